"""The wheel as a user installs it: pip into a fresh venv (system site packages for Debian's
grpcio, protobuf and numpy; no index, so the wheel's declared dependencies must be met by
those), then imported by that venv's Python from
a folder outside the source tree, in isolated mode (no PYTHONPATH, no script folder on the path),
and used against a real arcface-server."""

import json
import os
import subprocess

import pytest

from packaging_util import assert_same_embedding, in_tree_embedding, lib, run

# Run by the venv's Python; prints what the test checks as one JSON document.
PROBE = r'''
import importlib.metadata as md
import json
import sys

import arcface.v1.face_embedding_pb2 as pb
import arcface.v1.face_gallery_pb2_grpc as gallery_grpc
import arcface_client
import grpc_health_v1.health_pb2 as health
from arcface_client import ArcFaceClient

target, image = sys.argv[1:3]
with ArcFaceClient(target, timeout=120) as client:
    client.wait_ready(60)  # grpc.health.v1, through the wheel's health stubs
    info = client.model_info()
    emb = client.embed([image])
print(json.dumps({
    "version": md.version("arcface-client"),
    "module_version": arcface_client.__version__,
    "files": [str(f) for f in md.files("arcface-client")],
    "modules": [m.__file__ for m in (arcface_client, pb, gallery_grpc, health)],
    "embedding_dim": info["embedding_dim"],
    "shape": list(emb.shape),
    "dtype": str(emb.dtype),
    "embedding": emb[0].tolist(),
}))
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = lib.ServerProcess(lib.demo_args(), str(tmp_path_factory.mktemp("wheel")), name="wheel")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def venv(tmp_path_factory, env):
    """A fresh venv with the wheel installed; returns its folder."""
    path = tmp_path_factory.mktemp("venv") / "env"
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", path], "venv", timeout=120)
    run([path / "bin" / "python", "-m", "pip", "install", "--no-index", env["ARCFACE_WHEEL"]],
        "pip install", timeout=300)
    return path


def test_wheel_in_venv_embeds_like_the_in_tree_client(tmp_path, env, venv, server, photo):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    probe = workdir / "probe.py"
    probe.write_text(PROBE)
    target = f"127.0.0.1:{server.grpc_port}"
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = json.loads(run([venv / "bin" / "python", "-I", probe, target, photo], "probe",
                         timeout=300, cwd=workdir, env=clean_env))

    # Imported from the venv, not from <build>/python or the source tree.
    site = os.path.realpath(venv)
    for module_file in out["modules"]:
        assert os.path.realpath(module_file).startswith(site + os.sep), out["modules"]
    # The installed files include the generated stubs beside the package.
    files = set(out["files"])
    for stub in ("arcface/__init__.py", "arcface/v1/__init__.py",
                 "arcface/v1/face_embedding_pb2.py", "arcface/v1/face_embedding_pb2_grpc.py",
                 "arcface/v1/face_gallery_pb2.py", "arcface/v1/face_gallery_pb2_grpc.py",
                 "grpc_health_v1/__init__.py", "grpc_health_v1/health_pb2.py",
                 "grpc_health_v1/health_pb2_grpc.py", "arcface_client/__init__.py",
                 "arcface_client/_admin.py", "arcface_client/_client.py",
                 "arcface_client/_detect.py", "arcface_client/_gallery.py",
                 "arcface_client/_remote.py"):
        assert stub in files, f"{stub} not installed: {sorted(files)}"
    assert out["version"] == out["module_version"] == env["ARCFACE_VERSION"]

    assert out["embedding_dim"] == lib.EMBEDDING_DIM
    assert out["shape"] == [1, lib.EMBEDDING_DIM] and out["dtype"] == "float32"
    assert_same_embedding(out["embedding"], in_tree_embedding(target, photo),
                          "the wheel's embedding vs the in-tree client's")


def test_venv_without_the_wheel_cannot_import(tmp_path):
    """The check above means something: a fresh venv alone has no arcface_client."""
    path = tmp_path / "bare"
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", path],
        "venv", timeout=120)
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([path / "bin" / "python", "-I", "-c", "import arcface_client"],
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env, timeout=60)
    assert proc.returncode != 0 and "No module named 'arcface_client'" in proc.stderr, proc.stderr
