"""Checks of dlib_ref.py, the numpy reference of dlib's ResNet face descriptor, and of the dlib
chip template in server/model/shapes.h (run: ARCFACE_DETECTOR_MODELS=models/face-api
ARCFACE_DLIB_DATA=build/dlib-data /usr/bin/python3 -m pytest tests/reference/test_dlib_ref.py).

FACE_API_DESCRIPTORS were printed by face-api 1.7.15 itself (face_api_descriptor_peer.mjs, TF.js's
CPU backend under node) for the first three johns chips decoded by OpenCV: the reference with
face-api's /255 input scaling must reproduce them. torch is only an outside check of the pools.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import dlib_ref as ref  # noqa: E402

MODELS = os.environ.get("ARCFACE_DETECTOR_MODELS", os.path.join(ROOT, "models", "face-api"))
DLIB_DATA = os.environ.get("ARCFACE_DLIB_DATA", os.path.join(ROOT, "build", "dlib-data"))
MANIFEST = os.path.join(MODELS, "face_recognition_model-weights_manifest.json")
DLIB_HEADER = "/usr/include/dlib/image_transforms/interpolation.h"

# (johns photo, first six values, norm) of face-api's own descriptor.
FACE_API_DESCRIPTORS = [
    ("John_Salley/000179_02159509.jpg",
     [-0.1107892, 0.09616106, 0.0218329, 0.009378353, 0.04871733, -0.07763235], 1.45633012),
    ("John_Salley/000183_02159543.jpg",
     [-0.1113322, 0.1045224, 0.03195254, 0.02828664, 0.03969983, -0.07326188], 1.42168955),
    ("John_Salley/000186_02159346.jpg",
     [-0.1155873, 0.05482224, 0.08524293, 0.03127917, 0.05528174, -0.08677345], 1.46130016),
]


def need(path):
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing (deploy/fetch-models.sh, tests/data/fetch_dlib_data.sh)")
    return path


def read_chip(path):
    import cv2
    bgr = cv2.imread(need(path), cv2.IMREAD_COLOR)
    return bgr[:, :, ::-1]


def test_expected_shapes_are_the_manifests_in_order():
    with open(need(MANIFEST)) as f:
        manifest = json.load(f)
    specs = [(w["name"], tuple(w["shape"])) for g in manifest for w in g["weights"]]
    assert specs == ref.expected_shapes()
    assert len(specs) == 117


def test_reference_with_face_apis_scaling_reproduces_face_api():
    w = ref.load(need(MANIFEST))
    chips = np.stack([read_chip(os.path.join(DLIB_DATA, "johns", name))
                      for name, _, _ in FACE_API_DESCRIPTORS])
    got = ref.describe(w, chips, input_scale=255.0)
    for (name, first, norm), d in zip(FACE_API_DESCRIPTORS, got):
        np.testing.assert_allclose(d[:6], first, atol=2e-7, err_msg=name)
        assert abs(np.linalg.norm(d) - norm) < 1e-6, name
    # dlib's own /256 moves the descriptor by a rounding's worth of direction.
    ours = ref.describe(w, chips)
    cos = (ours * got).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(got, axis=1)
    assert np.all(cos > 0.99999), cos


def test_pools_match_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).normal(size=(2, 35, 35, 5))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    want_max = torch.nn.functional.max_pool2d(t, 3, 2).permute(0, 2, 3, 1).numpy()
    want_avg = torch.nn.functional.avg_pool2d(t, 2, 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ref.max_pool_valid(x, 3, 2), want_max, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.avg_pool_valid(x, 2, 2), want_avg, rtol=0, atol=1e-12)


def test_residual_down_pads_the_main_path_at_bottom_and_right():
    # With a zero network, the down block is relu(pooled shortcut, padded with zero channels):
    # an 8x8 input comes out 4x4 although the 'valid' stride-2 conv gives 3x3.
    c_in, c_out = 2, 4
    w = {}
    for conv, cin in (("b/conv1", c_in), ("b/conv2", c_out)):
        w[f"{conv}/conv/filters"] = np.zeros((3, 3, cin, c_out))
        w[f"{conv}/conv/bias"] = np.zeros(c_out)
        w[f"{conv}/scale/weights"] = np.ones(c_out)
        w[f"{conv}/scale/biases"] = np.zeros(c_out)
    w["b/conv2/scale/biases"] = np.ones(c_out)  # the main path is 1 where it exists
    x = np.random.default_rng(2).uniform(0, 1, (1, 8, 8, c_in))
    out = ref.residual_down(w, x, "b")
    assert out.shape == (1, 4, 4, c_out)
    pooled = ref.avg_pool_valid(x, 2, 2)
    np.testing.assert_allclose(out[0, :3, :3, :c_in], pooled[0, :3, :3] + 1)
    np.testing.assert_allclose(out[0, 3, :, :c_in], pooled[0, 3])       # padded row: shortcut
    np.testing.assert_allclose(out[0, :, 3, :c_in], pooled[0, :, 3])    # padded column
    np.testing.assert_allclose(out[0, :3, :3, c_in:], 1)                # zero channels + 1


def dlib_mean_face():
    with open(need(DLIB_HEADER)) as f:
        src = f.read()

    def array(name):
        m = re.search(r"const double %s\[\]\s*=\s*\{([^}]*)\}" % name, src)
        return np.array([float(v) for v in m.group(1).split(",")])
    x, y = array("mean_face_shape_x"), array("mean_face_shape_y")
    assert len(x) == len(y) == 68 - 17
    return {i: np.array([x[i - 17], y[i - 17]]) for i in range(17, 68)}


def test_dlib_chip_template_is_dlibs_mean_face():
    m = dlib_mean_face()
    five = [np.mean([m[i] for i in range(36, 42)], axis=0),
            np.mean([m[i] for i in range(42, 48)], axis=0), m[30], m[48], m[54]]
    size, padding = 150, 0.25
    # get_face_chip_details places the mean face at (padding + m) / (1 + 2 padding) * size; the
    # extraction maps the chip's rectangle onto pixels 0..size-1: at the image's own scale a point
    # q lands on q - 0.5 (the comment in shapes.h derives it).
    want = [(padding + p) / (1 + 2 * padding) * size - 0.5 for p in five]
    with open(os.path.join(ROOT, "server", "model", "shapes.h")) as f:
        header = f.read()
    block = re.search(r"kDlibChip = \{kDlibChipSize,(.*?)\}\}\};", header, re.S).group(1)
    got = [tuple(float(v) for v in pair)
           for pair in re.findall(r"\{([-\d.]+)f, ([-\d.]+)f\}", block)]
    assert len(got) == 5
    np.testing.assert_allclose(got, want, atol=5e-5)
