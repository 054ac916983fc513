"""arcface-client and the C++ client library against real arcface-server processes on
loopback: outputs equal the reference goldens, detect shows the server's Detect (as JSON, text
and a picture, with identities from the gallery), pictures, the progress bar's terminal rule,
round robin, retries across a restart and a drain, no retry of INVALID_ARGUMENT, TLS and mutual
TLS, bench against the server's own counters, exit codes, the gallery commands, verdicts from
random weights saying so, eval on dlib's johns (ARCFACE_DLIB_DATA), reload (--admin-rpc)."""

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest

import arcface_testlib as lib
from conftest import CLIENT_BIN, JOHNS_PEOPLE, LIBRARY_TEST, MAX_FACES, cli_env, run_cli

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def data(name):
    return os.path.join(lib.TEST_DATA, name)


def whole_cases(goldens):
    """base name -> the r50 golden case of that whole photo."""
    return {os.path.basename(c["input"]["path"]): c for c in goldens.cases_of("r50")
            if c["input"]["kind"] == "image" and "box" not in c["input"]
            and "landmarks" not in c["input"]}


def assert_golden(row, case, what, min_cos=0.9999, normalized=False):
    ref = lib.Goldens.embedding(case)
    c = lib.cosine(row, ref)
    assert c >= min_cos, f"{what} vs {case['name']}: cosine {c:.7f}"
    norm = float(np.linalg.norm(np.asarray(row, np.float64)))
    if normalized:
        assert abs(norm - 1.0) < 1e-5, f"{what}: norm {norm}"
    else:
        assert abs(norm - case["norm"]) <= 0.01 * case["norm"], f"{what}: norm {norm}"


def write_crop_png(goldens, name, path):
    cv2.imwrite(str(path), cv2.cvtColor(goldens.crop_u8(goldens.cases[name]), cv2.COLOR_RGB2BGR))
    return str(path)


def embed_counts(metrics):
    """(all Embed requests, OK ones) in one /metrics scrape."""
    return (metrics.sum("arcface_requests_total", rpc="Embed"),
            metrics.get("arcface_requests_total", 0.0, rpc="Embed", code="OK"))


# --------------------------------------------------------------------------------------------
# The library


def test_cpp_library_against_the_golden_server(r50_address, admin):
    env = cli_env(ARCFACE_TEST_SERVER=r50_address, ARCFACE_GOLDEN_DIR=lib.GOLDEN_DIR,
                  ARCFACE_TEST_DATA=lib.TEST_DATA,
                  ARCFACE_FREE_ADDRESS=f"127.0.0.1:{lib.free_port()}",
                  ARCFACE_ADMIN_SERVER=f"127.0.0.1:{admin.grpc_port}",
                  ARCFACE_ADMIN_MODEL_FILE=admin.model_file)
    r = subprocess.run([LIBRARY_TEST], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "[  PASSED  ] 13 tests" in r.stdout, r.stdout[-3000:]


# --------------------------------------------------------------------------------------------
# embed


def test_embed_directory_to_npy_equals_the_reference(r50_address, goldens, tmp_path):
    out = tmp_path / "emb.npy"
    r = run_cli("--server", r50_address, "embed", lib.TEST_DATA, "--out", out)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    arr = np.load(out)
    assert arr.dtype == np.float32
    names = (tmp_path / "emb.files.txt").read_text().splitlines()
    expected = sorted(os.path.join(lib.TEST_DATA, f) for f in os.listdir(lib.TEST_DATA)
                      if f.lower().endswith(IMAGE_EXTENSIONS))
    assert names == expected
    assert arr.shape == (len(expected), 512)
    cases = whole_cases(goldens)
    checked = 0
    for row, name in zip(arr, names):
        case = cases.get(os.path.basename(name))
        if case:
            assert_golden(row, case, name)
            checked += 1
    assert checked >= 7


def test_embed_json_and_csv_keep_input_order(r50_address, goldens, tmp_path):
    cases = whole_cases(goldens)
    files = [data("single_face.jpg"), data("45-m7-di-ph.jpg"), data("BWPictureHuman.jpg")]
    out = tmp_path / "emb.json"
    r = run_cli("--server", r50_address, "embed", *files, "--out", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [e["file"] for e in doc["embeddings"]] == files
    assert doc["normalized"] is False and doc["dim"] == 512 and doc["errors"] == []
    assert doc["model_id"] == "arcface-r50@" + goldens.models["r50"]["sha256"][:12]
    for e in doc["embeddings"]:
        assert_golden(e["embedding"], cases[os.path.basename(e["file"])], e["file"])
        assert abs(e["norm"] - np.linalg.norm(e["embedding"])) <= 1e-4 * e["norm"]

    out = tmp_path / "emb.csv"
    r = run_cli("--server", r50_address, "embed", *files[:2], "--out", out, "--normalize")
    assert r.returncode == 0, r.stderr
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["file", "norm", "e0"] and len(lines[0].split(",")) == 514
    assert len(lines) == 3
    for line, f in zip(lines[1:], files):
        fields = line.split(",")
        assert fields[0] == f
        values = np.array(fields[2:], np.float64)
        case = cases[os.path.basename(f)]
        assert_golden(values, case, f, normalized=True)
        assert abs(float(fields[1]) - case["norm"]) <= 0.01 * case["norm"]  # the raw norm


def test_embed_with_box_and_landmarks(r50_address, goldens, tmp_path):
    box = goldens.cases["box_multi_p2"]
    r = run_cli("--server", r50_address, "embed", data("multi_face.jpg"), "--out",
                tmp_path / "box.json", "--box", ",".join(map(str, box["input"]["box"])))
    assert r.returncode == 0, r.stderr
    row = json.loads((tmp_path / "box.json").read_text())["embeddings"][0]["embedding"]
    assert_golden(row, box, "--box")

    aligned = goldens.cases["align_single_face"]
    landmarks = tmp_path / "lm.json"
    landmarks.write_text(json.dumps({"single_face.jpg": aligned["input"]["landmarks"]}))
    r = run_cli("--server", r50_address, "embed", data("single_face.jpg"),
                data("0-f1-su-ph.jpg"), "--landmarks", landmarks, "--out", tmp_path / "lm.npy")
    assert r.returncode == 0, r.stderr
    arr = np.load(tmp_path / "lm.npy")
    assert_golden(arr[0], aligned, "--landmarks")                        # by base name
    assert_golden(arr[1], whole_cases(goldens)["0-f1-su-ph.jpg"], "not in the landmarks file")


def test_embed_reports_bad_files_and_goes_on(r50_address, goldens, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "broken.jpg").write_bytes(b"this is not an image")
    os.symlink(data("single_face.jpg"), folder / "good.jpg")
    missing = tmp_path / "missing.png"
    out = tmp_path / "out.json"
    r = run_cli("--server", r50_address, "embed", folder, missing, "--out", out)
    assert r.returncode == 1, r.stderr
    assert re.search(r"broken\.jpg: INVALID_ARGUMENT: .*broken\.jpg", r.stderr), r.stderr
    assert f"{missing}: NOT_FOUND" in r.stderr
    assert "embedded 1 of 3 files (2 failed)" in r.stderr
    doc = json.loads(out.read_text())
    assert [e["file"] for e in doc["embeddings"]] == [str(folder / "good.jpg")]
    assert_golden(doc["embeddings"][0]["embedding"], whole_cases(goldens)["single_face.jpg"], "good")
    assert sorted(e["code"] for e in doc["errors"]) == ["INVALID_ARGUMENT", "NOT_FOUND"]


def _run_in_pty(args, stdout_is_tty):
    """Runs arcface-client with stderr on a pseudo-terminal (and stdout too, or a pipe);
    returns (rc, terminal bytes, piped stdout bytes)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([CLIENT_BIN, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=slave if stdout_is_tty else subprocess.PIPE, stderr=slave,
                            env=cli_env())
    os.close(slave)
    piped = []
    if not stdout_is_tty:
        reader = threading.Thread(target=lambda: piped.append(proc.stdout.read()))
        reader.start()
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    rc = proc.wait(timeout=30)
    if not stdout_is_tty:
        reader.join(timeout=30)
    return rc, seen, piped[0] if piped else b""


def test_progress_bar_only_on_a_terminal(r50_address, goldens, tmp_path):
    files = [write_crop_png(goldens, n, tmp_path / f"{n}.png")
             for n in ("crop_uniform_0", "crop_smooth_2", "crop_face_like_5")]
    args = ["--server", r50_address, "embed", *files]
    # stdout is a pipe (stderr a terminal): no bar, no control characters anywhere.
    rc, terminal, out = _run_in_pty(args, stdout_is_tty=False)
    assert rc == 0, terminal
    assert b"ETA" not in terminal and b"\r" not in terminal.replace(b"\r\n", b"\n"), terminal
    assert b"\x1b[" not in terminal and b"\x1b[" not in out
    assert out.count(b"norm=") == 3
    # Both on a terminal: the bar with count, rate and ETA.
    rc, terminal, _ = _run_in_pty(args, stdout_is_tty=True)
    assert rc == 0, terminal
    assert re.search(rb"\[#+\] 3/3 files +[0-9.]+/s +ETA 0:00", terminal), terminal
    # Neither: plain pipes.
    r = run_cli(*args)
    assert r.returncode == 0 and "ETA" not in r.stderr and "\r" not in r.stderr
    # bench: a progress line while it runs, on a terminal.
    rc, terminal, _ = _run_in_pty(["--server", r50_address, "bench", "--concurrency", "1",
                                   "--duration", "1"], stdout_is_tty=True)
    assert rc == 0, terminal
    assert re.search(rb"\r\x1b\[Kconcurrency 1: [0-9.]+/1 s, \d+ requests", terminal), terminal


# --------------------------------------------------------------------------------------------
# compare, detect


def test_compare_pair_threshold_verdict(r50_address, goldens):
    cases = whole_cases(goldens)
    a, b = data("0-f1-su-ph.jpg"), data("single_face.jpg")
    want = lib.cosine(lib.Goldens.embedding(cases["0-f1-su-ph.jpg"]),
                      lib.Goldens.embedding(cases["single_face.jpg"]))
    for threshold, verdict in ((want - 0.05, "same"), (want + 0.05, "different")):
        r = run_cli("--server", r50_address, "compare", a, b, "--threshold", f"{threshold:.4f}")
        assert r.returncode == 0, r.stderr
        m = re.search(r"cosine=(-?[0-9.]+)\t(\w+) \(threshold", r.stdout)
        assert m, r.stdout
        assert abs(float(m.group(1)) - want) < 2e-3
        assert m.group(2) == verdict
    # Without --threshold: the served model's (ArcFace: 0.4, InsightFace's).
    r = run_cli("--server", r50_address, "compare", a, b)
    assert r.returncode == 0 and "(threshold 0.40)" in r.stdout, (r.stdout, r.stderr)
    help_text = run_cli("compare", "--help").stdout
    assert "the served model's" in help_text and "InsightFace" in help_text


def test_compare_matrix_table_and_plot(r50_address, goldens, tmp_path):
    cases = whole_cases(goldens)
    names = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg",
             "single_face.jpg"]
    plot = tmp_path / "sim.png"
    r = run_cli("--server", r50_address, "compare", "--matrix", *map(data, names), "--plot", plot)
    assert r.returncode == 0, r.stderr
    refs = np.stack([lib.Goldens.embedding(cases[n]) for n in names])
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    want = refs @ refs.T
    rows = [line.split()[1:] for line in r.stdout.splitlines() if re.match(r"^ +\[\d+\] +-?\d", line)]
    table = np.array(rows, np.float64)
    assert table.shape == (5, 5), r.stdout
    np.testing.assert_allclose(table, want, atol=2e-3)

    img = cv2.imread(str(plot), cv2.IMREAD_COLOR)
    cell, n = 96, 5  # plot.h: width = cell + n*cell + 110, height = 52 + cell + n*cell + 10
    assert img.shape == (52 + cell + n * cell + 10, cell + n * cell + 110, 3)
    assert img.std() > 30
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1000  # photos, colours, text
    top = 52 + cell
    # The diagonal is cosine 1: the red end of the scale (BGR 38, 4, 180).
    for i in range(n):
        px = img[top + i * cell + 5, cell + i * cell + 5].astype(int)
        assert np.abs(px - [38, 4, 180]).max() <= 2, (i, px)
    # An off-diagonal cell: white (242) blended towards red by its cosine.
    v = float(want[0, 3])
    expect = np.array([242, 242, 242]) + (np.array([38, 4, 180]) - 242) * max(v, 0)
    px = img[top + 0 * cell + 5, cell + 3 * cell + 5].astype(int)
    assert np.abs(px - expect).max() <= 3, (px, expect)


def detect_json(address, *args):
    r = run_cli("--server", address, "detect", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_detect_prints_the_servers_faces_as_json_and_text(r50_address):
    """The CLI shows what Detect answers (the Python client's detect() of the same file):
    boxes, scores, the five landmarks, with --embed the embeddings and their cosines."""
    from arcface_client import ArcFaceClient

    image = data("multi_face.jpg")
    with ArcFaceClient(r50_address, timeout=120) as c:
        want = c.detect(image, embed=True)
    assert len(want.faces) >= 4, want.faces
    doc = detect_json(r50_address, image, "--embed")
    assert (doc["width"], doc["height"], doc["detector_id"]) == (1000, 667, want.detector_id)
    assert doc["model_id"] == want.model_id and doc["image"] == image
    assert len(doc["faces"]) == len(want.faces)
    for got, face in zip(doc["faces"], want.faces):
        np.testing.assert_allclose(got["box"], face.box, atol=1e-3)
        np.testing.assert_allclose(got["landmarks"], face.landmarks, atol=1e-3)
        assert abs(got["score"] - face.score) < 1e-6 and got["candidates"] == []
        assert lib.cosine(got["embedding"]["values"], face.embedding) >= 0.9999
        assert abs(got["embedding"]["norm"] - face.norm) <= 1e-3 * face.norm
    assert "embedding" not in detect_json(r50_address, image)["faces"][0]

    r = run_cli("--server", r50_address, "detect", image, "--embed", "--max-faces", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{image}: 1000x667, 3 faces ({want.detector_id})\n"), r.stdout
    number = r"(-?[0-9.]+)"
    lines = re.findall(rf"^face (\d): box {number},{number},{number},{number} \((\d+)x(\d+)\)  "
                       rf"score {number}  landmarks ((?:{number},{number} ?){{5}})$", r.stdout, re.M)
    assert [int(m[0]) for m in lines] == [1, 2, 3], r.stdout
    for m, face in zip(lines, want.faces):
        np.testing.assert_allclose([float(v) for v in m[1:5]], face.box, atol=0.051)
        assert abs(float(m[7]) - face.score) < 1e-4
        points = [[float(v) for v in p.split(",")] for p in m[8].split()]
        np.testing.assert_allclose(points, face.landmarks, atol=0.051)
    norms = [float(v) for v in re.findall(r"^  embedding norm=([0-9.]+)\t\[", r.stdout, re.M)]
    np.testing.assert_allclose(norms, [f.norm for f in want.faces[:3]], rtol=1e-3)
    rows = [line.split()[1:] for line in r.stdout.splitlines() if re.match(r"^ +\d+  ", line)]
    unit = want.embeddings()[:3] / np.linalg.norm(want.embeddings()[:3], axis=1, keepdims=True)
    np.testing.assert_allclose(np.array(rows, np.float64), unit @ unit.T, atol=2e-3)


def test_detect_identifies_in_a_gallery_and_plots(r50_address, tmp_path):
    from arcface_client import ArcFaceClient

    image = data("multi_face.jpg")
    with ArcFaceClient(r50_address, timeout=120) as c:
        found = c.detect(image, embed=True)
        for i, e in enumerate(found.embeddings()):
            c.enroll(f"person-{i}", [e], gallery="cli-detect")
    n = len(found.faces)
    doc = detect_json(r50_address, image, "--gallery", "cli-detect", "--top-k", "2",
                      "--threshold=-1")
    assert doc["gallery"] == "cli-detect" and len(doc["faces"]) == n and doc["threshold"] == -1
    for i, face in enumerate(doc["faces"]):
        assert [c["subject_id"] for c in face["candidates"]][:1] == [f"person-{i}"], face
        assert len(face["candidates"]) == 2 and face["candidates"][0]["similarity"] >= 0.999
    # Without --threshold: the model's own.
    by_default = detect_json(r50_address, image, "--gallery", "cli-detect", "--top-k", "2")
    assert by_default["threshold"] == pytest.approx(0.4)
    for face, every in zip(by_default["faces"], doc["faces"]):
        assert [c["subject_id"] for c in face["candidates"]] == [
            c["subject_id"] for c in every["candidates"] if c["similarity"] >= 0.4]

    plot = tmp_path / "faces.png"
    r = run_cli("--server", r50_address, "detect", image, "--gallery", "cli-detect",
                "--threshold", "0.9", "--plot", plot)
    assert r.returncode == 0, r.stderr
    assert "\nidentities in gallery 'cli-detect' (threshold 0.90)\n" in r.stdout, r.stdout
    identities = re.findall(r"^  identity (\S+)  similarity ([0-9.]+)  face (\S+)$", r.stdout, re.M)
    assert [m[0] for m in identities] == [f"person-{i}" for i in range(n)], r.stdout
    assert all(float(m[1]) >= 0.999 for m in identities), r.stdout

    original = cv2.imread(image, cv2.IMREAD_COLOR)
    drawn = cv2.imread(str(plot), cv2.IMREAD_COLOR)
    assert drawn.shape == original.shape
    palette = [[0, 200, 0], [0, 140, 255], [255, 80, 0], [200, 0, 200], [0, 220, 220],
               [255, 200, 0]]  # plot.h kDetectionPalette (BGR)
    dots = [[255, 0, 0], [0, 0, 255], [0, 255, 0], [255, 0, 255], [0, 255, 255]]  # kLandmarkColors
    edges = dot_hits = 0
    for i, face in enumerate(found.faces):
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        edges += drawn[(y0 + y1) // 2, x0].tolist() == palette[i % len(palette)]
        for k, (x, y) in enumerate(face.landmarks):
            dot_hits += drawn[int(round(y)), int(round(x))].tolist() == dots[k]
    # Another face's label may cover a little of a box or a dot: nearly all are seen.
    assert edges >= n - 1 and dot_hits >= 5 * n - 2, (edges, dot_hits, n)
    changed = np.any(drawn != original, axis=2).mean()
    assert 0.002 < changed < 0.2, changed

    r = run_cli("--server", r50_address, "detect", image, "--gallery", "no-such-gallery")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr


def test_detect_without_a_detector_says_how_to_enable_it(start_server, tmp_path):
    server = start_server(lib.demo_args("--detector", "none"), name="nodetector")
    address = f"127.0.0.1:{server.grpc_port}"
    r = run_cli("--server", address, "detect", data("single_face.jpg"))
    assert r.returncode == 1 and "UNIMPLEMENTED" in r.stderr and "--detector" in r.stderr, r.stderr
    r = run_cli("--server", address, "info")
    assert r.returncode == 0 and re.search(r"^detector +none", r.stdout, re.M), r.stdout


# --------------------------------------------------------------------------------------------
# Several servers: round robin, bench


def test_round_robin_spreads_bench_calls_and_bench_matches_server_counters(demo_trio, tmp_path):
    servers = ",".join(f"127.0.0.1:{s.grpc_port}" for s in demo_trio)
    before = [s.metrics() for s in demo_trio]
    report = tmp_path / "bench.json"
    r = run_cli("--server", servers, "bench", "--concurrency", "1,3", "--faces-per-request", "2",
                "--duration", "2", "--json", report)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("concurrency")]
    assert len(lines) == 2, r.stdout
    assert "\r" not in r.stderr  # not a terminal: no progress line
    doc = json.loads(report.read_text())
    results = doc["results"]
    assert [x["concurrency"] for x in results] == [1, 3]
    after = [s.metrics() for s in demo_trio]
    deltas = [(embed_counts(a)[0] - embed_counts(b)[0], embed_counts(a)[1] - embed_counts(b)[1])
              for a, b in zip(after, before)]
    requests = sum(x["requests"] for x in results)
    ok = sum(x["ok"] for x in results)
    assert requests > 0 and ok == requests
    # Exactly the server's counts: every request counted once, none retried.
    assert sum(d[0] for d in deltas) == requests, (deltas, results)
    assert sum(d[1] for d in deltas) == ok
    faces = sum(a.get("arcface_faces_total") - b.get("arcface_faces_total")
                for a, b in zip(after, before))
    assert faces == sum(x["faces"] for x in results) == 2 * ok
    # round_robin: every server took a fair part.
    assert min(d[0] for d in deltas) >= requests / 6, deltas
    for x in results:
        lat = x["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert x["errors"] == {}
        assert abs(x["faces_per_s"] - x["faces"] / x["elapsed_s"]) < 1e-6
        assert x["elapsed_s"] >= 2


class FixedPortServer(lib.ServerProcess):
    """A server whose gRPC port is chosen by the test (to restart on the same one)."""

    def __init__(self, args, workdir, name="server", port=0, **kw):
        super().__init__(args, workdir, name=name, **kw)
        self.port = port

    def command(self):
        cmd = super().command()
        cmd[cmd.index("--listen") + 1] = f"127.0.0.1:{self.port}"
        return cmd


def _wait_for_line(stream, pattern, timeout):
    """Reads lines from a text stream until one matches; returns all lines read."""
    lines = []
    found = threading.Event()

    def read():
        for line in stream:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    assert found.wait(timeout), f"no line matching {pattern!r} within {timeout} s: {lines}"
    return lines


def test_retries_recover_from_a_restarted_server(start_server, goldens, tmp_path):
    crop = write_crop_png(goldens, "crop_face_like_5", tmp_path / "crop.png")
    args = lib.demo_args("--warmup-batch-size", "1")
    first = start_server(args, name="first", server_class=FixedPortServer)
    port = first.grpc_port
    r = run_cli("--server", f"127.0.0.1:{port}", "embed", crop, "--out", tmp_path / "a.npy")
    assert r.returncode == 0, r.stderr
    first.kill()  # gone without a drain, as in a crash
    start_server.forget(first)

    proc = subprocess.Popen([CLIENT_BIN, "--server", f"127.0.0.1:{port}", "--retries", "30",
                             "embed", crop, "--out", str(tmp_path / "b.npy")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        seen = _wait_for_line(proc.stderr, r"UNAVAILABLE: .*retrying in", 30)
        start_server(args, name="second", server_class=FixedPortServer, port=port)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert lib.cosine(a[0], b[0]) >= 0.99999


def test_stream_moves_on_when_its_server_drains(start_server, goldens, tmp_path):
    crop = write_crop_png(goldens, "crop_gradient_3", tmp_path / "crop.png")
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(64):
        os.symlink(crop, folder / f"f{i:03d}.png")
    args = lib.demo_args("--warmup-batch-size", "1", "--drain-timeout", "10")
    a = start_server(args, name="a")
    b = start_server(args, name="b")
    out = tmp_path / "out.npy"
    proc = subprocess.Popen([CLIENT_BIN, "--server", f"127.0.0.1:{a.grpc_port},127.0.0.1:{b.grpc_port}",
                             "embed", str(folder), "--out", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        def streaming():
            for s in (a, b):
                if s.metrics().get("arcface_requests_total", 0.0, rpc="EmbedStream", code="OK") > 0:
                    return s
            return None

        busy = lib.wait_until(streaming, 60, interval=0.02, what="the stream's first answers")
        other = b if busy is a else a
        busy.stop()  # SIGTERM: drain; the open stream ends UNAVAILABLE after its read messages
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.search(r"UNAVAILABLE: .*draining.*retrying in", stderr), stderr
    assert other.metrics().get("arcface_requests_total", 0.0, rpc="EmbedStream", code="OK") > 0
    arr = np.load(out)
    assert arr.shape == (64, 512)
    assert (tmp_path / "out.files.txt").read_text().splitlines() == sorted(
        str(p) for p in folder.iterdir())
    assert np.abs(arr - arr[0]).max() < 1e-4 * np.linalg.norm(arr[0])  # all the same frame


def test_invalid_argument_is_never_retried(r50, r50_address, tmp_path):
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    before = r50.metrics()
    r = run_cli("--server", r50_address, "--retries", "5", "compare", data("single_face.jpg"), bad)
    after = r50.metrics()
    assert r.returncode == 1, r.stderr
    assert f"reference 0 ({bad})" in r.stderr and "INVALID_ARGUMENT" in r.stderr, r.stderr
    assert "retrying" not in r.stderr
    count = lambda m, **kw: m.sum("arcface_requests_total", rpc="Compare", **kw)
    assert count(after, code="INVALID_ARGUMENT") - count(before, code="INVALID_ARGUMENT") == 1
    assert count(after) - count(before) == 1


# --------------------------------------------------------------------------------------------
# TLS, exit codes


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return lib.make_pki(str(tmp_path_factory.mktemp("pki")))


def test_tls_and_mutual_tls(start_server, pki):
    tls = start_server(lib.demo_args("--warmup-batch-size", "1", "--tls-cert", pki["server_cert"],
                                     "--tls-key", pki["server_key"]),
                       name="tls", tls={"root": lib.read_bytes(pki["ca"])})
    p = tls.grpc_port
    r = run_cli("--server", f"localhost:{p}", "--tls-ca", pki["ca"], "info")
    assert r.returncode == 0 and "DEMO weights" in r.stdout, r.stderr
    # Several addresses (an ipv4: target): the certificate is checked against the first host.
    r = run_cli("--server", f"127.0.0.1:{p},localhost:{p}", "--tls-ca", pki["ca"], "health")
    assert r.returncode == 0 and r.stdout == "SERVING\n", r.stderr
    assert run_cli("--server", f"localhost:{p}", "--retries", "1", "info").returncode == 3
    assert run_cli("--server", f"localhost:{p}", "--retries", "1", "--tls-ca", pki["other"],
                   "info").returncode == 3

    mtls = start_server(lib.demo_args("--warmup-batch-size", "1", "--tls-cert", pki["server_cert"],
                                      "--tls-key", pki["server_key"], "--tls-client-ca", pki["ca"]),
                        name="mtls", tls={"root": lib.read_bytes(pki["ca"]),
                                          "cert": lib.read_bytes(pki["client_cert"]),
                                          "key": lib.read_bytes(pki["client_key"])})
    p = mtls.grpc_port
    r = run_cli("--server", f"localhost:{p}", "--tls-ca", pki["ca"], "--tls-cert",
                pki["client_cert"], "--tls-key", pki["client_key"], "compare",
                data("0-f1-su-ph.jpg"), data("0-f15-hao-ph.jpg"))
    assert r.returncode == 0 and "cosine=" in r.stdout, r.stderr
    r = run_cli("--server", f"localhost:{p}", "--retries", "1", "--tls-ca", pki["ca"], "info")
    assert r.returncode == 3, r.stderr
    r = run_cli("--server", f"localhost:{p}", "--tls-ca", pki["ca"], "--tls-cert",
                pki["client_cert"], "info")
    assert r.returncode == 2 and "--tls-key" in r.stderr, r.stderr


def test_exit_codes(r50_address, tmp_path):
    crop = tmp_path / "x.png"
    cv2.imwrite(str(crop), np.full((112, 112, 3), 90, np.uint8))
    usage = [
        [],
        ["embed"],
        ["embed", crop, "--box", "1,2,3"],
        ["embed", crop, "--out", tmp_path / "e.txt"],
        ["compare", crop],
        ["compare", crop, crop, "--plot", tmp_path / "p.png"],
        ["--retries", "0", "info"],
        ["--server", "no-port", "info"],
        ["bench", "--concurrency", "1,x"],
        ["detect", crop, "--top-k", "2"],
        ["detect", crop, "--threshold", "0.5"],
        ["detect", crop, "--min-score", "1.5"],
        ["detect"],
        ["--bogus-flag", "info"],
    ]
    for args in usage:
        r = run_cli("--server", r50_address, *args) if "--server" not in args else run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
    free = f"127.0.0.1:{lib.free_port()}"
    for args in (["info"], ["health"], ["embed", crop], ["compare", crop, crop],
                 ["detect", crop], ["bench", "--duration", "1"]):
        r = run_cli("--server", free, "--retries", "2", *args, timeout=60)
        assert r.returncode == 3, (args, r.stderr)
        assert "unreachable" in r.stderr
    assert "retrying" in run_cli("--server", free, "--retries", "2", "info").stderr
    r = run_cli("--server", free, "health", "--wait", "1")
    assert r.returncode == 3 and "no answer from the server" in r.stderr, r.stderr
    r = run_cli("--server", r50_address, "embed", crop, tmp_path / "missing.jpg")
    assert r.returncode == 1, r.stderr
    r = run_cli("--server", r50_address, "health", "--wait", "5")
    assert r.returncode == 0 and r.stdout == "SERVING\n"
    # ARCFACE_SERVER stands in for --server.
    r = run_cli("info", env=cli_env(ARCFACE_SERVER=r50_address))
    assert r.returncode == 0 and "arcface-r50@" in r.stdout, r.stderr
    assert run_cli("--help").returncode == 0


# --------------------------------------------------------------------------------------------
# gallery (the r50 server has a SQLite store, 3 faces per Enroll, 2 probes per Identify)


def table(text):
    """A FormatTable's rows, split on runs of two or more spaces; the header first."""
    return [re.split(r" {2,}", line) for line in text.splitlines()]


GALLERY_CROPS = ("crop_uniform_0", "crop_gaussian_1", "crop_smooth_2", "crop_gradient_3",
                 "crop_face_like_5")


def test_gallery_enroll_identify_list_forget(r50_address, goldens, tmp_path):
    alice_dir = tmp_path / "alice"
    alice_dir.mkdir()
    alice = [write_crop_png(goldens, n, alice_dir / f"{i}.png")
             for i, n in enumerate(GALLERY_CROPS)]
    (alice_dir / "9-bad.png").write_bytes(b"not an image")  # sorted last: the second request
    bob = write_crop_png(goldens, "crop_stripes_4", tmp_path / "bob.png")
    cli = ["--server", r50_address, "gallery", "--gallery", "cli"]

    # A folder of 6 files (two Enroll requests): the bad one is reported, the rest enrolled.
    r = run_cli(*cli, "enroll", "alice", alice_dir, "--label", "team=red", "--json")
    assert r.returncode == 1, r.stderr
    doc = json.loads(r.stdout)
    assert [f["file"] for f in doc["faces"]] == alice
    alice_ids = [f["face_id"] for f in doc["faces"]]
    assert len(set(alice_ids)) == 5 and doc["subject_id"] == "alice" and doc["gallery"] == "cli"
    assert [(e["file"], e["code"]) for e in doc["errors"]] == [
        (str(alice_dir / "9-bad.png"), "INVALID_ARGUMENT")]
    assert f"error: {alice_dir / '9-bad.png'}: INVALID_ARGUMENT" in r.stderr
    assert "enrolled 5 of 6 files as 'alice' in gallery 'cli'" in r.stderr
    r = run_cli(*cli, "enroll", "bob", bob)
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows[0] == ["FILE", "FACE_ID"] and rows[1][0] == bob
    bob_id = rows[1][1]

    # identify: each file finds its own face first (similarity 1), the other subject second.
    r = run_cli(*cli, "identify", alice[0], alice[3], bob, "--top-k", "2", "--threshold=-1",
                "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model_id"].startswith("arcface-r50@") and doc["errors"] == []
    assert doc["threshold"] == -1
    want = [("alice", alice_ids[0]), ("alice", alice_ids[3]), ("bob", bob_id)]
    for result, file, (subject, face) in zip(doc["results"], [alice[0], alice[3], bob], want):
        assert result["file"] == file
        first, second = result["candidates"]
        assert (first["subject_id"], first["face_id"]) == (subject, face)
        assert first["similarity"] == pytest.approx(1.0, abs=1e-4)
        assert second["subject_id"] != subject and second["similarity"] < first["similarity"]
    # Without --threshold: the server's cut, at the model's own (ArcFace 0.4).
    every = doc["results"]
    r = run_cli(*cli, "identify", alice[0], alice[3], bob, "--top-k", "2", "--json")
    doc = json.loads(r.stdout)
    assert doc["threshold"] == pytest.approx(0.4)
    for result, all_of in zip(doc["results"], every):
        assert [c["face_id"] for c in result["candidates"]] == [
            c["face_id"] for c in all_of["candidates"] if c["similarity"] >= doc["threshold"]]
    assert "identified 3 files in gallery 'cli' (threshold 0.40, the model's)" in r.stderr
    # as a table, with a threshold that leaves only the files' own faces
    r = run_cli(*cli, "identify", alice[0], bob, "--top-k", "2", "--threshold", "0.99")
    assert r.returncode == 0, r.stderr
    rows = table(r.stdout)
    assert rows[0] == ["FILE", "RANK", "SUBJECT", "SIMILARITY", "FACE_ID"]
    assert [(x[0], x[1], x[2], x[4]) for x in rows[1:]] == [
        (alice[0], "1", "alice", alice_ids[0]), (bob, "1", "bob", bob_id)]
    assert all(float(x[3]) > 0.99 for x in rows[1:])
    assert "identified 2 files in gallery 'cli' (threshold 0.99)" in r.stderr

    r = run_cli(*cli, "list")
    assert r.returncode == 0, r.stderr
    assert table(r.stdout) == [["SUBJECT", "FACES", "LABELS"], ["alice", "5", "team=red"],
                               ["bob", "1"]]
    assert "2 subjects, 6 faces in gallery 'cli'" in r.stderr

    r = run_cli(*cli, "forget", "alice", "--face", alice_ids[0], "--face", alice_ids[1])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("removed 2 faces of 'alice' from gallery 'cli'"), r.stdout
    r = run_cli(*cli, "forget", "bob", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["faces_removed"] == 1, r.stdout
    r = run_cli(*cli, "list", "--json")
    assert json.loads(r.stdout) == {"gallery": "cli", "subjects": [
        {"subject_id": "alice", "num_faces": 3, "labels": {"team": "red"}}]}
    # forgotten faces no longer answer
    r = run_cli(*cli, "identify", alice[0], "--top-k", "5", "--threshold=-1", "--json")
    found = json.loads(r.stdout)["results"][0]["candidates"]
    assert alice_ids[0] not in [c["face_id"] for c in found] and found

    r = run_cli(*cli[:3], "--gallery", "never-made", "identify", alice[0])
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr, r.stderr


def test_gallery_enroll_progress_bar_on_a_terminal(r50_address, goldens, tmp_path):
    files = [write_crop_png(goldens, n, tmp_path / f"{n}.png") for n in GALLERY_CROPS]
    rc, terminal, _ = _run_in_pty(["--server", r50_address, "gallery", "--gallery", "tty",
                                   "enroll", "carol", *files], stdout_is_tty=True)
    assert rc == 0, terminal
    assert re.search(rb"\[#+\] 5/5 files +[0-9.]+/s +ETA 0:00", terminal), terminal
    r = run_cli("--server", r50_address, "gallery", "--gallery", "tty", "enroll", "dave", *files)
    assert r.returncode == 0 and "ETA" not in r.stderr and "\r" not in r.stderr


def test_gallery_usage_and_a_server_without_a_store(demo_trio, r50_address, tmp_path):
    crop = tmp_path / "x.png"
    cv2.imwrite(str(crop), np.full((112, 112, 3), 90, np.uint8))
    for args in (["gallery"], ["gallery", "enroll", "x"], ["gallery", "enroll", "x", crop,
                 "--label", "no-equals"], ["gallery", "identify", crop, "--top-k", "0"],
                 ["gallery", "forget"], ["gallery", "identify", crop, "--box", "1,2"]):
        r = run_cli("--server", r50_address, *args)
        assert r.returncode == 2, (args, r.stderr)
    no_store = f"127.0.0.1:{demo_trio[0].grpc_port}"
    r = run_cli("--server", no_store, "gallery", "enroll", "x", crop)
    assert r.returncode == 1 and "UNIMPLEMENTED" in r.stderr and "--gallery-store" in r.stderr
    r = run_cli("--server", no_store, "gallery", "list")
    assert r.returncode == 1 and "UNIMPLEMENTED" in r.stderr
    free = f"127.0.0.1:{lib.free_port()}"
    r = run_cli("--server", free, "--retries", "1", "gallery", "list", timeout=60)
    assert r.returncode == 3 and "unreachable" in r.stderr


# --------------------------------------------------------------------------------------------
# The Python package's additions: several servers (round_robin), retries of UNAVAILABLE


def test_python_client_round_robin_and_retries(demo_trio, start_server, goldens, tmp_path):
    from arcface_client import ArcFaceClient, ArcFaceError

    crop = goldens.crop_u8(goldens.cases["crop_uniform_0"])
    targets = [f"127.0.0.1:{s.grpc_port}" for s in demo_trio]
    before = [embed_counts(s.metrics())[0] for s in demo_trio]
    with ArcFaceClient(",".join(targets), timeout=60, max_faces_per_request=4) as c:
        assert c.target.startswith("ipv4:")
        for _ in range(6):
            c.embed([crop])
    deltas = [embed_counts(s.metrics())[0] - b for s, b in zip(demo_trio, before)]
    assert sum(deltas) == 6 and min(deltas) >= 1, deltas

    # A draining server answers UNAVAILABLE; with retries each call moves on to the next one.
    hold = tmp_path / "hold"
    draining = start_server(lib.demo_args("--warmup-batch-size", "1", "--drain-timeout", "60",
                                          "--test-hold-model-file", str(hold)), name="draining")
    hold.touch()
    held = threading.Thread(target=lambda: draining.embed([lib.raw_face(crop)], timeout=90))
    held.start()
    try:
        lib.wait_until(lambda: draining.metrics().get("arcface_inflight_requests") >= 1, 30,
                       what="a call held in the draining server")
        draining.proc.send_signal(signal.SIGTERM)
        lib.wait_until(lambda: draining.health_status() == lib.NOT_SERVING, 30, what="draining")
        pair = [f"127.0.0.1:{draining.grpc_port}", targets[0]]
        refused = lambda: draining.metrics().sum("arcface_requests_total", rpc="GetModelInfo",
                                                 code="UNAVAILABLE")
        start = refused()
        # Round robin sends calls only to connected servers: calls go on until one has met the
        # draining server (a slow server, under a sanitizer, connects after the first calls).
        with ArcFaceClient(pair, timeout=30) as c:

            def retried():
                assert c.model_info()["demo_weights"]  # every call succeeds, retried or not
                return refused() - start >= 1

            lib.wait_until(retried, 60, interval=0.05,
                           what="an attempt that met the draining server and was retried")
        with ArcFaceClient(pair, timeout=30, retries=1) as c:

            def failed():
                try:
                    c.model_info()
                except ArcFaceError as e:
                    assert e.code.name == "UNAVAILABLE"
                    return True
                return False

            lib.wait_until(failed, 60, interval=0.05,
                           what="a call without retries that met the draining server")
    finally:
        if hold.exists():
            hold.unlink()
        held.join(timeout=90)
    assert draining.proc.wait(timeout=60) == 0


# --------------------------------------------------------------------------------------------
# Verdicts from random weights say so; eval on dlib's johns (five people, eleven aligned photos
# each) through a demo-weights server with the detector and a gallery store.

RANDOM_NOTE = "random weights: not an identity verdict"


@pytest.fixture(scope="module")
def demo_eval(session_servers, tmp_path_factory):
    """Demo (random) weights, the face detector, a SQLite gallery store (2 faces per Enroll,
    so eval's enrolment is split)."""
    store = tmp_path_factory.mktemp("demo_eval") / "gallery.db"
    server = session_servers(lib.demo_args(*lib.detector_args(), "--gallery-store",
                                           f"sqlite:{store}", "--gallery-max-faces-per-enroll",
                                           "2"), name="demo_eval")
    return f"127.0.0.1:{server.grpc_port}"


def test_verdicts_from_random_weights_say_so(demo_eval, r50_address, tmp_path):
    a, b = data("0-f1-su-ph.jpg"), data("single_face.jpg")
    r = run_cli("--server", demo_eval, "compare", a, b)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"cosine=-?[0-9.]+\t(same|different) \(threshold 0\.40; {RANDOM_NOTE}\)$",
                     r.stdout), r.stdout
    r = run_cli("--server", demo_eval, "compare", "--matrix", a, b)
    assert r.returncode == 0 and r.stdout.endswith(f"({RANDOM_NOTE})\n"), r.stdout
    # Weights from a file: the verdict alone.
    for args in (["compare", a, b], ["compare", "--matrix", a, b]):
        r = run_cli("--server", r50_address, *args)
        assert r.returncode == 0 and "random weights" not in r.stdout, r.stdout

    # identify and detect name their identities as coming from random weights.
    image = data("multi_face.jpg")
    doc = json.loads(run_cli("--server", demo_eval, "detect", image, "--embed", "--json").stdout)
    assert doc["random_weights"] is True
    face = tmp_path / "face.json"
    face.write_text(json.dumps({"multi_face.jpg": doc["faces"][0]["landmarks"]}))
    r = run_cli("--server", demo_eval, "gallery", "--gallery", "verdicts", "enroll", "one", image,
                "--landmarks", face)
    assert r.returncode == 0, r.stderr
    r = run_cli("--server", demo_eval, "gallery", "--gallery", "verdicts", "identify", image)
    assert r.returncode == 0, r.stderr
    assert table(r.stdout)[1][2] == "one" and r.stdout.endswith(f"({RANDOM_NOTE})\n"), r.stdout
    r = run_cli("--server", demo_eval, "gallery", "--gallery", "verdicts", "identify", image,
                "--json")
    assert json.loads(r.stdout)["random_weights"] is True
    r = run_cli("--server", demo_eval, "detect", image, "--gallery", "verdicts")
    assert r.returncode == 0, r.stderr
    identities = re.findall(r"^  identity .*$", r.stdout, re.M)
    assert identities and all(line.endswith(f"  ({RANDOM_NOTE})") for line in identities), r.stdout
    doc = json.loads(run_cli("--server", r50_address, "detect", image, "--embed", "--json").stdout)
    assert doc["random_weights"] is False


def eval_json(address, *args, rc=0):
    r = run_cli("--server", address, "eval", *args, "--json")
    assert r.returncode == rc, r.stderr
    return json.loads(r.stdout), r.stderr


def test_eval_on_johns_with_random_weights_is_near_chance(demo_eval, johns, tmp_path):
    from arcface_client import ArcFaceClient

    roc = tmp_path / "roc.png"
    doc, err = eval_json(demo_eval, johns, "--roc", roc, "--gallery", "eval-scratch")
    n, pairs = 55, 55 * 54 // 2
    same = 5 * 11 * 10 // 2
    assert doc["random_weights"] is True and doc["model_id"].startswith("arcface-r50@")
    assert (doc["identities"], doc["images"], doc["images_failed"], doc["errors"]) == (5, n, 0, [])
    assert doc["pairs"] == {"total": pairs, "same": same, "different": pairs - same, "skipped": 0}
    assert doc["faces"] == "whole" and doc["pairs_file"] is None
    acc = doc["accuracy"]
    assert acc["folds"] == 10 and len(acc["per_fold"]) == 10
    assert sum(f["pairs"] for f in acc["per_fold"]) == pairs
    assert np.mean([f["accuracy"] for f in acc["per_fold"]]) == pytest.approx(acc["mean"])
    assert np.std([f["accuracy"] for f in acc["per_fold"]]) == pytest.approx(acc["std"])
    assert 0 <= acc["mean"] <= 1 and acc["chance"] == pytest.approx((pairs - same) / pairs)
    # Random weights: the 10-fold accuracy is that of answering "different" always (0.815:
    # 0.817 measured), and the ROC only a little above the diagonal (0.740 measured: a random
    # network still sees each person's lighting and framing, the same in their eleven photos).
    # dlib's trained network scores an AUC of about 1 here.
    assert acc["mean"] <= acc["chance"] + 0.03, acc
    assert 0.4 <= doc["roc_auc"] <= 0.85, doc["roc_auc"]
    # 1210 different-person pairs: both FARs are measurable.
    for entry, far in zip(doc["tar_at_far"], (1e-3, 1e-2)):
        assert entry["far"] == far and entry["reported"] is True, entry
        assert 0 <= entry["tar"] <= 1 and entry["far_reached"] <= far, entry
    top1 = doc["top1"]
    assert (top1["probes"], top1["skipped"]) == (n, 0) and top1["rate"] == top1["correct"] / n
    # The gallery (exact flat index) finds the nearest other face as the client's own scan does
    # (its float cosines may break a near tie the other way).
    gallery = doc["gallery_top1"]
    assert gallery["gallery"] == "eval-scratch" and gallery["probes"] == n
    assert abs(gallery["correct"] - top1["correct"]) <= 1, (gallery, top1)
    print(f"johns, random weights: accuracy {acc['mean']:.4f} (chance {acc['chance']:.4f}), "
          f"AUC {doc['roc_auc']:.4f}, top-1 {top1['rate']:.4f}")
    # ... and leaves the gallery as it found it: empty.
    with ArcFaceClient(demo_eval, timeout=60) as c:
        assert list(c.list_subjects(gallery="eval-scratch")) == []
    eval_json(demo_eval, johns, "--gallery", "eval-scratch")  # so a second run is accepted

    picture = cv2.imread(str(roc), cv2.IMREAD_COLOR)
    assert picture is not None and picture.shape == (560, 720, 3)  # plot.h kRocWidth/Height
    curve = np.all(np.abs(picture.astype(int) - [180, 90, 20]) <= 10, axis=2)  # kRocCurveColor
    assert curve.sum() > 500, curve.sum()

    # The table, as people read it.
    r = run_cli("--server", demo_eval, "eval", johns)
    assert r.returncode == 0, r.stderr
    rows = {row[0]: row[1] for row in table(r.stdout)[1:] if len(row) == 2}
    assert rows["identities"] == "5" and rows["images"] == "55 (0 failed)", rows
    assert rows["pairs"].startswith(f"{pairs} ({same} same, {pairs - same} different; 0 skipped")
    assert rows["ROC AUC"] == f"{doc['roc_auc']:.4f}"
    assert rows["accuracy"].startswith(f"{acc['mean']:.4f} +- {acc['std']:.4f} (10-fold")
    assert f"({RANDOM_NOTE}" in r.stdout


def test_eval_detect_counts_images_without_a_face(demo_eval, johns):
    # Johns' photos are tight 150x150 chips: the detector misses the face in many of them, and
    # each is reported and counted, never dropped in silence.
    doc, err = eval_json(demo_eval, johns, "--faces", "detect", rc=1)
    failed = doc["images_failed"]
    assert 0 < failed < 55 and len(doc["errors"]) == failed
    for e in doc["errors"]:
        assert e["code"] == "NOT_FOUND" and e["message"] == "the server's detector found no face"
        assert f"error: {e['file']}: NOT_FOUND: the server's detector found no face" in err
    kept = 55 - failed
    used = doc["pairs"]["same"] + doc["pairs"]["different"]
    assert used == kept * (kept - 1) // 2 and doc["pairs"]["skipped"] == 1485 - used, doc["pairs"]
    assert doc["top1"]["probes"] + doc["top1"]["skipped"] == kept


def write_johns_pairs(johns, path, lines, header):
    path.write_text("\n".join([header, *lines]) + "\n")
    return str(path)


def test_eval_with_a_pairs_file(demo_eval, johns, tmp_path):
    from arcface_client import ArcFaceClient

    # LFW's layout of folds: "10 1": per fold one same-person and one different-person line.
    # johns' files are not named LFW's way: image I is the I-th file of the folder.
    lines = []
    for k in range(10):
        p, q = JOHNS_PEOPLE[k % 5], JOHNS_PEOPLE[(k + 1) % 5]
        lines += [f"{p} {k + 1} {k + 2}", f"{p} {k + 1} {q} {11 - k}"]
    pairs = write_johns_pairs(johns, tmp_path / "pairs.txt", lines, "10 1")
    doc, _ = eval_json(demo_eval, johns, "--pairs", pairs)
    assert doc["pairs_file"] == pairs and doc["accuracy"]["folds"] == 10
    assert doc["pairs"] == {"total": 20, "same": 10, "different": 10, "skipped": 0}
    files = {(p, i) for k in range(10) for p, i in [(JOHNS_PEOPLE[k % 5], k + 1),
                                                    (JOHNS_PEOPLE[k % 5], k + 2),
                                                    (JOHNS_PEOPLE[(k + 1) % 5], 11 - k)]}
    assert doc["images"] == len(files) and doc["identities"] == 5
    assert all(f["pairs"] == 2 for f in doc["accuracy"]["per_fold"])
    assert [t["reported"] for t in doc["tar_at_far"]] == [False, False]
    assert doc["tar_at_far"][0]["reason"] == "10 different-person pairs; FAR 0.001 needs at least 1000"

    # The AUC from the Python client's embeddings of the same files, computed here.
    def path(person, i):
        return os.path.join(johns, person, sorted(os.listdir(os.path.join(johns, person)))[i - 1])

    scored = []
    with ArcFaceClient(demo_eval, timeout=120) as c:
        for line in lines:
            w = line.split()
            a, b = (path(w[0], int(w[1])), path(w[0], int(w[2]))) if len(w) == 3 else (
                path(w[0], int(w[1])), path(w[2], int(w[3])))
            e = c.embed([a, b], normalize=True)
            scored.append((float(e[0] @ e[1]), len(w) == 3))
    wins = sum((s > d) + 0.5 * (s == d) for s, same in scored if same
               for d, other in scored if not other)
    # One near tie broken the other way by the batch's float rounding moves it by 1/100.
    assert abs(doc["roc_auc"] - wins / 100) <= 0.01 + 1e-12, (doc["roc_auc"], wins / 100)

    # A count header (pairsDevTrain.txt's form): 10 same then 10 different, 10 folds.
    counted = write_johns_pairs(johns, tmp_path / "dev.txt", lines[0::2] + lines[1::2], "10")
    assert eval_json(demo_eval, johns, "--pairs", counted)[0]["pairs"]["total"] == 20

    # A pair naming a file that is not there fails before any call, naming it.
    bad = write_johns_pairs(johns, tmp_path / "bad.txt", ["John_Simm 1 12", "John_Simm 1 John_Savage 2"], "1")
    r = run_cli("--server", demo_eval, "eval", johns, "--pairs", bad)
    assert r.returncode == 2, r.stderr
    assert (f"{bad} line 2: image 12 of John_Simm: no file "
            f"{os.path.join(johns, 'John_Simm', 'John_Simm_0012.jpg')}, and "
            f"{os.path.join(johns, 'John_Simm')} has 11 image files") in r.stderr, r.stderr
    short = write_johns_pairs(johns, tmp_path / "short.txt", lines[:3], "10 1")
    r = run_cli("--server", demo_eval, "eval", johns, "--pairs", short)
    assert r.returncode == 2 and "its header promises 20 pairs, it has 3" in r.stderr, r.stderr


def test_eval_refuses_what_it_cannot_measure(demo_eval, johns, tmp_path):
    from arcface_client import ArcFaceClient

    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("--server", demo_eval, "eval", empty)
    assert r.returncode == 2 and f"{empty} has no identity subfolders with image files" in r.stderr
    one = tmp_path / "one"
    one.mkdir()
    os.symlink(os.path.join(johns, "John_Simm"), one / "John_Simm")
    r = run_cli("--server", demo_eval, "eval", one)
    assert r.returncode == 2, r.stderr
    assert f"{one} has one identity (John_Simm): eval needs at least two" in r.stderr
    r = run_cli("--server", demo_eval, "eval", tmp_path / "missing")
    assert r.returncode == 2 and "no such folder" in r.stderr, r.stderr
    r = run_cli("--server", demo_eval, "eval", johns, "--faces", "eyes")
    assert r.returncode == 2, r.stderr

    # A gallery that holds faces is refused and left as it was.
    with ArcFaceClient(demo_eval, timeout=60) as c:
        c.enroll("keep-me", [np.ones(512, np.float32)], gallery="in-use")
        before = c.gallery_info("in-use")
        r = run_cli("--server", demo_eval, "eval", johns, "--gallery", "in-use")
        assert r.returncode == 1, r.stderr
        assert "gallery 'in-use' already holds 1 faces of 1 subjects" in r.stderr, r.stderr
        after = c.gallery_info("in-use")
        assert (after.num_faces, after.version) == (before.num_faces, before.version)


# --------------------------------------------------------------------------------------------
# reload (ModelAdmin.ReloadModels; the admin server serves a copy of r50 as "live")


def install(src, path):
    """As an operator should: the new file written beside, then renamed over the old one."""
    shutil.copyfile(src, path + ".new")
    os.replace(path + ".new", path)


def test_reload_prints_each_model_and_fails_when_one_failed(admin, goldens, r50_address):
    address = f"127.0.0.1:{admin.grpc_port}"
    r50, r100 = (f"arcface-{m}@" + lib.sha256_file(goldens.model_path(m))[:12]
                 for m in ("r50", "r100"))
    demo = json.loads(run_cli("--server", address, "models", "--json").stdout)["models"][1]
    assert demo["name"] == "arcface-demo"
    try:
        install(goldens.model_path("r100"), admin.model_file)
        r = run_cli("--server", address, "--timeout", "300", "reload")
        assert r.returncode == 0, r.stderr
        rows = [line.split() for line in r.stdout.splitlines()]
        assert rows[0] == ["MODEL", "RESULT", "SECONDS", "MODEL_ID"]
        assert [row[:2] + row[3:] for row in rows[1:]] == [
            ["live", "RELOADED", r50, "->", r100],
            ["arcface-demo", "UNCHANGED", demo["model_id"]]], r.stdout
        assert float(rows[1][2]) > 0

        # Back to r50, one model named, as JSON (the ReloadModelsResponse).
        install(goldens.model_path("r50"), admin.model_file)
        r = run_cli("--server", address, "--timeout", "300", "reload", "live", "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["models"][0].pop("seconds") > 0
        assert doc == {"models": [{"model": "live", "result": "RELOADED", "model_id": r50,
                                   "previous_model_id": r100, "error": ""}]}

        # A copy cut short: FAILED (exit 1), r50 serving on.
        with open(goldens.model_path("r50"), "rb") as f:
            data = f.read()
        with open(admin.model_file + ".new", "wb") as f:
            f.write(data[: len(data) // 2])
        os.replace(admin.model_file + ".new", admin.model_file)
        r = run_cli("--server", address, "reload", "live", "arcface-demo")
        assert r.returncode == 1, r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert re.match(rf"live +FAILED +[0-9.]+  {re.escape(r50)} \(keeps serving\): .*"
                        rf"{re.escape(admin.model_file)}", lines[1]), r.stdout
        assert lines[2].split()[:2] == ["arcface-demo", "UNCHANGED"], r.stdout
    finally:
        install(goldens.model_path("r50"), admin.model_file)
    info = json.loads(run_cli("--server", address, "--model", "live", "info", "--json").stdout)
    assert info["model_id"] == r50

    # Errors of the call itself: an unknown model; a server without --admin-rpc.
    r = run_cli("--server", address, "reload", "nope")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "live (default)" in r.stderr, r.stderr
    r = run_cli("--server", r50_address, "reload")
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert "UNIMPLEMENTED" in r.stderr and "--admin-rpc" in r.stderr, r.stderr
    assert "kill -HUP <pid>" in r.stderr and "docker kill -s HUP" in r.stderr, r.stderr
    r = run_cli("--server", f"127.0.0.1:{lib.free_port()}", "--retries", "1", "reload")
    assert r.returncode == 3 and "unreachable" in r.stderr, r.stderr
