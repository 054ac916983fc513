"""Through the API: the served embeddings equal the reference goldens (tests/reference) for every
input kind, and Compare / GetModelInfo / EmbedStream / health answer as specified."""

import random

import cv2
import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from grpc_health_v1 import health_pb2

GOLDENS = lib.Goldens(lib.GOLDEN_DIR, lib.TEST_DATA) if lib.GOLDEN_DIR else None
R50_CASES = [c["name"] for c in GOLDENS.cases_of("r50")] if GOLDENS else []


def model_id(goldens, model):
    m = goldens.models[model]
    return f"arcface-{m['arch']}@{lib.sha256_file(goldens.model_path(model))[:12]}"


def test_r50_cases_cover_every_input_kind(goldens):
    # The parametrized test below must exercise each kind the issue lists.
    cases = goldens.cases_of("r50")
    kinds = {c["input"]["kind"] for c in cases}
    assert kinds == {"crop", "image"}
    assert any("box" in c["input"] for c in cases)
    assert any("landmarks" in c["input"] for c in cases)
    assert any(c["input"].get("path", "").endswith("BWPictureHuman.jpg") for c in cases)
    assert any(c["input"].get("path", "").endswith("Image_with_alpha.png") for c in cases)
    gray = cv2.imread(goldens.image_path(goldens.cases["whole_BWPictureHuman_gray"]),
                      cv2.IMREAD_UNCHANGED)
    assert gray.ndim == 2, "the grayscale case must be a one-channel file"
    rgba = cv2.imread(goldens.image_path(goldens.cases["whole_Image_with_alpha_rgba"]),
                      cv2.IMREAD_UNCHANGED)
    assert rgba.ndim == 3 and rgba.shape[2] == 4, "the RGBA case must have an alpha channel"


@pytest.mark.parametrize("name", R50_CASES)
def test_embed_equals_golden(r50_server, goldens, name):
    case = goldens.cases[name]
    resp = r50_server.embed([goldens.face(case)], request_id=f"golden-{name}")
    assert resp.request_id == f"golden-{name}"
    assert resp.model_id == model_id(goldens, "r50")
    assert not resp.HasField("error")
    assert len(resp.embeddings) == 1
    lib.check_embedding(resp.embeddings[0], goldens.embedding(case), case["tolerance"], name)
    # The norm field is the raw vector's norm (checked inside check_embedding) and matches the
    # golden norm: to float rounding for exact crops, within 1 % for resampled photos.
    rel = 1e-4 if case["tolerance"] == "exact" else 1e-2
    assert resp.embeddings[0].norm == pytest.approx(case["norm"], rel=rel)


def test_multi_face_request_keeps_order(r50_server, goldens):
    names = [c["name"] for c in goldens.cases_of("r50") if c["input"]["kind"] == "crop"]
    names += ["box_multi_p2", "align_multi_p4"]
    random.Random(3).shuffle(names)
    resp = r50_server.embed([goldens.face(goldens.cases[n]) for n in names])
    assert len(resp.embeddings) == len(names)
    for n, emb in zip(names, resp.embeddings):
        case = goldens.cases[n]
        lib.check_embedding(emb, goldens.embedding(case), case["tolerance"], n)


def test_raw_pixel_formats(r50_server, goldens):
    """BGR8 of a crop and the crop as a PNG file equal the RGB8 golden; GRAY8 equals RGB8 of the
    replicated gray; a raw non-112 image with a box equals the same pixels sent as a PNG."""
    case = goldens.cases["crop_face_like_5"]
    rgb = goldens.crop_u8(case)
    gray = np.ascontiguousarray(rgb[:, :, 1])
    photo = cv2.cvtColor(cv2.imread(goldens.image_path(goldens.cases["whole_single_face"])),
                         cv2.COLOR_BGR2RGB)[100:400, 150:420]  # 270×300 RGB
    ok, png = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    assert ok
    box = pb.Box(x_min=30.4, y_min=-10.2, x_max=250.6, y_max=220.5)
    raw_boxed = lib.raw_face(photo)
    raw_boxed.box.CopyFrom(box)
    png_boxed = pb.Face(image=pb.Image(encoded=png.tobytes()), box=box)
    ok, crop_png = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    faces = [
        lib.raw_face(rgb[:, :, ::-1], pb.BGR8),
        lib.raw_face(gray, pb.GRAY8),
        lib.raw_face(np.repeat(gray[:, :, None], 3, axis=2), pb.RGB8),
        raw_boxed,
        png_boxed,
        pb.Face(image=pb.Image(encoded=crop_png.tobytes())),  # a 112×112 file: no resampling
    ]
    e = r50_server.embed(faces).embeddings
    assert len(e) == len(faces)
    lib.check_embedding(e[0], goldens.embedding(case), "exact", "BGR8")
    lib.check_embedding(e[5], goldens.embedding(case), "exact", "112x112 PNG")
    vals = [np.asarray(x.values, np.float64) for x in e]
    # Same pixels into the model → same embedding (only batch composition may differ).
    assert np.max(np.abs(vals[1] - vals[2])) <= 1e-5 * np.linalg.norm(vals[2])
    assert np.max(np.abs(vals[3] - vals[4])) <= 1e-5 * np.linalg.norm(vals[4])
    # ... and the formats really were told apart: gray and colour crops differ.
    assert lib.cosine(vals[1], goldens.embedding(case)) < 0.9999


def test_normalize(r50_server, goldens):
    names = ["crop_gaussian_1", "align_single_face"]
    faces = [goldens.face(goldens.cases[n]) for n in names]
    raw = r50_server.embed(faces).embeddings
    unit = r50_server.embed(faces, normalize=True).embeddings
    assert len(raw) == len(unit) == len(names)
    for n, r, u in zip(names, raw, unit):
        case = goldens.cases[n]
        v = np.asarray(u.values, np.float64)
        assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5), n
        raw_v = np.asarray(r.values, np.float64)
        assert u.norm == pytest.approx(np.linalg.norm(raw_v), rel=1e-5), n
        assert u.norm == pytest.approx(r.norm, rel=1e-5), n
        assert np.max(np.abs(v - raw_v / np.linalg.norm(raw_v))) <= 1e-5, n
        ref = goldens.embedding(case)
        assert lib.cosine(v, ref) >= (0.99999 if case["tolerance"] == "exact" else 0.9999), n


def _threshold_between(values):
    """A threshold in the widest gap of the sorted values, so that matches do not hinge on
    float rounding."""
    s = sorted(values)
    gaps = [(s[i + 1] - s[i], i) for i in range(len(s) - 1)]
    width, i = max(gaps)
    assert width > 1e-3, f"no usable gap in {s}"
    return (s[i] + s[i + 1]) / 2


def test_compare_faces_and_embeddings(r50_server, goldens):
    # Queries: two crops as faces (exact cases) and one golden vector as an embedding probe.
    # References: a crop face, the same crop as a query, golden vectors of photo cases, and one
    # photo face (a resampled case).
    q_names = ["crop_uniform_0", "crop_face_like_5", "box_multi_p3"]
    r_names = ["crop_smooth_2", "crop_face_like_5", "whole_single_face", "align_multi_p2"]
    g = {n: goldens.embedding(goldens.cases[n]) for n in q_names + r_names}
    face = lambda n: pb.Probe(face=goldens.face(goldens.cases[n]))  # noqa: E731
    vector = lambda v, **kw: pb.Probe(embedding=pb.Embedding(values=list(v), **kw))  # noqa: E731
    queries = [face("crop_uniform_0"), face("crop_face_like_5"), vector(g["box_multi_p3"])]
    references = [
        face("crop_smooth_2"),
        face("crop_face_like_5"),
        vector(3.5 * g["whole_single_face"], norm=123.0),  # scale and norm are irrelevant
        face("align_multi_p2"),
    ]
    expected = np.array([[lib.cosine(g[q], g[r]) for r in r_names] for q in q_names])
    threshold = _threshold_between(expected.ravel())
    resp = r50_server.stub.Compare(
        pb.CompareRequest(queries=queries, references=references, threshold=threshold),
        timeout=60)
    assert (resp.rows, resp.cols) == (len(q_names), len(r_names))
    assert resp.model_id == model_id(goldens, "r50")
    got = np.asarray(resp.similarities, np.float64).reshape(resp.rows, resp.cols)
    # Against the golden cosines: tight where only exact crops and golden vectors meet; the
    # photo face column within the bound its golden tolerance (cosine >= 0.9999) implies.
    tol = np.full(expected.shape, 1e-4)
    tol[:, 3] = np.sqrt(2 * (1 - 0.9999))
    assert np.all(np.abs(got - expected) <= tol), f"{got}\nvs\n{expected}"
    # Against the cosines of the same faces' Embed results: equal to float rounding.
    served = r50_server.embed([goldens.face(goldens.cases[n]) for n in
                               ["crop_uniform_0", "crop_face_like_5", "crop_smooth_2",
                                "align_multi_p2"]]).embeddings
    sv = {n: np.asarray(e.values) for n, e in
          zip(["crop_uniform_0", "crop_face_like_5", "crop_smooth_2", "align_multi_p2"], served)}
    sv["box_multi_p3"] = g["box_multi_p3"]
    sv["whole_single_face"] = g["whole_single_face"]
    from_embed = np.array([[lib.cosine(sv[q], sv[r]) for r in r_names] for q in q_names])
    assert np.max(np.abs(got - from_embed)) <= 1e-5, f"{got}\nvs\n{from_embed}"
    assert got[1, 1] == pytest.approx(1.0, abs=1e-5)  # the same crop on both sides
    assert list(resp.matches) == [bool(x) for x in (expected >= threshold).ravel()]
    assert list(resp.matches) == [bool(x) for x in (got >= threshold).ravel()]
    assert 0 < sum(resp.matches) < len(resp.matches)


def test_compare_embeddings_only(r50_server, goldens):
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, lib.EMBEDDING_DIM)).astype(np.float32)
    r = rng.standard_normal((3, lib.EMBEDDING_DIM)).astype(np.float32)
    r[2] = -q[0]  # cosine exactly -1
    expected = np.array([[lib.cosine(a, b) for b in r] for a in q])
    resp = r50_server.stub.Compare(pb.CompareRequest(
        queries=[pb.Probe(embedding=pb.Embedding(values=v.tolist())) for v in q],
        references=[pb.Probe(embedding=pb.Embedding(values=v.tolist())) for v in r]),
        timeout=30)
    assert (resp.rows, resp.cols) == (2, 3)
    got = np.asarray(resp.similarities).reshape(2, 3)
    assert np.max(np.abs(got - expected)) <= 1e-5
    assert got[0, 2] == pytest.approx(-1.0, abs=1e-5)
    assert len(resp.matches) == 0  # no threshold, no matches
    assert resp.model_id == model_id(goldens, "r50")


def test_get_model_info(r50_server, goldens):
    info = r50_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    sha = lib.sha256_file(goldens.model_path("r50"))
    assert sha == goldens.models["r50"]["sha256"]
    assert info.weights_sha256 == sha
    assert info.model_id == f"arcface-r50@{sha[:12]}"
    assert info.arch == "r50"
    assert info.embedding_dim == lib.EMBEDDING_DIM
    assert info.input_size == lib.CROP
    assert info.device == "cpu"
    assert info.precision == "fp32"
    assert info.demo_weights is False
    assert info.server_version
    assert info.batching.max_batch_size == lib.R50_MAX_BATCH
    assert info.batching.max_queue_delay_us == lib.R50_QUEUE_DELAY_US
    assert info.batching.max_queue_size == 4096  # the default
    assert info.max_faces_per_request == lib.R50_MAX_FACES
    assert info.max_message_bytes == 64 << 20  # the default


def test_onnx_weights_match_goldens(onnx_server, goldens):
    names = ["if50_crop_gaussian_0", "if50_whole_45-m7-di-ph"]
    resp = onnx_server.embed([goldens.face(goldens.cases[n]) for n in names])
    sha = lib.sha256_file(goldens.model_path("insightface_r50"))
    assert resp.model_id == f"arcface-r50@{sha[:12]}"
    for n, emb in zip(names, resp.embeddings):
        case = goldens.cases[n]
        lib.check_embedding(emb, goldens.embedding(case), case["tolerance"], n)
    info = onnx_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.weights_sha256 == sha
    assert info.model_id == resp.model_id


def test_embed_stream_order_and_errors(r50_server, goldens):
    good = ["crop_gradient_3", "whole_0-f1-su-ph", "crop_stripes_4"]
    requests = [
        pb.EmbedRequest(request_id="frame-1", faces=[goldens.face(goldens.cases[good[0]])]),
        pb.EmbedRequest(request_id="frame-2", faces=[
            pb.Face(image=pb.Image(encoded=b"this is not an image at all"))]),
        pb.EmbedRequest(request_id="frame-3", faces=[goldens.face(goldens.cases[good[1]])]),
        pb.EmbedRequest(request_id="frame-4", faces=[goldens.face(goldens.cases[good[2]])],
                        normalize=True),
    ]
    call = r50_server.stub.EmbedStream(iter(requests), timeout=60)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    bad = responses[1]
    assert bad.HasField("error")
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "face 0" in bad.error.message or "faces[0]" in bad.error.message, bad.error.message
    assert "undecodable" in bad.error.message or "unrecognized" in bad.error.message
    assert len(bad.embeddings) == 0
    for resp, name in zip([responses[0], responses[2], responses[3]], good):
        assert not resp.HasField("error"), resp.error
        assert resp.model_id == model_id(goldens, "r50")
        assert len(resp.embeddings) == 1
        case = goldens.cases[name]
        emb = resp.embeddings[0]
        if resp is responses[3]:
            v = np.asarray(emb.values, np.float64)
            assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
            assert lib.cosine(v, goldens.embedding(case)) >= 0.99999
        else:
            lib.check_embedding(emb, goldens.embedding(case), case["tolerance"], name)


def test_embed_stream_many_in_flight_keeps_order(r50_server, goldens):
    """Ten messages written at once (the server processes several of a stream concurrently):
    answers come back in request order, each with its own embedding."""
    crops = [c["name"] for c in goldens.cases_of("r50") if c["input"]["kind"] == "crop"]
    order = list(crops)
    random.Random(5).shuffle(order)
    requests = []
    for i, n in enumerate(order):
        requests.append(pb.EmbedRequest(request_id=f"m{i}", faces=[goldens.face(goldens.cases[n])]))
        if i in (2, 5):
            requests.append(pb.EmbedRequest(request_id=f"bad{i}", faces=[pb.Face(image=pb.Image(
                raw=pb.RawImage(width=4, height=4, format=pb.GRAY8, data=b"\0" * 15)))]))
    call = r50_server.stub.EmbedStream(iter(requests), timeout=120)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert [r.request_id for r in responses] == [r.request_id for r in requests]
    names = iter(order)
    for req, resp in zip(requests, responses):
        if req.request_id.startswith("bad"):
            assert resp.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert resp.error.message.startswith("face 0: "), resp.error.message
            assert "15 bytes" in resp.error.message
            continue
        assert not resp.HasField("error")
        case = goldens.cases[next(names)]
        lib.check_embedding(resp.embeddings[0], goldens.embedding(case), "exact", case["name"])


def test_health_and_http_probes(r50_server, goldens):
    assert r50_server.health_status("") == lib.SERVING
    assert r50_server.health_status(lib.SERVICE_NAME) == lib.SERVING
    with pytest.raises(grpc.RpcError) as err:
        r50_server.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"),
                                timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert lib.http_get(r50_server.http_base + "/healthz")[0] == 200
    assert lib.http_get(r50_server.http_base + "/readyz")[0] == 200
    assert lib.http_get(r50_server.http_base + "/no-such-page")[0] == 404
    # Two calls, so that at least two batches have run whatever ran before this test.
    for case in goldens.cases_of("r50")[:2]:
        r50_server.stub.Embed(pb.EmbedRequest(faces=[goldens.face(case)]), timeout=60)
    m = r50_server.metrics()
    for name in ["arcface_requests_total", "arcface_faces_total", "arcface_batch_size",
                 "arcface_queue_wait_seconds", "arcface_inference_seconds",
                 "arcface_request_seconds", "arcface_queue_depth", "arcface_rejected_total",
                 "arcface_model_info", "arcface_device_memory_allocated_bytes",
                 "arcface_device_memory_reserved_bytes", "arcface_preprocess_seconds",
                 "arcface_batch_stage_seconds", "arcface_postprocess_seconds",
                 "arcface_model_idle_seconds", "arcface_staged_ahead_crops_total"]:
        assert name in m.types, f"{name} missing from /metrics"
    # A CPU server has no device memory to report (the CUDA numbers: tests/gpu).
    assert m.get("arcface_device_memory_allocated_bytes") == 0
    assert m.get("arcface_device_memory_reserved_bytes") == 0
    # The pipeline's per-stage times: one observation per batch, the model's idle time from the
    # second batch on. The server is quiet between tests, but the last batch may still be being
    # reported (just after its calls were answered): read again until it is.
    m = lib.wait_until(
        lambda: (lambda m: m if m.histogram("arcface_batch_size")["count"]
                 == m.histogram("arcface_model_idle_seconds")["count"] + 1 else None)(
            r50_server.metrics()), 5, what="the last batch reported")
    batches = m.histogram("arcface_inference_seconds")["count"]
    assert batches >= 2
    for name in ["arcface_batch_stage_seconds", "arcface_postprocess_seconds"]:
        assert m.histogram(name)["count"] == batches, name
    assert m.histogram("arcface_model_idle_seconds")["count"] == batches - 1
    assert m.histogram("arcface_preprocess_seconds")["count"] >= 1
    info = r50_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.device_memory_allocated_bytes == 0 and info.device_memory_reserved_bytes == 0
    assert m.get("arcface_model_info", arch="r50", model_id=info.model_id, device="cpu",
                 precision="fp32") == 1
    # Every finished RPC is in both the counter and the latency histogram of its method.
    for rpc in ["Embed", "EmbedStream", "Compare", "GetModelInfo"]:
        count = m.histogram("arcface_request_seconds", rpc=rpc)["count"]
        assert count == m.sum("arcface_requests_total", rpc=rpc), rpc
    assert m.sum("arcface_requests_total", rpc="Embed") >= 1


def test_startup_summary_logged(r50_server, goldens):
    """The start-up summary names the model, the weights hash, device, precision, batching and
    both addresses."""
    log = r50_server.log_text()
    sha = lib.sha256_file(goldens.model_path("r50"))
    for needle in [sha, f"arcface-r50@{sha[:12]}", goldens.model_path("r50"), "cpu", "fp32",
                   f"127.0.0.1:{r50_server.grpc_port}", f"127.0.0.1:{r50_server.http_port}",
                   f"max batch {lib.R50_MAX_BATCH}", "backend onednn, winograd",
                   "OpenMP: OMP_WAIT_POLICY=active GOMP_SPINCOUNT=100000 OPENBLAS_CORETYPE="]:
        assert needle in log, f"{needle!r} not in the start-up log:\n{log[-3000:]}"


def test_two_batches_in_flight_answer_the_goldens(r50_server, start_server, goldens):
    """A CPU server with --max-batches-in-flight 2 (two model threads; on the CPU it only shows
    correctness, not speed): requests whose faces ride in several small batches, some of them in
    the model at once and finishing in any order, still get each face's golden embedding at its
    place, and GetModelInfo reports the setting (the automatic value on the CPU is 1)."""
    r50_info = r50_server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert r50_info.batching.max_batches_in_flight == 1
    server = start_server([
        "--weights", goldens.model_path("r50"),
        "--device", "cpu", "--threads", str(lib.THREADS),
        "--max-batch-size", "2", "--max-queue-delay-us", "2000",
        "--max-batches-in-flight", "2", "--warmup-batch-size", "0",
    ], name="r50_in_flight_2")
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.batching.max_batches_in_flight == 2
    assert info.batching.max_batch_size == 2
    names = [c["name"] for c in goldens.cases_of("r50") if c["input"]["kind"] == "crop"]
    names += ["box_multi_p2", "align_multi_p4"]
    requests = []
    for seed in range(3):
        order = list(names)
        random.Random(seed).shuffle(order)
        requests.append(order[:5])
    # Concurrent requests (futures), so batches of different requests interleave.
    futures = [server.stub.Embed.future(pb.EmbedRequest(
        faces=[goldens.face(goldens.cases[n]) for n in order]), timeout=120)
        for order in requests]
    for order, future in zip(requests, futures):
        resp = future.result()
        assert len(resp.embeddings) == len(order)
        for n, emb in zip(order, resp.embeddings):
            case = goldens.cases[n]
            lib.check_embedding(emb, goldens.embedding(case), case["tolerance"], n)


def test_direct_convolutions_and_own_openmp_settings(start_server, goldens):
    """--no-cpu-winograd runs the direct kernels, still exact to the reference; OpenMP settings
    the caller chose are kept, and the log says which are in effect."""
    server = start_server([
        "--weights", goldens.model_path("r50"), "--no-cpu-winograd",
        "--device", "cpu", "--threads", str(lib.THREADS), "--max-batch-size", "4",
    ], name="r50_direct", env={"OMP_WAIT_POLICY": "passive"})
    log = server.log_text()
    assert "backend onednn threads" in log and "winograd" not in log, log[-2000:]
    assert "OpenMP: OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=(unset)" in log, log[-2000:]
    names = ["crop_face_like_5", "crop_gaussian_1", "whole_single_face"]
    resp = server.embed([goldens.face(goldens.cases[n]) for n in names])
    for n, emb in zip(names, resp.embeddings):
        case = goldens.cases[n]
        lib.check_embedding(emb, goldens.embedding(case), case["tolerance"], n)


def test_int8_server(start_server, goldens):
    """--precision int8 on the CPU: the server calibrates at start-up, says so in GetModelInfo
    and /metrics, and its embeddings of the real-photo goldens stay within cosine 0.995 of the
    fp32 reference (the engine test holds every golden case to the same bar)."""
    server = start_server([
        "--weights", goldens.model_path("r50"), "--precision", "int8",
        "--device", "cpu", "--threads", str(lib.THREADS), "--max-batch-size", "8",
    ], name="r50_int8")
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.precision == "int8"
    m = server.metrics()
    assert m.get("arcface_model_info", arch="r50", model_id=info.model_id, device="cpu",
                 precision="int8") == 1
    names = ["whole_single_face", "box_multi_p2", "align_multi_p4", "whole_0-f1-su-ph",
             "crop_face_like_5", "crop_saltpepper_6"]
    resp = server.embed([goldens.face(goldens.cases[n]) for n in names])
    for n, emb in zip(names, resp.embeddings):
        got = np.asarray(emb.values, np.float64)
        assert lib.cosine(got, goldens.embedding(goldens.cases[n])) >= 0.995, n
