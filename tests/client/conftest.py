"""Fixtures for the client tests: real arcface-server processes on 127.0.0.1 (ServerProcess of
tests/integration/arcface_testlib.py) and a runner for the arcface-client binary."""

import os
import shutil
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

import arcface_testlib as lib  # noqa: E402
from server_fixtures import goldens, session_servers, start_server  # noqa: E402,F401

CLIENT_BIN = os.environ.get("ARCFACE_CLIENT_BIN", "")
LIBRARY_TEST = os.environ.get("ARCFACE_CLIENT_LIBRARY_TEST", "")
# Small, so that splitting large lists into several requests is exercised.
MAX_FACES = 4


def pytest_configure(config):
    problem = lib.missing_environment("client_pytest")
    if problem is None and not (CLIENT_BIN and LIBRARY_TEST):
        problem = "set ARCFACE_CLIENT_BIN and ARCFACE_CLIENT_LIBRARY_TEST (ctest -R client_pytest)"
    if problem:
        raise pytest.UsageError(problem)


def cli_env(**extra):
    """The environment for arcface-client: none of the caller's ARCFACE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCFACE_")}
    env.update(extra)
    return env


def run_cli(*args, timeout=300, env=None, **kw):
    """Runs arcface-client; returns the CompletedProcess (text output)."""
    return subprocess.run([CLIENT_BIN, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or cli_env(), stdin=subprocess.DEVNULL, **kw)


# The gallery's limits on that server: splitting is exercised there too.
GALLERY_MAX_ENROLL = 3
GALLERY_MAX_PROBES = 2


@pytest.fixture(scope="session")
def r50(session_servers, goldens, tmp_path_factory):
    """The golden r50 weights, at most MAX_FACES faces per request, the face detector; a SQLite
    gallery store."""
    store = tmp_path_factory.mktemp("r50_gallery") / "gallery.db"
    return session_servers([
        "--weights", goldens.model_path("r50"),
        *lib.detector_args(),
        "--device", "cpu", "--threads", str(lib.THREADS),
        "--max-batch-size", "8", "--max-queue-delay-us", "2000",
        "--max-faces-per-request", str(MAX_FACES),
        "--max-image-pixels", str(lib.R50_MAX_PIXELS),
        "--gallery-store", f"sqlite:{store}",
        "--gallery-max-faces-per-enroll", str(GALLERY_MAX_ENROLL),
        "--gallery-max-probes", str(GALLERY_MAX_PROBES),
        "--drain-timeout", "20",
    ], name="r50_client")


@pytest.fixture(scope="session")
def r50_address(r50):
    return f"127.0.0.1:{r50.grpc_port}"


@pytest.fixture(scope="session")
def admin(session_servers, goldens, tmp_path_factory):
    """--admin-rpc (loopback): a copy of the golden r50 weights as model "live" (model_file:
    tests swap it and put r50 back, reloaded) beside the demo weights."""
    path = str(tmp_path_factory.mktemp("admin") / "live.safetensors")
    shutil.copyfile(goldens.model_path("r50"), path)
    server = session_servers(lib.demo_args("--model", f"live={path}", "--admin-rpc",
                                           "--warmup-batch-size", "1"), name="admin")
    server.model_file = path
    return server


@pytest.fixture(scope="session")
def demo_trio(session_servers):
    """Three small demo-weights servers (round robin, bench)."""
    return [session_servers(lib.demo_args("--warmup-batch-size", "1", "--drain-timeout", "10"),
                            name=f"demo{i}") for i in range(3)]


# dlib's examples/johns (fetched by tests/data/fetch_dlib_data.sh; ctest sets the variable): five
# people, eleven aligned 150x150 photos each.
DLIB_DATA = os.environ.get("ARCFACE_DLIB_DATA", "")
JOHNS_PEOPLE = ("John_Salley", "John_Savage", "John_Schneider", "John_Shimkus", "John_Simm")


@pytest.fixture(scope="module")
def johns():
    root = os.path.join(DLIB_DATA, "johns")
    assert os.path.isdir(root), (
        f"ARCFACE_DLIB_DATA={DLIB_DATA!r} has no johns/ (tests/data/fetch_dlib_data.sh DIR fetches "
        "dlib's example faces; ctest sets the variable)")
    assert sorted(os.listdir(root)) == list(JOHNS_PEOPLE)
    return root
