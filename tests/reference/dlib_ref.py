#!/usr/bin/env python3
"""Independent numpy reference of dlib's ResNet face descriptor
(dlib_face_recognition_resnet_model_v1) as npm's @vladmandic/face-api 1.7.15 ships it
(face_recognition_model: a TF.js manifest with uint8-quantised shards).

Written from face-api's TypeScript (src/faceRecognitionNet: FaceRecognitionNet.ts, convLayer.ts,
residualLayer.ts, scaleLayer.ts) and dlib's input layer (dlib/dnn/input.h); it shares no code
with the C++ (server/model/dlib_resnet.cc). numpy only, float64 throughout, NHWC; the weights
come through detect_ref.read_tfjs (the reference side's TF.js reader: float32 values as TF.js
holds them, widened). The per-channel scale is applied as its own step, never folded.

The network, on a 150x150 RGB chip:
  input     (x - mean) / 256 per channel, mean (122.782, 117.001, 104.298) RGB: dlib's
            input_rgb_image_sized. face-api divides by 255 instead (input_scale=255 here).
  conv      conv2d + bias, then the scale layer (x * weights + biases), then ReLU unless said.
  stem      conv32_down: 7x7 stride 2 'valid' (150 -> 72), ReLU; max pool 3x3 stride 2 'valid'
            (72 -> 35).
  residual  relu(convNoRelu(conv(x, conv1), conv2) + x); both 3x3 stride 1 'same' (pad 1).
  down      out = convNoRelu(conv(x, conv1: 3x3 stride 2 'valid'), conv2: 3x3 'same');
            shortcut = avgPool 2x2 stride 2 'valid' of x, with zero channels appended when out
            is wider; when out is smaller than the shortcut (8 -> 3 vs 4, 4 -> 1 vs 2) a zero row
            is appended at the bottom and a zero column at the right (face-api's residualDown);
            relu(out + shortcut).
  blocks    conv32_1..3 (35), conv64_down, conv64_1..3 (17), conv128_down, conv128_1..2 (8),
            conv256_down, conv256_1..2 (4), conv256_down_out (2).
  head      mean over the 2x2 positions (256 values), times fc [256, 128]: the raw descriptor.

CLI: dlib_ref.py --manifest FILE --chip IMAGE [--input-scale 256] prints the descriptor.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from detect_ref import avg_pool_valid, conv2d, read_tfjs, relu  # noqa: E402

MEAN_RGB = (122.782, 117.001, 104.298)
CHIP = 150
STEM = ("conv32_down", 3, 32)
# (name, input channels, output channels, halves the resolution)
BLOCKS: List[Tuple[str, int, int, bool]] = [
    ("conv32_1", 32, 32, False), ("conv32_2", 32, 32, False), ("conv32_3", 32, 32, False),
    ("conv64_down", 32, 64, True), ("conv64_1", 64, 64, False), ("conv64_2", 64, 64, False),
    ("conv64_3", 64, 64, False),
    ("conv128_down", 64, 128, True), ("conv128_1", 128, 128, False),
    ("conv128_2", 128, 128, False),
    ("conv256_down", 128, 256, True), ("conv256_1", 256, 256, False),
    ("conv256_2", 256, 256, False), ("conv256_down_out", 256, 256, True),
]
FC = ("fc", (256, 128))


def expected_shapes() -> List[Tuple[str, Tuple[int, ...]]]:
    """Every tensor of the manifest with its shape, in face-api's order (117)."""
    def conv(name: str, k: int, cin: int, cout: int):
        return [(f"{name}/conv/filters", (k, k, cin, cout)), (f"{name}/conv/bias", (cout,)),
                (f"{name}/scale/weights", (cout,)), (f"{name}/scale/biases", (cout,))]
    shapes = conv(STEM[0], 7, STEM[1], STEM[2])
    for name, cin, cout, _ in BLOCKS:
        shapes += conv(f"{name}/conv1", 3, cin, cout) + conv(f"{name}/conv2", 3, cout, cout)
    return shapes + [FC]


def load(manifest: str) -> Dict[str, np.ndarray]:
    w = read_tfjs(manifest)
    want = dict(expected_shapes())
    if set(w) != set(want):
        raise ValueError(f"{manifest}: tensors differ: missing {sorted(set(want) - set(w))}, "
                         f"extra {sorted(set(w) - set(want))}")
    for name, shape in want.items():
        if tuple(w[name].shape) != shape or w[name].dtype != np.float64:
            raise ValueError(f"{manifest}: {name}: {w[name].dtype} {w[name].shape}, want {shape}")
    return w


def max_pool_valid(x: np.ndarray, k: int, stride: int) -> np.ndarray:
    ho = (x.shape[1] - k) // stride + 1
    wo = (x.shape[2] - k) // stride + 1
    out = np.full((x.shape[0], ho, wo, x.shape[3]), -np.inf)
    for i in range(k):
        for j in range(k):
            out = np.maximum(out, x[:, i:i + stride * (ho - 1) + 1:stride,
                                    j:j + stride * (wo - 1) + 1:stride, :])
    return out


def conv_layer(w, x, name: str, stride: int, padding: str, with_relu: bool) -> np.ndarray:
    out = conv2d(x, w[f"{name}/conv/filters"], stride, padding) + w[f"{name}/conv/bias"]
    out = out * w[f"{name}/scale/weights"] + w[f"{name}/scale/biases"]
    return relu(out) if with_relu else out


def residual(w, x, name: str) -> np.ndarray:
    out = conv_layer(w, x, f"{name}/conv1", 1, "same", True)
    out = conv_layer(w, out, f"{name}/conv2", 1, "same", False)
    return relu(out + x)


def residual_down(w, x, name: str) -> np.ndarray:
    out = conv_layer(w, x, f"{name}/conv1", 2, "valid", True)
    out = conv_layer(w, out, f"{name}/conv2", 1, "same", False)
    pooled = avg_pool_valid(x, 2, 2)
    if pooled.shape[1:3] != out.shape[1:3]:
        n, h, wd, c = out.shape
        out = np.concatenate([out, np.zeros((n, 1, wd, c))], axis=1)
        out = np.concatenate([out, np.zeros((n, h + 1, 1, c))], axis=2)
    if pooled.shape[3] != out.shape[3]:
        pooled = np.concatenate([pooled, np.zeros(pooled.shape)], axis=3)
    return relu(out + pooled)


def normalize(chips: np.ndarray, input_scale: float = 256.0) -> np.ndarray:
    """uint8 NHWC RGB chips -> the network's input (float64)."""
    return (chips.astype(np.float64) - np.array(MEAN_RGB)) / input_scale


def forward(w: Dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """x: normalised [N, 150, 150, 3] -> raw descriptors [N, 128]."""
    out = conv_layer(w, x, STEM[0], 2, "valid", True)
    out = max_pool_valid(out, 3, 2)
    for name, _, _, down in BLOCKS:
        out = residual_down(w, out, name) if down else residual(w, out, name)
    return out.mean(axis=(1, 2)) @ w["fc"]


def describe(w, chips: np.ndarray, input_scale: float = 256.0) -> np.ndarray:
    assert chips.dtype == np.uint8 and chips.shape[1:] == (CHIP, CHIP, 3), chips.shape
    return forward(w, normalize(chips, input_scale))


def main(argv: Sequence[str] | None = None) -> int:
    import cv2
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--chip", required=True, help="a 150x150 image")
    p.add_argument("--input-scale", type=float, default=256.0)
    args = p.parse_args(argv)
    bgr = cv2.imread(args.chip, cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape != (CHIP, CHIP, 3):
        raise SystemExit(f"{args.chip}: not a readable 150x150 colour image")
    d = describe(load(args.manifest), bgr[None, :, :, ::-1].copy(), args.input_scale)[0]
    print(" ".join(f"{v:.8f}" for v in d), f"norm={np.linalg.norm(d):.8f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
