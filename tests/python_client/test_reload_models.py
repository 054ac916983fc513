"""ArcFaceClient.reload_models against a real server with --admin-rpc on loopback serving a copy
of the golden r50 weights as model "live" beside the demo weights: one ModelReload per model,
UNCHANGED for an unchanged file, RELOADED for other weights (r100), FAILED for a file cut short
(the old weights serving on); the call's own errors as ArcFaceError, UNIMPLEMENTED without the
flag."""

import os
import shutil

import grpc
import numpy as np
import pytest

import arcface_testlib as lib

from arcface_client import ArcFaceClient, ArcFaceError, ModelReload

LIVE, DEMO = "live", "arcface-demo"


def install(src, path):
    """As an operator should: the new file written beside, then renamed over the old one."""
    shutil.copyfile(src, path + ".new")
    os.replace(path + ".new", path)


def model_id_of(goldens, model):
    return f"arcface-{model}@" + lib.sha256_file(goldens.model_path(model))[:12]


@pytest.fixture(scope="module")
def admin(tmp_path_factory, goldens):
    work = tmp_path_factory.mktemp("pyreload")
    path = str(work / "live.safetensors")
    shutil.copyfile(goldens.model_path("r50"), path)
    srv = lib.ServerProcess(lib.demo_args("--model", f"{LIVE}={path}", "--admin-rpc",
                                          "--warmup-batch-size", "1"), str(work),
                            name="reload_pyclient")
    srv.start()
    srv.model_file = path
    yield srv
    srv.stop()


@pytest.fixture
def live(admin):
    with ArcFaceClient(f"127.0.0.1:{admin.grpc_port}", timeout=300, model=LIVE) as c:
        yield c


def test_unchanged_files_report_every_model_in_served_order(live):
    ids = {m["name"]: m["model_id"] for m in live.list_models()}
    got = live.reload_models()
    assert got == [ModelReload(LIVE, "UNCHANGED", ids[LIVE], ids[LIVE], "", got[0].seconds),
                   ModelReload(DEMO, "UNCHANGED", ids[DEMO], ids[DEMO], "", got[1].seconds)]
    assert not any(r.failed for r in got)
    # Named: in the order asked.
    assert [(r.model, r.result) for r in live.reload_models([DEMO, LIVE])] == [
        (DEMO, "UNCHANGED"), (LIVE, "UNCHANGED")]


def test_other_weights_are_reloaded_and_a_broken_file_fails_alone(live, admin, goldens):
    r50, r100 = model_id_of(goldens, "r50"), model_id_of(goldens, "r100")
    crop = np.full((112, 112, 3), 90, np.uint8)
    try:
        install(goldens.model_path("r100"), admin.model_file)
        [got] = live.reload_models([LIVE])
        assert (got.model, got.result, got.previous_model_id, got.model_id, got.error) == (
            LIVE, "RELOADED", r50, r100, "")
        assert got.seconds > 0 and not got.failed
        assert live.model_info()["model_id"] == r100

        with open(goldens.model_path("r50"), "rb") as f:
            data = f.read()
        with open(admin.model_file + ".new", "wb") as f:
            f.write(data[: len(data) // 2])  # a copy cut short
        os.replace(admin.model_file + ".new", admin.model_file)
        got = live.reload_models()
        assert [(r.model, r.result, r.model_id, r.previous_model_id) for r in got] == [
            (LIVE, "FAILED", r100, r100), (DEMO, "UNCHANGED", got[1].model_id, got[1].model_id)]
        assert got[0].failed and admin.model_file in got[0].error, got[0].error
        assert live.embed([crop]).shape == (1, 512)
        assert live.model_info()["model_id"] == r100
    finally:
        install(goldens.model_path("r50"), admin.model_file)
    [got] = live.reload_models([LIVE])
    assert (got.result, got.previous_model_id, got.model_id) == ("RELOADED", r100, r50)


def test_errors_of_the_call(live, client):
    with pytest.raises(ArcFaceError) as e:
        live.reload_models(["nope"])
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.method == "ReloadModels"
    assert e.value.details == (
        f"model 'nope' is not served here; this server serves: {LIVE} (default), {DEMO}")
    with pytest.raises(TypeError):
        live.reload_models(LIVE)
    # The golden r50 server runs without --admin-rpc.
    with pytest.raises(ArcFaceError) as e:
        client.reload_models()
    assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert "--admin-rpc" in e.value.details and "SIGHUP" in e.value.details, e.value.details
