"""Verdicts from random weights say so: against a server with the demo weights (the face
detector and a SQLite gallery too), what compare, identify and detect return carries
random_weights=True, in its repr as well, from one GetModelInfo per client; against the golden
r50 server (weights loaded from a file) it is False and the repr says nothing of it."""

import os

import numpy as np
import pytest

import arcface_testlib as lib

from arcface_client import ArcFaceClient, Comparison

SINGLE = os.path.join(lib.TEST_DATA, "single_face.jpg")
MULTI = os.path.join(lib.TEST_DATA, "multi_face.jpg")
NOTE = "random weights: not an identity verdict"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("pyrandom")
    srv = lib.ServerProcess(lib.demo_args(*lib.detector_args(),
                                          "--gallery-store", f"sqlite:{work / 'gallery.db'}"),
                            str(work), name="demo_pyclient")
    srv.start()
    yield srv
    srv.stop()


def model_info_calls(server):
    return server.metrics().sum("arcface_requests_total", rpc="GetModelInfo")


def test_demo_weights_are_named_on_every_verdict_from_one_model_info(demo_server):
    before = model_info_calls(demo_server)
    with ArcFaceClient(f"127.0.0.1:{demo_server.grpc_port}", timeout=120) as c:
        r = c.compare([SINGLE], [MULTI, SINGLE], threshold=0.4)
        sim, same = r  # still the pair it always was
        assert isinstance(r, Comparison) and r.random_weights is True
        assert sim.shape == (1, 2) and same.shape == (1, 2) and same[0, 1]
        assert r.similarity is sim and r.matches is same
        assert NOTE in repr(r) and "random_weights=True" in repr(r)
        assert c.compare([SINGLE], [SINGLE]).random_weights is True

        found = c.detect(MULTI, embed=True)
        assert found.random_weights is True and "random_weights=True" in repr(found)
        # The detector's own answer is no model verdict.
        assert c.detect(MULTI).random_weights is False
        c.enroll("someone", [found.faces[0].embedding], gallery="random")
        ident = c.identify([found.faces[1].embedding], gallery="random")
        assert ident.random_weights is True and "random_weights=True" in repr(ident)
        streamed = list(c.detect_stream([MULTI], gallery="random"))
        assert streamed[0].random_weights is True and streamed[0].faces[0].candidates
        assert c.random_weights is True
    # Asked once for the whole client, not per call.
    assert model_info_calls(demo_server) - before == 1


def test_weights_from_a_file_are_not_flagged(client):
    crop = np.full((112, 112, 3), 90, np.uint8)
    r = client.compare([crop], [crop], threshold=0.4)
    assert r.random_weights is False and client.random_weights is False
    assert "random weights:" not in repr(r) and "random_weights=False" in repr(r)
