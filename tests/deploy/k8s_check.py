"""Offline checks of the Kubernetes manifests in deploy/k8s (no cluster, no kubectl).

Debian 12 has no kubectl recent enough to know native gRPC probes (its kubernetes-client is
1.20), and `kubectl --dry-run=client` still wants a cluster for its API discovery, so this is a
schema-style validator: the fields each kind needs, with their types; no unknown keys in the
parts written by hand (containers, probes, pod specs), so a misspelt field is caught; and the
consistency the server needs across files:
- a probe's port is one of its container's ports (by number or name); one handler per probe;
- terminationGracePeriodSeconds >= the preStop sleep + the server's --drain-timeout;
- selectors match the pod template's labels (Deployment, Service, PodDisruptionBudget);
- the Service is headless (clusterIP: None) and its target ports exist in the pods;
- the HPA targets an existing Deployment whose containers request CPU;
- resource quantities parse, and requests do not exceed limits;
- a GPU Deployment asks for nvidia.com/gpu and runs --device cuda;
- env entries have one source (value or valueFrom; a secretKeyRef names its Secret and key);
- the server's gallery store (--gallery-store, ARCFACE_GALLERY_STORE, else the image's
  sqlite:/var/lib/arcface/gallery.db): no password written in a manifest (a Secret holds it);
  SQLite only in a single pod (replicas cannot share its file), on a writable volume when the
  root file system is read-only.

    python3 tests/deploy/k8s_check.py deploy/k8s/*.yaml     # prints problems, exit 1 if any
"""

import re
import sys

import yaml

API = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "Pod": "v1",
    "PersistentVolumeClaim": "v1",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}

POD_SPEC_KEYS = {"containers", "initContainers", "volumes", "terminationGracePeriodSeconds",
                 "securityContext", "tolerations", "nodeSelector", "affinity",
                 "serviceAccountName", "topologySpreadConstraints", "priorityClassName"}
CONTAINER_KEYS = {"name", "image", "imagePullPolicy", "command", "args", "env", "envFrom",
                  "ports", "resources", "startupProbe", "readinessProbe", "livenessProbe",
                  "lifecycle", "securityContext", "volumeMounts", "workingDir"}
PROBE_KEYS = {"grpc", "httpGet", "tcpSocket", "exec", "initialDelaySeconds", "periodSeconds",
              "timeoutSeconds", "failureThreshold", "successThreshold",
              "terminationGracePeriodSeconds"}
PROBE_HANDLERS = ("grpc", "httpGet", "tcpSocket", "exec")
# The image's default store (Dockerfile: ARCFACE_GALLERY_STORE).
IMAGE_GALLERY_STORE = "sqlite:/var/lib/arcface/gallery.db"
CREDENTIALS_IN_URI = re.compile(r"^[a-z]+://[^/@:]*:[^/@]*@")
QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
SCALE = {None: 1, "m": 1e-3, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9,
         "Gi": 2**30, "T": 1e12, "Ti": 2**40}


def quantity(value):
    """A resource quantity ("500m", "2Gi", 4) as a float, or None when it does not parse."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    m = QUANTITY.match(str(value))
    return float(m.group(1)) * SCALE[m.group(2)] if m else None


def duration_seconds(text):
    """The server's --drain-timeout syntax: plain seconds, or 30s / 2m / 1m30s / 500ms."""
    text = str(text).strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.findall(r"([0-9.]+)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    unit = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * unit[u] for n, u in parts)


class Checker:
    def __init__(self):
        self.problems = []

    def bad(self, where, what):
        self.problems.append(f"{where}: {what}")

    def need(self, obj, key, typ, where):
        """obj[key] of type typ, else a problem and None."""
        if not isinstance(obj, dict) or key not in obj:
            self.bad(where, f"missing '{key}'")
            return None
        value = obj[key]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            self.bad(where, f"'{key}' must be {names}, got {type(value).__name__}")
            return None
        return value

    def unknown(self, obj, allowed, where):
        for key in sorted(set(obj) - allowed):
            self.bad(where, f"unknown field '{key}'")

    # -- parts ----------------------------------------------------------------------------

    def container(self, c, where):
        if not isinstance(c, dict):
            self.bad(where, "a container must be a mapping")
            return
        self.unknown(c, CONTAINER_KEYS, where)
        name = self.need(c, "name", str, where)
        where = f"{where} '{name}'"
        self.need(c, "image", str, where)
        ports = {}
        for i, p in enumerate(c.get("ports") or []):
            number = self.need(p, "containerPort", int, f"{where} ports[{i}]")
            if number is not None and not 0 < number < 65536:
                self.bad(f"{where} ports[{i}]", f"containerPort {number} out of range")
            if "name" in p:
                ports[p["name"]] = number
            ports[number] = number
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                self.probe(c[kind], ports, c, f"{where} {kind}")
        self.resources(c.get("resources", {}), f"{where} resources")
        for key in ("args", "command"):
            if key in c and not all(isinstance(a, str) for a in c[key]):
                self.bad(where, f"every item of '{key}' must be a string")
        for i, e in enumerate(c.get("env") or []):
            self.need(e, "name", str, f"{where} env[{i}]")
            if "value" in e and not isinstance(e["value"], str):
                self.bad(f"{where} env[{i}]", "'value' must be a string (quote numbers)")
            if ("value" in e) == ("valueFrom" in e):
                self.bad(f"{where} env[{i}]", "needs exactly one of 'value' and 'valueFrom'")
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if "valueFrom" in e and ref is not None:
                for key in ("name", "key"):
                    self.need(ref, key, str, f"{where} env[{i}] secretKeyRef")
        return ports

    def probe(self, probe, ports, container, where):
        if not isinstance(probe, dict):
            self.bad(where, "must be a mapping")
            return
        self.unknown(probe, PROBE_KEYS, where)
        handlers = [h for h in PROBE_HANDLERS if h in probe]
        if len(handlers) != 1:
            self.bad(where, f"needs exactly one handler of {PROBE_HANDLERS}, has {handlers}")
            return
        handler = probe[handlers[0]]
        if handlers[0] == "grpc":
            port = self.need(handler, "port", int, f"{where} grpc")
            if port is not None and port not in ports:
                self.bad(where, f"gRPC port {port} is not a port of the container")
            listen = arg_value(container, "--listen", "ARCFACE_LISTEN")
            if listen and listen.startswith("127.0.0.1"):
                self.bad(where, f"gRPC listens on {listen}, which the kubelet cannot reach")
        elif handlers[0] in ("httpGet", "tcpSocket"):
            port = handler.get("port") if isinstance(handler, dict) else None
            if port not in ports:
                self.bad(where, f"port {port!r} is not a port of the container")
        for key in PROBE_KEYS - set(PROBE_HANDLERS):
            if key in probe:
                v = probe[key]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    self.bad(where, f"'{key}' must be a non-negative integer")

    def resources(self, res, where):
        requests = res.get("requests") or {}
        limits = res.get("limits") or {}
        for part, values in (("requests", requests), ("limits", limits)):
            for name, value in values.items():
                if quantity(value) is None:
                    self.bad(where, f"{part}.{name} '{value}' is not a quantity")
        for name, value in requests.items():
            if name in limits and None not in (quantity(value), quantity(limits[name])):
                if quantity(value) > quantity(limits[name]):
                    self.bad(where, f"request {name} {value} exceeds its limit {limits[name]}")
        for name in set(requests) | set(limits):
            if "/" in name and requests.get(name, limits.get(name)) != limits.get(name):
                self.bad(where, f"extended resource {name}: request must equal the limit")

    def pod_spec(self, spec, where, replicas=1):
        """Checks a pod spec (of `replicas` pods); returns {container name: ports}."""
        if not isinstance(spec, dict):
            self.bad(where, "pod spec must be a mapping")
            return {}
        self.unknown(spec, POD_SPEC_KEYS, where)
        containers = self.need(spec, "containers", list, where) or []
        if not containers:
            self.bad(where, "no containers")
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        out = {}
        for i, c in enumerate(containers):
            out[c.get("name") if isinstance(c, dict) else i] = self.container(
                c, f"{where} containers[{i}]") or {}
            for m in (c.get("volumeMounts") or []) if isinstance(c, dict) else []:
                if m.get("name") not in volumes:
                    self.bad(f"{where} containers[{i}]", f"volumeMount '{m.get('name')}' has no volume")
        self.drain(spec, containers, where)
        self.gallery(spec, containers, where, replicas)
        return out

    def gallery(self, spec, containers, where, replicas):
        """The server's gallery store: where its password and its SQLite file may live."""
        for c in containers:
            if not isinstance(c, dict) or "arcface-service" not in str(c.get("image", "")):
                continue
            entry = next((e for e in c.get("env") or []
                          if e.get("name") == "ARCFACE_GALLERY_STORE"), None)
            store = arg_value(c, "--gallery-store", "ARCFACE_GALLERY_STORE")
            if store is None and entry is not None:
                continue  # from a Secret or another source: nothing written here to check
            store = store or IMAGE_GALLERY_STORE
            if CREDENTIALS_IN_URI.match(store):
                self.bad(where, f"container '{c.get('name')}' has a password in its gallery store "
                                "URI; take ARCFACE_GALLERY_STORE from a Secret (secretKeyRef)")
            if not store.startswith("sqlite:"):
                continue
            if replicas > 1:
                self.bad(where, f"{replicas} replicas on the SQLite gallery store {store}: each "
                                "would keep its own gallery; use postgres:// from a Secret")
            folder = store[len("sqlite:"):].rsplit("/", 1)[0] or "/"
            mounted = any(folder == m.get("mountPath", "").rstrip("/") and not m.get("readOnly")
                          for m in c.get("volumeMounts") or [])
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") and not mounted:
                self.bad(where, f"container '{c.get('name')}' keeps its gallery in {store} on a "
                                f"read-only root: mount a writable volume at {folder}")

    def drain(self, spec, containers, where):
        """terminationGracePeriodSeconds covers preStop + the server's drain timeout."""
        for c in containers:
            if not isinstance(c, dict) or "arcface-service" not in str(c.get("image", "")):
                continue
            drain = arg_value(c, "--drain-timeout", "ARCFACE_DRAIN_TIMEOUT") or "30s"
            seconds = duration_seconds(drain)
            if seconds is None:
                self.bad(where, f"--drain-timeout '{drain}' does not parse")
                continue
            pre = c.get("lifecycle", {}).get("preStop")
            if not pre:
                self.bad(where, f"container '{c.get('name')}' has no preStop hook")
                pre_s = 0.0
            else:
                cmd = pre.get("exec", {}).get("command", [])
                pre_s = float(cmd[1]) if len(cmd) == 2 and cmd[0] == "sleep" else 0.0
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if not isinstance(grace, int) or grace < pre_s + seconds:
                self.bad(where, f"terminationGracePeriodSeconds {grace} < preStop {pre_s:g} s + "
                                f"drain timeout {seconds:g} s")

    # -- kinds ----------------------------------------------------------------------------

    def run(self, docs):
        """docs: [(file name, document)]."""
        deployments, services = {}, []
        for name, doc in docs:
            where = name
            if not isinstance(doc, dict):
                self.bad(where, "a manifest must be a mapping")
                continue
            kind = self.need(doc, "kind", str, where)
            if kind not in API:
                self.bad(where, f"unexpected kind {kind!r}")
                continue
            if doc.get("apiVersion") != API[kind]:
                self.bad(where, f"{kind} needs apiVersion {API[kind]}, has {doc.get('apiVersion')!r}")
            if kind == "Kustomization":
                continue
            meta = self.need(doc, "metadata", dict, where) or {}
            obj = self.need(meta, "name", str, f"{where} metadata")
            where = f"{name} {kind}/{obj}"
            spec = self.need(doc, "spec", dict, where) or {}
            if kind == "Deployment":
                deployments[(name, obj)] = self.deployment(spec, where)
            elif kind == "Pod":
                self.pod_spec(spec, f"{where} spec")
            elif kind == "Service":
                services.append((where, spec))
            elif kind == "PodDisruptionBudget":
                services.append((where, {"selector": (spec.get("selector") or {}).get("matchLabels"),
                                         "_pdb": spec}))
            elif kind == "HorizontalPodAutoscaler":
                self.hpa(spec, where, deployments, docs)
            elif kind == "PersistentVolumeClaim":
                self.need(spec, "accessModes", list, where)
                storage = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
                if quantity(storage) is None:
                    self.bad(where, "resources.requests.storage is missing or not a quantity")
        for where, spec in services:
            self.selects(where, spec, deployments)
        return self.problems

    def deployment(self, spec, where):
        replicas = self.need(spec, "replicas", int, where)
        selector = (self.need(spec, "selector", dict, where) or {}).get("matchLabels")
        template = self.need(spec, "template", dict, where) or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        if not selector or not isinstance(selector, dict):
            self.bad(where, "selector.matchLabels missing")
        elif any(labels.get(k) != v for k, v in selector.items()):
            self.bad(where, f"selector {selector} does not match the template's labels {labels}")
        pod = template.get("spec") or {}
        ports = self.pod_spec(pod, f"{where} template",
                              replicas if isinstance(replicas, int) else 1)
        for c in pod.get("containers") or []:
            limits = (c.get("resources") or {}).get("limits") or {}
            if "nvidia.com/gpu" in limits:
                if arg_value(c, "--device", "ARCFACE_DEVICE") not in ("cuda", "cuda:0"):
                    self.bad(where, "asks for a GPU but does not run --device cuda")
            elif arg_value(c, "--device", "ARCFACE_DEVICE") in ("cuda", "cuda:0"):
                self.bad(where, "runs --device cuda without an nvidia.com/gpu limit")
        return {"labels": labels, "ports": ports, "replicas": replicas}

    def selects(self, where, spec, deployments):
        selector = spec.get("selector")
        if not isinstance(selector, dict) or not selector:
            self.bad(where, "selector missing")
            return
        matched = [d for d in deployments.values()
                   if all(d["labels"].get(k) == v for k, v in selector.items())]
        if not matched:
            self.bad(where, f"selector {selector} matches no Deployment's pods")
            return
        if "_pdb" in spec:
            pdb = spec["_pdb"]
            if ("minAvailable" in pdb) == ("maxUnavailable" in pdb):
                self.bad(where, "give exactly one of minAvailable, maxUnavailable")
            for d in matched:
                if isinstance(pdb.get("minAvailable"), int) and d["replicas"] is not None \
                        and pdb["minAvailable"] >= d["replicas"]:
                    self.bad(where, "minAvailable leaves no pod evictable")
            return
        if spec.get("clusterIP") != "None":
            self.bad(where, "must be headless (clusterIP: None) for client-side round_robin")
        for i, p in enumerate(spec.get("ports") or []):
            self.need(p, "port", int, f"{where} ports[{i}]")
            target = p.get("targetPort", p.get("port"))
            for d in matched:
                if not any(target in ports for ports in d["ports"].values()):
                    self.bad(f"{where} ports[{i}]", f"targetPort {target!r} is no container port")

    def hpa(self, spec, where, deployments, docs):
        ref = self.need(spec, "scaleTargetRef", dict, where) or {}
        lo = spec.get("minReplicas", 1)
        hi = self.need(spec, "maxReplicas", int, where)
        if hi is not None and (not isinstance(lo, int) or not 1 <= lo <= hi):
            self.bad(where, f"minReplicas {lo} must be in 1..maxReplicas {hi}")
        target = [d for n, d in docs if isinstance(d, dict) and d.get("kind") == ref.get("kind")
                  and (d.get("metadata") or {}).get("name") == ref.get("name")
                  and d.get("apiVersion") == ref.get("apiVersion")]
        if not target:
            self.bad(where, f"scaleTargetRef {ref} names no manifest here")
            return
        for m in spec.get("metrics") or []:
            if m.get("type") == "Resource" and (m.get("resource") or {}).get("name") == "cpu":
                pod = target[0]["spec"]["template"]["spec"]
                for c in pod.get("containers", []):
                    if "cpu" not in ((c.get("resources") or {}).get("requests") or {}):
                        self.bad(where, f"CPU utilisation needs a CPU request in '{c.get('name')}'")


def arg_value(container, flag, env):
    """The value of a server flag in a container: from args (`--flag v` or `--flag=v`), else
    from its ARCFACE_* environment variable, else None."""
    args = list(container.get("args") or [])
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    for e in container.get("env") or []:
        if e.get("name") == env:
            return e.get("value")
    return None


def check_documents(docs):
    """Problems (strings) of [(file name, document)] taken together; [] when all is well."""
    return Checker().run(docs)


def load(paths):
    docs = []
    for path in paths:
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc is not None:
                    docs.append((path.rsplit("/", 1)[-1], doc))
    return docs


def main(argv):
    paths = argv[1:]
    # Two Deployments named alike (CPU and GPU variants) are alternatives: check each set.
    problems = []
    for variant in alternatives(paths):
        problems += check_documents(load(variant))
    for p in dict.fromkeys(problems):
        print(p)
    return 1 if problems else 0


def alternatives(paths):
    """The GPU Deployment replaces the CPU one: one file set per Deployment variant."""
    gpu = [p for p in paths if p.endswith("-gpu.yaml")]
    base = [p for p in paths if p not in gpu]
    return [base] + [[p for p in base if not p.endswith("deployment.yaml")] + [g] for g in gpu]


if __name__ == "__main__":
    sys.exit(main(sys.argv))
