"""Scale-out: three arcface-server processes behind one client channel with gRPC's
round_robin, as a Kubernetes client does over the headless Service's addresses.

- Load spreads: with all three up, each server serves at least 20 % of the calls, read from
  its own /metrics, and the three counts add up to exactly the calls made.
- One server is killed (SIGKILL, a crash) while callers keep calling: a call in flight on it
  may fail, and then only with UNAVAILABLE; every other call succeeds; once the channel has
  seen the loss every call succeeds on the two others.
- Nothing is answered wrongly: every returned embedding is compared with the PyTorch
  reference's golden embedding of the crop that was sent (the servers run the golden r50
  weights), so a reply routed to the wrong call or computed wrongly would fail.
"""

import json
import os
import sys
import threading

import grpc
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
import arcface_testlib as lib  # noqa: E402
from arcface.v1 import face_embedding_pb2 as pb  # noqa: E402
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc  # noqa: E402

CALLERS = 6
ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


@pytest.fixture(scope="module")
def goldens():
    problem = lib.missing_environment("deploy_pytest")
    if problem:
        pytest.fail(problem)
    return lib.Goldens(lib.GOLDEN_DIR, lib.TEST_DATA)


@pytest.fixture(scope="module")
def servers(goldens, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("scale_out"))
    weights = goldens.model_path("r50")
    started = []
    try:
        for i in range(3):
            # One intra-op thread each: three servers share this machine's two cores.
            args = ["--weights", weights, "--device", "cpu", "--threads", "1",
                    "--max-batch-size", "4", "--max-queue-delay-us", "1000",
                    "--warmup-batch-size", "1"]
            started.append(lib.ServerProcess(args, workdir, name=f"server{i}").start(timeout=120))
        yield started
    finally:
        for s in started:
            s.kill()


def ok_calls(server):
    return server.metrics().get("arcface_requests_total", 0.0, rpc="Embed", code="OK")


class Load:
    """CALLERS threads calling Embed through one round_robin channel until stopped; each
    call sends one golden crop (a different one per call) and checks the reply against the
    golden embedding of that crop."""

    def __init__(self, channel, cases, goldens):
        self.stub = pb_grpc.FaceEmbeddingStub(channel)
        self.cases = cases
        self.goldens = goldens
        self.faces = [goldens.face(c) for c in cases]
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []  # (status code, details)
        self.wrong = []
        self.next = 0
        self.stop = threading.Event()
        self.threads = []

    def one_call(self):
        with self.lock:
            i = self.next % len(self.cases)
            self.next += 1
        try:
            reply = self.stub.Embed(pb.EmbedRequest(faces=[self.faces[i]]), timeout=60)
        except grpc.RpcError as e:
            with self.lock:
                self.failures.append((e.code(), e.details()))
            return
        try:
            assert len(reply.embeddings) == 1
            lib.check_embedding(reply.embeddings[0], self.goldens.embedding(self.cases[i]),
                                "exact", self.cases[i]["name"])
        except AssertionError as e:
            with self.lock:
                self.wrong.append(str(e))
            return
        with self.lock:
            self.ok += 1

    def __repr__(self):
        return (f"{self.ok} ok, {len(self.failures)} failed {self.failures[-3:]}, "
                f"{len(self.wrong)} wrong {self.wrong[-2:]}")

    def _spawn(self, budget):
        def worker():
            while not self.stop.is_set():
                if budget is not None:
                    with self.lock:
                        if budget[0] == 0:
                            return
                        budget[0] -= 1
                self.one_call()

        # Daemon threads: a failed assertion can never leave callers running past the test.
        self.threads = [threading.Thread(target=worker, daemon=True) for _ in range(CALLERS)]
        for t in self.threads:
            t.start()

    def _join(self):
        for t in self.threads:
            t.join(timeout=300)
            assert not t.is_alive(), "a caller hung"

    def run(self, calls):
        """Makes exactly `calls` calls over the CALLERS threads; returns when all are done."""
        self._spawn([calls])
        self._join()

    def start(self):
        """Calls until finish()."""
        self._spawn(None)

    def finish(self):
        self.stop.set()
        self._join()


def test_round_robin_spreads_and_survives_a_crash(servers, goldens):
    cases = [c for c in goldens.cases_of("r50") if c["input"]["kind"] == "crop"]
    assert len(cases) >= 4, "the reference's r50 crop cases"
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers)
    channel = grpc.insecure_channel(target, options=lib.CHANNEL_OPTIONS + [
        ("grpc.service_config", ROUND_ROBIN)])
    try:
        grpc.channel_ready_future(channel).result(timeout=30)

        # 1. All three up: the calls spread, and the servers' counters add up exactly.
        before = [ok_calls(s) for s in servers]
        calls = 60
        load = Load(channel, cases, goldens)
        load.run(calls)
        assert load.wrong == [] and load.failures == [], (load.wrong, load.failures)
        assert load.ok == calls
        served = [ok_calls(s) - b for s, b in zip(servers, before)]
        print(f"all three up: calls per server {served}")
        assert sum(served) == calls, served
        for i, n in enumerate(served):
            assert n >= 0.2 * calls, f"server{i} served {n} of {calls} calls: {served}"

        # 2. Kill one server while the callers keep calling.
        survivors = servers[:2]
        load = Load(channel, cases, goldens)
        load.start()
        try:
            lib.wait_until(lambda: load.ok >= 12, 120, what="calls before the crash")
            servers[2].kill()
            ok_at_kill = load.ok
            lib.wait_until(lambda: load.ok >= ok_at_kill + 30, 180, what="calls after the crash")
        except AssertionError as e:
            raise AssertionError(f"{e}; the callers: {load!r}") from None
        finally:
            load.finish()
        print(f"crash: {load.ok} calls succeeded, {len(load.failures)} failed: {load.failures}")
        assert load.wrong == [], load.wrong
        # Only the calls that were on the killed server when it died may fail, as UNAVAILABLE.
        assert len(load.failures) <= CALLERS, load.failures
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in load.failures), load.failures

        # 3. After the crash, every call succeeds on the two survivors, exactly counted.
        before = [ok_calls(s) for s in survivors]
        load = Load(channel, cases, goldens)
        load.run(40)
        assert load.wrong == [] and load.failures == [], (load.wrong, load.failures)
        served = [ok_calls(s) - b for s, b in zip(survivors, before)]
        assert sum(served) == 40 and min(served) >= 8, served
    finally:
        channel.close()
