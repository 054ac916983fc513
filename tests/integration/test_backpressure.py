"""Backpressure and dropped calls, made exact by the --test-hold-model-file hook: while the file
exists the batch thread holds the batch it formed before the model (arcface_batches_held = 1),
so the queue fills deterministically."""

import os

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

QUEUE = 8
EXTRA = 5


@pytest.fixture(scope="module")
def held_server(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("held"))
    hold = os.path.join(workdir, "hold")
    server = lib.ServerProcess(lib.demo_args(
        "--max-batch-size", "1", "--max-queue-size", str(QUEUE), "--max-queue-delay-us", "0",
        "--test-hold-model-file", hold), workdir, name="held")
    server.start()
    server.hold_file = hold
    yield server
    if os.path.exists(hold):
        os.unlink(hold)
    server.stop()


def crop_face(seed):
    rng = np.random.default_rng(seed)
    return lib.raw_face(rng.integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8))


def request(seed, rid):
    return pb.EmbedRequest(faces=[crop_face(seed)], request_id=rid)


class Hold:
    """Holds the model while in the `with` block; releases it on the way out, whatever
    happened, so the server never stays blocked."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        open(self.server.hold_file, "w").close()
        return self

    def __exit__(self, *exc):
        if os.path.exists(self.server.hold_file):
            os.unlink(self.server.hold_file)

    def release(self):
        os.unlink(self.server.hold_file)


def gauge(server, name):
    return server.metrics().get(name)


def wait_gauge(server, name, value, timeout=20):
    lib.wait_until(lambda: gauge(server, name) == value, timeout,
                   what=f"{name} == {value}")


def plug(server):
    """Sends one request and waits until its batch is held before the model."""
    future = server.stub.Embed.future(request(1000, "plug"), timeout=120)
    wait_gauge(server, "arcface_batches_held", 1)
    assert gauge(server, "arcface_queue_depth") == 0
    return future


def test_queue_full_is_exact(held_server):
    server = held_server
    before = server.metrics()
    with Hold(server) as hold:
        first = plug(server)
        futures = [server.stub.Embed.future(request(i, f"r{i}"), timeout=120)
                   for i in range(QUEUE + EXTRA)]
        # Exactly EXTRA calls come back at once, all RESOURCE_EXHAUSTED; the model is held, so
        # nothing can have succeeded yet.
        lib.wait_until(lambda: sum(f.done() for f in futures) >= EXTRA, 20,
                       what=f"{EXTRA} rejections")
        done = [f for f in futures if f.done()]
        assert len(done) == EXTRA
        for f in done:
            assert f.exception() is not None
            assert f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f.details()
        assert gauge(server, "arcface_queue_depth") == QUEUE
        assert not first.done()
        m = server.metrics()
        assert (m.get("arcface_rejected_total", 0.0, reason="queue_full")
                - before.get("arcface_rejected_total", 0.0, reason="queue_full")) == EXTRA
        hold.release()
        first.result(timeout=60)
        accepted = [f for f in futures if f not in done]
        for f in accepted:
            resp = f.result(timeout=60)
            assert len(resp.embeddings) == 1
    assert len(accepted) == QUEUE
    # The batcher reports a batch to /metrics just after its calls got their answers.
    after = lib.wait_until(
        lambda: (lambda m: m if m.get("arcface_faces_total") - before.get("arcface_faces_total")
                 >= QUEUE + 1 and m.histogram("arcface_batch_size")["count"]
                 - before.histogram("arcface_batch_size")["count"] >= QUEUE + 1 else None)(
            server.metrics()), 5, what="faces and batches counted")
    assert after.get("arcface_faces_total") - before.get("arcface_faces_total") == QUEUE + 1
    assert (after.histogram("arcface_batch_size")["count"]
            - before.histogram("arcface_batch_size")["count"]) == QUEUE + 1
    assert (after.get("arcface_rejected_total", 0.0, reason="queue_full")
            - before.get("arcface_rejected_total", 0.0, reason="queue_full")) == EXTRA
    assert (after.get("arcface_requests_total", 0.0, rpc="Embed", code="RESOURCE_EXHAUSTED")
            - before.get("arcface_requests_total", 0.0, rpc="Embed",
                         code="RESOURCE_EXHAUSTED")) == EXTRA
    assert after.get("arcface_queue_depth") == 0


def test_expired_and_cancelled_never_run(held_server):
    server = held_server
    before = server.metrics()
    with Hold(server) as hold:
        first = plug(server)
        # Expires while queued behind the held batch.
        expiring = server.stub.Embed.future(request(2000, "expiring"), timeout=2.0)
        wait_gauge(server, "arcface_queue_depth", 1, timeout=1.5)
        with pytest.raises(grpc.FutureTimeoutError):
            expiring.result(timeout=0)
        assert expiring.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's own deadline for it falls a hair after the client's; from then on the
        # batcher's sweep takes it out of the queue while the model is still held.
        wait_gauge(server, "arcface_queue_depth", 0, timeout=5)
        # Cancelled by its client while queued.
        cancelled = server.stub.Embed.future(request(3000, "cancelled"), timeout=120)
        wait_gauge(server, "arcface_queue_depth", 1)
        assert cancelled.cancel()
        assert cancelled.cancelled()
        # The next cancellation poll (every 20 ms by default) frees its room, still held.
        wait_gauge(server, "arcface_queue_depth", 0, timeout=5)
        assert gauge(server, "arcface_batches_held") == 1
        assert not first.done()
        hold.release()
        assert len(first.result(timeout=60).embeddings) == 1
    # One more call: the batch thread went past the dropped ones.
    later = server.stub.Embed(request(4000, "later"), timeout=60)
    assert len(later.embeddings) == 1

    def settled():
        m = server.metrics()
        dropped = (m.get("arcface_dropped_total", 0.0, reason="expired")
                   + m.get("arcface_dropped_total", 0.0, reason="cancelled")
                   - before.get("arcface_dropped_total", 0.0, reason="expired")
                   - before.get("arcface_dropped_total", 0.0, reason="cancelled"))
        # The batcher reports a batch to /metrics just after its calls got their answers.
        batches = (m.histogram("arcface_batch_size")["count"]
                   - before.histogram("arcface_batch_size")["count"])
        return m if dropped >= 2 and batches >= 2 else None

    after = lib.wait_until(settled, 10, what="both dropped, two batches reported")
    d = lambda name, **kw: after.get(name, 0.0, **kw) - before.get(name, 0.0, **kw)  # noqa: E731
    # The client's deadline passes a hair before the server's, and the client then cancels the
    # call: whichever the batcher notices first (its deadline sweep or its cancellation poll)
    # names the expiring call's drop. The cancelled one is always a cancellation.
    cancelled = d("arcface_dropped_total", reason="cancelled")
    assert cancelled in (1, 2)
    assert d("arcface_dropped_total", reason="expired") == 2 - cancelled
    # Only the plug and the later call reached the model.
    h0, h1 = before.histogram("arcface_batch_size"), after.histogram("arcface_batch_size")
    assert h1["count"] - h0["count"] == 2
    assert h1["sum"] - h0["sum"] == 2
    assert (after.histogram("arcface_inference_seconds")["count"]
            - before.histogram("arcface_inference_seconds")["count"]) == 2
    assert d("arcface_faces_total") == 2
    assert d("arcface_requests_total", rpc="Embed", code="OK") == 2
    assert d("arcface_requests_total", rpc="Embed", code="DEADLINE_EXCEEDED") == 2 - cancelled
    assert d("arcface_requests_total", rpc="Embed", code="CANCELLED") == cancelled
    assert after.get("arcface_queue_depth") == 0
