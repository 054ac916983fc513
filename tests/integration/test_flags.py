"""Command-line flags and their ARCFACE_* environment variables: a bad flag or value ends the
process with status 2 and a message naming it; good ones take effect."""

import json
import os
import re
import signal
import subprocess
import time

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc
from grpc_health_v1 import health_pb2, health_pb2_grpc

# The rest of the command line is valid, so only the named flag can be at fault.
BASE = ["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]

BAD = {
    "max_batch_size_0": (["--demo-weights", "--max-batch-size", "0"], {}, "max-batch-size"),
    "max_batch_size_not_a_number": (["--demo-weights", "--max-batch-size", "many"], {},
                                    "max-batch-size"),
    "device_tpu": (["--demo-weights", "--device", "tpu"], {}, "device"),
    # These tests run against the CPU build (Debian's libtorch): no CUDA path to fall back on.
    "device_cuda_on_cpu_build": (["--demo-weights", "--device", "cuda"], {},
                                 "device.*built without CUDA"),
    "precision_fp8": (["--demo-weights", "--precision", "fp8"], {}, "precision"),
    "unknown_flag": (["--demo-weights", "--no-such-flag", "1"], {}, "no-such-flag"),
    "log_format_xml": (["--demo-weights", "--log-format", "xml"], {}, "log-format"),
    "log_level_loud": (["--demo-weights", "--log-level", "loud"], {}, "log-level"),
    "queue_below_batch": (["--demo-weights", "--max-batch-size", "16", "--max-queue-size", "8"],
                          {}, "max-queue-size"),
    "max_faces_0": (["--demo-weights", "--max-faces-per-request", "0"], {},
                    "max-faces-per-request"),
    "listen_not_an_address": (["--demo-weights", "--listen", "not-an-address"], {}, "listen"),
    "tls_cert_without_key": (["--demo-weights", "--tls-cert", "/nonexistent/cert.pem"], {},
                             "tls"),
    "weights_missing_file": (["--weights", "/nonexistent/arcface_r50.safetensors"], {},
                             "weights"),
    "no_weights": ([], {}, "weights"),
    "env_max_batch_size_0": (["--demo-weights"], {"ARCFACE_MAX_BATCH_SIZE": "0"},
                             "MAX_BATCH_SIZE|max-batch-size"),
    "max_batches_in_flight_17": (["--demo-weights", "--max-batches-in-flight", "17"], {},
                                 "max-batches-in-flight"),
    "env_max_batches_in_flight_negative": (["--demo-weights"],
                                           {"ARCFACE_MAX_BATCHES_IN_FLIGHT": "-1"},
                                           "MAX_BATCHES_IN_FLIGHT|max-batches-in-flight"),
}


def clean_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
    env.update(extra)
    return env


# Under a sanitizer, one case of each way a start-up fails (a value CLI11 refuses, one from the
# environment, a device the build lacks, a missing file, TLS, no weights at all): the rest differ
# only in the flag's rule, which ServerFlags' C++ tests check in every lane, and each costs a
# sanitized process start (7 s under ASan).
SANITIZED_CASES = {"max_batch_size_not_a_number", "env_max_batch_size_0",
                   "device_cuda_on_cpu_build", "weights_missing_file", "tls_cert_without_key",
                   "no_weights"}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_flag_exits_2(case):
    if os.environ.get("ARCFACE_SANITIZE") and case not in SANITIZED_CASES:
        pytest.skip("a flag's own rule: ServerFlags' C++ tests check it under the sanitizers")
    args, env, pattern = BAD[case]
    base = [] if "--listen" in args else BASE[:2]
    cmd = [lib.SERVER_BIN] + base + BASE[2:] + args
    try:
        p = subprocess.run(lib.orphan_guarded(cmd), env=clean_env(env), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{case}: still running after 120 s (the bad value was accepted)")
    out = (p.stdout + p.stderr).decode(errors="replace")
    assert p.returncode == 2, f"{case}: exit {p.returncode}\n{out[-3000:]}"
    assert re.search(pattern, out), f"{case}: the message does not name {pattern!r}:\n{out[-3000:]}"


def test_environment_variables_configure(start_server):
    """The same settings through ARCFACE_* variables (flags win over them)."""
    server = start_server(["--demo-weights", "--threads", str(lib.THREADS), "--reflection",
                           "--max-queue-size", "99"],
                          name="env", env={
                              "ARCFACE_DEVICE": "cpu",
                              "ARCFACE_MAX_BATCH_SIZE": "3",
                              "ARCFACE_MAX_QUEUE_DELAY_US": "1234",
                              "ARCFACE_MAX_QUEUE_SIZE": "50",  # the flag wins
                              "ARCFACE_MAX_FACES_PER_REQUEST": "7",
                              "ARCFACE_MAX_MESSAGE_BYTES": str(8 << 20),
                              "ARCFACE_THREADS": "1",
                          })
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.demo_weights is True
    assert info.model_id.startswith("arcface-r50@")
    assert info.batching.max_batch_size == 3
    assert info.batching.max_queue_delay_us == 1234
    assert info.batching.max_queue_size == 99
    assert info.max_faces_per_request == 7
    assert info.max_message_bytes == 8 << 20
    # The message cap is enforced, not only reported.
    big = pb.EmbedRequest(faces=[pb.Face(image=pb.Image(encoded=b"\0" * (9 << 20)))])
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Embed(big, timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # --reflection: the reflection service lists the API (hand-encoded
    # ServerReflectionRequest{list_services: ""}, field 7).
    call = server.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    replies = list(call(iter([b"\x3a\x00"]), timeout=10))
    assert len(replies) == 1 and b"arcface.v1.FaceEmbedding" in replies[0]
    assert b"grpc.health.v1.Health" in replies[0]


def test_reflection_off_by_default(r50_server):
    call = r50_server.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(call(iter([b"\x3a\x00"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_not_serving_until_model_is_ready(tmp_path):
    """While the model loads, the ports are open but health says NOT_SERVING, /readyz is 503 and
    calls get UNAVAILABLE; then SERVING. Also: --log-format json writes one JSON object per
    line. (Fixed ports here, because the port file is only written once SERVING.)"""
    gport, hport = lib.free_port(), lib.free_port()
    log_path = tmp_path / "startup.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            lib.orphan_guarded([lib.SERVER_BIN, *lib.demo_args("--log-format", "json"),
                                "--listen", f"127.0.0.1:{gport}",
                                "--http-listen", f"127.0.0.1:{hport}"]),
            env=clean_env({}), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def http_up():
        assert proc.poll() is None, log_path.read_text()
        try:
            return lib.http_get(f"http://127.0.0.1:{hport}/readyz")[0]
        except OSError:
            return None

    # HTTP starts after the gRPC port listens; a channel made before that would sit in
    # reconnect backoff through the loading phase.
    try:
        lib.wait_until(http_up, 60, interval=0.02, what="the HTTP port")
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    channel = grpc.insecure_channel(f"127.0.0.1:{gport}")
    health = health_pb2_grpc.HealthStub(channel)
    stub = pb_grpc.FaceEmbeddingStub(channel)
    request = pb.EmbedRequest(faces=[lib.raw_face(np.zeros((lib.CROP, lib.CROP, 3), np.uint8))])
    seen_loading = 0
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "never SERVING"
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
            except grpc.RpcError as e:
                raise AssertionError(f"health Check failed while loading: {e}")
            if status == lib.SERVING:
                break
            assert status == lib.NOT_SERVING
            ready = lib.http_get(f"http://127.0.0.1:{hport}/readyz")[0]
            try:
                stub.Embed(request, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            # The model may have become ready between the three probes; only while health
            # still says NOT_SERVING afterwards do the other two have to agree.
            if health.Check(health_pb2.HealthCheckRequest(service=""),
                            timeout=2).status == lib.NOT_SERVING:
                assert ready == 503
                assert code == grpc.StatusCode.UNAVAILABLE
                seen_loading += 1
            time.sleep(0.02)
        assert seen_loading > 0, "the loading phase was never observed"
        assert lib.http_get(f"http://127.0.0.1:{hport}/readyz")[0] == 200
        assert len(stub.Embed(request, timeout=60).embeddings) == 1
    finally:
        channel.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, log_path.read_text()
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    assert len(lines) >= 3
    for line in lines:
        doc = json.loads(line)
        assert isinstance(doc, dict), line
    assert any("SERVING" in json.dumps(json.loads(line)) for line in lines)
