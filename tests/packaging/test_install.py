"""cmake --install as a user runs it: into a fresh prefix, then the installed server started and
consumer/ (find_package(arcface_client) against that prefix alone) configured, built and run
against it."""

import os

import numpy as np
import pytest

from packaging_util import assert_same_embedding, in_tree_embedding, lib, run

CONSUMER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "consumer")
INSTALLED = (
    "bin/arcface-server",
    "bin/arcface-client",
    "lib/libarcface_client_cpp.a",
    "lib/libarcface_proto.a",
    "lib/libarcface_health_proto.a",
    "include/arcface_client/client/cpp/client.h",
    "include/arcface_client/client/cpp/policies.h",
    "include/arcface_client/arcface/v1/face_embedding.pb.h",
    "include/arcface_client/arcface/v1/face_embedding.grpc.pb.h",
    "include/arcface_client/arcface/v1/face_gallery.pb.h",
    "include/arcface_client/arcface/v1/face_gallery.grpc.pb.h",
    "lib/cmake/arcface_client/arcface_clientConfig.cmake",
    "lib/cmake/arcface_client/arcface_clientConfigVersion.cmake",
    "lib/cmake/arcface_client/arcface_clientTargets.cmake",
)


class InstalledServer(lib.ServerProcess):
    """ServerProcess running the installed binary instead of the build's."""

    def __init__(self, binary, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.binary = binary

    def command(self):
        return [self.binary] + super().command()[1:]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory, env):
    path = tmp_path_factory.mktemp("install") / "prefix"
    run([env["ARCFACE_CMAKE"], "--install", env["ARCFACE_BUILD_DIR"], "--prefix", path],
        "cmake --install", timeout=300)
    return path


@pytest.fixture(scope="module")
def consumer(tmp_path_factory, env, prefix):
    """consumer/ built against the prefix; returns its program."""
    build = tmp_path_factory.mktemp("consumer") / "build"
    configure = [env["ARCFACE_CMAKE"], "-S", CONSUMER, "-B", build,
                 "-G", env["ARCFACE_CMAKE_GENERATOR"], "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}",
                 f"-DCMAKE_CXX_COMPILER={env['ARCFACE_CXX_COMPILER']}",
                 # Only the prefix: not a package registry entry left by some other build.
                 "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"]
    launcher = os.environ.get("ARCFACE_CXX_COMPILER_LAUNCHER")
    if launcher:
        configure.append(f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}")
    run(configure, "configuring the consumer", timeout=300)
    with open(build / "CMakeCache.txt") as f:
        cache = f.read()
    assert f"arcface_client_DIR:PATH={prefix}/lib/cmake/arcface_client\n" in cache
    run([env["ARCFACE_CMAKE"], "--build", build], "building the consumer", timeout=600)
    return build / "embed_one"


def test_install_puts_the_package_in_place(env, prefix):
    missing = [f for f in INSTALLED if not os.path.isfile(prefix / f)]
    assert not missing, f"not installed: {missing}"
    for program in ("arcface-server", "arcface-client"):
        out = run([prefix / "bin" / program, "--version"], program, timeout=60)
        assert out.strip() == env["ARCFACE_VERSION"], f"{program} --version: {out!r}"


def test_consumer_embeds_through_the_installed_client(tmp_path, prefix, consumer, photo):
    server = InstalledServer(str(prefix / "bin" / "arcface-server"), lib.demo_args(),
                             str(tmp_path), name="installed")
    server.start()
    try:
        target = f"127.0.0.1:{server.grpc_port}"
        lines = run([consumer, target, photo], "the consumer", timeout=300).splitlines()
        want = in_tree_embedding(target, photo)
    finally:
        server.stop()
    assert lines[0] == f"dimension {lib.EMBEDDING_DIM}", lines[:2]
    name, norm = lines[1].split()
    assert name == "norm", lines[1]
    assert float(norm) == pytest.approx(float(np.linalg.norm(want)), rel=1e-5), lines[1]
    values = lines[2].split()
    assert values[0] == "values"
    assert_same_embedding([float(v) for v in values[1:]], want,
                          "the installed C++ client's embedding vs the in-tree client's")

