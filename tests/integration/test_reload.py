"""Reloading models without a restart, on a real server: SIGHUP and ModelAdmin.ReloadModels
(--admin-rpc). A changed file is loaded and warmed up beside the serving version and swapped in
under load with no failed call, every answer's embedding the one its own model_id's weights give
(calls in flight finish on the weights they started with); an unchanged file stays as it is; a
broken file leaves the old model serving, with an error in the log and a metric; the other model
serves on throughout. The admin RPC is off without its flag, and refused beyond loopback without
mutual TLS."""

import os
import shutil
import signal
import subprocess
import threading

import grpc
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc

LIVE = "live"
DEMO = "arcface-demo"


def model_id_of(goldens, model):
    return f"arcface-{model}@" + lib.sha256_file(goldens.model_path(model))[:12]


def install(src, path):
    """As an operator should: the new file written beside, then renamed over the old one."""
    shutil.copyfile(src, path + ".new")
    os.replace(path + ".new", path)


@pytest.fixture(scope="module")
def reloadable(tmp_path_factory, goldens):
    workdir = str(tmp_path_factory.mktemp("reload"))
    path = os.path.join(workdir, "model.safetensors")
    shutil.copyfile(goldens.model_path("r50"), path)
    server = lib.ServerProcess(lib.demo_args(
        "--model", f"{LIVE}={path}", "--admin-rpc", "--max-batch-size", "4",
        "--max-queue-delay-us", "2000"), workdir, name="reload")
    server.start()
    server.model_file = path
    server.admin = pb_grpc.ModelAdminStub(server.channel)
    yield server
    server.stop()


def serving_id(server, model=LIVE):
    return server.stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=30).model_id


def reloads(server, model, result):
    return server.metrics().get("arcface_model_reloads_total", 0, model=model, result=result)


class Load:
    """Client threads embedding one face in a loop on a model until stopped; every answer and
    every error kept."""

    def __init__(self, server, face, model, threads):
        self.server, self.face, self.model = server, face, model
        self.answers, self.errors = [], []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self):
        while not self.done.is_set():
            try:
                r = self.server.embed([self.face], model=self.model, timeout=120)
                with self.lock:
                    self.answers.append((r.model_id, r.embeddings[0]))
            except grpc.RpcError as e:
                with self.lock:
                    self.errors.append(f"{e.code()}: {e.details()}")

    def count(self, model_id=None):
        with self.lock:
            return sum(1 for m, _ in self.answers if model_id in (None, m))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        for t in self.threads:
            t.join(timeout=180)


def test_sighup_swaps_a_changed_file_under_load_with_no_failed_call(reloadable, goldens):
    server = reloadable
    r50, r100 = model_id_of(goldens, "r50"), model_id_of(goldens, "r100")
    install(goldens.model_path("r50"), server.model_file)
    assert serving_id(server) == r50
    # The same photo has a reference embedding under each set of weights.
    cases = {r50: goldens.cases["whole_single_face"], r100: goldens.cases["r100_whole_single_face"]}
    face = goldens.face(cases[r50])
    reloaded_before = reloads(server, LIVE, "reloaded")
    demo_face = lib.raw_face(goldens.crop_u8(goldens.cases["crop_uniform_0"]))
    with Load(server, face, LIVE, threads=4) as live, Load(server, demo_face, DEMO, 1) as demo:
        lib.wait_until(lambda: live.count(r50) >= 8, 120, what="answers before the reload")
        install(goldens.model_path("r100"), server.model_file)
        server.proc.send_signal(signal.SIGHUP)
        lib.wait_until(lambda: serving_id(server) == r100, 240, what="r100 serving")
        lib.wait_until(lambda: live.count(r100) >= 8, 120, what="answers after the reload")
        demo_during = demo.count()
    assert live.errors == [] and demo.errors == [], (live.errors + demo.errors)[:5]
    assert {m for m, _ in live.answers} == {r50, r100}
    # Each answer is its own model_id's embedding: no call mixed the versions.
    for model_id, embedding in live.answers:
        case = cases[model_id]
        lib.check_embedding(embedding, goldens.embedding(case), case["tolerance"], model_id)
    # The other model answered throughout, on its own weights.
    assert demo_during > 0 and {m for m, _ in demo.answers} == {serving_id(server, DEMO)}
    m = server.metrics()
    assert m.get("arcface_model_reloads_total", model=LIVE, result="reloaded") == \
        reloaded_before + 1
    assert m.get("arcface_model_reloads_total", model=DEMO, result="unchanged") >= 1
    assert m.get("arcface_model_info", model=LIVE, arch="r100", model_id=r100, device="cpu",
                 precision="fp32") == 1
    assert m.get("arcface_model_info", model=LIVE, arch="r50", model_id=r50, device="cpu",
                 precision="fp32") == 0
    log = lib.wait_until(lambda: (lambda t: t if f"{r50} retired" in t else None)(
        server.log_text()), 60, what="the old version retired")
    assert "received SIGHUP: reloading the models" in log
    assert f"reload of model {LIVE}: {r100} serves now (was {r50})" in log
    assert f"reload of model {DEMO}: unchanged" in log


def test_a_broken_file_leaves_the_old_model_serving(reloadable, goldens):
    server = reloadable
    before = serving_id(server)
    failed_before = reloads(server, LIVE, "failed")
    with open(goldens.model_path("r50"), "rb") as f:
        data = f.read()
    with open(server.model_file + ".new", "wb") as f:
        f.write(data[: len(data) // 2])  # a copy cut short
    os.replace(server.model_file + ".new", server.model_file)
    server.proc.send_signal(signal.SIGHUP)
    lib.wait_until(lambda: reloads(server, LIVE, "failed") == failed_before + 1, 120,
                   what="the failed reload counted")
    assert serving_id(server) == before
    answer = server.embed([lib.raw_face(goldens.crop_u8(goldens.cases["crop_uniform_0"]))],
                          model=LIVE)
    assert answer.model_id == before and len(answer.embeddings[0].values) == 512
    log = server.log_text()
    assert f"reload of model {LIVE} failed" in log and f"{before} keeps serving" in log
    assert server.model_file in log, log[-3000:]
    # The admin RPC reports the same, in an OK answer.
    r = server.admin.ReloadModels(pb.ReloadModelsRequest(models=[LIVE]), timeout=120)
    assert [(x.model, x.result, x.model_id, x.previous_model_id) for x in r.models] == [
        (LIVE, pb.ModelReload.FAILED, before, before)]
    assert server.model_file in r.models[0].error
    assert server.proc.poll() is None


def test_admin_rpc_reloads_and_reports_each_model(reloadable, goldens):
    server = reloadable
    r50, r100 = model_id_of(goldens, "r50"), model_id_of(goldens, "r100")
    install(goldens.model_path("r100"), server.model_file)
    server.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=240)
    assert serving_id(server) == r100
    install(goldens.model_path("r50"), server.model_file)
    r = server.admin.ReloadModels(pb.ReloadModelsRequest(), timeout=240)
    demo_id = serving_id(server, DEMO)
    assert [(x.model, x.result, x.model_id, x.previous_model_id, x.error) for x in r.models] == [
        (LIVE, pb.ModelReload.RELOADED, r50, r100, ""),
        (DEMO, pb.ModelReload.UNCHANGED, demo_id, demo_id, "")]
    assert r.models[0].seconds > 0
    case = goldens.cases["crop_uniform_0"]
    got = server.embed([goldens.face(case)], model=LIVE)
    assert got.model_id == r50
    lib.check_embedding(got.embeddings[0], goldens.embedding(case), case["tolerance"], "r50")
    # Nothing changed since: both unchanged.
    r = server.admin.ReloadModels(pb.ReloadModelsRequest(models=[LIVE, DEMO]), timeout=120)
    assert [(x.model, x.result) for x in r.models] == [
        (LIVE, pb.ModelReload.UNCHANGED), (DEMO, pb.ModelReload.UNCHANGED)]
    for models, code, text in [
            (["r100"], grpc.StatusCode.NOT_FOUND,
             f"model 'r100' is not served here; this server serves: {LIVE} (default), {DEMO}"),
            ([""], grpc.StatusCode.INVALID_ARGUMENT, "models: an empty model name"),
            ([LIVE] * 3, grpc.StatusCode.INVALID_ARGUMENT,
             "models: 3 names, but this server serves 2")]:
        with pytest.raises(grpc.RpcError) as e:
            server.admin.ReloadModels(pb.ReloadModelsRequest(models=models), timeout=30)
        assert (e.value.code(), e.value.details()) == (code, text)


def test_without_the_flag_the_admin_rpc_is_off_and_sighup_still_reloads(tmp_path):
    server = lib.ServerProcess(lib.demo_args(), str(tmp_path), name="no-admin").start()
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ModelAdminStub(server.channel).ReloadModels(pb.ReloadModelsRequest(),
                                                                timeout=30)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "--admin-rpc" in e.value.details() and "SIGHUP" in e.value.details()
        # SIGHUP no longer ends the process (its default action): it reloads.
        server.proc.send_signal(signal.SIGHUP)
        lib.wait_until(lambda: server.metrics().get("arcface_model_reloads_total", 0,
                                                    result="unchanged", model=DEMO) == 1,
                       60, what="the SIGHUP reload")
        assert server.proc.poll() is None
        assert server.health_status() == lib.SERVING
    finally:
        server.stop()


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "10.0.0.1:0", "localhost.example:0"])
def test_the_admin_rpc_beyond_loopback_needs_mutual_tls(listen):
    # Refused with the flags, before anything loads (the fixture above serves it on loopback).
    r = subprocess.run([lib.SERVER_BIN, *lib.demo_args("--admin-rpc", "--listen", listen)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"--admin-rpc: --listen {listen} can be reached from other machines" in r.stderr
    assert "mutual TLS (--tls-client-ca)" in r.stderr
