"""The example video-analytics sidecar (deploy/video-analytics) on the host, against a real
arcface-server with the demo weights and the face detector (ARCFACE_DETECTOR_MODELS): the
server detects, aligns and embeds every frame of one DetectStream; identities of the program's
own from an image folder and from a video file, identities from the server's gallery, each
marked as coming from random weights (and not, from weights loaded from a file), and clear
failures for bad input and a server without a detector. (test_docker_stack.py runs it inside
the compose stack.)"""

import json
import os
import subprocess
import sys

import cv2
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
import arcface_testlib as lib  # noqa: E402
from arcface_client import ArcFaceClient  # noqa: E402
from sidecar_events import faces  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAM = os.path.join(ROOT, "deploy", "video-analytics", "video_analytics.py")
MULTI = os.path.join(lib.TEST_DATA, "multi_face.jpg")  # five faces


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    problem = lib.missing_environment("deploy_video_analytics")
    if problem:
        pytest.fail(problem)
    work = tmp_path_factory.mktemp("va")
    s = lib.ServerProcess(lib.demo_args(*lib.detector_args(),
                                        "--gallery-store", f"sqlite:{work / 'gallery.db'}"),
                          str(work), name="demo").start()
    yield s
    s.stop()


def analyse(server, *args, env=None):
    """(exit status, JSON events, stderr) of one run of the program."""
    out = subprocess.run(
        [sys.executable, PROGRAM, "--server", f"127.0.0.1:{server.grpc_port}", "--fps", "0",
         *args], capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def test_folder_loops_and_each_face_keeps_one_identity(server):
    names = [n for n in os.listdir(lib.TEST_DATA) if n.lower().endswith((".jpg", ".png"))]
    # Two passes over the folder. The demo weights are a random network, in which unrelated
    # faces reach cosines of 0.4-0.85: a high threshold keeps the photos' faces apart.
    rc, events, err = analyse(server, "--input", lib.TEST_DATA,
                              "--max-frames", str(2 * len(names)), env={"VIDEO_THRESHOLD": "0.95"})
    assert rc == 0, err
    connected = events[0]
    assert connected["event"] == "connected" and connected["demo_weights"] is True
    assert connected["detector_id"] and connected["gallery"] is None, connected
    assert connected["threshold"] == pytest.approx(0.95), connected
    seen = faces(events)
    # The server's detector finds the five faces of multi_face.jpg (Haar's cascade found one).
    assert sum(src == "multi_face.jpg" for src, _ in seen) >= 4, seen
    assert not any(src == "free-mountain-vector-01.jpg" for src, _ in seen), seen
    for key, ids in seen.items():
        assert len(ids) == 2 and ids[0] == ids[1], (key, ids)
    # Every identity says it comes from random weights.
    sightings = [e for e in events if "identity" in e]
    assert sightings and all(e["random_weights"] is True for e in sightings), sightings
    assert len({ids[0] for ids in seen.values()}) == len(seen), seen
    assert events[-1] == {"event": "done", "frames": 2 * len(names), "identities": len(seen)}
    # Without VIDEO_THRESHOLD: the served model's, InsightFace's 0.4 for ArcFace, at which the
    # random network's embeddings merge faces.
    rc, events, err = analyse(server, "--input", lib.TEST_DATA, "--max-frames", str(len(names)))
    assert rc == 0, err
    assert events[0]["threshold"] == pytest.approx(0.4), events[0]
    assert events[-1]["identities"] < len(seen)


def test_video_file(server, tmp_path):
    frame = cv2.imread(MULTI)
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 5,
                             (frame.shape[1], frame.shape[0]))
    for _ in range(3):
        writer.write(frame)
    writer.release()
    rc, events, err = analyse(server, "--input", path, "--no-loop")
    assert rc == 0, err
    assert events[-1]["frames"] == 3
    per_frame = {}
    for e in events:
        if "identity" in e:
            assert e["source"] == "clip.avi"
            per_frame.setdefault(e["frame"], []).append(e["identity"])
    assert sorted(per_frame) == [0, 1, 2] and min(map(len, per_frame.values())) >= 4, per_frame


def test_gallery_names_the_enrolled_faces_and_no_one_else(server, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("multi_face.jpg", "single_face.jpg"):
        os.symlink(os.path.join(lib.TEST_DATA, name), folder / name)
    with ArcFaceClient(f"127.0.0.1:{server.grpc_port}", timeout=120) as client:
        found = client.detect(MULTI, embed=True, min_face_size=40)
        for i, face in enumerate(found.faces):
            client.enroll(f"guest-{i}", [face.embedding], gallery="door")
    # single_face.jpg's person was not enrolled; the random network keeps them below 0.95.
    rc, events, err = analyse(server, "--input", str(folder), "--max-frames", "4",
                              "--gallery", "door", "--threshold", "0.95")
    assert rc == 0, err
    assert events[0]["gallery"] == "door", events[0]
    sightings = [e for e in events if "identity" in e]
    multi = [e for e in sightings if e["source"] == "multi_face.jpg"]
    assert len(multi) == 2 * len(found.faces), multi
    for e in multi:
        assert e["identity"] == f"guest-{e['face']}" and e["similarity"] >= 0.999, e
        assert e["random_weights"] is True, e
    single = [e for e in sightings if e["source"] == "single_face.jpg"]
    assert len(single) == 2 and all(e["identity"] is None for e in single), single
    rc, events, err = analyse(server, "--input", str(folder), "--max-frames", "1",
                              "--gallery", "no-such-gallery")
    assert rc == 0, err
    # The frame's own error, or the stream's: either way named, and the program goes on.
    failed = [e for e in events if e.get("event") in ("detect_failed", "stream_failed")]
    assert len(failed) == 1 and failed[0]["code"] == "NOT_FOUND", events
    assert events[-1]["event"] == "done", events


def test_bad_input_is_named(server, tmp_path):
    rc, _, err = analyse(server, "--input", str(tmp_path / "missing.mp4"))
    assert rc == 1 and "missing.mp4 does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = analyse(server, "--input", str(empty))
    assert rc == 1 and f"no readable frames in {empty}" in err


def test_a_server_without_a_detector_or_galleries_is_named(tmp_path):
    s = lib.ServerProcess(lib.demo_args("--detector", "none"), str(tmp_path),
                          name="nodetector").start()
    try:
        rc, _, err = analyse(s, "--input", lib.TEST_DATA)
        assert rc == 1 and "without a face detector" in err, err
    finally:
        s.stop()
    s = lib.ServerProcess(lib.demo_args(*lib.detector_args(), "--gallery-store", "none"),
                          str(tmp_path), name="nogallery").start()
    try:
        rc, _, err = analyse(s, "--input", lib.TEST_DATA, "--gallery", "door")
        assert rc == 1 and "--gallery door needs a store" in err, err
    finally:
        s.stop()


def test_weights_from_a_file_are_not_flagged(tmp_path):
    goldens = lib.Goldens(lib.GOLDEN_DIR, lib.TEST_DATA)
    folder = tmp_path / "frames"
    folder.mkdir()
    os.symlink(MULTI, folder / "multi_face.jpg")
    s = lib.ServerProcess(["--weights", goldens.model_path("r50"), "--device", "cpu",
                           "--threads", str(lib.THREADS), *lib.detector_args()],
                          str(tmp_path), name="r50").start()
    try:
        rc, events, err = analyse(s, "--input", str(folder), "--max-frames", "1")
    finally:
        s.stop()
    assert rc == 0, err
    sightings = [e for e in events if "identity" in e]
    assert sightings and all(e["random_weights"] is False for e in sightings), sightings
