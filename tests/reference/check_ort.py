#!/usr/bin/python3
"""Runs ONNX Runtime (ort_run.mjs) on r50.onnx and insightface_r50.onnx of a goldens directory
and checks it against the torch reference embeddings in goldens.json.

    /usr/bin/python3 tests/reference/check_ort.py GOLDENS_DIR [--min-cosine 0.99999]

Needs `npm install --ignore-scripts` in tests/reference. Exit status 1 if any case is below the
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
    a = ap.parse_args(argv)
    with open(os.path.join(a.goldens, "goldens.json")) as f:
        g = json.load(f)
    ok = True
    for key, m in g["models"].items():
        onnx = m.get("onnx") or (m["file"] if m["file"].endswith(".onnx") else None)
        if onnx is None:
            continue
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
        print(f"{key} ({onnx}): {n} cases, ORT vs torch reference: min cosine {worst_cos:.9f} (1-cos {1 - worst_cos:.1e}), "
              f"max |diff|/max|ref| {worst_rel:.2e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
