"""Command-line flags and their ARCFACE_* environment variables: a bad flag or value ends the
process with status 2 and a message naming it; good ones take effect."""

import os
import re
import subprocess

import grpc
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

# The rest of the command line is valid, so only the named flag can be at fault.
BASE = ["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]

BAD = {
    "max_batch_size_0": (["--demo-weights", "--max-batch-size", "0"], {}, "max-batch-size"),
    "max_batch_size_not_a_number": (["--demo-weights", "--max-batch-size", "many"], {},
                                    "max-batch-size"),
    "device_tpu": (["--demo-weights", "--device", "tpu"], {}, "device"),
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
}


def clean_env(extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
    env.update(extra)
    return env


@pytest.mark.parametrize("case", list(BAD))
def test_bad_flag_exits_2(case):
    args, env, pattern = BAD[case]
    base = [] if "--listen" in args else BASE[:2]
    cmd = [lib.SERVER_BIN] + base + BASE[2:] + args
    try:
        p = subprocess.run(cmd, env=clean_env(env), stdin=subprocess.DEVNULL,
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
