"""Seeded random IResNet weights that behave like a trained network numerically.

- make_fused_weights(layers, seed): a fused checkpoint (exact docs/MODEL.md key layout, float32).
- make_insightface_module(layers, seed): an unfused insightface-style IResNet (iresnet.py form).

Random draws come from numpy's PCG64 (bit-reproducible across machines). He-style init, the
residual branch scaled down, and every BatchNorm's running statistics set from a calibration pass
(the real per-channel mean/variance of its input over a batch of varied synthetic crops), then
perturbed and rounded to 12 significant bits (so ulp-level differences between machines in the
calibration pass do not change the file). Activations stay O(1) through all blocks and different
inputs give clearly different embeddings.

CLI: make_checkpoint.py --arch r50|r100 --seed N --out FILE.safetensors
"""
from __future__ import annotations

import argparse
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import arcface_ref as ref
from iresnet_modules import FusedIResNet, InsightFaceIResNet
from safetensors_io import write_safetensors

ARCH_LAYERS = {"r18": [2, 2, 2, 2], "r34": [3, 4, 6, 3], "r50": [3, 4, 14, 3],
               "r100": [3, 13, 30, 3]}

RESIDUAL_SCALE = 0.2  # conv2 (fused) / bn3 gamma (unfused) scale of the residual branch
CALIB_N = 24
CALIB_SEED = 12345


# ---------------------------------------------------------------------------------------------
# synthetic crops (also used for the random golden crops)
# ---------------------------------------------------------------------------------------------

def _upsample(a: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(a.transpose(2, 0, 1)[None].astype(np.float64))
    t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False)
    return t[0].numpy().transpose(1, 2, 0)


def synthetic_crop(rng: np.random.Generator, kind: str, size: int = 112) -> np.ndarray:
    """One uint8 HxWx3 RGB crop of the given kind."""
    if kind == "uniform":
        a = rng.uniform(0, 255, (size, size, 3))
    elif kind == "gaussian":
        a = rng.normal(rng.uniform(60, 190), rng.uniform(20, 60), (size, size, 3))
    elif kind == "smooth":
        cells = int(rng.integers(3, 15))
        a = _upsample(rng.uniform(0, 255, (cells, cells, 3)), size)
        a += rng.normal(0, rng.uniform(0, 8), a.shape)
    elif kind == "gradient":
        yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)
        a = np.empty((size, size, 3))
        for c in range(3):
            th = rng.uniform(0, 2 * np.pi)
            g = np.cos(th) * xx + np.sin(th) * yy
            g = (g - g.min()) / (g.max() - g.min() + 1e-9)
            lo, hi = sorted(rng.uniform(0, 255, 2))
            a[:, :, c] = lo + (hi - lo) * g
    elif kind == "stripes":
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        th = rng.uniform(0, np.pi)
        period = rng.uniform(4, 30)
        s = np.sin(2 * np.pi * (np.cos(th) * xx + np.sin(th) * yy) / period)
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        a = c0 + (c1 - c0) * (s[..., None] * 0.5 + 0.5)
    elif kind == "face_like":
        # a skin-toned smooth field with dark blobs where eyes/mouth sit in an aligned crop
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        base = rng.uniform(90, 220) * np.array([1.0, rng.uniform(0.7, 0.85), rng.uniform(0.55, 0.75)])
        a = _upsample(rng.normal(0, 20, (6, 6, 3)), size) + base
        for (cx, cy), r in zip(ref.ARCFACE_TEMPLATE + rng.normal(0, 3, (5, 2)), (7, 7, 5, 5, 5)):
            a -= rng.uniform(30, 90) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    else:
        raise ValueError(kind)
    return np.clip(np.round(a), 0, 255).astype(np.uint8)


SYNTH_KINDS = ("uniform", "gaussian", "smooth", "gradient", "stripes", "face_like")


def calibration_batch(n: int = CALIB_N, seed: int = CALIB_SEED) -> torch.Tensor:
    """[n,3,112,112] float32 model inputs in [-1,1], a mix of all synthetic kinds."""
    rng = np.random.default_rng(seed)
    xs = []
    for i in range(n):
        u8 = synthetic_crop(rng, SYNTH_KINDS[i % len(SYNTH_KINDS)])
        xs.append(ref.model_input(ref.to_unit_chw(u8)))
    return torch.stack(xs)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def round_sig(x: np.ndarray, bits: int = 12) -> np.ndarray:
    """Round to `bits` significant bits (float64 in, float32 out)."""
    m, e = np.frexp(np.asarray(x, dtype=np.float64))
    return np.ldexp(np.round(m * (1 << bits)) / (1 << bits), e).astype(np.float32)


def _normal(rng, shape, std):
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _uniform(rng, shape, lo, hi):
    return rng.uniform(lo, hi, shape).astype(np.float32)


class _BNCalibrator:
    """Forward pre-hooks that set each BatchNorm's running stats from the statistics of its
    actual input (over batch and space), perturbed: mean + 0.1*std*N(0,1), var * exp(U(-.3,.3))."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.count = 0

    def __call__(self, module, inputs):
        x = inputs[0].detach().to(torch.float64)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims).numpy()
        var = x.var(dim=dims, unbiased=False).numpy()
        c = mean.shape[0]
        mean = mean + 0.1 * np.sqrt(var) * self.rng.standard_normal(c)
        var = var * np.exp(self.rng.uniform(-0.3, 0.3, c)) + 1e-4
        module.running_mean.copy_(torch.from_numpy(round_sig(mean)))
        module.running_var.copy_(torch.from_numpy(round_sig(var)))
        self.count += 1


def _calibrate(model: torch.nn.Module, rng: np.random.Generator, calib: torch.Tensor) -> int:
    cal = _BNCalibrator(rng)
    hooks = [m.register_forward_pre_hook(cal) for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    model.eval()
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    return cal.count


# ---------------------------------------------------------------------------------------------
# fused checkpoint
# ---------------------------------------------------------------------------------------------

def make_fused_weights(layers: Sequence[int], seed: int, calib: torch.Tensor | None = None,
                       num_batches_tracked: bool = False) -> "OrderedDict[str, np.ndarray]":
    """Fused checkpoint as an ordered dict (canonical docs/MODEL.md order) of float32 arrays, plus
    int64 `*.num_batches_tracked` scalars if asked."""
    rng = np.random.default_rng(seed)
    shapes = ref.expected_shapes(layers)
    w: Dict[str, np.ndarray] = {}
    for k, shp in shapes.items():
        name = k.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # conv1, bn1, prelu, ...
        field = k.rsplit(".", 1)[1]
        if k == "fc.weight":
            w[k] = _normal(rng, shp, np.sqrt(1.0 / shp[1]))
        elif k == "fc.bias":
            w[k] = _normal(rng, shp, 0.1)
        elif name in ("bn1", "bn2", "features"):
            if field == "weight":
                w[k] = _uniform(rng, shp, 0.6, 1.4)
            elif field == "bias":
                w[k] = _normal(rng, shp, 0.15)
            elif field == "running_mean":
                w[k] = np.zeros(shp, np.float32)  # set by calibration
            else:
                w[k] = np.ones(shp, np.float32)
        elif name == "prelu":
            w[k] = _uniform(rng, shp, 0.1, 0.3)
        elif field == "weight":  # conv weights
            fan_in = int(np.prod(shp[1:]))
            if name == "downsample":
                std = np.sqrt(1.0 / fan_in)
            elif name == "conv2" and k.startswith("layer"):
                std = np.sqrt(2.0 / fan_in) * RESIDUAL_SCALE
            else:
                std = np.sqrt(2.0 / fan_in)
            w[k] = _normal(rng, shp, std)
        else:  # conv biases
            w[k] = _normal(rng, shp, 0.05)
    if calib is None:
        calib = calibration_batch()
    model = FusedIResNet(layers)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=False)
    n = _calibrate(model, rng, calib.to(torch.float32))
    assert n == len(ref.bn_prefixes(layers)), n
    sd = model.state_dict()
    out: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for k in shapes:
        out[k] = sd[k].detach().numpy().astype(np.float32).copy()
    if num_batches_tracked:
        for p in ref.bn_prefixes(layers):
            out[p + ".num_batches_tracked"] = np.array(int(rng.integers(1000, 10 ** 7)),
                                                       dtype=np.int64)
    return out


def write_checkpoint(path: str, arch: str, seed: int, num_batches_tracked: bool | None = None,
                     calib: torch.Tensor | None = None) -> "OrderedDict[str, np.ndarray]":
    layers = ARCH_LAYERS[arch]
    if num_batches_tracked is None:
        num_batches_tracked = arch == "r50"
    w = make_fused_weights(layers, seed, calib, num_batches_tracked)
    write_safetensors(path, w, metadata={"format": "pt", "arch": arch, "seed": str(seed),
                                         "generator": "tests/reference/make_checkpoint.py",
                                         "note": "random demo weights, not a trained model"})
    return w


# ---------------------------------------------------------------------------------------------
# unfused insightface-style module
# ---------------------------------------------------------------------------------------------

def make_insightface_module(layers: Sequence[int], seed: int,
                            calib: torch.Tensor | None = None) -> InsightFaceIResNet:
    rng = np.random.default_rng(seed)
    model = InsightFaceIResNet(layers)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                gain = 1.0 if "downsample" in name else 2.0
                m.weight.copy_(torch.from_numpy(_normal(rng, m.weight.shape, np.sqrt(gain / fan_in))))
            elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                scale = RESIDUAL_SCALE if name.endswith("bn3") else 1.0
                m.weight.copy_(torch.from_numpy(_uniform(rng, c, 0.6, 1.4) * scale))
                m.bias.copy_(torch.from_numpy(_normal(rng, c, 0.15 * scale)))
                m.num_batches_tracked.fill_(int(rng.integers(1000, 10 ** 7)))
            elif isinstance(m, torch.nn.PReLU):
                m.weight.copy_(torch.from_numpy(_uniform(rng, m.weight.shape, 0.1, 0.3)))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.from_numpy(_normal(rng, m.weight.shape,
                                                        np.sqrt(1.0 / m.in_features))))
                m.bias.copy_(torch.from_numpy(_normal(rng, m.bias.shape, 0.1)))
    if calib is None:
        calib = calibration_batch()
    _calibrate(model, rng, calib.to(torch.float32))
    return model.eval()


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCH_LAYERS), default="r50")
    ap.add_argument("--seed", type=int, default=50)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-num-batches-tracked", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    write_checkpoint(a.out, a.arch, a.seed,
                     num_batches_tracked=False if a.no_num_batches_tracked else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
