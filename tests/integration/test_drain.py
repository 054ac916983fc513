"""SIGTERM: health turns NOT_SERVING, new calls get UNAVAILABLE, every accepted call completes
OK, and the process exits 0 within the drain timeout."""

import os
import signal
import subprocess
import threading
import time

import grpc
import numpy as np

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc
from grpc_health_v1 import health_pb2

DRAIN_TIMEOUT_S = 20


def crop(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8)


def embed_request(seed, rid=""):
    return pb.EmbedRequest(faces=[lib.raw_face(crop(seed))], request_id=rid)


class HealthWatch:
    """Health.Watch("") on its own thread, recording every status it is sent."""

    def __init__(self, server):
        self.statuses = []
        self.end = None
        self._call = server.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=120)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for r in self._call:
                self.statuses.append(r.status)
        except grpc.RpcError as e:
            self.end = e.code()

    def close(self):
        self._call.cancel()
        self._thread.join(timeout=10)


def check_or_none(server):
    try:
        return server.health_status("", timeout=2)
    except grpc.RpcError:
        return None


def test_sigterm_finishes_accepted_calls(start_server, tmp_path):
    """Deterministic: the model is held, so accepted calls are still queued when SIGTERM
    arrives; they must all complete OK after the hold is released."""
    hold = str(tmp_path / "hold")
    server = start_server(lib.demo_args(
        "--max-batch-size", "1", "--max-queue-delay-us", "0",
        "--drain-timeout", str(DRAIN_TIMEOUT_S), "--test-hold-model-file", hold),
        name="drain-held")
    watch = HealthWatch(server)
    gate = threading.Event()  # holds the stream below open (not half-closed)
    try:
        lib.wait_until(lambda: lib.SERVING in watch.statuses, 10, what="Watch: SERVING")
        open(hold, "w").close()
        first = server.stub.Embed.future(embed_request(0, "first"), timeout=120)
        lib.wait_until(lambda: server.metrics().get("arcface_batches_held") == 1, 20,
                       what="the held batch")
        queued = [server.stub.Embed.future(embed_request(i, f"q{i}"), timeout=120)
                  for i in (1, 2, 3)]
        lib.wait_until(lambda: server.metrics().get("arcface_queue_depth") == 3, 20,
                       what="3 queued")
        # An open stream (not half-closed) with one message queued.
        def stream_requests():
            yield embed_request(4, "s0")
            gate.wait(timeout=60)  # keeps the stream open until the test ends

        stream = server.stub.EmbedStream(stream_requests(), timeout=120)
        stream_out = []

        def read_stream():
            try:
                for r in stream:
                    stream_out.append(r)
            except grpc.RpcError as e:
                stream_out.append(e.code())

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        lib.wait_until(lambda: server.metrics().get("arcface_queue_depth") == 4, 20,
                       what="the stream's message queued")

        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        # Draining: NOT_SERVING on Check and Watch, /readyz not ready, /healthz still live.
        lib.wait_until(lambda: check_or_none(server) == lib.NOT_SERVING, 10,
                       what="Check: NOT_SERVING")
        lib.wait_until(lambda: lib.NOT_SERVING in watch.statuses, 10, what="Watch: NOT_SERVING")
        assert watch.statuses.index(lib.SERVING) < watch.statuses.index(lib.NOT_SERVING)
        assert lib.http_get(server.http_base + "/readyz")[0] == 503
        assert lib.http_get(server.http_base + "/healthz")[0] == 200
        # New calls are refused.
        for rpc, req in [("Embed", embed_request(9, "late")),
                         ("Compare", pb.CompareRequest(
                             queries=[pb.Probe(embedding=pb.Embedding(values=[1.0] * 512))],
                             references=[pb.Probe(embedding=pb.Embedding(values=[1.0] * 512))]))]:
            try:
                getattr(server.stub, rpc)(req, timeout=10)
                raise AssertionError(f"{rpc} accepted while draining")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE, (rpc, e.code(), e.details())
        # The accepted calls are still waiting for the held model; the process waits for them.
        assert not first.done() and not any(f.done() for f in queued)
        assert server.proc.poll() is None
        os.unlink(hold)
        for f in [first] + queued:
            resp = f.result(timeout=60)
            assert len(resp.embeddings) == 1
        # The stream answers the message it had read, then ends with UNAVAILABLE.
        reader.join(timeout=60)
        assert not reader.is_alive()
        assert len(stream_out) == 2, stream_out
        assert stream_out[0].request_id == "s0" and len(stream_out[0].embeddings) == 1
        assert not stream_out[0].HasField("error")
        assert stream_out[1] == grpc.StatusCode.UNAVAILABLE
        rc = server.proc.wait(timeout=DRAIN_TIMEOUT_S)
        assert rc == 0, server.log_tail()
        assert time.monotonic() - sigterm_at < DRAIN_TIMEOUT_S
    finally:
        if os.path.exists(hold):
            os.unlink(hold)
        gate.set()
        watch.close()
    server.stop()  # already exited: closes the channel and checks the status once more


def test_sigterm_under_load(start_server):
    """16 threads loop requests; SIGTERM mid-load: each call is OK (with its correct embedding)
    or UNAVAILABLE, each thread sees UNAVAILABLE once the drain began, exit 0 in time."""
    server = start_server(lib.demo_args(
        "--max-batch-size", "4", "--max-queue-delay-us", "2000",
        "--drain-timeout", str(DRAIN_TIMEOUT_S)), name="drain-load")
    n = 16
    refs = [np.asarray(server.embed([lib.raw_face(crop(100 + i))]).embeddings[0].values)
            for i in range(n)]
    results = [[] for _ in range(n)]
    ok_count = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def loop(i):
        channel = server.make_channel()
        stub = pb_grpc.FaceEmbeddingStub(channel)
        try:
            for k in range(500):  # bounded: the drain ends each loop long before
                try:
                    resp = stub.Embed(embed_request(100 + i, f"{i}-{k}"), timeout=60)
                    results[i].append(("OK", resp))
                    with lock:
                        ok_count[0] += 1
                except grpc.RpcError as e:
                    results[i].append((e.code().name, e.details()))
                    if e.code() == grpc.StatusCode.UNAVAILABLE or stop.is_set():
                        return
        finally:
            channel.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    try:
        lib.wait_until(lambda: ok_count[0] >= 2 * n, 60, what="load going")
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(timeout=DRAIN_TIMEOUT_S + 5)
        exit_after = time.monotonic() - sigterm_at
    except (AssertionError, subprocess.TimeoutExpired):
        stop.set()
        raise
    finally:
        for t in threads:
            t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert rc == 0, server.log_tail()
    assert exit_after < DRAIN_TIMEOUT_S, f"exit took {exit_after:.1f} s"
    for i, rs in enumerate(results):
        codes = [c for c, _ in rs]
        assert set(codes) <= {"OK", "UNAVAILABLE"}, f"thread {i}: {rs[-3:]}"
        assert codes[-1] == "UNAVAILABLE" and codes.count("UNAVAILABLE") == 1, codes
        for c, resp in rs:
            if c == "OK":
                got = np.asarray(resp.embeddings[0].values)
                assert np.max(np.abs(got - refs[i])) <= 1e-5 * np.linalg.norm(refs[i])
    server.stop()
