"""Detect and DetectStream with the real server and the real detector (face-api's networks in
libtorch, the files at ARCFACE_DETECTOR_MODELS): the faces of multi_face.jpg, in the frame's own
pixels whatever its scale or pixel format; Detect with embed equals Embed with the returned
landmarks; concurrent frames coalesce into detector batches; DetectStream answers in order with
per-frame errors; bad frames are INVALID_ARGUMENT naming the reason; --detector none answers
UNIMPLEMENTED; missing or malformed detector files stop the start naming the file."""

import os
import shutil
import subprocess
import threading

import cv2
import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

MODELS = os.environ.get("ARCFACE_DETECTOR_MODELS", "")
MULTI_FACE = os.path.join(lib.TEST_DATA, "multi_face.jpg")
SINGLE_FACE = os.path.join(lib.TEST_DATA, "single_face.jpg")
MAX_BATCH = 8



@pytest.fixture(autouse=True)
def detector_models():
    # A missing folder is a failure, not a skip: these tests are the detector's only end-to-end
    # check.
    assert MODELS and os.path.isdir(MODELS), (
        f"ARCFACE_DETECTOR_MODELS={MODELS!r} is not a folder: run deploy/fetch-models.sh "
        "(tests/run.sh does), or point it at face-api's model files (ctest sets it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    servers = lib.ServerSet(str(tmp_path_factory.mktemp("detect")))
    s = servers(lib.demo_args("--detector", MODELS,
                              "--detector-max-batch-size", str(MAX_BATCH),
                              "--detector-max-queue-delay-us", "20000",
                              "--max-image-pixels", "20000000"), name="detect")
    yield s
    servers.stop_all()


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def encoded(path):
    with open(path, "rb") as f:
        return pb.Image(encoded=f.read())


def raw(pixels, fmt=pb.RGB8):
    pixels = np.ascontiguousarray(pixels, np.uint8)
    h, w = pixels.shape[:2]
    return pb.Image(raw=pb.RawImage(width=w, height=h, format=fmt, data=pixels.tobytes()))


def png(rgb):
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return pb.Image(encoded=data.tobytes())


def detect(server, image, timeout=120, **kw):
    return server.stub.Detect(pb.DetectRequest(image=image, **kw), timeout=timeout)


def boxes(response):
    return np.array([[f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max]
                     for f in response.faces], np.float64).reshape(-1, 4)


def landmarks(response):
    return np.array([[[p.x, p.y] for p in f.landmarks] for f in response.faces],
                    np.float64).reshape(-1, 5, 2)


def iou(a, b):
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
    return inter / (area(a) + area(b) - inter)


def match(reference, got, min_iou, max_landmark_error):
    """Every reference face has a face in `got` with IoU >= min_iou whose five points are within
    max_landmark_error inter-ocular distances of the reference's."""
    ref_boxes, ref_points = boxes(reference), landmarks(reference)
    got_boxes, got_points = boxes(got), landmarks(got)
    assert len(got_boxes) == len(ref_boxes), (len(got_boxes), len(ref_boxes))
    for i, box in enumerate(ref_boxes):
        j = max(range(len(got_boxes)), key=lambda k: iou(box, got_boxes[k]))
        assert iou(box, got_boxes[j]) >= min_iou, (i, box, got_boxes[j])
        iod = np.linalg.norm(ref_points[i][0] - ref_points[i][1])
        err = np.linalg.norm(got_points[j] - ref_points[i], axis=1).max() / iod
        assert err <= max_landmark_error, (i, err)


@pytest.fixture(scope="module")
def multi_face(server):
    return detect(server, encoded(MULTI_FACE), request_id="multi")


def test_multi_face_has_its_five_faces_by_score(server, multi_face):
    r = multi_face
    h, w = read_rgb(MULTI_FACE).shape[:2]
    assert (r.image_width, r.image_height) == (w, h)
    assert r.request_id == "multi"
    assert len(r.faces) == 5, [f.score for f in r.faces]
    scores = [f.score for f in r.faces]
    assert scores == sorted(scores, reverse=True)
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert info.detector.enabled
    assert r.detector_id == info.detector.detector_id != ""
    assert r.model_id == ""  # nothing embedded
    for f in r.faces:
        assert 0 <= f.box.x_min < f.box.x_max <= w and 0 <= f.box.y_min < f.box.y_max <= h
        assert len(f.landmarks) == 5
        p = [(q.x, q.y) for q in f.landmarks]
        # Inside the box, and in ArcFace's order: eyes above the mouth, left eye on the left.
        for x, y in p:
            assert f.box.x_min - 2 <= x <= f.box.x_max + 2 and f.box.y_min - 2 <= y <= f.box.y_max + 2
        assert p[0][0] < p[1][0] and p[3][0] < p[4][0]
        assert max(p[0][1], p[1][1]) < p[2][1] < min(p[3][1], p[4][1])


def test_embed_equals_embed_with_the_returned_landmarks(server):
    r = detect(server, encoded(MULTI_FACE), embed=True, normalize=True)
    assert len(r.faces) == 5
    assert r.model_id != ""
    faces = [pb.Face(image=encoded(MULTI_FACE), landmarks=f.landmarks) for f in r.faces]
    e = server.embed(faces, normalize=True)
    assert e.model_id == r.model_id
    for i, (f, ref) in enumerate(zip(r.faces, e.embeddings)):
        assert len(f.embedding.values) == lib.EMBEDDING_DIM
        assert lib.cosine(f.embedding.values, ref.values) >= 0.9999, i
        assert f.embedding.norm == pytest.approx(ref.norm, rel=1e-4)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.5])
def test_coordinates_are_in_the_frame_as_sent_at_any_scale(server, multi_face, scale):
    rgb = read_rgb(MULTI_FACE)
    h, w = rgb.shape[:2]
    size = (round(w * scale), round(h * scale))
    scaled = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    r = detect(server, png(scaled))
    assert (r.image_width, r.image_height) == size
    # The reference faces scaled by the same factor: the detector's own resizing is undone.
    reference = pb.DetectResponse()
    reference.CopyFrom(multi_face)
    for f in reference.faces:
        f.box.x_min *= size[0] / w
        f.box.x_max *= size[0] / w
        f.box.y_min *= size[1] / h
        f.box.y_max *= size[1] / h
        for p in f.landmarks:
            p.x *= size[0] / w
            p.y *= size[1] / h
    match(reference, r, min_iou=0.7, max_landmark_error=0.15)


def test_raw_rgb_bgr_and_gray_frames(server, multi_face):
    rgb = read_rgb(MULTI_FACE)
    from_rgb = detect(server, raw(rgb))
    from_bgr = detect(server, raw(np.ascontiguousarray(rgb[:, :, ::-1]), pb.BGR8))
    # The same pixels as the JPEG decoded: the same faces.
    match(multi_face, from_rgb, min_iou=0.99, max_landmark_error=0.01)
    match(from_rgb, from_bgr, min_iou=0.999, max_landmark_error=0.001)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    from_gray = detect(server, raw(gray, pb.GRAY8))
    assert (from_gray.image_width, from_gray.image_height) == (rgb.shape[1], rgb.shape[0])
    match(multi_face, from_gray, min_iou=0.6, max_landmark_error=0.2)


def test_a_frame_without_faces_is_an_empty_list(server):
    flat = np.full((240, 320, 3), 128, np.uint8)
    r = detect(server, raw(flat), embed=True)
    assert len(r.faces) == 0
    assert (r.image_width, r.image_height) == (320, 240)


@pytest.mark.parametrize("name,image,reason", [
    ("empty", pb.Image(encoded=b""), "image: empty image"),
    ("undecodable", pb.Image(encoded=b"\xff\xd8 not really a jpeg" * 8),
     "image: unsupported or undecodable image"),
    ("huge", pb.Image(raw=pb.RawImage(width=50000, height=50000, format=pb.RGB8, data=b"\0")),
     "over the limit"),
    ("raw of the wrong size", pb.Image(raw=pb.RawImage(width=64, height=64, format=pb.RGB8,
                                                       data=b"\0" * 100)),
     "image: raw image data is 100 bytes"),
    ("no image", pb.Image(), "image: no image"),
])
def test_bad_frames_are_invalid_argument_naming_the_reason(server, name, image, reason):
    with pytest.raises(grpc.RpcError) as e:
        detect(server, image)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert reason in e.value.details(), (name, e.value.details())


def test_bad_options_are_invalid_argument(server):
    for kw, reason in [(dict(min_score=1.5), "min_score is 1.5"),
                       (dict(min_face_size=-3), "min_face_size is -3"),
                       (dict(max_faces=100000), "(--detector-max-faces)")]:
        with pytest.raises(grpc.RpcError) as e:
            detect(server, encoded(SINGLE_FACE), **kw)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert reason in e.value.details(), (kw, e.value.details())


def test_concurrent_frames_coalesce_and_each_caller_gets_its_own_faces(server, multi_face):
    def batch_sizes():
        return server.metrics().histogram("arcface_detector_batch_size")

    # A batch is recorded just after its calls are answered: wait for each count to land.
    start = batch_sizes()["sum"]
    single = detect(server, encoded(SINGLE_FACE))
    assert len(single.faces) == 1
    expected = {"multi": multi_face, "single": single}
    lib.wait_until(lambda: batch_sizes()["sum"] >= start + 1, 30, interval=0.01,
                   what="the single frame's batch is recorded")
    before = batch_sizes()
    callers = 24
    results, errors = [None] * callers, []

    def call(i):
        which = "multi" if i % 2 == 0 else "single"
        try:
            results[i] = (which, detect(server, encoded(MULTI_FACE if which == "multi"
                                                        else SINGLE_FACE),
                                        request_id=f"caller-{i}"))
        except grpc.RpcError as e:  # pragma: no cover - reported below
            errors.append((i, e.code(), e.details()))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, (which, r) in enumerate(results):
        assert r.request_id == f"caller-{i}"
        # Batched with others, the frame's faces are the ones it has alone.
        match(expected[which], r, min_iou=0.98, max_landmark_error=0.02)
    lib.wait_until(lambda: batch_sizes()["sum"] >= before["sum"] + callers, 30, interval=0.01,
                   what="every caller's batch is recorded")
    after = batch_sizes()
    batches = after["count"] - before["count"]
    frames = after["sum"] - before["sum"]
    single_frame_batches = after["buckets"][1.0] - before["buckets"].get(1.0, 0)
    assert frames == callers
    assert batches < callers
    assert single_frame_batches < batches, "no batch held more than one frame"
    assert after["buckets"][float(MAX_BATCH)] == after["count"]  # within the limit


def test_stream_answers_in_order_with_per_frame_errors(server, multi_face):
    frames = []
    for i in range(10):
        if i % 4 == 3:
            frames.append(pb.DetectRequest(image=pb.Image(encoded=b"garbage"), request_id=f"f{i}"))
        elif i % 2 == 0:
            frames.append(pb.DetectRequest(image=encoded(MULTI_FACE), request_id=f"f{i}"))
        else:
            frames.append(pb.DetectRequest(image=raw(np.zeros((48, 64, 3), np.uint8)),
                                           request_id=f"f{i}"))
    answers = list(server.stub.DetectStream(iter(frames), timeout=300))
    assert [a.request_id for a in answers] == [f"f{i}" for i in range(10)]
    for i, a in enumerate(answers):
        assert a.detector_id != ""
        if i % 4 == 3:
            assert a.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], i
            assert "image: " in a.error.message
        elif i % 2 == 0:
            assert not a.HasField("error")
            match(multi_face, a, min_iou=0.98, max_landmark_error=0.02)
        else:
            assert not a.HasField("error")
            assert len(a.faces) == 0


def test_detector_none_answers_unimplemented(start_server):
    s = start_server(lib.demo_args(), name="no-detector")
    with pytest.raises(grpc.RpcError) as e:
        detect(s, encoded(SINGLE_FACE))
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "--detector" in e.value.details()
    assert not s.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).detector.enabled


def run_server(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
    r = subprocess.run(lib.orphan_guarded([lib.SERVER_BIN, "--listen", "127.0.0.1:0",
                                           "--http-listen", "127.0.0.1:0", *args]),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, env=env, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace")


def test_missing_detector_files_stop_the_start_naming_the_file(tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    rc, out = run_server(lib.demo_args("--detector", str(empty)))
    assert rc == 2, out
    assert "--detector" in out and str(empty) in out, out
    assert ".json" in out or ".bin" in out, out


def test_malformed_detector_files_stop_the_start_naming_the_file(tmp_path):
    broken = tmp_path / "truncated"
    shutil.copytree(MODELS, broken)
    cut = []
    for name in sorted(os.listdir(broken)):
        if name.endswith(".bin"):
            path = broken / name
            data = path.read_bytes()
            path.write_bytes(data[:len(data) // 2])
            cut.append(name)
    rc, out = run_server(lib.demo_args("--detector", str(broken)))
    assert rc == 2, out
    assert any(name in out for name in cut), out
