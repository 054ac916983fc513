#!/usr/bin/env python3
"""Independent numpy reference of face-api's detection networks (@vladmandic/face-api 1.7.15).

Written from face-api's TypeScript sources (src/ssdMobilenetv1, src/tinyYolov2,
src/tinyFaceDetector, src/faceLandmarkNet, src/faceFeatureExtractor, src/dom/NetInput.ts,
src/ops) and TF.js's weights format; it shares no code with the C++ (server/detect). numpy only,
float64 throughout; the weights are dequantised to float32 as TF.js holds them (q*scale+min
rounded to float32), then widened. cv2 only decodes the image (the server decodes with OpenCV
too, so both start from the same pixels).

Networks and face-api's preprocessing, exactly (tensor inputs, as face-api runs under node):
  ssd       SsdMobilenetv1: padToSquare with zeros at the bottom or right (not centred), then
            tf.image.resizeBilinear to 512x512 (alignCorners=false, halfPixelCenters=false:
            source = dest * in/out, clamped), then x/127.5 - 1. MobileNetV1 (conv 0 stride 2,
            depthwise strides 2 at pairs 2, 4, 6, 12; depthwise + BatchNorm eps 0.001, pointwise
            + bias; ReLU6 after each), 8 extra pointwise convs, six box predictors (on conv 11,
            the last MobileNet layer and extra convs 1, 3, 5, 7) -> 5118 anchors, box encodings
            (4) and class logits (3). Decoding against Output/extra_dim (anchors as ymin, xmin,
            ymax, xmax): centre += enc/10 * size, size *= exp(enc/5) (y from encodings 0 and 2,
            x from 1 and 3); score = sigmoid(logit of class 1). Post-processing: scores > min
            score (0.5), greedy NMS at IoU 0.5 (suppressed when IoU > 0.5), at most 100; boxes
            clipped to [0, 1], scaled by 512/round(side*512/max(W,H)) per axis, then by the
            image's W and H.
  tiny      TinyFaceDetector: padToSquare bottom/right, resize to 416 (--input-size, a multiple
            of 32) as above, minus mean RGB (117.001, 114.697, 97.404), /255. conv0 3x3 'valid'
            + bias, leaky 0.1; max-pool 2x2 'same' (strides 2,2,2,2,2 then 1) between five
            separable convs (each: zero pad 1, depthwise 3x3 + pointwise 1x1 'valid', + bias,
            leaky); conv8 1x1 -> 13x13x(5 anchors x 5). Per cell and anchor: score =
            sigmoid(t4); kept when > min score (0.5); centre = (col|row + sigmoid(tx|ty))/13,
            size = exp(tw|th) * anchor / 13, both times the correction 416/round(side*416/max);
            NMS at IoU 0.4 (suppressed when IoU > 0.4, highest score first); boxes times W, H.
  landmark68  FaceLandmark68Net on a face crop (the image, or --box x0,y0,x1,y1 cut as face-api
            cuts a detection: clipped to the image, then x, y, w, h floored): padToSquare
            centred (round(d/2) after, the rest before), resize to 112, minus mean RGB (122.782,
            117.001, 104.298), /255; four dense blocks (conv0 stride 2: a 3x3 conv in block 0,
            separable in the others; three more separable convs, stride 1, each fed the ReLU of
            the sum of the outputs before it), avg-pool 7x7 stride 2 'valid', fc 256 -> 136.
            face-api's mapping: p = (out * 112 - pad) / (side * 112/max) per axis, with pad =
            |w' - h'|/2 on the shorter axis (w', h' the unrounded scaled sizes; face-api's
            assumption, half a pixel off the real padding for odd differences), then times the
            crop's W and H. `landmarks` adds the crop's (integer) origin; face-api itself adds
            the detection box's unfloored corner, which differs by less than a pixel.
TF 'same' padding: total = max((ceil(n/s) - 1)*s + k - n, 0), the smaller half before, so a
stride-2 3x3 conv on an even size pads only after (bottom, right).

CLI: detect_ref.py --models DIR --image PATH --net ssd|tiny|landmark68 --out FILE.npz
     [--min-score S] [--max-results N] [--input-size N] [--box x0,y0,x1,y1]
npz keys (float64 unless said; boxes are x0, y0, x1, y1 in the image's pixels):
  all        net (str), image (uint8 HxWx3 RGB, the crop for landmark68), resized (SxSx3, the
             padded and resized image in 0..255), input (1xSxSx3 NHWC, what the first layer
             takes)
  ssd        conv11 (32x32x512), features (16x16x1024: MobileNet's output), box_encodings
             (5118x4), class_logits (5118x3), anchors (5118x4), boxes (5118x4: decoded ymin,
             xmin, ymax, xmax in the padded square, 0..1, unclipped), scores (5118),
             det_indices (int64 K: anchors kept), det_scores (K), det_boxes (Kx4)
  tiny       grid (13x13x25 for 416: the raw output), det_scores (K), det_boxes (Kx4),
             det_cells (int64 Kx3: row, col, anchor)
  landmark68 crop (int64 x, y, w, h in the image), features (256: after the avg-pool),
             output (136: raw fc, x0 y0 x1 y1 ... relative to the 112 input),
             landmarks_crop (68x2, crop pixels), landmarks (68x2, image pixels)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

# ---- TF.js weights ----------------------------------------------------------------------------

_STORED_SIZE = {"float32": 4, "int32": 4, "uint8": 1, "uint16": 2, "float16": 2}


class WeightsError(ValueError):
    pass


def read_tfjs(manifest_path: str) -> Dict[str, np.ndarray]:
    """A TF.js weights manifest (face-api's list of groups, or a graph model's
    "weightsManifest") -> {name: array}. float tensors come back float64 holding the float32
    values TF.js would hold; int32 tensors as int64. Strict about sizes and dtypes."""
    with open(manifest_path, "rb") as f:
        manifest = json.loads(f.read())
    if isinstance(manifest, dict):
        if "weightsManifest" not in manifest:
            raise WeightsError(f"{manifest_path}: no weightsManifest")
        manifest = manifest["weightsManifest"]
    folder = os.path.dirname(manifest_path)
    out: Dict[str, np.ndarray] = {}
    for g, group in enumerate(manifest):
        data = b"".join(_read(os.path.join(folder, p)) for p in group["paths"])
        offset = 0
        for spec in group["weights"]:
            name, dtype, shape = spec["name"], spec["dtype"], [int(d) for d in spec["shape"]]
            if name in out:
                raise WeightsError(f"{manifest_path}: duplicate tensor {name}")
            if dtype not in ("float32", "int32"):
                raise WeightsError(f"{manifest_path}: {name}: dtype {dtype}")
            if any(d < 0 for d in shape):
                raise WeightsError(f"{manifest_path}: {name}: shape {shape}")
            count = math.prod(shape)
            quant = spec.get("quantization")
            stored = quant["dtype"] if quant else dtype
            if stored not in _STORED_SIZE:
                raise WeightsError(f"{manifest_path}: {name}: quantisation dtype {stored}")
            size = count * _STORED_SIZE[stored]
            raw = data[offset:offset + size]
            if len(raw) != size:
                raise WeightsError(f"{manifest_path}: {name}: shard truncated")
            offset += size
            if stored in ("uint8", "uint16"):
                q = np.frombuffer(raw, dtype="<u1" if stored == "uint8" else "<u2")
                v = q.astype(np.float64) * float(quant["scale"]) + float(quant["min"])
                # int32: JS Math.round (halves up); float32: a Float32Array element.
                v = np.floor(v + 0.5).astype(np.int64) if dtype == "int32" else \
                    v.astype(np.float32).astype(np.float64)
            elif stored == "float16":
                v = np.frombuffer(raw, dtype="<f2").astype(np.float64)
            elif stored == "float32":
                v = np.frombuffer(raw, dtype="<f4").astype(np.float64)
            else:
                v = np.frombuffer(raw, dtype="<i4").astype(np.int64)
            if v.dtype == np.float64 and not np.all(np.isfinite(v)):
                raise WeightsError(f"{manifest_path}: {name}: non-finite values")
            out[name] = v.reshape(shape)
        if offset != len(data):
            raise WeightsError(f"{manifest_path}: group {g}: {len(data) - offset} bytes too many")
    return out


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---- TF ops in NHWC, float64 ------------------------------------------------------------------


def same_pads(n: int, k: int, s: int) -> Tuple[int, int]:
    out = -(-n // s)
    total = max((out - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def _pad(x: np.ndarray, kh: int, kw: int, s: int, padding: str, value: float = 0.0):
    if padding == "valid":
        return x
    top, bottom = same_pads(x.shape[1], kh, s)
    left, right = same_pads(x.shape[2], kw, s)
    return np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=value)


def conv2d(x: np.ndarray, w: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """tf.conv2d: x NHWC, w HWIO."""
    kh, kw, cin, cout = w.shape
    assert x.shape[3] == cin, (x.shape, w.shape)
    xp = _pad(x, kh, kw, stride, padding)
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, cout))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            out += patch @ w[i, j]
    return out


def depthwise_conv2d(x: np.ndarray, w: np.ndarray, stride: int, padding: str) -> np.ndarray:
    """tf.depthwiseConv2d with channel multiplier 1: w is [kh, kw, C, 1]."""
    kh, kw, c, mult = w.shape
    assert mult == 1 and x.shape[3] == c, (x.shape, w.shape)
    xp = _pad(x, kh, kw, stride, padding)
    ho = (xp.shape[1] - kh) // stride + 1
    wo = (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, c))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + stride * (ho - 1) + 1:stride,
                      j:j + stride * (wo - 1) + 1:stride, :] * w[i, j, :, 0]
    return out


def separable_conv2d(x, depthwise, pointwise, stride: int, padding: str) -> np.ndarray:
    return conv2d(depthwise_conv2d(x, depthwise, stride, padding), pointwise, 1, "valid")


def max_pool(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    """tf.maxPool with 'same' padding (padded cells never win)."""
    xp = _pad(x, k, k, stride, "same", value=-np.inf)
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, xp[:, i:i + stride * (ho - 1) + 1:stride,
                                     j:j + stride * (wo - 1) + 1:stride, :])
    return out


def avg_pool_valid(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    ho = (x.shape[1] - k) // stride + 1
    wo = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, x.shape[3]))
    for i in range(k):
        for j in range(k):
            out += x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
    return out / (k * k)


def relu(x):
    return np.maximum(x, 0.0)


def relu6(x):
    return np.clip(x, 0.0, 6.0)


# tinyYolov2/leaky.ts: relu(x - a*x) + a*x with a = 0.1 as a float32 scalar.
LEAKY_ALPHA = float(np.float32(0.1))


def leaky(x):
    m = x * LEAKY_ALPHA
    return relu(x - m) + m


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def js_round(v: float) -> int:
    """Math.round: halves toward +infinity."""
    return int(math.floor(v + 0.5))


# ---- preprocessing (dom/NetInput.ts, ops/padToSquare.ts) --------------------------------------


def pad_to_square(img: np.ndarray, centred: bool) -> np.ndarray:
    h, w = img.shape[:2]
    if h == w:
        return img.astype(np.float64)
    diff = abs(h - w)
    after = js_round(diff * (0.5 if centred else 1.0))
    before = diff - after if centred else 0
    if h > w:
        pads = ((0, 0), (before, after), (0, 0))
    else:
        pads = ((before, after), (0, 0), (0, 0))
    return np.pad(img.astype(np.float64), pads)


def resize_bilinear(img: np.ndarray, size: int) -> np.ndarray:
    """tf.image.resizeBilinear(alignCorners=false, halfPixelCenters=false) of HxWxC."""
    h, w = img.shape[:2]
    if h == size and w == size:
        return img.astype(np.float64)

    def axis(n_in: int):
        src = np.arange(size) * (n_in / size)
        lo = np.maximum(np.floor(src).astype(np.int64), 0)
        hi = np.minimum(np.ceil(src).astype(np.int64), n_in - 1)
        return lo, hi, src - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    img = img.astype(np.float64)
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * fx[None, :, None]
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * fx[None, :, None]
    return top + (bottom - top) * fy[:, None, None]


def reshaped_dims(width: int, height: int, size: int) -> Tuple[int, int]:
    """utils.computeReshapedDimensions: the image's sides scaled to fit `size`, rounded."""
    scale = size / max(height, width)
    return js_round(width * scale), js_round(height * scale)


# ---- SSD-MobileNetV1 --------------------------------------------------------------------------

SSD_SIZE = 512
BN_EPSILON = 0.0010000000474974513


def _pointwise(x, w, prefix: str, stride: int):
    out = conv2d(x, w[f"{prefix}/weights"], stride, "same")
    return relu6(out + w[f"{prefix}/convolution_bn_offset"])


def _depthwise(x, w, prefix: str, stride: int):
    out = depthwise_conv2d(x, w[f"{prefix}/depthwise_weights"], stride, "same")
    mean = w[f"{prefix}/BatchNorm/moving_mean"]
    var = w[f"{prefix}/BatchNorm/moving_variance"]
    gamma = w[f"{prefix}/BatchNorm/gamma"]
    beta = w[f"{prefix}/BatchNorm/beta"]
    return relu6((out - mean) * gamma / np.sqrt(var + BN_EPSILON) + beta)


def _box_predictor(x, w, idx: int):
    p = f"Prediction/BoxPredictor_{idx}"
    enc = conv2d(x, w[f"{p}/BoxEncodingPredictor/weights"], 1, "same") + \
        w[f"{p}/BoxEncodingPredictor/biases"]
    cls = conv2d(x, w[f"{p}/ClassPredictor/weights"], 1, "same") + w[f"{p}/ClassPredictor/biases"]
    return enc.reshape(x.shape[0], -1, 4), cls.reshape(x.shape[0], -1, 3)


def ssd_forward(w: Dict[str, np.ndarray], x: np.ndarray) -> Dict[str, np.ndarray]:
    """x: 1x512x512x3 in -1..1."""
    out = _pointwise(x, w, "MobilenetV1/Conv2d_0_pointwise", 2)
    conv11 = None
    for i in range(1, 14):
        out = _depthwise(out, w, f"MobilenetV1/Conv2d_{i}_depthwise", 2 if i in (2, 4, 6, 12) else 1)
        out = _pointwise(out, w, f"MobilenetV1/Conv2d_{i}_pointwise", 1)
        if i == 11:
            conv11 = out
    features = out
    extra = []
    y = features
    for i in range(8):
        y = _pointwise(y, w, f"Prediction/Conv2d_{i}_pointwise", 2 if i % 2 else 1)
        extra.append(y)
    sources = [conv11, features, extra[1], extra[3], extra[5], extra[7]]
    preds = [_box_predictor(s, w, i) for i, s in enumerate(sources)]
    enc = np.concatenate([p[0] for p in preds], axis=1)[0]
    cls = np.concatenate([p[1] for p in preds], axis=1)[0]

    anchors = w["Output/extra_dim"].reshape(-1, 4)
    size_y = anchors[:, 2] - anchors[:, 0]
    size_x = anchors[:, 3] - anchors[:, 1]
    centre_y = anchors[:, 0] + size_y / 2
    centre_x = anchors[:, 1] + size_x / 2
    half_y = np.exp(enc[:, 2] / 5) * size_y / 2
    half_x = np.exp(enc[:, 3] / 5) * size_x / 2
    cy = enc[:, 0] / 10 * size_y + centre_y
    cx = enc[:, 1] / 10 * size_x + centre_x
    boxes = np.stack([cy - half_y, cx - half_x, cy + half_y, cx + half_x], axis=1)
    return {"conv11": conv11[0], "features": features[0], "box_encodings": enc,
            "class_logits": cls, "anchors": anchors, "boxes": boxes,
            "scores": sigmoid(cls[:, 1])}


def _ssd_iou(a: np.ndarray, b: np.ndarray) -> float:
    """ssdMobilenetv1/nonMaxSuppression.ts's IOU on (ymin, xmin, ymax, xmax)."""
    ya0, xa0, ya1, xa1 = min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3])
    yb0, xb0, yb1, xb1 = min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])
    area_a = (ya1 - ya0) * (xa1 - xa0)
    area_b = (yb1 - yb0) * (xb1 - xb0)
    if area_a <= 0 or area_b <= 0:
        return 0.0
    inter = max(min(ya1, yb1) - max(ya0, yb0), 0.0) * max(min(xa1, xb1) - max(xa0, xb0), 0.0)
    return inter / (area_a + area_b - inter)


def ssd_postprocess(boxes: np.ndarray, scores: np.ndarray, width: int, height: int,
                    min_score: float, max_results: int):
    order = [i for i in range(len(scores)) if scores[i] > min_score]
    order.sort(key=lambda i: -scores[i])  # stable, as JS's sort
    selected: List[int] = []
    for i in order:
        if len(selected) >= min(max_results, len(scores)):
            break
        if all(_ssd_iou(boxes[i], boxes[j]) <= 0.5 for j in selected):
            selected.append(i)
    rw, rh = reshaped_dims(width, height, SSD_SIZE)
    pad_x, pad_y = SSD_SIZE / rw, SSD_SIZE / rh
    out = []
    for i in selected:
        top = max(0.0, boxes[i, 0]) * pad_y
        bottom = min(1.0, boxes[i, 2]) * pad_y
        left = max(0.0, boxes[i, 1]) * pad_x
        right = min(1.0, boxes[i, 3]) * pad_x
        out.append([left * width, top * height, right * width, bottom * height])
    return (np.array(selected, dtype=np.int64), scores[selected].astype(np.float64),
            np.array(out, dtype=np.float64).reshape(-1, 4))


def run_ssd(models: str, rgb: np.ndarray, min_score: float = 0.5, max_results: int = 100):
    w = read_tfjs(os.path.join(models, "ssd_mobilenetv1_model-weights_manifest.json"))
    resized = resize_bilinear(pad_to_square(rgb, centred=False), SSD_SIZE)
    x = (resized / 127.5 - 1.0)[None]
    res = ssd_forward(w, x)
    idx, scores, boxes = ssd_postprocess(res["boxes"], res["scores"], rgb.shape[1], rgb.shape[0],
                                         min_score, max_results)
    res.update(resized=resized, input=x, det_indices=idx, det_scores=scores, det_boxes=boxes)
    return res


# ---- Tiny-Face-Detector -----------------------------------------------------------------------

TINY_ANCHORS = [(1.603231, 2.094468), (6.041143, 7.080126), (2.882459, 3.518061),
                (4.266906, 5.178857), (9.041765, 10.66308)]
TINY_MEAN_RGB = (117.001, 114.697, 97.404)


def tiny_forward(w: Dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    out = leaky(conv2d(x, w["conv0/filters"], 1, "valid") + w["conv0/bias"])
    for i in range(1, 6):
        out = max_pool(out, 2, 2)
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = separable_conv2d(padded, w[f"conv{i}/depthwise_filter"],
                               w[f"conv{i}/pointwise_filter"], 1, "valid")
        out = leaky(out + w[f"conv{i}/bias"])
    out = max_pool(out, 2, 1)
    return (conv2d(out, w["conv8/filters"], 1, "valid") + w["conv8/bias"])[0]


def _box_iou(a, b) -> float:
    """ops/iou.ts on (x0, y0, x1, y1)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def tiny_postprocess(grid: np.ndarray, width: int, height: int, input_size: int,
                     min_score: float):
    cells = grid.shape[0]
    g = grid.reshape(cells, cells, len(TINY_ANCHORS), 5)
    rw, rh = reshaped_dims(width, height, input_size)
    side = max(rw, rh)
    corr_x, corr_y = side / rw, side / rh
    boxes, scores, where = [], [], []
    for row in range(cells):
        for col in range(cells):
            for a, (ax, ay) in enumerate(TINY_ANCHORS):
                score = float(sigmoid(g[row, col, a, 4]))
                if score <= min_score:
                    continue
                cx = (col + sigmoid(g[row, col, a, 0])) / cells * corr_x
                cy = (row + sigmoid(g[row, col, a, 1])) / cells * corr_y
                bw = math.exp(g[row, col, a, 2]) * ax / cells * corr_x
                bh = math.exp(g[row, col, a, 3]) * ay / cells * corr_y
                x0, y0 = cx - bw / 2, cy - bh / 2
                boxes.append((x0, y0, x0 + bw, y0 + bh))
                scores.append(score)
                where.append((row, col, a))
    # ops/nonMaxSuppression.ts: ascending stable sort, the last (highest) popped first.
    remaining = sorted(range(len(scores)), key=lambda i: scores[i])
    pick = []
    while remaining:
        cur = remaining.pop()
        pick.append(cur)
        remaining = [i for i in remaining if _box_iou(boxes[cur], boxes[i]) <= 0.4]
    det = np.array([[boxes[i][0] * width, boxes[i][1] * height,
                     boxes[i][2] * width, boxes[i][3] * height] for i in pick]).reshape(-1, 4)
    return (np.array([scores[i] for i in pick], dtype=np.float64), det,
            np.array([where[i] for i in pick], dtype=np.int64).reshape(-1, 3))


def run_tiny(models: str, rgb: np.ndarray, input_size: int = 416, min_score: float = 0.5):
    if input_size % 32:
        raise ValueError(f"input size {input_size} is not a multiple of 32")
    w = read_tfjs(os.path.join(models, "tiny_face_detector_model-weights_manifest.json"))
    resized = resize_bilinear(pad_to_square(rgb, centred=False), input_size)
    x = ((resized - np.array(TINY_MEAN_RGB)) / 255.0)[None]
    grid = tiny_forward(w, x)
    scores, boxes, cells = tiny_postprocess(grid, rgb.shape[1], rgb.shape[0], input_size,
                                            min_score)
    return {"resized": resized, "input": x, "grid": grid, "det_scores": scores,
            "det_boxes": boxes, "det_cells": cells}


# ---- 68-point landmarks -----------------------------------------------------------------------

LANDMARK_SIZE = 112
LANDMARK_MEAN_RGB = (122.782, 117.001, 104.298)


def _separable(x, w, prefix: str, stride: int):
    return separable_conv2d(x, w[f"{prefix}/depthwise_filter"], w[f"{prefix}/pointwise_filter"],
                            stride, "same") + w[f"{prefix}/bias"]


def _dense_block4(x, w, prefix: str, first: bool):
    if first:
        out1 = relu(conv2d(x, w[f"{prefix}/conv0/filters"], 2, "same") + w[f"{prefix}/conv0/bias"])
    else:
        out1 = relu(_separable(x, w, f"{prefix}/conv0", 2))
    out2 = _separable(out1, w, f"{prefix}/conv1", 1)
    out3 = _separable(relu(out1 + out2), w, f"{prefix}/conv2", 1)
    out4 = _separable(relu(out1 + out2 + out3), w, f"{prefix}/conv3", 1)
    return relu(out1 + out2 + out3 + out4)


def landmark_forward(w: Dict[str, np.ndarray], x: np.ndarray):
    out = x
    for i in range(4):
        out = _dense_block4(out, w, f"dense{i}", first=(i == 0))
    features = avg_pool_valid(out, 7, 2).reshape(x.shape[0], -1)
    return features[0], (features @ w["fc/weights"] + w["fc/bias"])[0]


def face_crop(width: int, height: int, box: Sequence[float]) -> Tuple[int, int, int, int]:
    """Box.clipAtImageBorders(...).floor() of a detection box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    cx, cy = max(x0, 0.0), max(y0, 0.0)
    cw = min(x1 - cx, width - cx)
    ch = min(y1 - cy, height - cy)
    return math.floor(cx), math.floor(cy), math.floor(cw), math.floor(ch)


def landmarks_from_output(output: np.ndarray, width: int, height: int) -> np.ndarray:
    """FaceLandmark68NetBase.postProcess, then FaceLandmarks' scaling to the crop's pixels."""
    scale = LANDMARK_SIZE / max(width, height)
    sw, sh = width * scale, height * scale
    pad_x = abs(sw - sh) / 2 if sw < sh else 0.0
    pad_y = abs(sw - sh) / 2 if sh < sw else 0.0
    pts = output.reshape(68, 2) * LANDMARK_SIZE
    rel = (pts - np.array([pad_x, pad_y])) / np.array([sw, sh])
    return rel * np.array([width, height])


def run_landmark68(models: str, rgb: np.ndarray, box: Sequence[float] | None = None):
    w = read_tfjs(os.path.join(models, "face_landmark_68_model-weights_manifest.json"))
    if box is None:
        crop = (0, 0, rgb.shape[1], rgb.shape[0])
    else:
        crop = face_crop(rgb.shape[1], rgb.shape[0], box)
        if crop[2] <= 0 or crop[3] <= 0:
            raise ValueError(f"box {list(box)} lies outside the image")
    x0, y0, cw, ch = crop
    face = rgb[y0:y0 + ch, x0:x0 + cw]
    resized = resize_bilinear(pad_to_square(face, centred=True), LANDMARK_SIZE)
    x = ((resized - np.array(LANDMARK_MEAN_RGB)) / 255.0)[None]
    features, output = landmark_forward(w, x)
    in_crop = landmarks_from_output(output, cw, ch)
    return {"image": face, "crop": np.array(crop, dtype=np.int64), "resized": resized,
            "input": x, "features": features, "output": output, "landmarks_crop": in_crop,
            "landmarks": in_crop + np.array([x0, y0])}


# ---- CLI --------------------------------------------------------------------------------------


def read_rgb(path: str) -> np.ndarray:
    import cv2  # decoding only

    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"detect_ref: cannot decode {path}")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="folder with face-api's files")
    ap.add_argument("--image", required=True)
    ap.add_argument("--net", required=True, choices=["ssd", "tiny", "landmark68"])
    ap.add_argument("--out", required=True, help="the .npz to write")
    ap.add_argument("--min-score", type=float, default=0.5)
    ap.add_argument("--max-results", type=int, default=100, help="ssd")
    ap.add_argument("--input-size", type=int, default=416, help="tiny: a multiple of 32")
    ap.add_argument("--box", help="landmark68: x0,y0,x1,y1 of the face in the image")
    args = ap.parse_args(argv)

    rgb = read_rgb(args.image)
    if args.net == "ssd":
        res = run_ssd(args.models, rgb, args.min_score, args.max_results)
    elif args.net == "tiny":
        res = run_tiny(args.models, rgb, args.input_size, args.min_score)
    else:
        box = [float(v) for v in args.box.split(",")] if args.box else None
        if box is not None and len(box) != 4:
            raise SystemExit("detect_ref: --box takes x0,y0,x1,y1")
        res = run_landmark68(args.models, rgb, box)
    res.setdefault("image", rgb)
    np.savez_compressed(args.out, net=np.array(args.net), **res)
    if "det_boxes" in res:
        for s, b in zip(res["det_scores"], res["det_boxes"]):
            print(f"{s:.4f} " + " ".join(f"{v:.1f}" for v in b))
    else:
        print(" ".join(f"{x:.1f},{y:.1f}" for x, y in res["landmarks"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
