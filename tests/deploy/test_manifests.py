"""The deployment files, offline: Kubernetes manifests through k8s_check (a schema-style
validator, see its docstring for why not kubectl), each of its rules shown to catch a broken
copy, and the compose files through `docker-compose config` (which needs no engine)."""

import copy
import glob
import os
import shutil
import subprocess

import pytest
import yaml

import k8s_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K8S = os.path.join(ROOT, "deploy", "k8s")
DEPLOY = os.path.join(ROOT, "deploy")


def manifests():
    return sorted(glob.glob(os.path.join(K8S, "*.yaml")))


def base_docs():
    paths = k8s_check.alternatives(manifests())[0]
    return k8s_check.load(paths)


def test_every_manifest_set_is_valid():
    sets = k8s_check.alternatives(manifests())
    assert len(sets) == 2, "the CPU set and the GPU variant"
    for paths in sets:
        assert k8s_check.check_documents(k8s_check.load(paths)) == [], paths


def test_kustomization_lists_existing_files_and_covers_the_core_kinds():
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        resources = yaml.safe_load(f)["resources"]
    for r in resources:
        assert os.path.exists(os.path.join(K8S, r)), r
    kinds = {d["kind"] for _, d in k8s_check.load([os.path.join(K8S, r) for r in resources])}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds


def test_deployment_uses_native_grpc_probes_and_drain_timing():
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        (_, doc), = k8s_check.load([os.path.join(K8S, name)])
        pod = doc["spec"]["template"]["spec"]
        c, = pod["containers"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == 50051, (name, probe)
        assert pod["terminationGracePeriodSeconds"] >= 5 + 30
    (_, gpu), = k8s_check.load([os.path.join(K8S, "deployment-gpu.yaml")])
    c, = gpu["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def find(docs, kind):
    for _, d in docs:
        if d["kind"] == kind:
            return d
    raise AssertionError(kind)


def arcface_container(docs):
    return find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


# Each breakage, applied to a fresh copy of the CPU set, must be reported with these words.
BREAKAGES = {
    "grace period below the drain": (
        lambda d: find(d, "Deployment")["spec"]["template"]["spec"].update(
            terminationGracePeriodSeconds=30), "terminationGracePeriodSeconds 30 <"),
    "longer drain timeout": (
        lambda d: arcface_container(d)["args"].__setitem__(1, "60s"), "drain timeout 60"),
    "no preStop": (lambda d: arcface_container(d).pop("lifecycle"), "no preStop"),
    "selector not matching the labels": (
        lambda d: find(d, "Deployment")["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}), "does not match the template's labels"),
    "service selecting nothing": (
        lambda d: find(d, "Service")["spec"]["selector"].update(tier="x"), "matches no Deployment"),
    "service not headless": (
        lambda d: find(d, "Service")["spec"].pop("clusterIP"), "must be headless"),
    "service target port missing": (
        lambda d: find(d, "Service")["spec"]["ports"][0].update(targetPort="grpcs"),
        "targetPort 'grpcs'"),
    "probe on another port": (
        lambda d: arcface_container(d)["readinessProbe"]["grpc"].update(port=50052),
        "gRPC port 50052"),
    "two handlers in a probe": (
        lambda d: arcface_container(d)["livenessProbe"].update(tcpSocket={"port": 8080}),
        "exactly one handler"),
    "misspelt probe field": (
        lambda d: arcface_container(d).update(readynessProbe={"grpc": {"port": 50051}}),
        "unknown field 'readynessProbe'"),
    "port as a string": (
        lambda d: arcface_container(d)["ports"][0].update(containerPort="50051"),
        "'containerPort' must be int"),
    "request above limit": (
        lambda d: arcface_container(d)["resources"]["requests"].update(memory="8Gi"),
        "request memory 8Gi exceeds"),
    "bad quantity": (
        lambda d: arcface_container(d)["resources"]["limits"].update(cpu="four"),
        "'four' is not a quantity"),
    "numeric env value": (
        lambda d: arcface_container(d)["env"][1].update(value=4), "must be a string"),
    "hpa targeting nothing": (
        lambda d: find(d, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"].update(name="x"),
        "names no manifest"),
    "hpa without cpu requests": (
        lambda d: arcface_container(d)["resources"]["requests"].pop("cpu"), "needs a CPU request"),
    "hpa bounds": (
        lambda d: find(d, "HorizontalPodAutoscaler")["spec"].update(minReplicas=20),
        "minReplicas 20"),
    "pdb with both bounds": (
        lambda d: find(d, "PodDisruptionBudget")["spec"].update(minAvailable=1),
        "exactly one of minAvailable"),
    "cuda without a gpu": (
        lambda d: arcface_container(d)["args"].__setitem__(3, "cuda"),
        "without an nvidia.com/gpu limit"),
    "wrong apiVersion": (
        lambda d: find(d, "HorizontalPodAutoscaler").update(apiVersion="autoscaling/v1"),
        "needs apiVersion autoscaling/v2"),
    "mount without volume": (
        lambda d: find(d, "Deployment")["spec"]["template"]["spec"]["volumes"].clear(),
        "volumeMount 'weights' has no volume"),
    "gallery password in the manifest": (
        lambda d: gallery_env(d).update(
            value="postgres://arcface:s3cret@db:5432/arcface", valueFrom=None) or
        gallery_env(d).pop("valueFrom"), "password in its gallery store URI"),
    "env with a value and a secret": (
        lambda d: gallery_env(d).update(value="x"), "exactly one of 'value' and 'valueFrom'"),
    "secret reference without a key": (
        lambda d: gallery_env(d)["valueFrom"]["secretKeyRef"].pop("key"),
        "secretKeyRef: missing 'key'"),
    "replicas sharing no gallery": (
        lambda d: arcface_container(d)["env"].remove(gallery_env(d)),
        "3 replicas on the SQLite gallery store"),
}


def gallery_env(docs):
    return next(e for e in arcface_container(docs)["env"] if e["name"] == "ARCFACE_GALLERY_STORE")


@pytest.mark.parametrize("name", sorted(BREAKAGES))
def test_validator_reports_each_breakage(name):
    docs = copy.deepcopy(base_docs())
    assert k8s_check.check_documents(docs) == []
    breakage, words = BREAKAGES[name]
    breakage(docs)
    problems = k8s_check.check_documents(docs)
    assert any(words in p for p in problems), f"{name}: {problems}"


def test_gallery_store_uri_comes_from_a_secret():
    for name in ("deployment.yaml", "deployment-gpu.yaml"):
        (_, doc), = k8s_check.load([os.path.join(K8S, name)])
        c, = doc["spec"]["template"]["spec"]["containers"]
        assert k8s_check.arg_value(c, "--gallery-store", "") is None, name
        entry, = [e for e in c["env"] if e["name"] == "ARCFACE_GALLERY_STORE"]
        assert entry["valueFrom"] == {"secretKeyRef": {"name": "arcface-gallery",
                                                       "key": "store-uri"}}, name
    # No Secret (with a password) is committed: the comment says how to make one.
    for path in manifests():
        assert all(d["kind"] != "Secret" for _, d in k8s_check.load([path])), path


def test_sidecar_pod_keeps_its_sqlite_gallery_on_a_writable_volume():
    (_, pod), = k8s_check.load([os.path.join(K8S, "pod-sidecar.yaml")])
    assert k8s_check.check_documents([("pod", pod)]) == []
    arcface = pod["spec"]["containers"][1]
    arcface["volumeMounts"] = [m for m in arcface["volumeMounts"] if m["name"] != "gallery"]
    problems = k8s_check.check_documents([("pod", pod)])
    assert any("read-only root: mount a writable volume at /var/lib/arcface" in p
               for p in problems), problems


def test_sidecar_pod_probe_on_loopback_grpc_is_reported():
    (_, pod), = k8s_check.load([os.path.join(K8S, "pod-sidecar.yaml")])
    assert k8s_check.check_documents([("pod", pod)]) == []
    c = pod["spec"]["containers"][1]
    c["readinessProbe"] = {"grpc": {"port": 50051}}
    c["ports"].append({"name": "grpc", "containerPort": 50051})
    problems = k8s_check.check_documents([("pod", pod)])
    assert any("kubelet cannot reach" in p for p in problems), problems


# --------------------------------------------------------------------------------------------
# docker-compose (the engine is not needed for `config`)


def compose_config(*files):
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose missing: run deploy/install-deps.sh"
    env = dict(os.environ, ARCFACE_VIDEO_INPUT="/tmp")
    args = [exe]
    for f in files:
        args += ["-f", os.path.join(DEPLOY, f)]
    out = subprocess.run(args + ["config"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


def test_compose_stack_is_consistent():
    cfg = compose_config("docker-compose.yml")
    s = cfg["services"]
    assert set(s) == {"arcface", "prometheus", "video-analytics"}
    arc = s["arcface"]
    assert {p["target"] for p in arc["ports"]} == {50051, 8080}
    assert arc["healthcheck"]["test"][:3] == ["CMD", "arcface-client", "health"]
    assert arc["restart"] == "unless-stopped"
    assert arc["read_only"] is True and arc["cap_drop"] == ["ALL"]
    assert arc["deploy"]["resources"]["limits"]["memory"]
    assert any(v.endswith(":/models:ro") for v in arc["volumes"]), arc["volumes"]
    # the gallery's SQLite file in a named volume
    assert arc["environment"]["ARCFACE_GALLERY_STORE"] == "sqlite:/var/lib/arcface/gallery.db"
    assert "gallery:/var/lib/arcface:rw" in arc["volumes"], arc["volumes"]
    assert "gallery" in cfg["volumes"]
    drain = k8s_check.duration_seconds(arc["environment"]["ARCFACE_DRAIN_TIMEOUT"])
    assert k8s_check.duration_seconds(arc["stop_grace_period"]) > drain
    va = s["video-analytics"]
    assert va["network_mode"] == "service:arcface"
    assert va["depends_on"]["arcface"]["condition"] == "service_healthy"
    assert va["environment"]["ARCFACE_SERVER"] == "localhost:50051"
    assert {p["target"] for p in s["prometheus"]["ports"]} == {9090}
    with open(os.path.join(DEPLOY, "prometheus", "prometheus.yml")) as f:
        prom = yaml.safe_load(f)
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == ["arcface:8080"]


def test_compose_gpu_override_reserves_a_gpu_and_runs_cuda():
    arc = compose_config("docker-compose.yml", "docker-compose.gpu.yml")["services"]["arcface"]
    devices = arc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert arc["command"] == ["--device", "cuda"]
    assert arc["deploy"]["resources"]["limits"]["memory"], "the base file's limits stay"


def test_compose_postgres_two_replicas_share_one_store(tmp_path, monkeypatch):
    env_file = tmp_path / "gallery.env"
    env_file.write_text("PGPASSWORD=from-the-env-file\n")
    monkeypatch.setenv("ARCFACE_GALLERY_ENV_FILE", str(env_file))
    cfg = compose_config("docker-compose.postgres.yml")
    s = cfg["services"]
    assert set(s) == {"postgres", "arcface-a", "arcface-b"}
    assert s["postgres"]["build"]["target"] == "postgres"
    assert "postgres-data:/var/lib/postgresql/data:rw" in s["postgres"]["volumes"]
    assert s["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    published = set()
    for name in ("arcface-a", "arcface-b"):
        arc = s[name]
        store = arc["environment"]["ARCFACE_GALLERY_STORE"]
        assert store == "postgres://arcface@postgres:5432/arcface", "no password in the URI"
        assert arc["environment"]["PGPASSWORD"] == "from-the-env-file"
        assert arc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert arc["read_only"] is True and arc["healthcheck"]["test"][1] == "arcface-client"
        published |= {p["published"] for p in arc["ports"]}
    assert s["postgres"]["environment"]["PGPASSWORD"] == "from-the-env-file"
    assert published == {50051, 8080, 50052, 8081}
    # The password is in no committed file.
    with open(os.path.join(DEPLOY, "docker-compose.postgres.yml")) as f:
        assert "PGPASSWORD" not in f.read().replace("gives PGPASSWORD", "")
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert "/deploy/gallery-postgres.env" in f.read().split()


def test_compose_needs_no_variable_and_runs_the_sidecar_on_request():
    """With no variable set, `config` works (it once demanded ARCFACE_VIDEO_INPUT); `up`
    starts the service and Prometheus, the sidecar only with `--profile video`, reading the
    image's test photos through the named volume unless ARCFACE_VIDEO_INPUT names a path."""
    exe = shutil.which("docker-compose")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ARCFACE_", "VIDEO_", "PROMETHEUS_"))}
    out = subprocess.run([exe, "-f", os.path.join(DEPLOY, "docker-compose.yml"), "config"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    s = cfg["services"]
    assert "profiles" not in s["arcface"] and "profiles" not in s["prometheus"]
    assert s["video-analytics"]["profiles"] == ["video"]
    assert s["video-analytics"]["volumes"] == ["video-samples:/input:ro"]
    assert "video-samples" in cfg["volumes"]
    assert s["video-analytics"]["environment"]["VIDEO_GALLERY"] == ""
    # The detector's files are the image's own (the Dockerfile's ENV names the same folder).
    detector = s["arcface"]["environment"]["ARCFACE_DETECTOR"]
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        assert f"ARCFACE_DETECTOR={detector}" in f.read().split(), detector
    given = compose_config("docker-compose.yml")["services"]["video-analytics"]
    assert given["volumes"] == ["/tmp:/input:ro"], given["volumes"]
