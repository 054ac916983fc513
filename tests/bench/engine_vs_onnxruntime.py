#!/usr/bin/python3
"""Engine vs ONNX Runtime, side by side in one run, on the same weights and thread count.

Usage: tests/bench/engine_vs_onnxruntime.py [--build build] [--batch 1,8,32] [--threads 2]
                                            [--seconds 20] [--rounds 2] [--engines fp32,int8,...]
Uses the seeded r50 checkpoint and its ONNX export from the reference goldens
(<build>/golden/r50.safetensors and r50.onnx: the same weights in both files). Each batch size
alternates engine and ONNX Runtime runs (--rounds times) so drift on a shared machine hits both;
the table reports the best round of each, with the CPU's model and family (a ratio holds only for
the CPU it was measured on).
"""
import argparse
import json
import os
import subprocess
import sys

from cpuinfo import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def json_lines(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


# Engine variants engine_bench can run, by name (--engines): the default CPU engine (oneDNN with
# Winograd convolutions), its direct-convolution form, the libtorch module it replaced, and the
# reduced precisions.
VARIANTS = {
    "fp32": [],
    "fp32-direct": ["--no-winograd"],
    "torch": ["--cpu-backend", "torch"],
    "bf16": ["--precision", "bf16"],
    "int8": ["--precision", "int8"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--engines", default="fp32",
                    help="comma-separated engine variants: " + ", ".join(VARIANTS))
    args = ap.parse_args()
    engines = args.engines.split(",")
    for name in engines:
        if name not in VARIANTS:
            sys.exit(f"unknown engine variant '{name}': expected one of {', '.join(VARIANTS)}")

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
        best = {name: 0.0 for name in engines + ["ort"]}
        rss = {name: 0.0 for name in engines}
        for _ in range(args.rounds):
            # Interleaved within each round, so drift on a shared machine hits every column.
            for name in engines:
                lines = json_lines([bench, "--weights", weights, "--batch", str(batch), "--threads",
                                    str(args.threads), "--seconds", str(args.seconds)] + VARIANTS[name])
                best[name] = max(best[name], lines[0]["faces_per_s"])
                rss[name] = max(rss[name], lines[-1]["peak_rss_mib"])
            lines = json_lines(["node", ort, onnx, "--batch", str(batch), "--threads",
                                str(args.threads), "--seconds", str(args.seconds)])
            best["ort"] = max(best["ort"], lines[0]["faces_per_s"])
        rows.append((batch, best, rss))
        print(f"batch {batch}: " + ", ".join(f"{k} {v:.2f}" for k, v in best.items()) + " faces/s",
              file=sys.stderr)

    print(f"IResNet-50, {args.threads} threads, best of {args.rounds} x {args.seconds:g} s, "
          f"on {cpu_model()}")
    head = "| batch | ONNX Runtime faces/s |"
    for name in engines:
        head += f" {name} faces/s | {name} / ORT |" + (" / fp32 |" if name != "fp32" and "fp32" in engines else "")
    print(head + " peak RSS MiB (" + ", ".join(engines) + ") |")
    print("|---:" * (head.count("|") - 1) + "|---|")
    for batch, best, rss in rows:
        line = f"| {batch} | {best['ort']:.2f} |"
        for name in engines:
            line += f" {best[name]:.2f} | {best[name] / best['ort']:.2f} |"
            if name != "fp32" and "fp32" in engines:
                line += f" {best[name] / best['fp32']:.2f} |"
        print(line + " " + ", ".join(f"{rss[n]:.0f}" for n in engines) + " |")


if __name__ == "__main__":
    main()
