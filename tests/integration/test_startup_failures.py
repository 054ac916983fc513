"""Start-up failures: each ends the process with a message naming the problem and the exit
status of the Server's convention (server/app/server.h; 1: cannot listen, 2: a bad flag or
weights file), never a hang or a crash; and the outputs being unwritable is not one of them."""

import os
import socket
import subprocess

import numpy as np
import pytest

import arcface_testlib as lib


def run_server(args, timeout=180, **kw):
    """Runs arcface-server to its exit; returns (exit status, its output)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
    r = subprocess.run(lib.orphan_guarded([lib.SERVER_BIN, *args]), stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                       timeout=timeout, **kw)
    return r.returncode, r.stdout.decode("utf-8", "replace")


@pytest.fixture
def busy_port():
    """A port of 127.0.0.1 another socket is listening on."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    yield s.getsockname()[1]
    s.close()


def test_grpc_port_in_use(busy_port):
    rc, out = run_server(lib.demo_args("--listen", f"127.0.0.1:{busy_port}",
                                       "--http-listen", "127.0.0.1:0"))
    assert rc == 1, out
    assert f"cannot listen for gRPC on 127.0.0.1:{busy_port}" in out, out


def test_http_port_in_use(busy_port):
    rc, out = run_server(lib.demo_args("--listen", "127.0.0.1:0",
                                       "--http-listen", f"127.0.0.1:{busy_port}"))
    assert rc == 1, out
    assert f"--http-listen: cannot listen for HTTP on 127.0.0.1:{busy_port}" in out, out


def test_missing_weights_file(tmp_path):
    missing = str(tmp_path / "nowhere.safetensors")
    rc, out = run_server(["--weights", missing, "--listen", "127.0.0.1:0",
                          "--http-listen", "127.0.0.1:0"])
    assert rc == 2, out
    assert f"--weights: File does not exist: {missing}" in out, out


@pytest.mark.parametrize("name,make", [
    # The golden checkpoint cut after 100 kB: a valid header whose tensors reach past the end.
    ("truncated.safetensors", lambda golden: open(golden, "rb").read(100_000)),
    ("garbage.safetensors", lambda golden: b"\xff" * 64 + os.urandom(4096)),
    ("garbage.onnx", lambda golden: b"\x08\x07" + os.urandom(4096)),
    ("empty.safetensors", lambda golden: b""),
])
def test_corrupt_weights_file(tmp_path, goldens, name, make):
    path = tmp_path / name
    path.write_bytes(make(goldens.model_path("r50")))
    rc, out = run_server(["--weights", str(path), "--device", "cpu", "--listen", "127.0.0.1:0",
                          "--http-listen", "127.0.0.1:0"])
    assert rc == 2, out
    line = next((l for l in out.splitlines() if "--weights:" in l), None)
    assert line is not None and str(path) in line, out
    assert "SERVING" not in out


def test_bad_fault_injection_spec():
    rc, out = run_server(lib.demo_args("--test-fault-injection", "fail-batch=0,explode=1"))
    assert rc == 2, out
    assert "--test-fault-injection: rule 'fail-batch=0': expected KEY=N with N >= 1" in out, out
    rc, out = run_server(["--help"])
    assert rc == 0 and "--test-fault-injection" not in out  # a hidden test hook


def test_no_log_file_flag():
    """Logs go to stdout (text or JSON lines); there is no --log-file, and asking for one is a
    bad flag rather than something silently ignored."""
    rc, out = run_server(lib.demo_args("--log-file", "/tmp/arcface.log"))
    assert rc == 2, out
    assert "--log-file" in out, out


def test_unwritable_output_is_not_fatal(start_server, tmp_path):
    """stdout and stderr on a full device (/dev/full): log lines are lost, but the server starts,
    serves and drains as usual (exit 0): a logging failure never takes the service down."""
    server = lib.ServerProcess(lib.demo_args(), str(tmp_path), name="muted")
    server.log_path = "/dev/full"  # ServerProcess sends the output to its log file
    start_server.servers.append(server)  # stopped, and its exit status checked, at teardown
    server.start()
    crop = np.random.default_rng(0).integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8)
    assert len(server.embed([lib.raw_face(crop)], timeout=60).embeddings) == 1
