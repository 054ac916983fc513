#!/usr/bin/python3
"""End-to-end throughput and latency of arcface-server, with the engine's offline throughput
measured in the same run for the ratio.

Usage: tests/bench/server_bench.py [--build build] [--weights FILE | (default) golden r50]
         [--concurrency 1,8,32,64] [--faces-per-request 1,8] [--seconds 20] [--threads 2]
         [--max-batch-size 32] [--max-queue-delay-us 2000] [--offline-batch 32]

Starts the server on loopback ports, runs closed-loop callers (each sends a request of N
distinct raw 112x112 crops, waits for the answer, repeats) for each setting, then stops the
server and measures the engine alone (tests/bench/engine_bench) at --offline-batch on the same
weights and threads. Prints a Markdown table.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--weights")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--faces-per-request", default="1,8")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--max-queue-delay-us", type=int, default=2000)
    ap.add_argument("--offline-batch", type=int, default=32)
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
    server_bin = os.path.join(args.build, "server", "arcface-server")
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
    grpc_port = int(open(port_file).read().split()[0])
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    stub = pb_grpc.FaceEmbeddingStub(channel)

    rng = np.random.default_rng(7)
    pool = [rng.integers(0, 256, size=(112, 112, 3), dtype=np.uint8).tobytes() for _ in range(64)]

    def request(n, k):
        faces = [pb.Face(image=pb.Image(raw=pb.RawImage(width=112, height=112, format=pb.RGB8,
                                                        data=pool[(k + i) % len(pool)])))
                 for i in range(n)]
        return pb.EmbedRequest(faces=faces)

    rows = []
    try:
        for n in [int(v) for v in args.faces_per_request.split(",")]:
            for c in [int(v) for v in args.concurrency.split(",")]:
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

                start = time.perf_counter()
                threads = [threading.Thread(target=caller, args=(i,)) for i in range(c)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                elapsed = time.perf_counter() - start
                lat = np.array(latencies) * 1000
                faces_per_s = len(latencies) * n / elapsed
                p50, p90, p99 = (np.percentile(lat, q) for q in (50, 90, 99))
                rows.append((c, n, faces_per_s, p50, p90, p99, errors))
                print(f"concurrency {c} x {n} faces: {faces_per_s:.2f} faces/s, p50 {p50:.0f} ms, "
                      f"errors {errors or 0}", file=sys.stderr)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    bench = os.path.join(args.build, "tests", "bench", "engine_bench")
    out = subprocess.run([bench, "--weights", weights, "--batch", str(args.offline_batch), "--threads",
                          str(args.threads), "--seconds", str(args.seconds), "--device", args.device,
                          "--precision", args.precision],
                         check=True, capture_output=True, text=True).stdout
    offline = float(out.split('"faces_per_s": ')[1].split(",")[0])

    print(f"arcface-server end to end, {args.threads} threads, {args.device} {args.precision}, "
          f"max batch {args.max_batch_size}, max delay {args.max_queue_delay_us} us, "
          f"{args.seconds:g} s per row; engine offline at batch {args.offline_batch}: {offline:.2f} faces/s")
    print("| callers | faces/request | faces/s | p50 ms | p90 ms | p99 ms | errors | / offline |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|")
    for c, n, fps, p50, p90, p99, errors in rows:
        err = ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"
        print(f"| {c} | {n} | {fps:.2f} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {err} | {fps / offline:.2f} |")


if __name__ == "__main__":
    main()
