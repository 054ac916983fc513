"""ArcFaceClient.detect and detect_stream against a real arcface-server with the golden r50
weights, the face detector of ARCFACE_DETECTOR_MODELS (deploy/fetch-models.sh) and a SQLite
gallery store, on the repository's photos: five faces in multi_face.jpg, one in
single_face.jpg, none in the drawn landscape. Embeddings are checked against Embed of the same
landmarks, identities against faces enrolled from the same frame; the arguments' checks run
before any call."""

import os

import cv2
import grpc
import numpy as np
import pytest

import arcface_testlib as lib

from arcface_client import ArcFaceClient, ArcFaceError, Candidate, DetectedFace, Detection

MULTI = os.path.join(lib.TEST_DATA, "multi_face.jpg")  # five faces
SINGLE = os.path.join(lib.TEST_DATA, "single_face.jpg")
NO_FACE = os.path.join(lib.TEST_DATA, "free-mountain-vector-01.jpg")


@pytest.fixture(scope="module")
def detect_server(tmp_path_factory, goldens):
    work = tmp_path_factory.mktemp("pydetect")
    srv = lib.ServerProcess([
        "--weights", goldens.model_path("r50"),
        "--device", "cpu", "--threads", str(lib.THREADS),
        *lib.detector_args(),
        "--gallery-store", f"sqlite:{work / 'gallery.db'}",
        "--drain-timeout", "20",
    ], str(work), name="r50_pydetect")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def dc(detect_server):
    with ArcFaceClient(f"127.0.0.1:{detect_server.grpc_port}", timeout=120) as c:
        yield c


def rgb(path):
    return cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION),
                        cv2.COLOR_BGR2RGB)


def boxes(detection):
    return np.array([f.box for f in detection.faces], np.float64).reshape(-1, 4)


def assert_plausible_face(face, width, height, what):
    """A box inside the frame (a detector may reach a little past its edge), a score in
    [0, 1], and five landmarks in the ArcFace order on an upright face: the image-left eye
    left of the other, both eyes above the nose tip, the nose tip above the mouth corners."""
    x0, y0, x1, y1 = face.box
    assert -0.1 * width <= x0 < x1 <= 1.1 * width and -0.1 * height <= y0 < y1 <= 1.1 * height, (
        what, face.box)
    assert 0.0 <= face.score <= 1.0, (what, face.score)
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32, (what, lm)
    w, h = x1 - x0, y1 - y0
    inside = ((lm[:, 0] >= x0 - 0.25 * w) & (lm[:, 0] <= x1 + 0.25 * w) &
              (lm[:, 1] >= y0 - 0.25 * h) & (lm[:, 1] <= y1 + 0.25 * h))
    assert inside.all(), (what, face.box, lm)
    left_eye, right_eye, nose, mouth_left, mouth_right = lm
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0], (what, lm)
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1]), (what, lm)


def test_model_info_reports_the_detector(dc):
    d = dc.model_info()["detector"]
    assert d["enabled"] is True, d
    assert d["detector_id"] and d["detector"] and d["landmarks"], d
    assert len(d["weights_sha256"]) == 64 and 0.0 < d["default_min_score"] < 1.0, d
    assert d["input_size"] > 0 and d["max_faces_per_frame"] > 0 and d["device"] == "cpu", d
    assert d["batching"]["max_batch_size"] >= 1, d


def test_faces_of_the_repository_photos(dc):
    multi = dc.detect(MULTI)
    assert isinstance(multi, Detection) and (multi.width, multi.height) == (1000, 667)
    assert multi.detector_id == dc.model_info()["detector"]["detector_id"]
    assert multi.model_id == ""  # nothing was embedded
    # Haar's cascade found 1 of these 5 faces; the served detector must find them.
    assert len(multi.faces) >= 4, multi.faces
    scores = [f.score for f in multi.faces]
    assert scores == sorted(scores, reverse=True), scores
    for i, f in enumerate(multi.faces):
        assert isinstance(f, DetectedFace) and f.embedding is None and f.candidates == ()
        assert_plausible_face(f, 1000, 667, f"multi_face face {i}")
    single = dc.detect(SINGLE)
    assert len(single.faces) == 1, single.faces
    assert_plausible_face(single.faces[0], 572, 562, "single_face")
    # No face is an empty answer, not an error.
    assert dc.detect(NO_FACE).faces == ()
    assert dc.detect(np.full((200, 300, 3), 128, np.uint8)).faces == ()


def test_paths_bytes_and_arrays_give_the_same_faces(dc):
    by_path = dc.detect(MULTI)
    by_bytes = dc.detect(lib.read_bytes(MULTI))
    by_rgb = dc.detect(rgb(MULTI))
    np.testing.assert_allclose(boxes(by_bytes), boxes(by_path), atol=1e-3)
    # Raw RGB pixels: the same decoded image (OpenCV's JPEG decoder on both sides).
    assert len(by_rgb.faces) == len(by_path.faces)
    np.testing.assert_allclose(boxes(by_rgb), boxes(by_path), atol=1.0)
    gray = dc.detect(cv2.cvtColor(rgb(MULTI), cv2.COLOR_RGB2GRAY))
    assert (gray.width, gray.height) == (1000, 667) and len(gray.faces) >= 3, gray.faces


def test_filters_pick_from_the_full_list(dc):
    everything = dc.detect(MULTI, min_score=0.1)
    assert len(everything.faces) >= 4
    top2 = dc.detect(MULTI, min_score=0.1, max_faces=2)
    np.testing.assert_allclose(boxes(top2), boxes(everything)[:2], atol=1e-3)
    cut = (everything.faces[1].score + everything.faces[2].score) / 2
    high = dc.detect(MULTI, min_score=cut)
    np.testing.assert_allclose(boxes(high), boxes(everything)[:2], atol=1e-3)
    sides = sorted(min(x1 - x0, y1 - y0) for x0, y0, x1, y1 in boxes(everything))
    size = (sides[0] + sides[1]) / 2
    big = dc.detect(MULTI, min_score=0.1, min_face_size=size)
    want = [b for b in boxes(everything) if min(b[2] - b[0], b[3] - b[1]) >= size]
    np.testing.assert_allclose(boxes(big), np.array(want), atol=1e-3)


def test_embed_equals_embed_of_the_returned_landmarks(dc):
    found = dc.detect(MULTI, embed=True, request_id="frame-7")
    assert found.request_id == "frame-7" and found.model_id == dc.model_info()["model_id"]
    emb = found.embeddings()
    assert emb.shape == (len(found.faces), 512) and emb.dtype == np.float32
    direct = dc.embed([MULTI] * len(found.faces), landmarks=[f.landmarks for f in found.faces])
    for i, (got, want) in enumerate(zip(emb, direct)):
        assert lib.cosine(got, want) >= 0.9999, i
        assert abs(found.faces[i].norm - np.linalg.norm(want)) <= 1e-3 * np.linalg.norm(want), i
    unit = dc.detect(MULTI, embed=True, normalize=True)
    norms = np.linalg.norm(unit.embeddings(), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    np.testing.assert_allclose([f.norm for f in unit.faces], [f.norm for f in found.faces],
                               rtol=1e-4)
    with pytest.raises(ValueError, match="embed=True"):
        dc.detect(MULTI).embeddings()


def test_gallery_identifies_each_face_of_the_frame(dc):
    found = dc.detect(MULTI, embed=True)
    for i, e in enumerate(found.embeddings()):
        dc.enroll(f"person-{i}", [e], gallery="detect")
    named = dc.detect(MULTI, gallery="detect", top_k=2, threshold=-1)  # every candidate
    assert named.model_id == found.model_id and len(named.faces) == len(found.faces)
    assert named.threshold == -1 and found.threshold is None
    for i, f in enumerate(named.faces):
        assert f.embedding is not None  # a gallery implies embed
        assert len(f.candidates) == 2 and isinstance(f.candidates[0], Candidate), f.candidates
        assert f.identity == f"person-{i}" and f.candidates[0].similarity >= 0.999, f.candidates
        assert f.candidates[1].similarity < f.candidates[0].similarity
    # Above a threshold no other person qualifies: one candidate each.
    strict = dc.detect(MULTI, gallery="detect", top_k=3, threshold=0.9)
    assert [len(f.candidates) for f in strict.faces] == [1] * len(found.faces)
    # None: the model's own threshold, each face's candidates those of -1 that reach it.
    by_default = dc.detect(MULTI, gallery="detect", top_k=2)
    assert by_default.threshold == pytest.approx(dc.default_threshold)
    for f, every in zip(by_default.faces, named.faces):
        assert [c.subject_id for c in f.candidates] == [
            c.subject_id for c in every.candidates if c.similarity >= dc.default_threshold], (
            f.candidates, every.candidates)
    with pytest.raises(ArcFaceError) as e:
        dc.detect(MULTI, gallery="no-such-gallery")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "no-such-gallery" in e.value.details


def test_bad_frames_are_invalid_argument(dc):
    for image in (b"not an image", b""):
        with pytest.raises(ArcFaceError) as e:
            dc.detect(image)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert e.value.details and e.value.method == "Detect", e.value


def test_detect_stream_in_order_with_per_frame_errors(dc):
    single = rgb(SINGLE)
    consumed = []

    def frames():  # lazy, as a video reader is
        for f in (MULTI, single, b"garbage", NO_FACE, SINGLE):
            consumed.append(f if isinstance(f, (str, bytes)) else "array")
            yield f

    out = list(dc.detect_stream(frames(), embed=True, errors="yield"))
    assert len(out) == 5 and len(consumed) == 5
    assert [o.request_id for o in out if isinstance(o, Detection)] == ["0", "1", "3", "4"]
    assert isinstance(out[2], ArcFaceError) and out[2].code == grpc.StatusCode.INVALID_ARGUMENT
    assert out[3].faces == ()
    unary = dc.detect(MULTI, embed=True)
    np.testing.assert_allclose(boxes(out[0]), boxes(unary), atol=1e-3)
    for a, b in zip(out[0].embeddings(), unary.embeddings()):
        assert lib.cosine(a, b) >= 0.9999
    assert len(out[1].faces) == 1 and len(out[4].faces) == 1
    np.testing.assert_allclose(boxes(out[1]), boxes(out[4]), atol=1.0)
    # max_in_flight: a frame is taken from the source only when one is answered.
    pulled = []

    def counted(n):
        for _ in range(n):
            pulled.append(1)
            yield SINGLE

    answers = 0
    for k, d in enumerate(dc.detect_stream(counted(6), max_in_flight=2)):
        answers += 1
        # k + 1 answered: at most 2 more sent (without the window all 6 go at once).
        assert len(pulled) <= k + 1 + 2, (k, len(pulled))
        assert len(d.faces) == 1
    assert answers == 6 and len(pulled) == 6
    with pytest.raises(ArcFaceError) as e:
        list(dc.detect_stream([SINGLE, b"garbage", SINGLE]))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.method == "DetectStream"
    assert list(dc.detect_stream(iter(()))) == []


def test_arguments_are_checked_before_any_call():
    """No server behind the address: each bad argument fails before a call would be UNAVAILABLE."""
    with ArcFaceClient(f"127.0.0.1:{lib.free_port()}", timeout=5, retries=1) as c:
        frame = np.zeros((8, 8, 3), np.uint8)
        for kwargs, word in ((dict(min_score=1.5), "min_score"), (dict(min_score="x"), "min_score"),
                             (dict(max_faces=-1), "max_faces"), (dict(max_faces=2.5), "max_faces"),
                             (dict(min_face_size=float("inf")), "min_face_size"),
                             (dict(top_k=3), "gallery"), (dict(threshold=0.4), "gallery"),
                             (dict(gallery="g", threshold=float("nan")), "threshold"),
                             (dict(gallery=None), "gallery"),
                             (dict(top_k=2 ** 32, gallery="g"), "top_k")):
            with pytest.raises(ValueError, match=word):
                c.detect(frame, **kwargs)
            with pytest.raises(ValueError, match=word):
                c.detect_stream([frame], **kwargs)  # at the call, before the stream opens
        with pytest.raises(ValueError, match="errors"):
            c.detect_stream([frame], errors="ignore")
        for bad in (0, 1.5, True):
            with pytest.raises(ValueError, match="max_in_flight"):
                c.detect_stream([frame], max_in_flight=bad)
        with pytest.raises(TypeError, match="uint8"):
            c.detect(np.zeros((8, 8, 3), np.float32))
        with pytest.raises(ArcFaceError) as e:
            c.detect(frame)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_without_a_detector_detect_is_unimplemented(tmp_path):
    srv = lib.ServerProcess(lib.demo_args("--detector", "none"), str(tmp_path), name="nodetector")
    srv.start()
    try:
        with ArcFaceClient(f"127.0.0.1:{srv.grpc_port}", timeout=60) as c:
            assert c.model_info()["detector"]["enabled"] is False
            with pytest.raises(ArcFaceError) as e:
                c.detect(SINGLE)
            assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
            assert "--detector" in e.value.details
            with pytest.raises(ArcFaceError) as e:
                list(c.detect_stream([SINGLE]))
            assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()
