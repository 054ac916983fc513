"""Independent functional reference of ArcFace IResNet (fused-BN form) and its preprocessing.

Written from the model facts in docs/MODEL.md (py-feat's and InsightFace's semantics), sharing
no code with the C++ service. Everything here is plain torch.nn.functional / numpy:

- forward(weights, x): the fused IResNet; the number of blocks per stage is read off the keys, so
  r50, r100 and any other depth work. Runs in the dtype of `x` (the goldens use float64).
- preprocessing as py-feat does it: uint8 RGB -> [0,1] -> bilinear resize to 112 with half-pixel
  centres, no antialias (F.interpolate) -> x*2-1.
- box crops (rounded box, black outside the image) and InsightFace norm_crop alignment (Umeyama
  similarity + a cv2.warpAffine-equivalent bilinear warp written with grid_sample).

cv2 is used only to decode image files (libjpeg/libpng pixels, no EXIF rotation).
"""
from __future__ import annotations

import math
import re
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

INPUT_SIZE = 112
EMBEDDING_DIM = 512
BN_EPS = 1e-5
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_CIN0 = (64, 64, 128, 256)  # input channels of block 0 of each stage

# InsightFace arcface_dst: left eye, right eye, nose tip, left mouth corner, right mouth corner.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963],
     [73.5318, 51.5014],
     [56.0252, 71.7366],
     [41.5493, 92.3655],
     [70.7299, 92.2041]], dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------

_BLOCK_RE = re.compile(r"^layer([1-4])\.(\d+)\.")


def blocks_per_stage(weights: Dict[str, torch.Tensor]) -> List[int]:
    """Number of blocks of layer1..layer4, read off the checkpoint keys."""
    counts = [0, 0, 0, 0]
    for k in weights:
        m = _BLOCK_RE.match(k)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
    if min(counts) == 0:
        raise ValueError(f"checkpoint lacks a stage: blocks per stage {counts}")
    return counts


def expected_shapes(layers: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    """The exact key -> shape layout of a fused checkpoint (docs/MODEL.md 'Checkpoint keys'),
    in canonical order, without num_batches_tracked."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    shapes["conv1.weight"] = (64, 3, 3, 3)
    shapes["conv1.bias"] = (64,)
    shapes["prelu.weight"] = (64,)
    for s, n in enumerate(layers):
        c = STAGE_WIDTHS[s]
        for i in range(n):
            cin = STAGE_CIN0[s] if i == 0 else c
            p = f"layer{s + 1}.{i}."
            for f in ("weight", "bias", "running_mean", "running_var"):
                shapes[p + "bn1." + f] = (cin,)
            shapes[p + "conv1.weight"] = (c, cin, 3, 3)
            shapes[p + "conv1.bias"] = (c,)
            shapes[p + "prelu.weight"] = (c,)
            shapes[p + "conv2.weight"] = (c, c, 3, 3)
            shapes[p + "conv2.bias"] = (c,)
            if i == 0:
                shapes[p + "downsample.weight"] = (c, cin, 1, 1)
                shapes[p + "downsample.bias"] = (c,)
    for f in ("weight", "bias", "running_mean", "running_var"):
        shapes["bn2." + f] = (512,)
    shapes["fc.weight"] = (512, 512 * 7 * 7)
    shapes["fc.bias"] = (512,)
    for f in ("weight", "bias", "running_mean", "running_var"):
        shapes["features." + f] = (512,)
    return shapes


def bn_prefixes(layers: Sequence[int]) -> List[str]:
    """Prefixes of the BatchNorms of a fused checkpoint (the ones that may carry
    num_batches_tracked), in forward order."""
    out = []
    for s, n in enumerate(layers):
        for i in range(n):
            out.append(f"layer{s + 1}.{i}.bn1")
    return out + ["bn2", "features"]


def check_weights(weights: Dict[str, torch.Tensor]) -> List[int]:
    """Validate keys and shapes exactly; returns blocks per stage."""
    layers = blocks_per_stage(weights)
    shapes = expected_shapes(layers)
    nbt = {p + ".num_batches_tracked" for p in bn_prefixes(layers)}
    for k, v in weights.items():
        if k in nbt:
            continue
        if k not in shapes:
            raise KeyError(f"unexpected key {k}")
        if tuple(v.shape) != shapes[k]:
            raise ValueError(f"{k}: shape {tuple(v.shape)}, expected {shapes[k]}")
    for k in shapes:
        if k not in weights:
            raise KeyError(f"missing key {k}")
    return layers


def _bn(x: torch.Tensor, w: Dict[str, torch.Tensor], p: str) -> torch.Tensor:
    """Inference BatchNorm, explicit formula, per channel (dim 1)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = w[p + ".running_mean"].to(x.dtype).reshape(shape)
    var = w[p + ".running_var"].to(x.dtype).reshape(shape)
    gamma = w[p + ".weight"].to(x.dtype).reshape(shape)
    beta = w[p + ".bias"].to(x.dtype).reshape(shape)
    return (x - mean) / torch.sqrt(var + BN_EPS) * gamma + beta


def _conv(x, w, p, stride, pad):
    return F.conv2d(x, w[p + ".weight"].to(x.dtype), w[p + ".bias"].to(x.dtype), stride=stride,
                    padding=pad)


def _prelu(x, w, p):
    return F.prelu(x, w[p + ".weight"].to(x.dtype))


def forward(weights: Dict[str, torch.Tensor], x: torch.Tensor,
            trace: List[Tuple[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Fused IResNet forward. x: [N,3,112,112] in [-1,1]; returns [N,512] (not normalized).
    Computes in x's dtype. `trace`, if given, collects (name, activation) after the stem, each
    block and the head, for diagnostics."""
    layers = check_weights(weights)
    if x.dim() != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
        raise ValueError(f"input shape {tuple(x.shape)}")
    with torch.no_grad():
        h = _prelu(_conv(x, weights, "conv1", 1, 1), weights, "prelu")
        if trace is not None:
            trace.append(("stem", h))
        for s, n in enumerate(layers):
            for i in range(n):
                p = f"layer{s + 1}.{i}."
                stride = 2 if i == 0 else 1
                b = _bn(h, weights, p + "bn1")
                b = _conv(b, weights, p + "conv1", 1, 1)
                b = _prelu(b, weights, p + "prelu")
                b = _conv(b, weights, p + "conv2", stride, 1)
                sc = _conv(h, weights, p + "downsample", stride, 0) if i == 0 else h
                h = b + sc
                if trace is not None:
                    trace.append((p[:-1], h))
        h = _bn(h, weights, "bn2")
        h = torch.flatten(h, 1)  # channel-major, 512*7*7
        h = F.linear(h, weights["fc.weight"].to(h.dtype), weights["fc.bias"].to(h.dtype))
        h = _bn(h, weights, "features")
        if trace is not None:
            trace.append(("embedding", h))
    return h


# ----------------------------------------------------------------------------------------------
# Preprocessing (py-feat semantics); images are HWC uint8 RGB numpy arrays
# ----------------------------------------------------------------------------------------------

def decode_image(path: str) -> np.ndarray:
    """File -> HxWx3 uint8 RGB. libjpeg/libpng pixels, EXIF orientation ignored, grayscale
    replicated, alpha dropped (not composited)."""
    import cv2  # decoding only
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def to_unit_chw(img_u8: np.ndarray, dtype=torch.float64) -> torch.Tensor:
    """HxWx3 uint8 -> [3,H,W] in [0,1]."""
    if img_u8.dtype != np.uint8 or img_u8.ndim != 3 or img_u8.shape[2] != 3:
        raise ValueError("expected HxWx3 uint8")
    return torch.from_numpy(np.ascontiguousarray(img_u8.transpose(2, 0, 1))).to(dtype) / 255.0


def resize_unit(chw: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """[3,H,W] float -> [3,size,size]: bilinear, half-pixel centres, no antialias (py-feat).
    A crop already of the right size is returned untouched."""
    if tuple(chw.shape[1:]) == (size, size):
        return chw
    return F.interpolate(chw[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=False)[0]


def normalize(chw_unit: torch.Tensor) -> torch.Tensor:
    """[0,1] -> [-1,1]."""
    return chw_unit * 2.0 - 1.0


def box_region(img_u8: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The box (x_min, y_min, x_max, y_max) rounded to whole pixels: columns [ix0, ix1), rows
    [iy0, iy1) with i = floor(v + 0.5); parts outside the image are black. Returns uint8 HWC."""
    x0, y0, x1, y1 = (math.floor(float(v) + 0.5) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {box}")
    h, w = img_u8.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img_u8[sy0:sy1, sx0:sx1]
    return out


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping src points onto dst points.
    Returns the 3x3 homogeneous matrix, float64."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    num, dim = src.shape
    src_mean = src.mean(axis=0)
    dst_mean = dst.mean(axis=0)
    src_d = src - src_mean
    dst_d = dst - dst_mean
    cov = dst_d.T @ src_d / num
    d = np.ones(dim)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    T = np.eye(dim + 1)
    U, S, Vt = np.linalg.svd(cov)
    rank = np.linalg.matrix_rank(cov)
    if rank == 0:
        raise ValueError("degenerate landmarks")
    if rank == dim - 1:
        if np.linalg.det(U) * np.linalg.det(Vt) > 0:
            T[:dim, :dim] = U @ Vt
        else:
            dd = d.copy()
            dd[-1] = -1
            T[:dim, :dim] = U @ np.diag(dd) @ Vt
    else:
        T[:dim, :dim] = U @ np.diag(d) @ Vt
    scale = (S @ d) / src_d.var(axis=0).sum() if estimate_scale else 1.0
    T[:dim, dim] = dst_mean - scale * (T[:dim, :dim] @ src_mean)
    T[:dim, :dim] *= scale
    return T


def norm_crop_matrix(landmarks: Sequence[Sequence[float]]) -> np.ndarray:
    """InsightFace estimate_norm for a 112 crop: 2x3 image->crop matrix."""
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    return umeyama(lm, ARCFACE_TEMPLATE)[:2, :]


def warp_affine_unit(chw: torch.Tensor, M: np.ndarray, size: int = INPUT_SIZE) -> torch.Tensor:
    """cv2.warpAffine(img, M, (size,size), INTER_LINEAR, BORDER_CONSTANT, 0) semantics, exact
    (no fixed-point coordinates): dst(x,y) = bilinear sample of src at M^-1 (x,y,1), pixel
    centres at integer coordinates, samples outside the image are 0 and blend at the edges.
    Computes in float64."""
    _, h, w = chw.shape
    A = np.vstack([np.asarray(M, dtype=np.float64), [0.0, 0.0, 1.0]])
    Ainv = np.linalg.inv(A)
    ys, xs = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64),
                         indexing="ij")
    u = Ainv[0, 0] * xs + Ainv[0, 1] * ys + Ainv[0, 2]  # source column
    v = Ainv[1, 0] * xs + Ainv[1, 1] * ys + Ainv[1, 2]  # source row
    # grid_sample with align_corners=False: pixel index i <-> normalized (2i+1)/W - 1.
    gx = (2.0 * u + 1.0) / w - 1.0
    gy = (2.0 * v + 1.0) / h - 1.0
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1))[None]
    out = F.grid_sample(chw[None].to(torch.float64), grid, mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]
    return out.to(chw.dtype)


# --- whole pipelines: image -> [3,112,112] in [0,1] (float; py-feat keeps resampled crops float)

def crop_whole(img_u8: np.ndarray) -> torch.Tensor:
    return resize_unit(to_unit_chw(img_u8))


def crop_box(img_u8: np.ndarray, box: Sequence[float]) -> torch.Tensor:
    return resize_unit(to_unit_chw(box_region(img_u8, box)))


def crop_aligned(img_u8: np.ndarray, landmarks: Sequence[Sequence[float]]) -> torch.Tensor:
    return warp_affine_unit(to_unit_chw(img_u8), norm_crop_matrix(landmarks))


def model_input(unit_chw: torch.Tensor) -> torch.Tensor:
    """[3,112,112] in [0,1] -> float32 [3,112,112] in [-1,1], the exact numbers fed to a model."""
    return normalize(unit_chw.to(torch.float64)).to(torch.float32)


def quantize_unit(unit_chw: torch.Tensor) -> np.ndarray:
    """What a service that keeps crops as uint8 does: round to nearest, clip. -> HWC uint8."""
    a = np.clip(np.round(unit_chw.to(torch.float64).numpy() * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a.transpose(1, 2, 0))
