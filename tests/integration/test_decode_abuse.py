"""Decode work is bounded by the calls that asked for it: a call's preprocessing stops at its
deadline, calls take turns on the preprocessing pool (a small call is not stuck behind two calls
of many slow images), and a full pool refuses at once with the server's memory flat."""

import os
import re
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc

SIDE = 6000  # 36 MP, under the default 40 MP cap


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


@pytest.fixture(scope="module")
def slow_png():
    """A real, valid one-colour 6000x6000 RGB PNG: ~100 KB (~350 pixels a byte, under the
    deflate bound of 1032:1 that any PNG obeys), ~0.3-1 s of CPU to decode."""
    row = b"\x00" + bytes([120, 130, 140]) * SIDE
    ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 2, 0, 0, 0)
    idat = zlib.compress(row * SIDE, 9)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def slow_faces(png, n):
    return [pb.Face(image=pb.Image(encoded=png)) for _ in range(n)]


def small_face(seed):
    rng = np.random.default_rng(seed)
    return lib.raw_face(rng.integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8))


def slow_face_cost(server, png, callers=1):
    """What decoding one slow face costs this server now when `callers` calls each decode one at
    once: the best of two rounds of calls that decode it and then fail on an empty second face (so
    the model never runs); a round lasts until its slowest call ends. Two at once is what the
    pool's two threads do in the abuse scenario, and it can cost far more than one alone (the
    images are 108 MB each: under TSan on a shared machine, 6.5 times as much has been seen)."""

    def one_call():
        with pytest.raises(grpc.RpcError) as e:
            server.embed(slow_faces(png, 1) + [pb.Face()], timeout=120)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    best = None
    for _ in range(2):
        start = time.monotonic()
        threads = [threading.Thread(target=one_call) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best or 1e9, time.monotonic() - start)
    return best


def small_call_time(server):
    """A one-small-face call on an idle server (mostly the model)."""
    start = time.monotonic()
    server.embed([small_face(2)], timeout=60)
    return time.monotonic() - start


def ended(server, rpc, *codes):
    m = server.metrics()
    return sum(m.get("arcface_requests_total", 0, rpc=rpc, code=c) for c in codes)


def test_expired_calls_stop_decoding_and_a_small_call_is_not_stuck(start_server, slow_png):
    """The issue's scenario at small scale: two clients send 16 slow faces each with a 0.5 s
    deadline, a third one small face. Before the fix the small call waited for all 32 slow
    faces and the server decoded them all after the deadlines."""
    server = start_server(lib.demo_args("--preprocess-threads", "2"), name="abuse")
    cost = slow_face_cost(server, slow_png)
    pair = slow_face_cost(server, slow_png, callers=2)
    alone = small_call_time(server)
    decoded_before = server.metrics().get("arcface_preprocess_faces_total", 0)
    heavy = pb.EmbedRequest(faces=slow_faces(slow_png, 16))
    codes = [None, None]

    def heavy_client(i):
        channel = server.make_channel()
        try:
            pb_grpc.FaceEmbeddingStub(channel).Embed(heavy, timeout=0.5)
            codes[i] = grpc.StatusCode.OK
        except grpc.RpcError as e:
            codes[i] = e.code()
        finally:
            channel.close()

    heavy_start = time.monotonic()
    threads = [threading.Thread(target=heavy_client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.1)  # both heavy calls are on the pool (loopback, 2 MB each)
    small_start = time.monotonic()
    reply = server.embed([small_face(1)], timeout=60)
    small_wait = time.monotonic() - small_start
    assert len(reply.embeddings) == 1
    for t in threads:
        t.join()
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
    lib.wait_until(lambda: ended(server, "Embed", "DEADLINE_EXCEEDED", "CANCELLED") == 2, 120,
                   interval=0.01, what="the server ends both heavy calls")
    server_done = time.monotonic() - heavy_start
    m = server.metrics()
    decoded = m.get("arcface_preprocess_faces_total", 0) - decoded_before - 1
    print(f"slow face {cost:.3f} s alone, {pair:.3f} s two at once; small call alone "
          f"{alone:.3f} s, among the heavy calls {small_wait:.3f} s; the server ended the "
          f"heavy calls {server_done:.3f} s after they began, {decoded:.0f} of 32 faces decoded")
    # About one slow face per pool thread (decoding side by side) before its turn; the margins
    # absorb the small call's model run on the same cores and a loaded machine, and stay far
    # below the ~16 × cost waited before the fix.
    assert small_wait < alone + 2 * pair + 1.0
    # The deadline, then the face each pool thread was decoding; before the fix: all 32 faces.
    assert server_done < 0.5 + 3 * pair + alone + 1.0
    assert decoded <= 2 * (2 + 0.5 / cost) + 2
    assert m.get("arcface_preprocess_aborted_total", 0, reason="deadline") == 2
    assert m.get("arcface_requests_total", 0, rpc="Embed", code="DEADLINE_EXCEEDED") == 2


def server_rss_bytes(server):
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# Slow faces per admitted call: enough that the pool stays full while the refusals run.
ADMITTED = 12


def test_full_pool_refuses_at_once_with_flat_memory(start_server, slow_png):
    """--preprocess-queue 24 (faces) with one thread: two admitted calls of 12 slow faces fill it;
    calls beyond are refused at once, naming the pool, and the server's RSS stays flat over
    1400 refused 1.2 MB requests (280 under a sanitizer); the admitted calls then complete."""
    server = start_server(lib.demo_args("--preprocess-threads", "1",
                                        "--preprocess-queue", str(2 * ADMITTED)), name="full")
    admitted = [server.stub.Embed.future(pb.EmbedRequest(faces=slow_faces(slow_png, ADMITTED)),
                                         timeout=300) for _ in range(2)]
    lib.wait_until(
        lambda: server.metrics().get("arcface_preprocess_admitted_faces") == 2 * ADMITTED, 30,
        interval=0.01, what="the pool is full")
    assert server.metrics().get("arcface_preprocess_calls") == 2
    refused = pb.EmbedRequest(faces=[small_face(i) for i in range(32)])  # 1.2 MB
    slowest = [0.0]
    lock = threading.Lock()

    def refuse(calls):
        channel = server.make_channel()
        stub = pb_grpc.FaceEmbeddingStub(channel)
        try:
            for _ in range(calls):
                start = time.monotonic()
                with pytest.raises(grpc.RpcError) as e:
                    stub.Embed(refused, timeout=30)
                took = time.monotonic() - start
                with lock:
                    slowest[0] = max(slowest[0], took)
                assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                # The admitted calls' faces leave the pool as they are decoded (slowly, but a
                # sanitized server refuses slowly too), so the admitted count may fall.
                assert re.search(r"preprocessing pool full \(\d+ of 24 face crops admitted, "
                                 r"this call needs 32; --preprocess-queue\)",
                                 e.value.details()), e.value.details()
        finally:
            channel.close()

    def burst(calls_each):
        threads = [threading.Thread(target=refuse, args=(calls_each,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # The admitted calls hold the pool only while their slow faces decode (about 24 × 0.3 s);
    # a sanitized server refuses several times slower, so it gets fewer refusals in that time.
    each = 10 if os.environ.get("ARCFACE_SANITIZE") else 50
    burst(each)  # warm-up: gRPC's buffers and malloc's arenas reach their working size
    rss = []
    for _ in range(6):
        burst(each)
        rss.append(server_rss_bytes(server))
    m = server.metrics()
    print("server RSS (MiB) every 200 refused calls:", [round(r / 2**20, 1) for r in rss],
          f"slowest refusal {slowest[0]:.3f} s")
    assert m.get("arcface_rejected_total", 0, reason="preprocess_queue_full") == 7 * 4 * each
    assert m.get("arcface_preprocess_calls") == 2  # the admitted calls are still there
    # RSS swings by what malloc keeps cached from the requests of the last burst (up to ~200 MB
    # here, up and down) but does not climb: the later samples stay within the band of the
    # earlier ones. Keeping each refused request would add 240 MB a sample.
    # Under ThreadSanitizer RSS also grows with the shadow memory of every new address the
    # allocator hands out, so only the refusals' accounting and latency are checked there. Under
    # AddressSanitizer freed blocks wait in its quarantine (256 MiB by default) before they are
    # reused, so RSS climbs by up to that much over the run (171 MiB seen), then stays.
    sanitizer = os.environ.get("ARCFACE_SANITIZE", "")
    if sanitizer.startswith("address"):
        assert max(rss) - rss[0] < (256 + 16) * 2**20, rss
    elif sanitizer != "thread":
        assert min(rss[3:]) < max(rss[:3]) + 16 * 2**20, rss
    assert slowest[0] < 2.0
    for f in admitted:
        assert len(f.result().embeddings) == ADMITTED
