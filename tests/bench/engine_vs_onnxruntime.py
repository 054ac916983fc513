#!/usr/bin/python3
"""Engine vs ONNX Runtime, side by side in one run, on the same weights and thread count.

Usage: tests/bench/engine_vs_onnxruntime.py [--build build] [--batch 1,8,32] [--threads 2]
                                            [--seconds 20] [--rounds 2]
Uses the seeded r50 checkpoint and its ONNX export from the reference goldens
(<build>/golden/r50.safetensors and r50.onnx: the same weights in both files). Each batch size
alternates engine and ONNX Runtime runs (--rounds times) so drift on a shared machine hits both;
the table reports the best round of each.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def json_lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    golden = os.path.join(args.build, "golden")
    weights = os.path.join(golden, "r50.safetensors")
    onnx = os.path.join(golden, "r50.onnx")
    for f in (weights, onnx):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: run tests/run.sh (or ctest -R reference_goldens) first")
    bench = os.path.join(args.build, "tests", "bench", "engine_bench")
    ort = os.path.join(ROOT, "tests", "reference", "ort_bench.mjs")

    rows = []
    for batch in [int(b) for b in args.batch.split(",")]:
        best_engine, best_ort, rss = 0.0, 0.0, 0.0
        for _ in range(args.rounds):
            lines = json_lines([bench, "--weights", weights, "--batch", str(batch), "--threads",
                                str(args.threads), "--seconds", str(args.seconds),
                                "--precision", args.precision])
            best_engine = max(best_engine, lines[0]["faces_per_s"])
            rss = max(rss, lines[-1]["peak_rss_mib"])
            lines = json_lines(["node", ort, onnx, "--batch", str(batch), "--threads",
                                str(args.threads), "--seconds", str(args.seconds)])
            best_ort = max(best_ort, lines[0]["faces_per_s"])
        rows.append((batch, best_engine, best_ort, best_engine / best_ort, rss))
        print(f"batch {batch}: engine {best_engine:.2f} faces/s, onnxruntime {best_ort:.2f} faces/s",
              file=sys.stderr)

    print(f"IResNet-50, {args.threads} threads, {args.precision}, best of {args.rounds} x {args.seconds:g} s")
    print(f"| batch | engine faces/s | ONNX Runtime faces/s | engine / ORT | engine peak RSS MiB |")
    print(f"|---:|---:|---:|---:|---:|")
    for batch, e, o, r, m in rows:
        print(f"| {batch} | {e:.2f} | {o:.2f} | {r:.2f} | {m:.0f} |")


if __name__ == "__main__":
    main()
