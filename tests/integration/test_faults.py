"""Fault injection (the --test-fault-injection hook, server/service/fault_injection.h): a failed,
throwing or stalled model batch and a failed face preprocessing each end exactly the calls they
hit, with a reason, and the server goes on serving; and the drain when the model never comes
back (drain timeout expiry with held calls, a second SIGTERM)."""

import os
import signal
import threading
import time

import grpc
import numpy as np

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb


def crop(seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8)


def request(*seeds, rid=""):
    return pb.EmbedRequest(faces=[lib.raw_face(crop(s)) for s in seeds], request_id=rid)


def requests_total(server):
    m = server.metrics()
    return {(labels["rpc"], labels["code"]): int(v)
            for labels, v in m.series("arcface_requests_total") if v}, m


def wait_batches(server, ok, error):
    """The batch counters reach their values: the batcher counts a batch after it has finished
    the batch's calls, so a scrape right after an answer may not include its batch yet."""
    lib.wait_until(lambda: (server.metrics().get("arcface_batches_total", 0.0, status="ok"),
                            server.metrics().get("arcface_batches_total", 0.0, status="error"))
                   == (ok, error), 10, what=f"batches ok {ok}, error {error}")


def code_and_details(call):
    try:
        call()
        return "OK", ""
    except grpc.RpcError as e:
        return e.code().name, e.details()


def future_outcome(future, timeout=120):
    try:
        return "OK", future.result(timeout=timeout)
    except grpc.RpcError as e:
        return e.code().name, e.details()


def faulty_server(start_server, spec, *extra, name="faults"):
    return start_server(lib.demo_args("--test-fault-injection", spec, *extra), name=name)


def test_failed_batch_fails_only_its_calls(start_server, tmp_path):
    """Batch 2 (calls B and C together) fails: both end INTERNAL naming the fault; A (batch 1)
    and D (batch 3) succeed with the right embeddings."""
    hold = str(tmp_path / "hold")
    server = faulty_server(start_server, "fail-batch=2", "--max-batch-size", "2",
                           "--max-queue-delay-us", "500000", "--test-hold-model-file", hold)
    assert "TEST HOOK: fault injection fail-batch=2" in server.log_text()
    open(hold, "w").close()
    try:
        a = server.stub.Embed.future(request(1, rid="A"), timeout=120)
        lib.wait_until(lambda: server.metrics().get("arcface_batches_held") == 1, 30,
                       what="batch 1 held")
        b = server.stub.Embed.future(request(2, rid="B"), timeout=120)
        c = server.stub.Embed.future(request(3, rid="C"), timeout=120)
        lib.wait_until(lambda: server.metrics().get("arcface_queue_depth") == 2, 30,
                       what="B and C queued")
    finally:
        os.unlink(hold)
    code_a, ra = future_outcome(a)
    assert code_a == "OK"
    for f in (b, c):
        code, details = future_outcome(f)
        assert code == "INTERNAL", (code, details)
        assert "injected fault: batch 2 failed" in details, details
    rd = server.embed([lib.raw_face(crop(1))])
    assert lib.cosine(ra.embeddings[0].values, rd.embeddings[0].values) >= 0.99999
    counts, m = requests_total(server)
    assert counts == {("Embed", "OK"): 2, ("Embed", "INTERNAL"): 2}, counts
    assert m.get("arcface_faces_total") == 2
    wait_batches(server, ok=2, error=1)
    server.stop()


def test_engine_exception_becomes_internal(start_server):
    """An exception escaping the engine (not libtorch's c10::Error, which the engine converts
    itself) ends its batch's calls INTERNAL instead of ending the process."""
    server = faulty_server(start_server, "throw-batch=1", "--max-batch-size", "1",
                           "--max-queue-delay-us", "0")
    code, details = code_and_details(lambda: server.embed([lib.raw_face(crop(1))], timeout=60))
    assert code == "INTERNAL", (code, details)
    assert "the engine threw: injected fault: batch 1 threw" in details, details
    assert server.proc.poll() is None, server.log_tail()
    ok = server.embed([lib.raw_face(crop(1))], timeout=60)
    assert len(ok.embeddings) == 1
    counts, m = requests_total(server)
    assert counts == {("Embed", "OK"): 1, ("Embed", "INTERNAL"): 1}, counts
    wait_batches(server, ok=1, error=1)
    server.stop()


def test_failed_preprocessing_fails_only_its_request(start_server):
    """The process's 2nd face fails preprocessing: its request ends INTERNAL naming face 1 (and
    stops there: its 3rd face is never preprocessed); the next Embed succeeds; in an EmbedStream
    the message holding the process's 6th face (also failed) is answered with the error and the
    messages around it with their embeddings."""
    server = faulty_server(start_server, "fail-face=2,fail-face=6", "--max-batch-size", "4",
                           "--max-queue-delay-us", "1000")
    code, details = code_and_details(lambda: server.stub.Embed(request(1, 2, 3), timeout=60))
    assert code == "INTERNAL", (code, details)
    assert details.startswith("face 1: injected fault: preprocessing of face 2"), details
    ok = server.stub.Embed(request(4, 5), timeout=60)  # faces #3 and #4
    assert len(ok.embeddings) == 2
    ref = {s: np.asarray(e.values) for s, e in zip((4, 5), ok.embeddings)}

    # One message at a time, so that the faces are numbered in message order: #5, #6, #7, #8.
    answers = []
    turn = threading.Semaphore(0)

    def messages():
        for k, seed in enumerate((4, 5, 7, 5)):
            yield request(seed, rid=f"m{k}")
            turn.acquire(timeout=60)

    for r in server.stub.EmbedStream(messages(), timeout=120):
        answers.append(r)
        turn.release()
    assert [r.request_id for r in answers] == ["m0", "m1", "m2", "m3"]
    assert answers[1].HasField("error")
    assert answers[1].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert answers[1].error.message.startswith(
        "face 0: injected fault: preprocessing of face 6"), answers[1].error.message
    for r, seed in ((answers[0], 4), (answers[2], 7), (answers[3], 5)):
        assert not r.HasField("error"), r.error
        assert len(r.embeddings) == 1
        if seed in ref:  # the same crop, maybe in a batch of another size
            assert lib.cosine(r.embeddings[0].values, ref[seed]) >= 0.99999
    counts, m = requests_total(server)
    assert counts == {("Embed", "OK"): 1, ("Embed", "INTERNAL"): 1,
                      ("EmbedStream", "OK"): 3, ("EmbedStream", "INTERNAL"): 1}, counts
    assert m.get("arcface_faces_total") == 5
    server.stop()


def test_stalled_model_past_deadlines(start_server):
    """Batch 1 stalls 4 s in the model. A (in it) and B (queued behind it), both with a 1.5 s
    deadline, end DEADLINE_EXCEEDED for their callers at ~1.5 s; on the server, A's batch still
    completes (counted OK: it finished, late) and B is dropped from the queue as expired (or as
    cancelled, when the client's cancellation arrives first), never reaching the model; C, sent
    after, succeeds."""
    server = faulty_server(start_server, "stall-batch=1:4s", "--max-batch-size", "1",
                           "--max-queue-delay-us", "0")
    sent = time.monotonic()
    a = server.stub.Embed.future(request(1, rid="A"), timeout=1.5)
    time.sleep(0.2)
    b = server.stub.Embed.future(request(2, rid="B"), timeout=1.5)
    for f in (a, b):
        code, _ = future_outcome(f)
        assert code == "DEADLINE_EXCEEDED", code
    assert time.monotonic() - sent < 3.5, "the callers waited for the stalled model"
    lib.wait_until(lambda: server.metrics().get("arcface_inflight_requests") == 0, 30,
                   what="the stalled batch to end")
    ok = server.stub.Embed(request(3, rid="C"), timeout=60)
    assert ok.request_id == "C" and len(ok.embeddings) == 1
    counts, m = requests_total(server)
    # B's end on the server: its deadline, or the client's cancellation that the expiry on the
    # client side sends, whichever the server sees first (the server's deadline falls slightly
    # after the client's, and queued calls are polled for cancellation every 20 ms).
    b_code = "CANCELLED" if ("Embed", "CANCELLED") in counts else "DEADLINE_EXCEEDED"
    assert counts == {("Embed", "OK"): 2, ("Embed", b_code): 1}, counts
    assert (m.get("arcface_dropped_total", 0, reason="expired") +
            m.get("arcface_dropped_total", 0, reason="cancelled")) == 1
    wait_batches(server, ok=2, error=0)  # the stalled one and C's
    server.stop()


# ---------------------------------------------------------------------------------------------
# The drain when the model does not come back (tests/integration/test_drain.py covers the drain
# whose calls finish).


def hold_server(start_server, tmp_path, drain_timeout, name):
    hold = str(tmp_path / "hold")
    server = start_server(lib.demo_args(
        "--max-batch-size", "1", "--max-queue-delay-us", "0", "--drain-timeout",
        str(drain_timeout), "--test-hold-model-file", hold), name=name)
    open(hold, "w").close()
    held = server.stub.Embed.future(request(1, rid="held"), timeout=120)
    lib.wait_until(lambda: server.metrics().get("arcface_batches_held") == 1, 30,
                   what="the held batch")
    queued = server.stub.Embed.future(request(2, rid="queued"), timeout=120)
    lib.wait_until(lambda: server.metrics().get("arcface_queue_depth") == 1, 30,
                   what="a call queued")
    return server, hold, [held, queued]


def test_drain_timeout_expires_with_held_calls(start_server, tmp_path):
    """The model never returns (held): after SIGTERM the calls end for their callers once the
    drain timeout (2 s) has passed, and the process exits at timeout + 10 s (the Server's drain
    watchdog, server/app/server.cc: the batcher cannot flush a batch stuck in the model) with status 1, saying why."""
    drain = 2
    server, hold, calls = hold_server(start_server, tmp_path, drain, "drain-expiry")
    ended = {}
    try:
        sigterm_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        def wait(k, f):
            ended[k] = (future_outcome(f, timeout=60)[0], time.monotonic() - sigterm_at)

        waiters = [threading.Thread(target=wait, args=(k, f)) for k, f in enumerate(calls)]
        for t in waiters:
            t.start()
        rc = server.proc.wait(timeout=drain + 10 + 10)
        exit_after = time.monotonic() - sigterm_at
        for t in waiters:
            t.join(timeout=30)
    finally:
        os.unlink(hold)
    assert rc == 1, server.log_tail()
    assert drain + 10 - 1 <= exit_after <= drain + 10 + 5, exit_after
    assert "drain timeout: 2 calls still running are cancelled" in server.log_text()
    assert "drain did not complete within its timeout + 10 s" in server.log_text()
    # The callers hear at the drain deadline (UNAVAILABLE, measured at 2.0 s), not when the
    # process finally exits.
    assert sorted(ended) == [0, 1], ended
    for k, (code, at) in ended.items():
        assert code in ("CANCELLED", "UNAVAILABLE"), (k, code)
        assert drain - 0.5 <= at <= drain + 5, (k, at)
    start_server.forget(server)  # exited 1 on purpose
    server.terminate()


def test_second_sigterm_exits_at_once(start_server, tmp_path):
    """A second SIGTERM during a drain that waits for held calls exits at once with status 1."""
    server, hold, calls = hold_server(start_server, tmp_path, 60, "drain-second")
    try:
        server.proc.send_signal(signal.SIGTERM)
        lib.wait_until(lambda: "drain started" in server.log_text(), 10, what="the drain")
        assert server.proc.poll() is None
        second_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(timeout=10)
        assert time.monotonic() - second_at < 3
    finally:
        os.unlink(hold)
    assert rc == 1, server.log_tail()
    assert "received a second signal during the drain: exiting now" in server.log_text()
    for f in calls:
        code, _ = future_outcome(f, timeout=30)
        assert code == "UNAVAILABLE", code  # the connection went away with the process
    start_server.forget(server)  # exited 1 on purpose
    server.terminate()
