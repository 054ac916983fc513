"""Fixtures of the packaging tests: the settings ctest passes (CMakeLists.txt) and the photo."""

import os

import pytest

ENV_KEYS = ("ARCFACE_SERVER_BIN", "ARCFACE_TEST_DATA", "ARCFACE_BUILD_DIR", "ARCFACE_WHEEL",
            "ARCFACE_VERSION", "ARCFACE_CMAKE", "ARCFACE_CMAKE_GENERATOR", "ARCFACE_CXX_COMPILER")


def pytest_configure(config):
    missing = [k for k in ENV_KEYS if not os.environ.get(k)]
    if missing:
        raise pytest.UsageError(f"set {', '.join(missing)} (ctest sets them: "
                                f"ctest -R packaging_pytest)")


@pytest.fixture(scope="session")
def env():
    return {k: os.environ[k] for k in ENV_KEYS}


@pytest.fixture(scope="session")
def photo(env):
    path = os.path.join(env["ARCFACE_TEST_DATA"], "single_face.jpg")
    assert os.path.isfile(path), path
    return path
