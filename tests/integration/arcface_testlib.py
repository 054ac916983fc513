"""Helpers for the integration tests: the server process, goldens, metrics, certificates.

Everything here talks to real parts: an arcface-server process on 127.0.0.1, gRPC channels from
Debian's python3-grpcio, photos read in place from ARCFACE_TEST_DATA (default: tests/data), the
golden embeddings of tests/reference, openssl for certificates. Every wait is bounded.
"""

import hashlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import grpc
import numpy as np

from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc
from grpc_health_v1 import health_pb2, health_pb2_grpc

SERVER_BIN = os.environ.get("ARCFACE_SERVER_BIN", "")
GOLDEN_DIR = os.environ.get("ARCFACE_GOLDEN_DIR", "")
TEST_DATA = os.environ.get("ARCFACE_TEST_DATA") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def missing_environment(ctest_name):
    """None when ctest's environment is there, else a message saying what to set."""
    missing = [k for k in ("ARCFACE_SERVER_BIN", "ARCFACE_GOLDEN_DIR")
               if not os.environ.get(k)]
    if missing:
        return f"set {', '.join(missing)} (ctest sets them: ctest -R {ctest_name})"
    return None

SERVICE_NAME = "arcface.v1.FaceEmbedding"
EMBEDDING_DIM = 512
CROP = 112

# The shared r50 golden server's settings (conftest.py); tests read them from here.
R50_MAX_BATCH = 8
R50_QUEUE_DELAY_US = 5000
R50_MAX_FACES = 64
R50_MAX_PIXELS = 5_000_000  # above the largest photo used (2560x1912 = 4,894,720)
THREADS = 2


def demo_args(*extra):
    """Flags of a small dedicated server with seeded random (demo) weights."""
    return ["--demo-weights", "--device", "cpu", "--threads", str(THREADS), *extra]


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Lets the tests send (and receive) messages beyond gRPC's 4 MiB client default, so the
# server's own limit is what a large message meets.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Polls predicate() until it returns a truthy value; returns it, or raises after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def orphan_guarded(cmd):
    """`cmd` run through util-linux's setpriv, which has the child get SIGTERM when the test
    process dies (say, killed by a ctest timeout), so no server or Prometheus outlives the run.
    Not a Popen preexec_fn: that makes Python fork(), where grpcio's pre-fork handler joins gRPC's
    own threads and can wait for ever (seen: a test process stuck in fork() for 12 minutes);
    without one, Python starts the child with vfork, which runs no fork handlers."""
    return ["setpriv", "--pdeathsig", "TERM", "--", *cmd]


def free_port():
    """A port that was free on 127.0.0.1 a moment ago (for programs without a port file)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Goldens


class Goldens:
    """build/golden/goldens.json (schema: tests/reference/README.md)."""

    def __init__(self, golden_dir, test_data):
        self.dir = golden_dir
        self.test_data = test_data
        with open(os.path.join(golden_dir, "goldens.json")) as f:
            self.doc = json.load(f)
        self.models = self.doc["models"]
        self.cases = {c["name"]: c for c in self.doc["cases"]}

    def model_path(self, model):
        return os.path.join(self.dir, self.models[model]["file"])

    def cases_of(self, model):
        return [c for c in self.doc["cases"] if c["model"] == model]

    def image_path(self, case):
        # goldens.json records absolute paths; read the same file from ARCFACE_TEST_DATA.
        path = case["input"]["path"]
        local = os.path.join(self.test_data, os.path.basename(path))
        return local if os.path.exists(local) else path

    def crop_u8(self, case):
        """The 112×112×3 RGB uint8 crop of a crop case."""
        with open(os.path.join(self.dir, case["input"]["file"]), "rb") as f:
            data = f.read()
        assert len(data) == CROP * CROP * 3, case["name"]
        return np.frombuffer(data, np.uint8).reshape(CROP, CROP, 3)

    def face(self, case):
        """The Face message for a golden case: raw RGB8 crop, or the encoded file with its
        box or landmarks."""
        inp = case["input"]
        if inp["kind"] == "crop":
            return raw_face(self.crop_u8(case))
        with open(self.image_path(case), "rb") as f:
            face = pb.Face(image=pb.Image(encoded=f.read()))
        if "box" in inp:
            x0, y0, x1, y1 = inp["box"]
            face.box.CopyFrom(pb.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1))
        if "landmarks" in inp:
            face.landmarks.extend(pb.Point(x=x, y=y) for x, y in inp["landmarks"])
        return face

    @staticmethod
    def embedding(case):
        return np.asarray(case["embedding"], np.float64)


def raw_face(pixels, fmt=pb.RGB8):
    """A Face with a RawImage of an HxWx3 (RGB8/BGR8) or HxW (GRAY8) uint8 array."""
    pixels = np.ascontiguousarray(pixels, np.uint8)
    h, w = pixels.shape[:2]
    return pb.Face(image=pb.Image(raw=pb.RawImage(width=w, height=h, format=fmt,
                                                  data=pixels.tobytes())))


def cosine(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_embedding(emb, ref, tolerance, what=""):
    """Asserts that an Embedding message matches a reference vector within the golden
    tolerance: "exact" (cosine >= 0.99999 and max|Δ| <= 1e-4·‖ref‖) or "resampled"
    (cosine >= 0.9999). Also checks the message's own shape and its norm field."""
    got = np.asarray(emb.values, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == (EMBEDDING_DIM,), f"{what}: {got.shape}"
    assert np.all(np.isfinite(got)), what
    raw_norm = float(np.linalg.norm(got))
    assert abs(emb.norm - raw_norm) <= 1e-5 * raw_norm, (
        f"{what}: norm field {emb.norm} vs {raw_norm}")
    c = cosine(got, ref)
    ref_norm = float(np.linalg.norm(ref))
    if tolerance == "exact":
        max_diff = float(np.max(np.abs(got - ref)))
        assert c >= 0.99999 and max_diff <= 1e-4 * ref_norm, (
            f"{what}: cosine {c:.7f}, max|Δ| {max_diff:.3g} > {1e-4 * ref_norm:.3g}")
    elif tolerance == "resampled":
        assert c >= 0.9999, f"{what}: cosine {c:.7f} < 0.9999"
        assert abs(raw_norm - ref_norm) <= 0.01 * ref_norm, f"{what}: norm {raw_norm} vs {ref_norm}"
    else:
        raise ValueError(tolerance)


# --------------------------------------------------------------------------------------------
# Prometheus text format

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(value):
    return value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def parse_labels(text):
    labels = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError(f"bad label set: {text!r}")
        labels[m.group(1)] = _unescape(m.group(2))
        pos = m.end()
    return labels


def _parse_value(text):
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    return float(text)


class Metrics:
    """One scrape of /metrics: samples keyed by (name, frozenset(labels))."""

    def __init__(self, text):
        self.text = text
        self.samples = {}
        self.types = {}
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split()
                if len(parts) >= 4 and parts[1] == "TYPE":
                    self.types[parts[2]] = parts[3]
                continue
            m = _SAMPLE.match(line)
            if not m:
                raise ValueError(f"unparsable metrics line: {line!r}")
            labels = parse_labels(m.group(3)) if m.group(3) else {}
            key = (m.group(1), frozenset(labels.items()))
            assert key not in self.samples, f"duplicate sample {line!r}"
            self.samples[key] = _parse_value(m.group(4))

    def series(self, name):
        """[(labels dict, value)] of every sample with this name."""
        return [(dict(k[1]), v) for k, v in self.samples.items() if k[0] == name]

    def get(self, name, default=None, **labels):
        """The sample with exactly these labels; `default` if absent (a counter not yet
        created), or AssertionError when default is None."""
        value = self.samples.get((name, frozenset(labels.items())))
        if value is None:
            if default is None:
                raise AssertionError(f"no sample {name}{labels} in /metrics:\n{self.text}")
            return default
        return value

    def sum(self, name, **labels):
        """Sum over the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for k, v in self.samples.items() if k[0] == name and want <= k[1])

    def histogram(self, name, **labels):
        """{"buckets": {le(float): cumulative count}, "sum": s, "count": n}."""
        want = set(labels.items())
        buckets = {}
        for (n, lab), v in self.samples.items():
            if n == name + "_bucket":
                d = dict(lab)
                le = d.pop("le")
                if set(d.items()) == want:
                    buckets[_parse_value(le)] = v
        return {
            "buckets": buckets,
            "sum": self.get(name + "_sum", 0.0, **labels),
            "count": self.get(name + "_count", 0.0, **labels),
        }


def http_get(url, timeout=5.0):
    """(status, body bytes) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------------------------
# The server process


class ServerProcess:
    """An arcface-server process on 127.0.0.1 with ephemeral ports.

    The ports come from the server itself: it binds port 0 and, once SERVING, writes the bound
    ports into --port-file. Output goes to a log file; failures quote its tail.
    """

    def __init__(self, args, workdir, name="server", tls=None, env=None):
        self.args = list(args)
        self.workdir = workdir
        self.name = name
        self.tls = tls  # None, or dict(root=bytes, key=bytes|None, cert=bytes|None)
        self.env = env
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.port_file = os.path.join(workdir, f"{name}.ports")
        self.proc = None
        self.grpc_port = None
        self.http_port = None
        self.channel = None
        self.stub = None
        self.health = None
        self._log = None

    # -- life cycle ---------------------------------------------------------------------

    def command(self):
        return [SERVER_BIN, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
                "--port-file", self.port_file] + self.args

    def start(self, timeout=240.0):
        assert SERVER_BIN and os.access(SERVER_BIN, os.X_OK), (
            f"ARCFACE_SERVER_BIN={SERVER_BIN!r} is not an executable")
        if os.path.exists(self.port_file):
            os.unlink(self.port_file)
        self._log = open(self.log_path, "wb")
        env = dict(os.environ)
        # Only the flags given here configure the server (and its OpenMP waiting: its own
        # defaults unless a test sets them).
        for k in list(env):
            if (k.startswith("ARCFACE_") and k not in ("ARCFACE_SERVER_BIN",)) or k in (
                    "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_CORETYPE"):
                del env[k]
        env.update(self.env or {})
        self.proc = subprocess.Popen(orphan_guarded(self.command()), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            self._wait_serving(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def _read_ports(self):
        try:
            with open(self.port_file) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        ports = parse_port_file(text)
        return ports

    def _wait_serving(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before "
                                     f"serving:\n{self.log_tail()}")
            if self.channel is None:
                ports = self._read_ports()
                if ports:
                    self.grpc_port, self.http_port = ports
                    self.channel = self.make_channel()
                    self.stub = pb_grpc.FaceEmbeddingStub(self.channel)
                    self.health = health_pb2_grpc.HealthStub(self.channel)
            if self.channel is not None:
                try:
                    r = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if r.status == SERVING:
                        return
                except grpc.RpcError:
                    pass
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} not SERVING after {timeout} s:\n"
                                     f"{self.log_tail()}")
            time.sleep(0.1)

    def make_channel(self, tls="default"):
        """A new channel to the gRPC port: with this server's client TLS settings by default,
        tls=None for plaintext, or a dict(root, key, cert)."""
        tls = self.tls if tls == "default" else tls
        target = f"127.0.0.1:{self.grpc_port}"
        if tls is None:
            return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        creds = grpc.ssl_channel_credentials(root_certificates=tls.get("root"),
                                             private_key=tls.get("key"),
                                             certificate_chain=tls.get("cert"))
        return grpc.secure_channel(target, creds, options=CHANNEL_OPTIONS)

    def terminate(self, timeout=60.0):
        """SIGTERM, then waits for the exit; returns the exit status (kills after timeout)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"{self.name} did not exit within {timeout} s of SIGTERM:\n"
                                     f"{self.log_tail()}")
        self._close()
        return self.proc.returncode

    def stop(self, timeout=60.0):
        """SIGTERM and assert a clean exit (status 0)."""
        rc = self.terminate(timeout)
        assert rc == 0, f"{self.name} exited with {rc} after SIGTERM:\n{self.log_tail()}"

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._close()

    def _close(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- helpers ------------------------------------------------------------------------

    def log_tail(self, n=60):
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return f"--- {self.log_path} (last {n} lines) ---\n" + "\n".join(lines[-n:])

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    @property
    def http_base(self):
        return f"http://127.0.0.1:{self.http_port}"

    def metrics(self):
        status, body = http_get(self.http_base + "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return Metrics(body.decode())

    def health_status(self, service="", timeout=2.0):
        return self.health.Check(health_pb2.HealthCheckRequest(service=service),
                                 timeout=timeout).status

    def embed(self, faces, timeout=60.0, **kw):
        return self.stub.Embed(pb.EmbedRequest(faces=faces, **kw), timeout=timeout)


class ServerSet:
    """Starts servers (ServerProcess, or the subclass given) and stops them all at teardown,
    asserting exit status 0; a server a test killed on purpose is forget()-ten first."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.servers = []

    def __call__(self, args, name="server", server_class=ServerProcess, **kw):
        server = server_class(args, self.workdir, name=name, **kw)
        self.servers.append(server)
        return server.start()

    def forget(self, server):
        self.servers.remove(server)

    def stop_all(self):
        errors = []
        for server in reversed(self.servers):
            if server.proc is None:
                continue
            try:
                server.stop()
            except AssertionError as e:
                errors.append(str(e))
        assert not errors, "\n\n".join(errors)


def parse_port_file(text):
    """(grpc_port, http_port) from the server's --port-file ("<grpc port> <http port>\\n",
    written whole once SERVING), or None while it is not there yet."""
    fields = text.split()
    if len(fields) != 2:
        return None
    return int(fields[0]), int(fields[1])


# --------------------------------------------------------------------------------------------
# Certificates (openssl, at test time)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def make_ca(workdir, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=arcface test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=workdir)
    return os.path.join(workdir, f"{name}.pem"), os.path.join(workdir, f"{name}.key")


def make_leaf(workdir, name, ca, usage, san=None):
    """A key and certificate signed by `ca` (name of make_ca's files); usage: serverAuth or
    clientAuth. Returns (cert path, key path)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=arcface test {name}",
             cwd=workdir)
    ext = ["basicConstraints=critical,CA:FALSE",
           "keyUsage=critical,digitalSignature,keyEncipherment",
           f"extendedKeyUsage={usage}"]
    if san:
        ext.append(f"subjectAltName={san}")
    with open(os.path.join(workdir, f"{name}.ext"), "w") as f:
        f.write("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
             cwd=workdir)
    return os.path.join(workdir, f"{name}.pem"), os.path.join(workdir, f"{name}.key")


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def make_pki(workdir):
    """A test CA with a server certificate for 127.0.0.1/localhost and a client certificate, and
    a second CA (`other`) with a client certificate (`rogue`) the first CA never signed. Returns
    file paths by name (ca, other, server_cert, server_key, client_cert, client_key, rogue_cert,
    rogue_key)."""
    ca, _ = make_ca(workdir, "ca")
    other, _ = make_ca(workdir, "other")
    server_cert, server_key = make_leaf(workdir, "server", "ca", "serverAuth",
                                        san="IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = make_leaf(workdir, "client", "ca", "clientAuth")
    rogue_cert, rogue_key = make_leaf(workdir, "rogue", "other", "clientAuth")
    return dict(ca=ca, other=other, server_cert=server_cert, server_key=server_key,
                client_cert=client_cert, client_key=client_key, rogue_cert=rogue_cert,
                rogue_key=rogue_key)


# --------------------------------------------------------------------------------------------
# The face detector (Detect, DetectStream)

# The detector's model files (deploy/fetch-models.sh); ctest sets it for the suites that detect.
DETECTOR_MODELS = os.environ.get("ARCFACE_DETECTOR_MODELS", "")


def detector_args():
    """The server flags of the face detector: `--detector ARCFACE_DETECTOR_MODELS`. A missing
    variable fails the test that needs it (never a skip)."""
    if not DETECTOR_MODELS or not os.path.isdir(DETECTOR_MODELS):
        raise AssertionError(
            f"ARCFACE_DETECTOR_MODELS={DETECTOR_MODELS!r} is not a folder of the detector's model "
            "files (deploy/fetch-models.sh DIR fetches them; ctest sets the variable)")
    return ["--detector", DETECTOR_MODELS]
