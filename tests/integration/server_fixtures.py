"""Pytest fixtures shared by the suites that start arcface-server processes; a conftest imports
them (`from server_fixtures import goldens, session_servers, start_server`)."""

import pytest

import arcface_testlib as lib


@pytest.fixture(scope="session")
def goldens():
    return lib.Goldens(lib.GOLDEN_DIR, lib.TEST_DATA)


@pytest.fixture(scope="session")
def session_servers(tmp_path_factory):
    servers = lib.ServerSet(str(tmp_path_factory.mktemp("servers")))
    yield servers
    servers.stop_all()


@pytest.fixture
def start_server(tmp_path):
    """start_server(args, name=..., tls=..., env=..., server_class=...) → a started
    ServerProcess, stopped (and its exit status checked) when the test ends unless the test
    already stopped it."""
    servers = lib.ServerSet(str(tmp_path))
    yield servers
    servers.stop_all()
