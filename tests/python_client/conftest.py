"""Fixtures: one arcface-server with the golden r50 weights on 127.0.0.1 for the session
(ServerProcess of tests/integration/arcface_testlib.py), and an ArcFaceClient to it."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

import arcface_testlib as lib  # noqa: E402

# Small, so that the client's splitting of large lists is exercised.
MAX_FACES = 4


def pytest_configure(config):
    problem = lib.missing_environment("python_client_pytest")
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="session")
def goldens():
    return lib.Goldens(lib.GOLDEN_DIR, lib.TEST_DATA)


@pytest.fixture(scope="session")
def server(tmp_path_factory, goldens):
    srv = lib.ServerProcess([
        "--weights", goldens.model_path("r50"),
        "--device", "cpu", "--threads", str(lib.THREADS),
        "--max-batch-size", "8", "--max-queue-delay-us", "2000",
        "--max-faces-per-request", str(MAX_FACES),
        "--drain-timeout", "20",
    ], str(tmp_path_factory.mktemp("pyclient")), name="r50_pyclient")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def target(server):
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture
def client(target):
    from arcface_client import ArcFaceClient

    with ArcFaceClient(target, timeout=120) as c:
        yield c
