"""The Docker image and the compose stack on a real engine (ctest label `docker`).

Starts an engine when none answers (deploy/docker-engine.sh: private data root, base image
made with debootstrap when missing; never skipped: no engine is a failure), builds the four
images from the repository's Dockerfile, brings deploy/docker-compose.yml up with the demo
weights (the service and Prometheus alone; then the sidecar with `--profile video`, on its
image's own input, the test photos), and checks:
- the server image is at most 650 MB and SERVING at most 15 s after `docker run` (demo weights),
  its detector (the image's /opt/arcface/face-api, ARCFACE_DETECTOR) finding the photos' faces;
- its face gallery (SQLite on the image's volume /var/lib/arcface) outlives the container: a
  face enrolled in one container is identified by the next one on the same named volume;
- the service becomes `healthy` (the image's HEALTHCHECK, arcface-client health);
- Embed from the host through the published port, and from inside the video-analytics
  container over localhost (its shared network namespace), both equal the reference: the
  same inputs through arcface-server built on the host with the same demo weights;
- without the profile no sidecar runs; with it, it logs the faces the server's DetectStream
  finds in the image's photos, with identities, the same identity for the same face every loop;
- Prometheus (published port 9090) reports its scrape target arcface:8080 up;
- `docker-compose stop`: the server (PID 1 through the entry point) and the sidecar exit 0;
- `docker-compose down` leaves no container, network or volume of the project behind;
- deploy/docker-compose.postgres.yml: `postgres` (the Dockerfile's `postgres` target) healthy,
  the env file's password logs in over TCP and another does not; the two replicas on it share
  the gallery (enroll on A identified by B, forget on B gone on A); `stop` exits 0 for all.
The images it built are removed at the end; the base image and the build cache stay in the
engine's data root, so a second run on the same machine rebuilds only what changed.
"""

import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
import arcface_testlib as lib  # noqa: E402
from arcface_client import ArcFaceClient, ArcFaceError  # noqa: E402
from sidecar_events import faces  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE = os.path.join(ROOT, "deploy", "docker-engine.sh")
COMPOSE_FILE = os.path.join(ROOT, "deploy", "docker-compose.yml")
POSTGRES_COMPOSE_FILE = os.path.join(ROOT, "deploy", "docker-compose.postgres.yml")
DOCKER = "/usr/bin/docker"  # Debian's client, matching Debian's engine
# The CAs this machine trusts, given to the image's build (the Dockerfile's stage `models`): npm
# there reaches the registry through whatever this machine reaches it through.
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
PROJECT = f"arcfaceci{os.getpid()}"
TAG = f"ci-{os.getpid()}"
IMAGES = {  # compose variable -> (image, Dockerfile target)
    "ARCFACE_IMAGE": (f"arcface-service:{TAG}", None),
    "PROMETHEUS_IMAGE": (f"arcface-prometheus:{TAG}", "prometheus"),
    "VIDEO_ANALYTICS_IMAGE": (f"arcface-video-analytics:{TAG}", "video-analytics"),
    "POSTGRES_IMAGE": (f"arcface-postgres:{TAG}", "postgres"),
}


def run(args, env, timeout, check=True):
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited with {out.returncode}:\n"
                             f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


@pytest.fixture(scope="module")
def engine():
    """DOCKER_HOST of a running engine with debian:bookworm; stops the engine afterwards if
    this fixture started it. One such test at a time per machine (a lock), so that no run
    stops the engine under another one."""
    lock = open("/tmp/arcface-docker-test.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    env = dict(os.environ)
    out = subprocess.run([ENGINE, "start"], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"no Docker engine could be started:\n{out.stderr}")
    # "export DOCKER_HOST=... ARCFACE_DOCKERD_STARTED=0|1"
    for assignment in out.stdout.split()[1:]:
        key, value = assignment.split("=", 1)
        env[key] = value
    print(f"engine at {env['DOCKER_HOST']}, started by this test: {env['ARCFACE_DOCKERD_STARTED']}")
    try:
        run([ENGINE, "base"], env, timeout=600)
        yield env
    finally:
        run([ENGINE, "stop"], env, timeout=120)
        lock.close()


@pytest.fixture(scope="module")
def images(engine):
    env = dict(engine, DOCKER_BUILDKIT="1")
    built = []
    try:
        for image, target in IMAGES.values():
            started = time.monotonic()
            args = [DOCKER, "build", "--progress=plain", "-t", image, "-f",
                    os.path.join(ROOT, "Dockerfile")]
            if os.path.exists(HOST_CA_BUNDLE):  # npm in the `models` stage (a TLS proxy here)
                args += ["--secret", f"id=ca-certificates,src={HOST_CA_BUNDLE}"]
            if target:
                args += ["--target", target]
            built.append(image)
            run(args + [ROOT], env, timeout=1500)
            print(f"built {image} in {time.monotonic() - started:.0f} s")
        size = int(run([DOCKER, "image", "inspect", "-f", "{{.Size}}", built[0]], env, 60))
        print(f"{built[0]}: {size / 1e6:.0f} MB")
        yield built
    finally:
        run([DOCKER, "image", "rm", "--force", *built], engine, timeout=300, check=False)
        # Keep the build cache (dependency layers, ccache) for the next run, within bounds.
        run([DOCKER, "builder", "prune", "--force", "--keep-storage", "8gb"], engine,
            timeout=300, check=False)


def compose(env, *args, timeout=300, check=True, project=PROJECT, file=COMPOSE_FILE):
    return run(["docker-compose", "-p", project, "-f", file, *args], env, timeout, check)


def leftovers(env, project=PROJECT):
    """Containers, networks and volumes still labelled with the compose project."""
    label = f"label=com.docker.compose.project={project}"
    found = {}
    for kind, cmd in (("containers", ["ps", "-aq"]), ("networks", ["network", "ls", "-q"]),
                      ("volumes", ["volume", "ls", "-q"])):
        ids = run([DOCKER, *cmd, "--filter", label], env, 60).split()
        if ids:
            found[kind] = ids
    return found


@pytest.fixture(scope="module")
def stack(engine, images):
    ports = {"ARCFACE_GRPC_PORT": lib.free_port(), "ARCFACE_HTTP_PORT": lib.free_port(),
             "PROMETHEUS_PORT": lib.free_port()}
    # The demo's default model is dlib's trained one (threshold 0.9144; different people reach
    # 0.89 on dlib's johns): the sidecar's identity threshold is raised above that, as it was
    # for the random ArcFace of earlier demos, to tell the photos' faces apart.
    # No ARCFACE_VIDEO_INPUT: the sidecar reads its image's photos (the named volume).
    env = {k: v for k, v in engine.items() if k not in ("ARCFACE_VIDEO_INPUT", "COMPOSE_PROFILES")}
    env.update(ARCFACE_DEMO_WEIGHTS="true", VIDEO_THRESHOLD="0.95", VIDEO_FPS="4",
               **{k: str(v) for k, v in ports.items()},
               **{k: image for k, (image, _) in IMAGES.items()})
    try:
        compose(env, "up", "-d", "--no-build", timeout=600)
        running = sorted(compose(env, "ps", "--services", "--filter", "status=running").split())
        assert running == ["arcface", "prometheus"], running  # the sidecar waits for its profile
        env["COMPOSE_PROFILES"] = "video"  # from here on every command includes the sidecar
        compose(env, "up", "-d", "--no-build", timeout=600)
        yield env, ports
    finally:
        if leftovers(env):  # the test failed before its own `down`: show why
            print(compose(env, "logs", "--no-color", "--tail", "40", check=False)[-8000:])
        compose(env, "down", "--volumes", "--remove-orphans", check=False)


def container(env, service):
    ids = compose(env, "ps", "-q", service).split()
    assert len(ids) == 1, f"{service}: {ids}"
    return ids[0]


def health(env, service):
    return run([DOCKER, "inspect", "-f", "{{.State.Health.Status}}", container(env, service)],
               env, 60).strip()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """arcface-server built on the host, with the same demo weights as the image."""
    problem = lib.missing_environment("docker_compose_stack")
    if problem:
        pytest.fail(problem)
    server = lib.ServerProcess(lib.demo_args(), str(tmp_path_factory.mktemp("reference")),
                               name="reference").start()
    with ArcFaceClient(f"127.0.0.1:{server.grpc_port}", timeout=120) as client:
        yield client
    server.stop()


def inputs():
    """(name, image, box): a whole photo, a box in a group photo, a raw crop."""
    data = lib.TEST_DATA
    crop = np.random.default_rng(5).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    return [("single_face", os.path.join(data, "single_face.jpg"), None),
            ("a box in multi_face", os.path.join(data, "multi_face.jpg"), (370, 80, 520, 260)),
            ("raw crop", crop, None)]


def assert_same(got, ref, what):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape == (512,), what
    cos = lib.cosine(got, ref)
    diff = float(np.max(np.abs(got - ref)))
    assert cos >= 0.99999 and diff <= 1e-4 * np.linalg.norm(ref), (
        f"{what}: cosine {cos:.7f}, max|Δ| {diff:.3g}")


def test_image_contract(engine, images):
    """Non-root, the ports, the health check, the environment, and the entry point's answer
    when there are no weights."""
    image = images[0]
    config = json.loads(run([DOCKER, "image", "inspect", "-f", "{{json .Config}}", image],
                            engine, 60))
    assert config["User"] == "10001:10001", config["User"]
    assert set(config["ExposedPorts"]) == {"50051/tcp", "8080/tcp"}
    assert config["Healthcheck"]["Test"][:3] == ["CMD", "arcface-client", "health"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["ARCFACE_WEIGHTS"].startswith("/models/") and env["ARCFACE_DEMO_WEIGHTS"] == "false"
    assert int(env["OPENCV_IO_MAX_IMAGE_PIXELS"]) >= 40_000_000
    assert env["ARCFACE_GALLERY_STORE"] == "sqlite:/var/lib/arcface/gallery.db"
    assert env["ARCFACE_DETECTOR"] == "/opt/arcface/face-api", env
    files = run([DOCKER, "run", "--rm", image, "ls", env["ARCFACE_DETECTOR"]], engine, 120)
    assert any(f.endswith(".bin") for f in files.split()), files
    assert "/var/lib/arcface" in config["Volumes"], config["Volumes"]
    assert run([DOCKER, "run", "--rm", image, "id", "-u"], engine, 120).strip() == "10001"
    out = subprocess.run([DOCKER, "run", "--rm", image], env=engine, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "no readable weights at ARCFACE_WEIGHTS" in out.stderr, out
    out = subprocess.run([DOCKER, "run", "--rm", image, "--demo-weights", "--max-batch-size", "0"],
                         env=engine, capture_output=True, text=True, timeout=120)
    # Flags reach the server, and --demo-weights replaced the image's ARCFACE_WEIGHTS.
    assert out.returncode == 2 and "--max-batch-size" in out.stderr, out
    assert "give exactly one" not in out.stderr, out.stderr


# 580 MB before the face gallery; its libraries add 38 MB (OpenBLAS, FAISS's BLAS: 43 MB on
# disk; libpq, libpqxx, SQLite; FAISS itself is static in the server): 619 MB; the face
# detector's files (deploy/fetch-models.sh: face-api's networks) 13 MB.
MAX_IMAGE_BYTES = 650_000_000
MAX_START_TO_READY_S = 15.0


def test_image_lean(engine, images):
    """The image holds only what the binaries load (deploy/image-rootfs.sh), ≤ 650 MB (Debian's
    packages made it 1.37 GB), and serves with the demo weights ≤ 15 s after `docker run`,
    detecting faces with the files it carries."""
    image = images[0]
    size = int(run([DOCKER, "image", "inspect", "-f", "{{.Size}}", image], engine, 60))
    assert size <= MAX_IMAGE_BYTES, f"{image}: {size / 1e6:.0f} MB"
    port = lib.free_port()
    started = time.monotonic()
    cid = run([DOCKER, "run", "-d", "-p", f"127.0.0.1:{port}:50051",
               "-e", "ARCFACE_DEMO_WEIGHTS=true", image], engine, 120).strip()
    try:
        with ArcFaceClient(f"127.0.0.1:{port}", timeout=30) as client:
            ready = client.wait_ready(timeout=120)
            elapsed = time.monotonic() - started
            if not ready:
                logs = subprocess.run([DOCKER, "logs", "--tail", "40", cid], env=engine,
                                      capture_output=True, text=True, timeout=60)
                pytest.fail(f"not SERVING 120 s after docker run:\n{logs.stdout}{logs.stderr}")
            print(f"{image}: {size / 1e6:.0f} MB, SERVING {elapsed:.1f} s after docker run")
            assert elapsed <= MAX_START_TO_READY_S, f"SERVING after {elapsed:.1f} s"
            # The demo: dlib's trained model (128-d) by default, the random ArcFace by name.
            assert client.embed([np.zeros((112, 112, 3), np.uint8)]).shape == (1, 128)
            assert [m["name"] for m in client.list_models()] == ["dlib", "arcface-demo"]
            assert client.model_info()["detector"]["enabled"] is True
            found = client.detect(os.path.join(lib.TEST_DATA, "multi_face.jpg"))
            assert len(found.faces) >= 4, found.faces
    finally:
        run([DOCKER, "rm", "--force", cid], engine, 120, check=False)


def test_gallery_outlives_the_container(engine, images):
    """A named volume on /var/lib/arcface starts as the image's folder (owned by uid 10001):
    the server writes its SQLite gallery there, and a new container on it finds the face."""
    image = images[0]
    volume = f"arcfaceci{os.getpid()}-gallery"
    crop = np.random.default_rng(9).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    enrolled = None
    try:
        for attempt in ("enroll", "identify"):
            port = lib.free_port()
            cid = run([DOCKER, "run", "-d", "-p", f"127.0.0.1:{port}:50051", "-v",
                       f"{volume}:/var/lib/arcface", "-e", "ARCFACE_DEMO_WEIGHTS=true", image],
                      engine, 120).strip()
            try:
                with ArcFaceClient(f"127.0.0.1:{port}", timeout=60) as client:
                    assert client.wait_ready(timeout=120), run(
                        [DOCKER, "logs", "--tail", "40", cid], engine, 60, check=False)
                    if attempt == "enroll":
                        enrolled = client.enroll("in-the-volume", [crop])
                    else:
                        best = client.identify([crop]).best()[0]
                        assert (best.subject_id, best.face_id) == (
                            "in-the-volume", enrolled.face_ids[0]), best
                    info = client.gallery_info()
                    assert info.store == "sqlite:/var/lib/arcface/gallery.db", info
                    assert info.num_faces == 1, info
            finally:
                run([DOCKER, "rm", "--force", cid], engine, 120, check=False)
    finally:
        run([DOCKER, "volume", "rm", "--force", volume], engine, 60, check=False)


SIDECAR_EMBED = """
import json
from arcface_client import ArcFaceClient
with ArcFaceClient("localhost:50051", timeout=120, model="arcface-demo") as c:
    info = c.model_info()
    e = c.embed(["/input/single_face.jpg"])
print(json.dumps({"model_id": info["model_id"], "embedding": e[0].tolist()}))
"""


def test_compose_stack(engine, stack, reference):
    env, ports = stack
    lib.wait_until(lambda: health(env, "arcface") == "healthy", 240, interval=1,
                   what="the arcface container to be healthy")

    # Embed from the host through the published gRPC port.
    ref_info = reference.model_info()
    # The demo serves dlib's trained model by default; the random ArcFace is `arcface-demo`.
    with ArcFaceClient(f"127.0.0.1:{ports['ARCFACE_GRPC_PORT']}", timeout=120) as client:
        assert client.model_info()["model_id"].startswith("dlib-resnet@")
    with ArcFaceClient(f"127.0.0.1:{ports['ARCFACE_GRPC_PORT']}", timeout=120,
                       model="arcface-demo") as client:
        info = client.model_info()
        assert info["demo_weights"] and info["model_id"] == ref_info["model_id"], info
        for name, image, box in inputs():
            got = client.embed([image], boxes=[box])
            want = reference.embed([image], boxes=[box])
            assert_same(got[0], want[0], f"host -> container, {name}")
        # The gallery writes to its named volume under the read-only root.
        face = os.path.join(lib.TEST_DATA, "single_face.jpg")
        enrolled = client.enroll("compose", [face])
        assert client.identify([face]).best()[0].face_id == enrolled.face_ids[0]
        assert client.gallery_info().store == "sqlite:/var/lib/arcface/gallery.db"

    # Embed from inside the sidecar, over localhost in the shared network namespace.
    out = compose(env, "exec", "-T", "video-analytics", "python3", "-c", SIDECAR_EMBED)
    sidecar = json.loads(out.strip().splitlines()[-1])
    assert sidecar["model_id"] == ref_info["model_id"]
    want = reference.embed([os.path.join(lib.TEST_DATA, "single_face.jpg")])
    assert_same(sidecar["embedding"], want[0], "sidecar -> localhost:50051, single_face")

    # The sidecar's own loop over its image's photos: the faces the server's DetectStream
    # found, each face its own identity, kept on every pass.
    def faces_seen_twice():
        lines = compose(env, "logs", "--no-color", "video-analytics").splitlines()
        events = []
        for line in lines:
            text = line.split("|", 1)[-1].strip()
            if text.startswith("{"):
                events.append(json.loads(text))
        seen = faces(events)
        return seen if any(len(ids) >= 2 for ids in seen.values()) else None

    seen = lib.wait_until(faces_seen_twice, 240, interval=2, what="faces on a second pass")
    print(f"sidecar: {len(seen)} faces, {len({i for ids in seen.values() for i in ids})} "
          f"identities, {sum(len(ids) for ids in seen.values())} sightings")
    for key, identities in seen.items():
        assert len(set(identities)) == 1, f"{key} changed identity: {identities}"
    first = {ids[0] for ids in seen.values()}
    assert len(first) == len(seen), f"two faces share an identity: {seen}"
    assert sum(src == "multi_face.jpg" for src, _ in seen) >= 4, seen

    # Prometheus scrapes arcface:8080 over the compose network.
    query = urllib.parse.quote('up{job="arcface"}')
    url = f"http://127.0.0.1:{ports['PROMETHEUS_PORT']}/api/v1/query?query={query}"

    def target_up():
        try:
            status, body = lib.http_get(url)
        except OSError:  # not listening yet
            return None
        if status != 200:
            return None
        result = json.loads(body)["data"]["result"]
        return result if result and result[0]["value"][1] == "1" else None

    result = lib.wait_until(target_up, 120, interval=1, what="Prometheus to see arcface up")
    assert result[0]["metric"]["instance"] == "arcface:8080", result

    # SIGTERM (stop): the server drains and exits 0 as PID 1; the sidecar finishes its frame.
    ids = {name: container(env, name) for name in ("arcface", "video-analytics")}
    compose(env, "stop")
    for name, cid in ids.items():
        code = run([DOCKER, "inspect", "-f", "{{.State.ExitCode}}", cid], env, 60).strip()
        assert code == "0", f"{name} exited with {code} on SIGTERM"

    # down leaves nothing of the project behind.
    compose(env, "down", "--volumes", "--remove-orphans")
    assert leftovers(env) == {}


def test_postgres_stack_two_replicas_share_the_gallery(engine, images, tmp_path):
    project = f"{PROJECT}pg"
    env_file = tmp_path / "gallery.env"
    env_file.write_text(f"PGPASSWORD=ci-{os.getpid()}\n")
    ports = {"ARCFACE_GRPC_PORT": lib.free_port(), "ARCFACE_HTTP_PORT": lib.free_port(),
             "ARCFACE_B_GRPC_PORT": lib.free_port(), "ARCFACE_B_HTTP_PORT": lib.free_port()}
    env = dict(engine, ARCFACE_GALLERY_ENV_FILE=str(env_file), ARCFACE_DEMO_WEIGHTS="true",
               **{k: str(v) for k, v in ports.items()},
               **{k: image for k, (image, _) in IMAGES.items()})

    def pg(*args, **kw):
        return compose(env, *args, project=project, file=POSTGRES_COMPOSE_FILE, **kw)

    try:
        pg("up", "-d", "--no-build", "postgres", timeout=300)
        cid = pg("ps", "-q", "postgres").split()[0]
        lib.wait_until(lambda: run([DOCKER, "inspect", "-f", "{{.State.Health.Status}}", cid],
                                   env, 60).strip() == "healthy", 120, interval=1,
                       what="postgres to be healthy")
        uri = "postgres://arcface@127.0.0.1:5432/arcface"
        out = run([DOCKER, "exec", cid, "psql", "-XAt", uri, "-c", "select current_user"], env, 60)
        assert out.strip() == "arcface"
        wrong = subprocess.run([DOCKER, "exec", "-e", "PGPASSWORD=wrong", cid, "psql", "-XAt", uri,
                                "-c", "select 1"], env=env, capture_output=True, text=True,
                               timeout=60)
        assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr

        # The two replicas on it: an enrollment acknowledged by one is identified by the other
        # (within a second, the bound; polled for 5 s), a forget on the other is gone
        # on the first.
        pg("up", "-d", "--no-build", timeout=300)
        replicas = {name: pg("ps", "-q", name).split()[0] for name in ("arcface-a", "arcface-b")}
        for name, rid in replicas.items():
            lib.wait_until(lambda: run([DOCKER, "inspect", "-f", "{{.State.Health.Status}}",
                                        rid], env, 60).strip() == "healthy", 240, interval=1,
                           what=f"{name} to be healthy")
        crop = np.random.default_rng(11).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        a_addr = f"127.0.0.1:{env['ARCFACE_GRPC_PORT']}"
        b_addr = f"127.0.0.1:{env['ARCFACE_B_GRPC_PORT']}"
        with ArcFaceClient(a_addr, timeout=60) as a, ArcFaceClient(b_addr, timeout=60) as b:
            assert a.gallery_limits.store.startswith("postgres://")
            enrolled = a.enroll("shared", [crop])
            acked = time.monotonic()

            def on_b():
                try:
                    best = b.identify([crop]).best()[0]
                except ArcFaceError:  # NOT_FOUND until B has followed the new gallery
                    return None
                return best if best and best.face_id == enrolled.face_ids[0] else None

            lib.wait_until(on_b, 5, interval=0.02, what="B to identify A's enrollment")
            print(f"replica B identified A's enrollment {time.monotonic() - acked:.3f} s after "
                  "A acknowledged it")
            assert b.forget("shared").faces_removed == 1

            def gone_on_a():
                r = a.identify([crop]).results[0]
                return all(c.face_id != enrolled.face_ids[0] for c in r)

            lib.wait_until(gone_on_a, 5, interval=0.02, what="A to drop B's forget")
        pg("stop")
        for name, container_id in [("postgres", cid), *replicas.items()]:
            code = run([DOCKER, "inspect", "-f", "{{.State.ExitCode}}", container_id], env, 60)
            assert code.strip() == "0", f"{name} exited with {code.strip()} on SIGTERM"
    finally:
        pg("down", "--volumes", "--remove-orphans", check=False)
    assert leftovers(env, project) == {}
