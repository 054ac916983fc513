#!/usr/bin/python3
"""Reload under load: what a model reload (SIGHUP) costs the calls that run through it.

Usage: tests/bench/reload_bench.py [--build build] [--clients 4] [--steady 15] [--cycles 4]
         [--threads 2] [--workdir DIR]

Starts the real server (loopback, ephemeral ports) with one model, `live`, read from a file in
the work folder: the golden r50 weights (safetensors). Client threads embed one raw crop each in
a loop for the whole run. After --steady seconds the file is replaced (written beside, renamed
over) by another set of r50 weights, the golden InsightFace-layout r50 (ONNX), and the server
gets SIGHUP; once the old version has retired, --steady seconds more; and so on, alternating,
for --cycles reloads. Same architecture both ways, so each batch costs the same before and
after: what changes during a reload is only the reload itself (reading, building and warming up
the new version on the same cores, both versions resident).

Printed: per phase (steady, and the windows from each SIGHUP to the old version's retirement)
the calls finished, failed, their throughput and latency (p50, p99, max); per reload the
server's own load-and-warm-up time and the swap-to-retire time (its log); the server's RSS in
steady state (median) and at its peak during the reloads. Exit 1 if any call failed or an answer
carried a model_id other than the two files'.
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--build", default=os.path.join(ROOT, "build"))
    p.add_argument("--golden-dir", default=os.environ.get("ARCFACE_GOLDEN_DIR"))
    p.add_argument("--test-data", default=os.environ.get("ARCFACE_TEST_DATA",
                                                          os.path.join(ROOT, "tests", "data")))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steady", type=float, default=15.0, help="seconds before and after each reload")
    p.add_argument("--cycles", type=int, default=4, help="reloads, alternating the two files")
    p.add_argument("--threads", type=int, default=2, help="the server's --threads")
    p.add_argument("--workdir", default=None)
    return p.parse_args()


ARGS = parse_args()
os.environ.setdefault("ARCFACE_SERVER_BIN", os.path.join(ARGS.build, "server", "arcface-server"))
sys.path.insert(0, os.path.join(ARGS.build, "python"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import arcface_testlib as lib  # noqa: E402
import cpuinfo  # noqa: E402


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def percentile(values, q):
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main():
    golden_dir = ARGS.golden_dir or os.path.join(ARGS.build, "golden")
    goldens = lib.Goldens(golden_dir, ARGS.test_data)
    files = [goldens.model_path("r50"), goldens.model_path("insightface_r50")]
    ids = {"arcface-r50@" + lib.sha256_file(f)[:12] for f in files}
    workdir = ARGS.workdir or tempfile.mkdtemp(prefix="reload-bench-")
    path = os.path.join(workdir, "live.model")
    shutil.copyfile(files[0], path)
    server = lib.ServerProcess(
        ["--model", f"live={path}", "--device", "cpu", "--threads", str(ARGS.threads),
         "--max-batch-size", "8", "--max-queue-delay-us", "2000", "--drain-timeout", "20"],
        workdir, name="reload-bench")
    print(f"reload bench: {ARGS.clients} clients, {ARGS.cycles} reloads, {ARGS.steady:.0f} s "
          f"steady around each; CPU {cpuinfo.cpu_model()}, {os.cpu_count()} cores; "
          f"log {server.log_path}", flush=True)
    server.start()
    pid = server.proc.pid
    face = lib.raw_face(goldens.crop_u8(goldens.cases["crop_uniform_0"]))
    calls, lock, done = [], threading.Lock(), threading.Event()

    def client():
        while not done.is_set():
            start = time.monotonic()
            try:
                r = server.embed([face], model="live", timeout=300)
                outcome = r.model_id
            except lib.grpc.RpcError as e:
                outcome = f"error {e.code()}: {e.details()}"
            with lock:
                calls.append((start, time.monotonic(), outcome))

    rss = []
    def sampler():
        while not done.is_set():
            rss.append((time.monotonic(), rss_mib(pid)))
            time.sleep(0.1)

    threads = [threading.Thread(target=client) for _ in range(ARGS.clients)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    windows = []  # (SIGHUP, retired)
    retired_re = re.compile(r"model live: \S+ retired after")
    t0 = time.monotonic()
    time.sleep(ARGS.steady)
    for k in range(ARGS.cycles):
        shutil.copyfile(files[(k + 1) % 2], path + ".new")
        os.replace(path + ".new", path)
        hup = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        lib.wait_until(lambda: len(retired_re.findall(server.log_text())) == k + 1, 600,
                       interval=0.02, what=f"reload {k + 1} retired")
        windows.append((hup, time.monotonic()))
        time.sleep(ARGS.steady)
    done.set()
    for t in threads:
        t.join(timeout=600)
    log = server.log_text()
    server.stop()

    def during(c):
        return any(c[0] < end and c[1] > hup for hup, end in windows)

    failed = [c for c in calls if c[2] not in ids]
    phases = [("steady", [c for c in calls if not during(c)], None)]
    for i, (hup, end) in enumerate(windows):
        phases.append((f"reload {i + 1}", [c for c in calls if c[0] < end and c[1] > hup],
                       end - hup))
    steady_seconds = time.monotonic() - t0 - sum(e - h for h, e in windows)
    print(f"\n| phase | window s | calls | failed | calls/s | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name, cs, seconds in phases:
        lat = [1000 * (c[1] - c[0]) for c in cs]
        span = seconds if seconds is not None else steady_seconds
        print(f"| {name} | {span:.1f} | {len(cs)} | {sum(c[2] not in ids for c in cs)} | "
              f"{len(cs) / span:.1f} | {percentile(lat, 0.5):.0f} | {percentile(lat, 0.99):.0f} | "
              f"{max(lat) if lat else float('nan'):.0f} |")
    loads = [float(x) for x in re.findall(r"loaded and warmed up in ([0-9.]+) s", log)]
    retires = [float(x) for x in re.findall(r"retired after ([0-9.]+) s", log)]
    steady_rss = [m for t, m in rss if not any(h <= t <= e for h, e in windows)]
    during_rss = [m for t, m in rss if any(h <= t <= e for h, e in windows)]
    print(f"\nreloads: load and warm-up {', '.join(f'{x:.2f}' for x in loads)} s; swap to retire "
          f"{', '.join(f'{x:.3f}' for x in retires)} s")
    print(f"RSS: steady median {statistics.median(steady_rss):.0f} MiB, peak during reloads "
          f"{max(during_rss or [0]):.0f} MiB")
    print(f"model_ids answered: {sorted({c[2] for c in calls if c[2] in ids})}")
    if failed:
        print(f"FAILED: {len(failed)} calls, e.g. {failed[0][2]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
