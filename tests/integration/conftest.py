"""Fixtures: real arcface-server processes on 127.0.0.1 (ephemeral ports), torn down with
SIGTERM and an exit-status check.

Servers are expensive on this machine (an IResNet-50 forward is ~65 ms per face on 2 CPU
cores), so one r50 server with the golden weights is shared by the whole session; tests that
need special flags start small dedicated servers (usually with --demo-weights) through
`start_server`.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import arcface_testlib as lib  # noqa: E402
from server_fixtures import goldens, session_servers, start_server  # noqa: E402,F401


def pytest_configure(config):
    problem = lib.missing_environment("integration_pytest")
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(scope="session")
def r50_server(session_servers, goldens):
    """The r50 golden weights, small batches, short delay; shared by the session."""
    return session_servers([
        "--weights", goldens.model_path("r50"),
        "--device", "cpu", "--threads", str(lib.THREADS),
        "--max-batch-size", str(lib.R50_MAX_BATCH),
        "--max-queue-delay-us", str(lib.R50_QUEUE_DELAY_US),
        "--max-faces-per-request", str(lib.R50_MAX_FACES),
        "--max-image-pixels", str(lib.R50_MAX_PIXELS),
        "--drain-timeout", "20",
    ], name="r50")


@pytest.fixture(scope="session")
def onnx_server(session_servers, goldens):
    return session_servers([
        "--weights", goldens.model_path("insightface_r50"),
        "--device", "cpu", "--threads", str(lib.THREADS),
        "--max-batch-size", "4", "--max-queue-delay-us", "1000",
    ], name="insightface_r50")

