"""Several models in one real server (--model NAME=PATH beside --demo-weights): calls routed by
name, each answer's model_id the model that made it, ListModels, the model label on /metrics,
and one model's overload (its batch held by the --test-hold-model-file hook, its queue full)
never delaying the other's calls beyond their own queue."""

import os
import subprocess
import time

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

QUEUE = 4
DEMO = "arcface-demo"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, goldens):
    workdir = str(tmp_path_factory.mktemp("models"))
    hold = os.path.join(workdir, "hold")
    server = lib.ServerProcess(lib.demo_args(
        "--model", "golden=" + goldens.model_path("r50"),
        "--max-batch-size", "1", "--max-queue-size", str(QUEUE), "--max-queue-delay-us", "0",
        "--test-hold-model-file", hold), workdir, name="models")
    server.start()
    # The demo model alone is held while this file exists.
    server.hold_demo = hold + "." + DEMO
    yield server
    if os.path.exists(server.hold_demo):
        os.unlink(server.hold_demo)
    server.stop()


def face(seed):
    rng = np.random.default_rng(seed)
    return lib.raw_face(rng.integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8))


def test_list_models_names_each_model_default_first(two_models, goldens):
    models = two_models.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
    assert [m.name for m in models] == ["golden", DEMO]
    golden, demo = models
    assert golden.is_default and not demo.is_default
    assert not golden.demo_weights and demo.demo_weights
    assert golden.weights_sha256 == lib.sha256_file(goldens.model_path("r50"))
    assert golden.model_id != demo.model_id
    for m in models:
        assert (m.family, m.metric, m.embedding_dim, m.input_size) == ("arcface", "cosine", 512, 112)
        assert m.default_threshold == pytest.approx(0.4)
        assert m.batching.max_queue_size == QUEUE
    info = two_models.stub.GetModelInfo(pb.GetModelInfoRequest(model=DEMO), timeout=30)
    assert info.model_id == demo.model_id and info.name == DEMO
    assert two_models.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).name == "golden"
    with pytest.raises(grpc.RpcError) as e:
        two_models.stub.GetModelInfo(pb.GetModelInfoRequest(model="r100"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == (
        f"model 'r100' is not served here; this server serves: golden (default), {DEMO}")


def test_calls_are_routed_by_name(two_models, goldens):
    ids = {m.name: m.model_id for m in
           two_models.stub.ListModels(pb.ListModelsRequest(), timeout=30).models}
    # The golden model answers its reference case as the reference does.
    case = goldens.cases_of("r50")[0]
    got = two_models.stub.Embed(pb.EmbedRequest(faces=[goldens.face(case)], model="golden"),
                                timeout=60)
    assert got.model_id == ids["golden"]
    lib.check_embedding(got.embeddings[0], goldens.embedding(case), case["tolerance"], "golden")
    by_default = two_models.embed([goldens.face(case)])
    assert by_default.model_id == ids["golden"]
    demo = two_models.embed([goldens.face(case)], model=DEMO)
    assert demo.model_id == ids[DEMO]
    assert lib.cosine(demo.embeddings[0].values, got.embeddings[0].values) < 0.9
    # Compare on the demo model, and an embedding of the golden one refused there.
    probe = pb.Probe(embedding=got.embeddings[0], model_id=ids["golden"])
    request = pb.CompareRequest(queries=[pb.Probe(face=face(1))], references=[probe], model=DEMO)
    with pytest.raises(grpc.RpcError) as e:
        two_models.stub.Compare(request, timeout=60)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ids["golden"] in e.value.details() and ids[DEMO] in e.value.details()
    request.model = "golden"
    compared = two_models.stub.Compare(request, timeout=60)
    assert compared.model_id == ids["golden"]
    with pytest.raises(grpc.RpcError) as e:
        two_models.embed([face(2)], model="nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_carry_the_model_label(two_models):
    before = two_models.metrics()
    two_models.embed([face(3)], model=DEMO)
    two_models.embed([face(4)])
    with pytest.raises(grpc.RpcError) as e:
        two_models.embed([face(5)], model="nope")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    m = two_models.metrics()
    # Each call under the model that answered it; an unknown name under "", never as a value.
    for model, code in (("golden", "OK"), (DEMO, "OK"), ("", "NOT_FOUND")):
        assert (m.get("arcface_requests_total", 0.0, model=model, rpc="Embed", code=code)
                - before.get("arcface_requests_total", 0.0, model=model, rpc="Embed",
                             code=code)) == 1, (model, code)
    assert not [s for s in m.series("arcface_requests_total") if s[0]["model"] == "nope"]
    for name in ("golden", DEMO):
        assert m.sum("arcface_batches_total", model=name, status="ok") >= 1
        assert m.get("arcface_queue_depth", model=name) == 0
        assert m.get("arcface_batches_held", model=name) == 0
        assert m.histogram("arcface_inference_seconds", model=name)["count"] >= 1
        assert len([s for s in m.series("arcface_model_info") if s[0]["model"] == name]) == 1


def test_one_models_overload_does_not_delay_the_other(two_models):
    server = two_models
    before = server.metrics()
    open(server.hold_demo, "w").close()
    try:
        plug = server.stub.Embed.future(pb.EmbedRequest(faces=[face(10)], model=DEMO),
                                        timeout=120)
        lib.wait_until(lambda: server.metrics().get("arcface_batches_held", model=DEMO) == 1,
                       20, what="the demo model's batch held")
        queued = [server.stub.Embed.future(pb.EmbedRequest(faces=[face(11 + i)], model=DEMO),
                                           timeout=120) for i in range(QUEUE)]
        lib.wait_until(lambda: server.metrics().get("arcface_queue_depth", model=DEMO) == QUEUE,
                       20, what="the demo model's queue full")
        with pytest.raises(grpc.RpcError) as e:
            server.embed([face(20)], model=DEMO)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        refused = server.metrics()
        for model, want in ((DEMO, 1), ("golden", 0)):
            assert (refused.get("arcface_rejected_total", 0.0, model=model, reason="queue_full")
                    - before.get("arcface_rejected_total", 0.0, model=model,
                                 reason="queue_full")) == want, model
        # The golden model answers meanwhile, as fast as alone: one forward pass each.
        for i in range(5):
            start = time.monotonic()
            resp = server.embed([face(30 + i)], timeout=30)
            assert time.monotonic() - start < 10
            assert len(resp.embeddings) == 1
        # The batcher reports a batch to /metrics just after its calls got their answers.
        m = lib.wait_until(
            lambda: (lambda m: m if m.sum("arcface_batches_total", model="golden")
                     - before.sum("arcface_batches_total", model="golden") >= 5 else None)(
                server.metrics()), 10, what="the golden batches counted")
        assert (m.sum("arcface_batches_total", model="golden")
                - before.sum("arcface_batches_total", model="golden")) == 5
        assert m.get("arcface_queue_depth", model="golden") == 0
        assert m.get("arcface_batches_held", model=DEMO) == 1
        assert not plug.done() and not any(f.done() for f in queued)
        assert (m.sum("arcface_batches_total", model=DEMO)
                - before.sum("arcface_batches_total", model=DEMO)) == 0
    finally:
        os.unlink(server.hold_demo)
    for f in [plug] + queued:
        assert len(f.result(timeout=60).embeddings) == 1
    after = lib.wait_until(
        lambda: (lambda m: m if m.sum("arcface_batches_total", model=DEMO)
                 - before.sum("arcface_batches_total", model=DEMO) >= QUEUE + 1 else None)(
            server.metrics()), 10, what="the demo batches counted")
    assert (after.sum("arcface_batches_total", model=DEMO)
            - before.sum("arcface_batches_total", model=DEMO)) == QUEUE + 1


@pytest.mark.parametrize("args,message", [
    (["--model", "Arc=x"], "model name 'Arc' must be 1 to 64 characters"),
    (["--model", "arcface"], "is not NAME=PATH"),
    (["--model", "a=/nonexistent/weights"], "/nonexistent/weights: no such file"),
])
def test_bad_model_flags_exit_2(args, message, tmp_path):
    proc = subprocess.run([lib.SERVER_BIN, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


def test_a_name_given_twice_exits_2(goldens):
    path = goldens.model_path("r50")
    proc = subprocess.run([lib.SERVER_BIN, "--model", f"a={path}", "--model", f"a={path}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--model: model name 'a' is given twice" in proc.stderr


def test_python_client_lists_and_routes_models(two_models):
    from arcface_client import ArcFaceClient, ArcFaceError

    target = f"127.0.0.1:{two_models.grpc_port}"
    with ArcFaceClient(target) as client:
        models = client.list_models()
        assert [m["name"] for m in models] == ["golden", DEMO]
        assert models[0]["is_default"] and models[1]["demo_weights"]
        assert client.model_info()["name"] == "golden"
        golden = client.embed([face(40)], normalize=True)
    with ArcFaceClient(target, model=DEMO) as demo_client:
        assert demo_client.model_info()["name"] == DEMO
        demo = demo_client.embed([face(40)], normalize=True)
        sim, _ = demo_client.compare([face(40)], [demo[0]])
        assert sim[0, 0] == pytest.approx(1.0, abs=1e-5)
    # One face, two models: two different embeddings.
    assert float(golden[0] @ demo[0]) < 0.9
    with ArcFaceClient(target, model="nope") as bad:
        with pytest.raises(ArcFaceError) as e:
            bad.embed([face(41)])
        assert e.value.code == grpc.StatusCode.NOT_FOUND


def test_cli_lists_models_and_uses_one(two_models):
    # The CLI is built beside the server (build/client/arcface-client).
    cli = os.path.join(os.path.dirname(os.path.dirname(lib.SERVER_BIN)), "client",
                       "arcface-client")
    assert os.access(cli, os.X_OK), cli
    server = f"127.0.0.1:{two_models.grpc_port}"
    out = subprocess.run([cli, "--server", server, "models"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "FAMILY", "METRIC"]
    assert lines[1].split()[:5] == ["golden", "arcface", "cosine", "0.40", "512"]
    assert "(default)" in lines[1] and "(DEMO weights)" in lines[2]
    info = subprocess.run([cli, "--server", server, "--model", DEMO, "info", "--json"],
                          capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    assert f'"name": "{DEMO}"' in info.stdout
    bad = subprocess.run([cli, "--server", server, "--model", "nope", "info"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stderr
    assert "NOT_FOUND" in bad.stderr and "golden (default)" in bad.stderr
