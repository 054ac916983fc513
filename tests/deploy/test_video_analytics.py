"""The example video-analytics sidecar (deploy/video-analytics) on the host, against a real
arcface-server with the demo weights: identities from an image folder and from a video file,
and clear failures for bad input. (test_docker_stack.py runs it inside the compose stack.)"""

import json
import os
import subprocess
import sys

import cv2
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "integration"))
import arcface_testlib as lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAM = os.path.join(ROOT, "deploy", "video-analytics", "video_analytics.py")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    problem = lib.missing_environment("deploy_video_analytics")
    if problem:
        pytest.fail(problem)
    s = lib.ServerProcess(lib.demo_args(), str(tmp_path_factory.mktemp("va")), name="demo").start()
    yield s
    s.stop()


def analyse(server, *args, env=None):
    """(exit status, JSON events, stderr) of one run of the program."""
    out = subprocess.run(
        [sys.executable, PROGRAM, "--server", f"127.0.0.1:{server.grpc_port}", "--fps", "0",
         *args], capture_output=True, text=True, timeout=300, env=dict(os.environ, **(env or {})))
    return out.returncode, [json.loads(line) for line in out.stdout.splitlines()], out.stderr


def faces(events):
    """{(source, box): [identity per sighting]}"""
    seen = {}
    for e in events:
        if "identity" in e:
            seen.setdefault((e["source"], tuple(e["box"])), []).append(e["identity"])
    return seen


def test_folder_loops_and_each_face_keeps_one_identity(server):
    names = [n for n in os.listdir(lib.TEST_DATA) if n.lower().endswith((".jpg", ".png"))]
    # Two passes over the folder. The demo weights are a random network, in which unrelated
    # faces reach cosines of 0.4-0.85: a high threshold keeps the photos' faces apart.
    rc, events, err = analyse(server, "--input", lib.TEST_DATA,
                              "--max-frames", str(2 * len(names)), env={"VIDEO_THRESHOLD": "0.95"})
    assert rc == 0, err
    assert events[0]["event"] == "connected" and events[0]["demo_weights"] is True
    seen = faces(events)
    assert sum(src == "multi_face.jpg" for src, _ in seen) >= 3, seen
    for key, ids in seen.items():
        assert len(ids) == 2 and ids[0] == ids[1], (key, ids)
    assert len({ids[0] for ids in seen.values()}) == len(seen), seen
    assert events[-1] == {"event": "done", "frames": 2 * len(names), "identities": len(seen)}
    # With InsightFace's threshold, the random network's embeddings merge faces.
    rc, events, err = analyse(server, "--input", lib.TEST_DATA, "--max-frames", str(len(names)))
    assert rc == 0, err
    assert events[-1]["identities"] < len(seen)


def test_video_file(server, tmp_path):
    frame = cv2.imread(os.path.join(lib.TEST_DATA, "multi_face.jpg"))
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
    assert sorted(per_frame) == [0, 1, 2] and min(map(len, per_frame.values())) >= 3, per_frame


def test_bad_input_is_named(server, tmp_path):
    rc, _, err = analyse(server, "--input", str(tmp_path / "missing.mp4"))
    assert rc == 1 and "missing.mp4 does not exist" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = analyse(server, "--input", str(empty))
    assert rc == 1 and f"no readable frames in {empty}" in err
    rc, _, err = analyse(server, "--input", lib.TEST_DATA, "--cascade", str(tmp_path / "x.xml"))
    assert rc == 1 and "cannot load the Haar cascade" in err
