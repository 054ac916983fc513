#!/usr/bin/env python3
"""Writes the numpy reference's (tests/reference/dlib_ref.py) descriptors of 150x150 chips for
dlib_engine_test: the trained weights (face-api's face_recognition_model) on dlib's
examples/johns chips (5 people x 11, already aligned dlib chips) and on seeded random chips, and
seeded random weights, written here in the exact TF.js layout of the real file (a manifest and
uint8-quantised shards, the conv64 kernels stored float32 as face-api stores them, split over two
shards), on some of the same chips.

Into OUT: chips.u8 (N x 150 x 150 x 3 RGB), random_weights/ (the manifest and its shards),
<set>.f32 (N x 128 float32 descriptors per weight set), index.json (the chips' names and people,
the sets with their manifest, which chips they cover and each descriptor's norm). Idempotent:
returns at once when index.json is newer than this script, the reference and the inputs.
Usage: make_dlib_refs.py --models DIR --dlib-data DIR --out DIR
"""
import argparse
import glob
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import dlib_ref  # noqa: E402

MANIFEST = "face_recognition_model-weights_manifest.json"
RANDOM_CHIPS = 3
RANDOM_WEIGHT_CHIPS = [0, 11, 22, 33, 44]  # one chip of each person, then the random chips


def up_to_date(out, sources):
    index = os.path.join(out, "index.json")
    if not os.path.exists(index):
        return False
    return os.path.getmtime(index) > max(os.path.getmtime(s) for s in sources)


def random_chips(rng, n):
    """Noise over smooth colour ramps: every channel varies, values span 0..255."""
    yy, xx = np.mgrid[0:dlib_ref.CHIP, 0:dlib_ref.CHIP] / (dlib_ref.CHIP - 1)
    chips = []
    for _ in range(n):
        ramp = np.stack([a * xx + b * yy + c for a, b, c in rng.uniform(-1, 1, (3, 3))], axis=2)
        img = 128 + 80 * ramp + rng.normal(0, 30, ramp.shape)
        chips.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return chips


def random_weights(rng):
    """Seeded weights of the network's shapes, scaled so activations stay of order one."""
    w = {}
    for name, shape in dlib_ref.expected_shapes():
        if name.endswith("/conv/filters"):
            fan_in = shape[0] * shape[1] * shape[2]
            v = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
        elif name.endswith("/scale/weights"):
            # The second convolution of a block adds to the shortcut: keep it small.
            v = rng.uniform(0.2, 0.5, shape) if "/conv2/" in name else rng.uniform(0.5, 1.5, shape)
        elif name == "fc":
            v = rng.normal(0, 1.0 / np.sqrt(shape[0]), shape)
        else:
            v = rng.normal(0, 0.1, shape)
        w[name] = v
    return w


def write_tfjs(folder, weights):
    """TF.js layout: uint8 quantisation (q * scale + min) except conv64 kernels (float32), the
    bytes split into two shards; returns the weights as TF.js will read them."""
    os.makedirs(folder, exist_ok=True)
    specs, blob, read_back = [], bytearray(), {}
    for name, _ in dlib_ref.expected_shapes():
        v = weights[name]
        spec = {"name": name, "shape": list(v.shape), "dtype": "float32"}
        if name.startswith("conv64") and name.endswith("/filters"):
            data = v.astype("<f4")
            read_back[name] = data.astype(np.float64)
            blob += data.tobytes()
        else:
            lo, hi = float(v.min()), float(v.max())
            scale = (hi - lo) / 255.0 if hi > lo else 1.0
            q = np.clip(np.rint((v - lo) / scale), 0, 255).astype(np.uint8)
            spec["quantization"] = {"dtype": "uint8", "scale": scale, "min": lo}
            read_back[name] = (q * scale + lo).astype(np.float32).astype(np.float64)
            blob += q.tobytes()
        specs.append(spec)
    half = len(blob) // 2
    paths = ["face_recognition_model-shard1", "face_recognition_model-shard2"]
    for path, part in zip(paths, (blob[:half], blob[half:])):
        with open(os.path.join(folder, path), "wb") as f:
            f.write(part)
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump([{"paths": paths, "weights": specs}], f)
    return read_back


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="face-api's models folder")
    p.add_argument("--dlib-data", required=True, help="fetch_dlib_data.sh's folder")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import cv2

    manifest = os.path.join(args.models, MANIFEST)
    johns = sorted(glob.glob(os.path.join(args.dlib_data, "johns", "*", "*.jpg")))
    if len(johns) != 55:
        sys.exit(f"{args.dlib_data}/johns: {len(johns)} photos, expected 55 "
                 "(tests/data/fetch_dlib_data.sh)")
    sources = [__file__, dlib_ref.__file__, manifest] + johns
    if up_to_date(args.out, sources):
        return 0
    os.makedirs(args.out, exist_ok=True)

    rng = np.random.default_rng(20261202)
    names, people, chips = [], [], []
    for path in johns:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        names.append(os.path.relpath(path, args.dlib_data))
        people.append(os.path.basename(os.path.dirname(path)))
        chips.append(bgr[:, :, ::-1])
    for i, chip in enumerate(random_chips(rng, RANDOM_CHIPS)):
        names.append(f"random_chip_{i}")
        people.append("")
        chips.append(chip)
    chips = np.ascontiguousarray(np.stack(chips), dtype=np.uint8)
    chips.tofile(os.path.join(args.out, "chips.u8"))

    sets = []
    trained = dlib_ref.load(manifest)
    random_folder = os.path.join(args.out, "random_weights")
    written = write_tfjs(random_folder, random_weights(rng))
    random_manifest = os.path.join(random_folder, MANIFEST)
    loaded = dlib_ref.load(random_manifest)
    for name in written:  # the reader must give back what was written
        assert np.array_equal(written[name], loaded[name]), name
    extra = list(range(len(johns), len(names)))
    for set_name, w, path, indices in (
            ("trained", trained, manifest, list(range(len(names)))),
            ("random", loaded, random_manifest, RANDOM_WEIGHT_CHIPS + extra)):
        d = np.concatenate([dlib_ref.describe(w, chips[indices[i:i + 8]])
                            for i in range(0, len(indices), 8)])
        d.astype(np.float32).tofile(os.path.join(args.out, set_name + ".f32"))
        sets.append({"name": set_name, "manifest": os.path.abspath(path), "chips": indices,
                     "norms": [float(v) for v in np.linalg.norm(d, axis=1)]})
    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump({"chip_size": dlib_ref.CHIP, "embedding_dim": 128, "names": names,
                   "people": people, "sets": sets}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
