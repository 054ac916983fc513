"""Self-checks of the independent reference (run: /usr/bin/python3 -m pytest tests/reference).

cv2 appears here only as an external check of the reference's own resampling code.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import arcface_ref as ref  # noqa: E402
import make_checkpoint as mc  # noqa: E402
from iresnet_modules import fused_module_from_weights  # noqa: E402
from safetensors_io import read_safetensors, write_safetensors  # noqa: E402

cv2 = pytest.importorskip("cv2")

DATA = os.environ.get("ARCFACE_TEST_DATA", os.path.normpath(os.path.join(HERE, "..", "data")))
torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))

R50 = mc.ARCH_LAYERS["r50"]


@pytest.fixture(scope="module")
def calib():
    return mc.calibration_batch(n=4)


@pytest.fixture(scope="module")
def r50_weights(calib):
    w = mc.make_fused_weights(R50, 50, calib, num_batches_tracked=True)
    return {k: torch.from_numpy(v) for k, v in w.items()}


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(3)
    return torch.stack([ref.model_input(ref.to_unit_chw(mc.synthetic_crop(rng, k)))
                        for k in ("uniform", "smooth", "face_like")])


def cosines(a, b):
    a, b = a.double(), b.double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ---------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------

def test_checkpoint_layout(r50_weights):
    floats = [k for k in r50_weights if not k.endswith("num_batches_tracked")]
    assert len(floats) == 237
    assert sum(k.endswith("num_batches_tracked") for k in r50_weights) == 26
    assert ref.blocks_per_stage(r50_weights) == R50
    params = sum(v.numel() for k, v in r50_weights.items() if k in floats)
    # docs/MODEL.md: 43,578,176 parameters (trainable; BN running stats are buffers)
    buffers = sum(v.numel() for k, v in r50_weights.items()
                  if k.endswith(("running_mean", "running_var")))
    assert params - buffers == 43_578_176
    assert ref.expected_shapes(mc.ARCH_LAYERS["r100"]).__len__() == 3 + 49 * 9 + 4 * 2 + 10
    # non-trivial BN statistics
    for p in ref.bn_prefixes(R50):
        assert not torch.allclose(r50_weights[p + ".running_mean"], torch.zeros(1))
        assert not torch.allclose(r50_weights[p + ".running_var"], torch.ones(1))
        assert not torch.allclose(r50_weights[p + ".weight"], torch.ones(1))
        assert not torch.allclose(r50_weights[p + ".bias"], torch.zeros(1))


def test_checkpoint_generation_is_deterministic(calib):
    tiny = [1, 1, 1, 1]
    a = mc.make_fused_weights(tiny, 7, calib[:2])
    b = mc.make_fused_weights(tiny, 7, calib[:2])
    c = mc.make_fused_weights(tiny, 8, calib[:2])
    assert list(a) == list(ref.expected_shapes(tiny))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["fc.weight"], c["fc.weight"])


def test_check_weights_names_the_key(r50_weights):
    w = dict(r50_weights)
    del w["layer3.7.conv2.bias"]
    with pytest.raises(KeyError, match="layer3.7.conv2.bias"):
        ref.check_weights(w)
    w = dict(r50_weights)
    w["layer2.1.prelu.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match="layer2.1.prelu.weight"):
        ref.check_weights(w)
    w = dict(r50_weights)
    w["layer2.1.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match="layer2.1.extra"):
        ref.check_weights(w)


def test_functional_equals_fused_module(r50_weights, inputs):
    e = ref.forward(r50_weights, inputs)
    m = fused_module_from_weights(r50_weights, R50)
    with torch.no_grad():
        em = m(inputs)
    assert e.shape == (3, 512)
    assert torch.all(cosines(e, em) > 1 - 1e-7)
    assert (e - em).abs().max() <= 1e-4 * e.abs().max()
    # O(1) activations, distinct embeddings
    n = e.norm(dim=1)
    assert torch.all((n > 5) & (n < 200)), n
    en = torch.nn.functional.normalize(e, dim=1)
    c = en @ en.T
    assert c[~torch.eye(3, dtype=torch.bool)].max() < 0.8


def test_depth_read_off_keys(calib, inputs):
    w = {k: torch.from_numpy(v) for k, v in mc.make_fused_weights([1, 3, 2, 1], 9, calib).items()}
    assert ref.blocks_per_stage(w) == [1, 3, 2, 1]
    e = ref.forward(w, inputs[:1])
    with torch.no_grad():
        em = fused_module_from_weights(w, [1, 3, 2, 1])(inputs[:1])
    assert cosines(e, em).item() > 1 - 1e-7


def fold_bn_into_conv(conv_w, bn):
    """Folds an inference BatchNorm that follows a bias-free conv (computed in float64)."""
    s = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv_w.double() * s[:, None, None, None]
    b = bn.bias.double() - bn.running_mean.double() * s
    return w.float(), b.float()


def fold_insightface(model, layers):
    out = OrderedDict()
    with torch.no_grad():
        out["conv1.weight"], out["conv1.bias"] = fold_bn_into_conv(model.conv1.weight, model.bn1)
        out["prelu.weight"] = model.prelu.weight.detach().clone()
        for s, n in enumerate(layers):
            for i in range(n):
                b = getattr(model, f"layer{s + 1}")[i]
                p = f"layer{s + 1}.{i}."
                for f in ("weight", "bias", "running_mean", "running_var"):
                    out[p + "bn1." + f] = getattr(b.bn1, f).detach().clone()
                out[p + "conv1.weight"], out[p + "conv1.bias"] = fold_bn_into_conv(b.conv1.weight, b.bn2)
                out[p + "prelu.weight"] = b.prelu.weight.detach().clone()
                out[p + "conv2.weight"], out[p + "conv2.bias"] = fold_bn_into_conv(b.conv2.weight, b.bn3)
                if b.downsample is not None:
                    out[p + "downsample.weight"], out[p + "downsample.bias"] = fold_bn_into_conv(
                        b.downsample[0].weight, b.downsample[1])
        for bn in ("bn2", "features"):
            for f in ("weight", "bias", "running_mean", "running_var"):
                out[bn + "." + f] = getattr(getattr(model, bn), f).detach().clone()
        out["fc.weight"] = model.fc.weight.detach().clone()
        out["fc.bias"] = model.fc.bias.detach().clone()
    return out


def test_insightface_module_equals_functional_on_folded_weights(calib, inputs):
    layers = [2, 3, 2, 2]  # block 0 (downsample) and later blocks of every stage
    m = mc.make_insightface_module(layers, 5050, calib)
    assert not m.training
    with torch.no_grad():
        em = m(inputs)
    folded = fold_insightface(m, layers)
    ref.check_weights(folded)
    e = ref.forward(folded, inputs)
    assert torch.all(cosines(e, em) > 1 - 1e-7)
    assert (e - em).abs().max() <= 2e-4 * em.abs().max()


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------

def test_safetensors_roundtrip(tmp_path):
    t = OrderedDict([("a.weight", np.arange(6, dtype=np.float32).reshape(2, 3)),
                     ("b.num_batches_tracked", np.array(123456789012, dtype=np.int64)),
                     ("c", np.array([1.5], dtype=np.float32))])
    p = str(tmp_path / "x.safetensors")
    write_safetensors(p, t, {"seed": "1"})
    raw = open(p, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"seed": "1"}
    assert header["a.weight"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b.num_batches_tracked"] == {"dtype": "I64", "shape": [], "data_offsets": [24, 32]}
    assert len(raw) == 8 + n + 36
    back, meta = read_safetensors(p)
    assert meta == {"seed": "1"}
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k], t[k])


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------

def test_normalization_and_no_resize_at_112():
    u8 = np.zeros((112, 112, 3), np.uint8)
    u8[0, 0] = [0, 128, 255]
    x = ref.model_input(ref.crop_whole(u8))
    assert x.dtype == torch.float32 and x.shape == (3, 112, 112)
    assert x[0, 0, 0] == -1.0 and x[2, 0, 0] == 1.0
    assert x[1, 0, 0] == np.float32(128 / 255 * 2 - 1)
    # RGB order kept: channel 0 is R
    assert x[0, 0, 0] < x[1, 0, 0] < x[2, 0, 0]


@pytest.mark.parametrize("hw", [(300, 200), (50, 70), (112, 224), (667, 1000), (113, 111)])
def test_resize_equals_cv2_inter_linear(hw):
    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    img = rng.uniform(0, 1, (hw[0], hw[1], 3)).astype(np.float32)
    mine = ref.resize_unit(torch.from_numpy(img.transpose(2, 0, 1)).double())
    theirs = cv2.resize(img, (112, 112), interpolation=cv2.INTER_LINEAR)
    assert np.abs(mine.numpy().transpose(1, 2, 0) - theirs).max() < 1e-4


def test_box_rule():
    img = (np.arange(8 * 10 * 3) % 251 + 1).astype(np.uint8).reshape(8, 10, 3)  # no zeros
    # x: floor(-1.5+.5)=-1, floor(3.49+.5)=3 ; y: floor(2.5+.5)=3, floor(12+.5)=12
    r = ref.box_region(img, [-1.5, 2.5, 3.49, 12.0])
    assert r.shape == (9, 4, 3)
    assert np.all(r[:, 0] == 0)                   # column -1 is outside
    assert np.all(r[5:] == 0)                     # rows 8..11 are outside
    assert np.array_equal(r[:5, 1:], img[3:8, 0:3])
    # .5 rounds up, also for negatives: -0.5 -> 0, -0.51 -> -1
    assert ref.box_region(img, [-0.5, 0, 2, 2]).shape == (2, 2, 3)
    assert ref.box_region(img, [-0.51, 0, 2, 2]).shape == (2, 3, 3)
    assert np.array_equal(ref.box_region(img, [0.5, 0.49, 4.5, 3.5]), img[0:4, 1:5])
    # a box entirely outside is all black; an empty one is an error
    assert not ref.box_region(img, [20, 20, 30, 30]).any()
    with pytest.raises(ValueError):
        ref.box_region(img, [5, 5, 5.2, 9])
    # whole pipeline: the region is resized to 112
    assert ref.crop_box(img, [1, 1, 7, 6]).shape == (3, 112, 112)


def _similarity(scale, deg, tx, ty):
    th = math.radians(deg)
    return np.array([[scale * math.cos(th), -scale * math.sin(th), tx],
                     [scale * math.sin(th), scale * math.cos(th), ty], [0, 0, 1.0]])


def test_umeyama_recovers_known_similarity():
    rng = np.random.default_rng(0)
    for _ in range(20):
        T = _similarity(rng.uniform(0.1, 3), rng.uniform(-180, 180), *rng.uniform(-300, 300, 2))
        src = rng.uniform(0, 500, (5, 2))
        dst = (T[:2, :2] @ src.T).T + T[:2, 2]
        assert np.allclose(ref.umeyama(src, dst), T, atol=1e-9, rtol=1e-9)


def test_umeyama_is_least_squares_on_noisy_points():
    # independent check: a 2-D similarity is linear in (a, b, tx, ty)
    rng = np.random.default_rng(1)
    src = np.array([[230, 245], [318, 243], [272, 285], [250, 330], [305, 328]], float)
    src += rng.normal(0, 4, src.shape)
    dst = ref.ARCFACE_TEMPLATE
    A, y = [], []
    for (x, yy), (u, v) in zip(src, dst):
        A += [[x, -yy, 1, 0], [yy, x, 0, 1]]
        y += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)[0]
    expect = np.array([[a, -b, tx], [b, a, ty]])
    assert np.allclose(ref.norm_crop_matrix(src), expect, atol=1e-9)


def _warp_both(img, M):
    mine = ref.warp_affine_unit(torch.from_numpy(img.transpose(2, 0, 1)).double(), M)
    theirs = cv2.warpAffine(img, M, (112, 112), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return mine.numpy().transpose(1, 2, 0), theirs


def test_warp_equals_cv2_on_exact_grid_including_borders():
    # inverse map entries are multiples of 1/32, so cv2's fixed-point coordinates are exact and
    # the two must agree everywhere, edges blended with black included
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, (90, 80, 3)).astype(np.float32)
    Minv = np.array([[0.75, -0.25, -10.5], [0.25, 0.75, 20.25], [0, 0, 1.0]])
    M = np.linalg.inv(Minv)[:2]
    mine, theirs = _warp_both(img, M)
    assert (theirs == 0).all(axis=2).sum() > 500       # part of the crop is outside
    assert np.abs(mine - theirs).max() < 1e-5


def test_warp_equals_cv2_on_smooth_image():
    # general matrix: cv2 rounds sample positions to 1/32 pixel, so compare on a smooth image
    yy, xx = np.mgrid[0:640, 0:600].astype(np.float64)
    img = np.stack([0.5 + 0.4 * np.sin(xx / 23.0 + yy / 31.0),
                    0.5 + 0.4 * np.cos(xx / 17.0 - yy / 29.0),
                    (xx + yy) / 900.0], axis=2).astype(np.float32)
    lmk = np.array([[230, 245], [318, 243], [272, 285], [250, 330], [305, 328]], float)
    for deg in (0.0, 13.0, -35.0):
        c = lmk[2]
        th = math.radians(deg)
        R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        M = ref.norm_crop_matrix((lmk - c) @ R.T + c)
        mine, theirs = _warp_both(img, M)
        assert (theirs > 0).all()  # crop fully inside the image
        assert np.abs(mine - theirs).max() < 1e-3


def test_aligned_template_is_fixed_point():
    # landmarks already on the template: identity warp, the crop is the image itself
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    M = ref.norm_crop_matrix(ref.ARCFACE_TEMPLATE)
    assert np.allclose(M, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    out = ref.crop_aligned(img, ref.ARCFACE_TEMPLATE)
    assert torch.allclose(out, ref.to_unit_chw(img), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# decoding (needs the test photos)
# ---------------------------------------------------------------------------------------------

def _data(name):
    p = os.path.join(DATA, name)
    if not os.path.exists(p):
        pytest.skip(f"test data not found: {p}")
    return p


def test_decode_gray_and_alpha():
    g = ref.decode_image(_data("BWPictureHuman.jpg"))
    assert g.shape == (1912, 2560, 3)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    assert np.array_equal(g[..., 0], cv2.imread(_data("BWPictureHuman.jpg"),
                                                cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION))
    a = ref.decode_image(_data("Image_with_alpha.png"))
    raw = cv2.imread(_data("Image_with_alpha.png"), cv2.IMREAD_UNCHANGED)
    assert raw.shape[2] == 4 and a.shape == raw.shape[:2] + (3,)
    assert np.array_equal(a, raw[:, :, 2::-1])          # alpha dropped, not composited
    c = ref.decode_image(_data("single_face.jpg"))
    assert np.array_equal(c, cv2.imread(_data("single_face.jpg"))[:, :, ::-1])
