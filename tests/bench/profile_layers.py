#!/usr/bin/python3
"""Where the CPU forward pass spends its time: per stage of the network and per operator.

Usage: tests/bench/profile_layers.py [--batch 8] [--threads 2] [--iters 5] [--arch r50]

Runs the network as the engine does (channels-last activations and weights, the bn2/fc/features
head folded into one 7x7 convolution, inference mode, random weights; the engine's libtorch is
the same Debian libtorch that python3-torch wraps, so the kernels are the same oneDNN ones):
- per stage (stem, layer1..4, head): wall time of that stage alone, best of --iters;
- per operator: self CPU time from torch.profiler over --iters whole forward passes.
Prints two Markdown tables.
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
from iresnet_modules import FusedIResNet  # noqa: E402

LAYERS = {"r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3)}


def fold_head(net):
    """bn2 -> flatten -> fc -> features as one 7x7 convolution (what the engine runs)."""
    eps = 1e-5
    with torch.no_grad():
        s1 = net.bn2.weight.double() / (net.bn2.running_var.double() + eps).sqrt()
        t1 = net.bn2.bias.double() - net.bn2.running_mean.double() * s1
        s2 = net.features.weight.double() / (net.features.running_var.double() + eps).sqrt()
        t2 = net.features.bias.double() - net.features.running_mean.double() * s2
        w = net.fc.weight.double().view(512, 512, 7, 7)
        weight = (w * s1.view(1, 512, 1, 1)) * s2.view(512, 1, 1, 1)
        bias = ((w * t1.view(1, 512, 1, 1)).sum(dim=(1, 2, 3)) + net.fc.bias.double()) * s2 + t2
        head = nn.Conv2d(512, 512, 7)
        head.weight.copy_(weight.float())
        head.bias.copy_(bias.float())
    return head


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--arch", default="r50", choices=sorted(LAYERS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    net = FusedIResNet(LAYERS[args.arch]).eval()
    for m in net.modules():  # non-trivial BatchNorm statistics, as trained weights have
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    head = fold_head(net).eval()
    stem = nn.Sequential(net.conv1, net.prelu)
    stages = [("stem (conv1, prelu)", stem), ("layer1", net.layer1), ("layer2", net.layer2),
              ("layer3", net.layer3), ("layer4", net.layer4), ("head (folded 7x7 conv)", head)]
    for _, m in stages:
        m.to(memory_format=torch.channels_last)

    def forward(x):
        for _, m in stages:
            x = m(x)
        return x.flatten(1)

    x0 = torch.rand(args.batch, 3, 112, 112).sub_(0.5).mul_(2).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        forward(x0)
        forward(x0)
        # Per stage: the stage's own input, timed alone.
        inputs, x = [], x0
        for _, m in stages:
            inputs.append(x)
            x = m(x)
        stage_times = []
        for (name, m), inp in zip(stages, inputs):
            best = float("inf")
            for _ in range(args.iters):
                t0 = time.perf_counter()
                m(inp)
                best = min(best, time.perf_counter() - t0)
            stage_times.append((name, best))
        total = sum(t for _, t in stage_times)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.iters):
                forward(x0)

    print(f"IResNet-{args.arch[1:]} forward, batch {args.batch}, {args.threads} threads, fp32, channels-last")
    print("| stage | ms per batch | ms per face | share |")
    print("|---|---:|---:|---:|")
    for name, t in stage_times:
        print(f"| {name} | {1000 * t:.1f} | {1000 * t / args.batch:.2f} | {100 * t / total:.1f} % |")
    print(f"| total | {1000 * total:.1f} | {1000 * total / args.batch:.2f} | 100 % |")
    print()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    self_total = sum(e.self_cpu_time_total for e in events)
    print("| operator (self CPU time) | ms per batch | share | calls per batch |")
    print("|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1000 / args.iters:.1f} "
              f"| {100 * e.self_cpu_time_total / self_total:.1f} % | {e.count // args.iters} |")


if __name__ == "__main__":
    main()
