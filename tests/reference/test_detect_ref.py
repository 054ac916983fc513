"""Checks of detect_ref.py, the numpy reference of face-api's detection networks (run:
ARCFACE_DETECTOR_MODELS=models/face-api /usr/bin/python3 -m pytest tests/reference/test_detect_ref.py).

The FACE_API_* values were printed by face-api 1.7.15 itself (dist/face-api.esm.js of the npm
package, TF.js's CPU backend, under node: face_api_peer.mjs, whose header says how to run it)
on tests/data/multi_face.jpg decoded by OpenCV and passed as an int32 tensor: locateFaces (SSD,
minConfidence 0.3; Tiny, scoreThreshold 0.3, inputSize 416) and
detectAllFaces().withFaceLandmarks() (unshiftedLandmarks: crop pixels).
torch appears here only as an outside check of the reference's own convolution and pooling.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import detect_ref as ref  # noqa: E402

DATA = os.environ.get("ARCFACE_TEST_DATA", os.path.normpath(os.path.join(HERE, "..", "data")))
MODELS = os.environ.get("ARCFACE_DETECTOR_MODELS",
                        os.path.normpath(os.path.join(HERE, "..", "..", "models", "face-api")))
NEEDED = ["ssd_mobilenetv1_model", "tiny_face_detector_model", "face_landmark_68_model"]

# score, x0, y0, x1, y1 (face-api prints one decimal)
FACE_API_SSD = [
    (0.9959, 531.0, 297.6, 627.3, 437.5),
    (0.9909, 221.8, 59.1, 303.2, 171.8),
    (0.9886, 312.5, 218.3, 412.1, 362.4),
    (0.9853, 680.0, 273.4, 789.5, 420.5),
    (0.9850, 434.8, 204.0, 516.9, 310.4),
]
FACE_API_TINY = [
    (0.8858, 651.5, 304.4, 822.4, 448.1),
    (0.8605, 199.9, 63.9, 327.0, 169.6),
    (0.7687, 393.2, 215.0, 554.2, 340.9),
    (0.7033, 503.7, 306.2, 678.5, 453.3),
    (0.7009, 283.7, 239.1, 448.0, 387.7),
]
# Per SSD face: the box face-api cropped, and landmarks 0, 8, 16, 30, 36, 39, 42, 45, 48, 54
# in the crop's pixels.
LANDMARK_IDS = [0, 8, 16, 30, 36, 39, 42, 45, 48, 54]
FACE_API_LANDMARKS = [
    ([530.9816, 297.6303, 627.344, 437.4501],
     [[-1.479, 56.437], [39.217, 134.851], [100.076, 66.422], [40.928, 78.602], [17.492, 53.611],
      [32.966, 56.306], [59.537, 58.91], [75.924, 60.428], [19.881, 96.188], [65.937, 101.159]]),
    ([221.7573, 59.053, 303.2486, 171.759],
     [[-3.278, 32.504], [33.6, 112.963], [84.73, 52.904], [44.722, 68.452], [19.446, 40.181],
      [34.754, 44.404], [57.429, 48.267], [71.631, 49.974], [17.366, 78.336], [58.79, 85.194]]),
    ([312.4785, 218.2505, 412.1329, 362.3513],
     [[-1.896, 64.306], [55.936, 140.944], [99.271, 62.117], [56.285, 85.567], [23.304, 62.624],
      [39.919, 62.984], [66.11, 61.775], [81.988, 60.255], [33.842, 105.381], [75.991, 103.186]]),
    ([680.0019, 273.4186, 789.4763, 420.4856],
     [[-0.124, 62.184], [47.617, 144.212], [111.492, 74.852], [50.958, 88.789], [23.501, 61.876],
      [40.499, 64.572], [69.472, 67.337], [87.169, 68.56], [27.416, 106.723], [73.667, 112.006]]),
    ([434.8323, 203.9748, 516.9214, 310.4309],
     [[0.202, 48.611], [42.24, 104.021], [82.319, 49.781], [43.7, 62.013], [19.863, 43.94],
      [32.776, 44.663], [53.889, 44.914], [66.828, 44.68], [28.091, 79.188], [57.43, 80.005]]),
]


@pytest.fixture(scope="module")
def models():
    missing = [n for n in NEEDED
               if not os.path.exists(os.path.join(MODELS, n + "-weights_manifest.json"))]
    if missing:
        pytest.fail(f"{MODELS} lacks {', '.join(missing)}: run deploy/fetch-models.sh {MODELS} "
                    f"(or set ARCFACE_DETECTOR_MODELS to a folder with face-api's files)")
    return MODELS


@pytest.fixture(scope="module")
def multi_face():
    return ref.read_rgb(os.path.join(DATA, "multi_face.jpg"))


@pytest.fixture(scope="module")
def ssd(models, multi_face):
    return ref.run_ssd(models, multi_face, min_score=0.3)


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_ssd_finds_the_five_faces_of_multi_face(ssd, multi_face):
    # min_score 0.3 and still five: nothing else in the photo comes near a face.
    assert len(ssd["det_scores"]) == 5
    assert np.all(ssd["det_scores"] >= 0.5)
    assert np.all(np.diff(ssd["det_scores"]) <= 0), "by score, descending"
    h, w = multi_face.shape[:2]
    boxes = ssd["det_boxes"]
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 2] <= w)
    assert np.all(boxes[:, 1] >= 0) and np.all(boxes[:, 3] <= h)
    for i in range(5):
        for j in range(i):
            assert iou(boxes[i], boxes[j]) < 0.05, "five different faces"


def test_ssd_equals_face_api(ssd):
    for (score, *box), got_score, got_box in zip(FACE_API_SSD, ssd["det_scores"],
                                                 ssd["det_boxes"]):
        assert got_score == pytest.approx(score, abs=6e-5)
        np.testing.assert_allclose(got_box, box, atol=0.06)


def test_ssd_raw_outputs(ssd):
    assert ssd["input"].shape == (1, 512, 512, 3)
    assert ssd["input"].min() >= -1.0 and ssd["input"].max() <= 1.0
    assert ssd["conv11"].shape == (32, 32, 512) and ssd["features"].shape == (16, 16, 1024)
    assert ssd["box_encodings"].shape == (5118, 4) and ssd["class_logits"].shape == (5118, 3)
    # ReLU6 feature maps.
    assert ssd["features"].min() >= 0 and ssd["features"].max() <= 6
    # The kept anchors' scores and boxes are the raw outputs', mapped to the image: 1000x667 is
    # padded to 1000x1000, so y scales by 512/round(667*0.512) = 512/342, then by 667.
    for k, i in enumerate(ssd["det_indices"]):
        assert ssd["det_scores"][k] == ssd["scores"][i] == ref.sigmoid(ssd["class_logits"][i, 1])
        ymin, xmin, ymax, xmax = np.clip(ssd["boxes"][i], 0, 1)
        np.testing.assert_allclose(ssd["det_boxes"][k],
                                   [xmin * 1000, ymin * 512 / 342 * 667,
                                    xmax * 1000, ymax * 512 / 342 * 667])


def test_ssd_boxes_follow_the_image_scale(models, multi_face, ssd):
    import cv2  # only to make the half-size image

    half = cv2.resize(multi_face, (500, 334), interpolation=cv2.INTER_AREA)
    small = ref.run_ssd(models, half)
    assert len(small["det_scores"]) == 5
    for box in ssd["det_boxes"]:
        assert max(iou(box, b * np.array([2, 667 / 334, 2, 667 / 334]))
                   for b in small["det_boxes"]) > 0.85


def test_no_face_in_a_landscape(models):
    rgb = ref.read_rgb(os.path.join(DATA, "free-mountain-vector-01.jpg"))
    res = ref.run_ssd(models, rgb)
    assert res["det_boxes"].shape == (0, 4)
    assert res["scores"].max() < 0.1


def test_tiny_equals_face_api_and_finds_the_same_faces(models, multi_face, ssd):
    tiny = ref.run_tiny(models, multi_face, input_size=416, min_score=0.3)
    assert tiny["grid"].shape == (13, 13, 25)
    assert len(tiny["det_scores"]) == 5
    for (score, *box), got_score, got_box in zip(FACE_API_TINY, tiny["det_scores"],
                                                 tiny["det_boxes"]):
        assert got_score == pytest.approx(score, abs=6e-5)
        np.testing.assert_allclose(got_box, box, atol=0.06)
    # Tiny's boxes are looser (forehead to chin), but each holds one of SSD's faces.
    for box in ssd["det_boxes"]:
        assert max(iou(box, b) for b in tiny["det_boxes"]) > 0.35


def test_landmarks_equal_face_api(models, multi_face):
    for box, expected in FACE_API_LANDMARKS:
        res = ref.run_landmark68(models, multi_face, box)
        assert res["output"].shape == (136,) and res["features"].shape == (256,)
        np.testing.assert_allclose(res["landmarks_crop"][LANDMARK_IDS], expected, atol=5e-3)
        # Clipped (nothing to clip here), then x, y, width, height each floored.
        x0, y0 = int(box[0]), int(box[1])
        assert list(res["crop"]) == [x0, y0, int(box[2] - box[0]), int(box[3] - box[1])]
        np.testing.assert_allclose(res["landmarks"], res["landmarks_crop"] + [x0, y0])


def test_landmarks_are_a_face(models, multi_face, ssd):
    """The five ArcFace points of each SSD face, as the server takes them from the 68."""
    for box in ssd["det_boxes"]:
        pts = ref.run_landmark68(models, multi_face, box)["landmarks"]
        left_eye, right_eye = pts[36:42].mean(axis=0), pts[42:48].mean(axis=0)
        nose, mouth_l, mouth_r = pts[30], pts[48], pts[54]
        assert left_eye[0] < nose[0] < right_eye[0]
        assert mouth_l[0] < mouth_r[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_l[1], mouth_r[1])
        width = box[2] - box[0]
        assert 0.25 * width < right_eye[0] - left_eye[0] < 0.6 * width
        for x, y in (left_eye, right_eye, nose, mouth_l, mouth_r):
            assert box[0] <= x <= box[2] and box[1] <= y <= box[3]


def test_cli_writes_the_documented_keys(models, tmp_path):
    out = tmp_path / "lm.npz"
    assert ref.main(["--models", models, "--image", os.path.join(DATA, "single_face.jpg"),
                     "--net", "landmark68", "--box", "189,164,373,395", "--out", str(out)]) == 0
    with np.load(out) as z:
        assert set(z.files) == {"net", "image", "crop", "resized", "input", "features", "output",
                                "landmarks_crop", "landmarks"}
        assert str(z["net"]) == "landmark68"
        assert z["input"].shape == (1, 112, 112, 3)
        assert z["image"].shape == (231, 184, 3) and z["image"].dtype == np.uint8


# ---- the reference's own parts ----------------------------------------------------------------


def _write_manifest(tmp_path, weights, shard: bytes, name="m.json"):
    (tmp_path / "w.bin").write_bytes(shard)
    (tmp_path / name).write_text(json.dumps([{"paths": ["w.bin"], "weights": weights}]))
    return str(tmp_path / name)


def test_reader_dequantises_and_checks_sizes(tmp_path):
    weights = [{"name": "q", "shape": [2, 2], "dtype": "float32",
                "quantization": {"dtype": "uint8", "scale": 0.1, "min": -1.0}},
               {"name": "i", "shape": [3], "dtype": "int32",
                "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.5}},
               {"name": "h", "shape": [1], "dtype": "float32",
                "quantization": {"dtype": "float16"}}]
    shard = bytes([0, 1, 10, 255]) + bytes([0, 1, 2]) + np.float16(0.5).tobytes()
    w = ref.read_tfjs(_write_manifest(tmp_path, weights, shard))
    np.testing.assert_array_equal(
        w["q"], np.float32(np.array([0, 1, 10, 255]) * 0.1 - 1.0).reshape(2, 2))
    assert list(w["i"]) == [-1, -1, 0]  # Math.round: -1.5 -> -1, -0.5 -> 0
    assert list(w["h"]) == [0.5]
    with pytest.raises(ref.WeightsError, match="truncated"):
        ref.read_tfjs(_write_manifest(tmp_path, weights, shard[:-1]))
    with pytest.raises(ref.WeightsError, match="too many"):
        ref.read_tfjs(_write_manifest(tmp_path, weights, shard + b"\0"))


def test_ops_against_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(14)
    x = rng.standard_normal((1, 10, 9, 4))
    w = rng.standard_normal((3, 3, 4, 5))
    dw = rng.standard_normal((3, 3, 4, 1))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    # TF 'same', stride 2 on 10x9: rows pad (0, 1), columns (1, 1).
    assert ref.same_pads(10, 3, 2) == (0, 1) and ref.same_pads(9, 3, 2) == (1, 1)
    want = F.conv2d(F.pad(xt, (1, 1, 0, 1)), torch.from_numpy(w).permute(3, 2, 0, 1), stride=2)
    np.testing.assert_allclose(ref.conv2d(x, w, 2, "same"), want.permute(0, 2, 3, 1).numpy(),
                               atol=1e-12)
    want = F.conv2d(F.pad(xt, (1, 1, 0, 1)), torch.from_numpy(dw).permute(2, 3, 0, 1), stride=2,
                    groups=4)
    np.testing.assert_allclose(ref.depthwise_conv2d(x, dw, 2, "same"),
                               want.permute(0, 2, 3, 1).numpy(), atol=1e-12)
    # max-pool 2x2 'same' stride 1 pads one row and column after, never chosen.
    want = F.max_pool2d(F.pad(xt, (0, 1, 0, 1), value=-np.inf), 2, stride=1)
    np.testing.assert_array_equal(ref.max_pool(x, 2, 1), want.permute(0, 2, 3, 1).numpy())
    want = F.avg_pool2d(xt, 3, stride=2)
    np.testing.assert_allclose(ref.avg_pool_valid(x, 3, 2), want.permute(0, 2, 3, 1).numpy(),
                               atol=1e-12)


def test_pad_and_resize_follow_tf():
    img = np.arange(2 * 3 * 1, dtype=np.float64).reshape(2, 3, 1)
    # bottom/right padding for the detectors; centred (round(d/2) after) for the landmarks.
    assert ref.pad_to_square(img, centred=False)[:, :, 0].tolist() == [[0, 1, 2], [3, 4, 5],
                                                                       [0, 0, 0]]
    tall = np.ones((5, 2, 1))
    padded = ref.pad_to_square(tall, centred=True)[:, :, 0]
    assert padded[0].tolist() == [0, 1, 1, 0, 0]  # 1 before, round(1.5) = 2 after
    # resizeBilinear without half-pixel centres: dest i samples source i * in/out.
    row = np.array([[0.0, 10.0, 20.0, 30.0]]).reshape(1, 4, 1)
    out = ref.resize_bilinear(np.repeat(row, 4, axis=0), 8)
    np.testing.assert_allclose(out[0, :, 0], [0, 5, 10, 15, 20, 25, 30, 30])
