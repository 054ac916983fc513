#!/usr/bin/python3
"""Checks ONNX Runtime's embeddings of r50.onnx and insightface_r50.onnx of a goldens directory
against the torch reference embeddings in goldens.json.

    /usr/bin/python3 tests/reference/check_ort.py GOLDENS_DIR [--min-cosine 0.99999]
                                                  [--ort-dir DIR]

With --ort-dir, ONNX Runtime's outputs are read from DIR/ort_<model key>.json (what ctest's
reference_onnxruntime fixtures write); without it, ort_run.mjs runs here (needs
`npm install --ignore-scripts` in tests/reference). Exit status 1 if any case is below the
threshold; prints the worst cosine and the largest relative difference per model.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("goldens")
    ap.add_argument("--min-cosine", type=float, default=0.99999)
    ap.add_argument("--node", default="node")
    ap.add_argument("--ort-dir", help="read DIR/ort_<model key>.json instead of running ORT")
    a = ap.parse_args(argv)
    with open(os.path.join(a.goldens, "goldens.json")) as f:
        g = json.load(f)
    ok, checked = True, 0
    for key, m in g["models"].items():
        onnx = m.get("onnx") or (m["file"] if m["file"].endswith(".onnx") else None)
        if onnx is None:
            continue
        if a.ort_dir:
            with open(os.path.join(a.ort_dir, f"ort_{key}.json")) as f:
                ort = json.load(f)["cases"]
        else:
            with tempfile.TemporaryDirectory() as td:
                out = os.path.join(td, "ort.json")
                subprocess.run([a.node, os.path.join(HERE, "ort_run.mjs"),
                                os.path.join(a.goldens, onnx), a.goldens, out, "--model-key", key],
                               check=True, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    ort = json.load(f)["cases"]
        worst_cos, worst_rel, n = 1.0, 0.0, 0
        for c in g["cases"]:
            if c["model"] != key:
                continue
            r = np.asarray(c["embedding"], np.float64)
            o = np.asarray(ort[c["name"]], np.float64)
            cos = float(r @ o / np.linalg.norm(r) / np.linalg.norm(o))
            rel = float(np.abs(r - o).max() / np.abs(r).max())
            worst_cos, worst_rel, n = min(worst_cos, cos), max(worst_rel, rel), n + 1
            if cos < a.min_cosine:
                ok = False
                print(f"  {key} {c['name']}: cosine {cos:.8f} < {a.min_cosine}")
        if n == 0 or len(ort) != n:
            ok = False
            print(f"  {key}: {n} reference cases, {len(ort)} ONNX Runtime outputs")
        checked += 1
        print(f"{key} ({onnx}): {n} cases, ORT vs torch reference: min cosine {worst_cos:.9f} (1-cos {1 - worst_cos:.1e}), "
              f"max |diff|/max|ref| {worst_rel:.2e}")
    if checked == 0:
        print(f"no ONNX model in {a.goldens}/goldens.json")
    return 0 if ok and checked else 1


if __name__ == "__main__":
    sys.exit(main())
