#!/usr/bin/python3
"""End-to-end throughput and latency of arcface-server beside the engine's offline throughput,
interleaved in one run, with the server's per-stage times from /metrics.

Usage: tests/bench/server_bench.py [--build build] [--weights FILE | (default) golden r50] [--server-bin B]
         [--concurrency 1,8,32,64] [--faces-per-request 1,8] [--seconds 20] [--threads 2]
         [--max-batch-size 32] [--max-queue-delay-us 2000] [--offline-batch 32] [--rounds 1]

Starts the server on loopback ports once. Each round first measures the engine alone
(tests/bench/engine_bench, same weights and threads, each --offline-batch size; the server sits
idle meanwhile) and then the server: closed-loop callers (each sends a request of N distinct raw
112x112 crops, waits for the answer, repeats) for every setting. Each row's ratio is to the best
offline figure of its own round, so that drift on a shared machine hits both sides. Prints one
Markdown table row per setting and round, and with several rounds the median and range of each
setting's ratio.
"""
import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

from cpuinfo import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scrape(http_port):
    """{(name, labels): value} of the server's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def busy_seconds():
    """CPU seconds all processes spent since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_seconds(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def delta(after, before, name):
    return after.get((name, ""), 0.0) - before.get((name, ""), 0.0)


def mean_of(after, before, histogram):
    count = delta(after, before, histogram + "_count")
    return delta(after, before, histogram + "_sum") / count if count else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--weights")
    ap.add_argument("--server-bin", help="another arcface-server binary (A/B comparisons)")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--faces-per-request", default="1,8")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--offline-batch", default="32", help="batch sizes measured offline; best counts")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-other-cpu", type=float, default=None,
                    help="redo a round (up to --retries times) when other processes took more "
                         "than this many cores during any of its measurements")
    ap.add_argument("--retries", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(args.build, "python"))
    import grpc
    from arcface.v1 import face_embedding_pb2 as pb
    from arcface.v1 import face_embedding_pb2_grpc as pb_grpc

    weights = args.weights or os.path.join(args.build, "golden", "r50.safetensors")
    if not os.path.exists(weights):
        sys.exit(f"{weights} is missing: run tests/run.sh first, or pass --weights")
    server_bin = args.server_bin or os.path.join(args.build, "server", "arcface-server")
    bench = os.path.join(args.build, "tests", "bench", "engine_bench")
    tmp = tempfile.mkdtemp(prefix="arcface-bench-")
    port_file = os.path.join(tmp, "ports")
    log = open(os.path.join(tmp, "server.log"), "w")
    server = subprocess.Popen(
        [server_bin, "--weights", weights, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0",
         "--port-file", port_file, "--device", args.device, "--precision", args.precision,
         "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
         "--max-queue-delay-us", str(args.max_queue_delay_us), "--log-level", "warn"],
        stdout=log, stderr=log)
    deadline = time.time() + 120
    while not (os.path.exists(port_file) and os.path.getsize(port_file) > 0):
        if server.poll() is not None or time.time() > deadline:
            sys.exit(f"server did not start; see {log.name}")
        time.sleep(0.1)
    grpc_port, http_port = (int(v) for v in open(port_file).read().split())
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.FaceEmbeddingStub(channel)

    rng = np.random.default_rng(7)
    pool = [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8).tobytes() for _ in range(64)]

    def request(n, k):
        faces = [pb.Face(image=pb.Image(raw=pb.RawImage(width=112, height=112, format=pb.RGB8,
                                                        data=pool[(k + i) % len(pool)])))
                 for i in range(n)]
        return pb.EmbedRequest(faces=faces)

    def offline():
        busy0, own0 = busy_seconds(), own_seconds(resource.RUSAGE_CHILDREN) + process_seconds(server.pid)
        start = time.perf_counter()
        out = subprocess.run([bench, "--weights", weights, "--batch", args.offline_batch, "--threads",
                              str(args.threads), "--seconds", str(args.seconds), "--device", args.device,
                              "--precision", args.precision],
                             check=True, capture_output=True, text=True).stdout
        foreign = (busy_seconds() - busy0 - own_seconds(resource.RUSAGE_CHILDREN)
                   - process_seconds(server.pid) + own0) / (time.perf_counter() - start)
        return max(float(v) for v in re.findall(r'"faces_per_s": ([0-9.]+)', out)), foreign

    def load(c, n):
        stub.Embed(request(n, 0), timeout=120)  # warm this request shape
        latencies, errors = [], {}
        lock = threading.Lock()
        stop_at = time.perf_counter() + args.seconds

        def caller(index):
            k = index
            while time.perf_counter() < stop_at:
                req = request(n, k)
                k += 1
                t0 = time.perf_counter()
                try:
                    stub.Embed(req, timeout=120)
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                except grpc.RpcError as e:
                    with lock:
                        errors[e.code().name] = errors.get(e.code().name, 0) + 1

        before = scrape(http_port)
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        busy0, server0 = busy_seconds(), process_seconds(server.pid)
        start = time.perf_counter()
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        client = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        foreign = (busy_seconds() - busy0 - (process_seconds(server.pid) - server0) - client) / elapsed
        after = scrape(http_port)
        lat = np.array(latencies) * 1000
        faces = delta(after, before, "arcface_faces_total")
        return {
            "faces_per_s": len(latencies) * n / elapsed,
            "p50": np.percentile(lat, 50), "p90": np.percentile(lat, 90), "p99": np.percentile(lat, 99),
            "errors": errors,
            "batch": mean_of(after, before, "arcface_batch_size"),
            "infer_per_face_ms": 1000 * delta(after, before, "arcface_inference_seconds_sum") / max(faces, 1),
            "idle_ms": 1000 * mean_of(after, before, "arcface_model_idle_seconds"),
            "stage_ms": 1000 * mean_of(after, before, "arcface_batch_stage_seconds"),
            "post_ms": 1000 * mean_of(after, before, "arcface_postprocess_seconds"),
            "pre_ms": 1000 * mean_of(after, before, "arcface_preprocess_seconds"),
            "staged_ahead": delta(after, before, "arcface_staged_ahead_crops_total") / max(faces, 1),
            "client_cpu_ms": 1000 * client / max(len(latencies), 1),
            "foreign": foreign,
        }

    settings = [(c, n) for n in (int(v) for v in args.faces_per_request.split(","))
                for c in (int(v) for v in args.concurrency.split(","))]
    rows = []
    try:
        for r in range(args.rounds):
            for attempt in range(args.retries + 1):
                best, offline_foreign = offline()
                print(f"round {r + 1}: engine offline {best:.2f} faces/s (other processes: "
                      f"{offline_foreign:.2f} cores)", file=sys.stderr)
                round_rows = []
                for c, n in settings:
                    row = load(c, n)
                    row.update(round=r + 1, callers=c, n=n, offline=best,
                               offline_foreign=offline_foreign)
                    round_rows.append(row)
                    print(f"round {r + 1}: {c} callers x {n} faces: {row['faces_per_s']:.2f} faces/s "
                          f"({row['faces_per_s'] / best:.2f} of offline), mean batch {row['batch']:.1f}, "
                          f"other processes {row['foreign']:.2f} cores", file=sys.stderr)
                dirty = max([offline_foreign] + [x["foreign"] for x in round_rows])
                if args.max_other_cpu is None or dirty <= args.max_other_cpu:
                    break
                print(f"round {r + 1}: other processes took {dirty:.2f} cores: measuring it again",
                      file=sys.stderr)
                time.sleep(10)
            rows.extend(round_rows)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    print(f"arcface-server end to end, {args.threads} threads, {args.device} {args.precision}, max batch "
          f"{args.max_batch_size}, max delay {args.max_queue_delay_us} us, {args.seconds:g} s per row; "
          f"offline: engine_bench at batch {args.offline_batch} (best) before each round's rows; "
          f"'other CPU': CPU time of processes other than the server, the callers and engine_bench "
          f"during the offline / server measurement, in cores (the machine is shared); "
          f"CPU: {cpu_model()}")
    print("| round | callers | faces/req | faces/s | offline | / offline | p50 ms | p99 ms | errors "
          "| mean batch | model ms/face | model idle ms | staged ahead | stage ms | post ms | pre ms "
          "| client CPU ms/req | other CPU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for x in rows:
        err = ", ".join(f"{k} {v}" for k, v in sorted(x["errors"].items())) or "0"
        print(f"| {x['round']} | {x['callers']} | {x['n']} | {x['faces_per_s']:.2f} | {x['offline']:.2f} "
              f"| {x['faces_per_s'] / x['offline']:.3f} | {x['p50']:.0f} | {x['p99']:.0f} | {err} "
              f"| {x['batch']:.1f} | {x['infer_per_face_ms']:.1f} | {x['idle_ms']:.2f} "
              f"| {100 * x['staged_ahead']:.0f} % | {x['stage_ms']:.2f} | {x['post_ms']:.2f} "
              f"| {x['pre_ms']:.2f} | {x['client_cpu_ms']:.2f} "
              f"| {x['offline_foreign']:.2f} / {x['foreign']:.2f} |")
    if args.rounds > 1:
        print()
        print("| callers | faces/req | / offline, median | min | max |")
        print("|---:|---:|---:|---:|---:|")
        for c, n in settings:
            ratios = [x["faces_per_s"] / x["offline"] for x in rows if x["callers"] == c and x["n"] == n]
            print(f"| {c} | {n} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | {max(ratios):.3f} |")


if __name__ == "__main__":
    main()
