"""A table of malformed requests: each gets the right code and a message naming the face and the
reason, within seconds; the server stays SERVING and the next valid call is still correct."""

import re
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
QUICK_S = 5.0  # "within seconds"


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bytes(width, height, idat):
    """A PNG with a valid IHDR (8-bit RGB) and CRCs, whatever the IDAT holds."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def truncated_jpeg():
    """A real JPEG cut just before its frame header (SOFn), so its size cannot be known."""
    with open(lib.TEST_DATA + "/single_face.jpg", "rb") as f:
        data = f.read()
    pos = 2
    while True:  # walk the marker segments (the file is well formed)
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return data[:pos + 4]  # the marker and its length, not the size fields
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]


def good_face():
    rng = np.random.default_rng(11)
    return lib.raw_face(rng.integers(0, 256, (lib.CROP, lib.CROP, 3), dtype=np.uint8))


def encoded(data):
    return pb.Face(image=pb.Image(encoded=data))


def with_landmarks(points):
    face = good_face()
    face.landmarks.extend(pb.Point(x=x, y=y) for x, y in points)
    return face


def with_box(x0, y0, x1, y1):
    face = good_face()
    face.box.CopyFrom(pb.Box(x_min=x0, y_min=y0, x_max=x1, y_max=y1))
    return face


LANDMARKS = [(38.3, 51.7), (73.5, 51.5), (56.0, 71.7), (41.5, 92.4), (70.7, 92.2)]
NAN = float("nan")
INF = float("inf")


def embed_bad(face):
    """A two-face request whose face 1 is the bad one."""
    return "Embed", pb.EmbedRequest(faces=[good_face(), face])


def compare_bad(query_values):
    good = pb.Probe(embedding=pb.Embedding(values=[1.0] * lib.EMBEDDING_DIM))
    bad = pb.Probe(embedding=pb.Embedding(values=query_values))
    return "Compare", pb.CompareRequest(queries=[good, bad], references=[good])


# id → (builder of (rpc, request), code, regexes the message must match, counted by the handler)
FACE1 = r"face\D{0,8}1(?!\d)"
PROBE1 = r"(quer(y|ies)\D{0,8}1(?!\d))"
CASES = {
    "undecodable_png_data": (lambda: embed_bad(encoded(png_bytes(16, 16, b"not zlib data"))),
                             INVALID, [FACE1, "undecodable|corrupt"], True),
    "random_bytes": (lambda: embed_bad(encoded(
        b"\0" + np.random.default_rng(5).integers(0, 256, 4095, dtype=np.uint8).tobytes())),
        INVALID, [FACE1, "undecodable|unrecognized|unsupported"], True),
    "truncated_jpeg": (lambda: embed_bad(encoded(truncated_jpeg())),
                       INVALID, [FACE1, "JPEG|jpeg", "truncated|malformed"], True),
    "png_header_100000x100000": (lambda: embed_bad(encoded(png_bytes(
        100000, 100000, zlib.compress(b"\0" * 64)))),
        INVALID, [FACE1, "100000x100000", "limit|cap"], True),
    "empty_encoded_image": (lambda: embed_bad(encoded(b"")), INVALID, [FACE1, "empty"], True),
    "no_image": (lambda: embed_bad(pb.Face()), INVALID, [FACE1, "empty|no image|missing"], True),
    "raw_over_pixel_cap": (lambda: embed_bad(lib.raw_face(
        np.zeros((2200, 2300), np.uint8), pb.GRAY8)),
        INVALID, [FACE1, "2300x2200", "limit|cap"], True),
    "raw_size_mismatch": (lambda: embed_bad(pb.Face(image=pb.Image(raw=pb.RawImage(
        width=112, height=112, format=pb.RGB8, data=b"\0" * (112 * 112 * 3 - 1))))),
        INVALID, [FACE1, str(112 * 112 * 3 - 1), str(112 * 112 * 3)], True),
    "raw_zero_width": (lambda: embed_bad(pb.Face(image=pb.Image(raw=pb.RawImage(
        width=0, height=112, format=pb.RGB8, data=b"")))),
        INVALID, [FACE1, "empty"], True),
    "raw_unknown_pixel_format": (lambda: embed_bad(pb.Face(image=pb.Image(raw=pb.RawImage(
        width=2, height=2, format=7, data=b"\0" * 12)))),
        INVALID, [FACE1, "format"], True),
    "landmarks_4": (lambda: embed_bad(with_landmarks(LANDMARKS[:4])),
                    INVALID, [FACE1, "5 landmarks|landmarks.*5"], True),
    "landmarks_6": (lambda: embed_bad(with_landmarks(LANDMARKS + [(1.0, 2.0)])),
                    INVALID, [FACE1, "5 landmarks|landmarks.*5"], True),
    "landmarks_not_finite": (lambda: embed_bad(with_landmarks(LANDMARKS[:2] + [(NAN, 71.7)]
                                                              + LANDMARKS[3:])),
                             INVALID, [FACE1, "not finite|finite"], True),
    "landmarks_degenerate": (lambda: embed_bad(with_landmarks([(50.0, 50.0)] * 5)),
                             INVALID, [FACE1, "degenerate"], True),
    "box_empty": (lambda: embed_bad(with_box(10.0, 10.0, 10.2, 60.0)),
                  INVALID, [FACE1, "empty"], True),
    "box_not_finite": (lambda: embed_bad(with_box(10.0, 10.0, INF, 60.0)),
                       INVALID, [FACE1, "not finite|finite"], True),
    "compare_embedding_dim_511": (lambda: compare_bad([0.5] * 511),
                                  INVALID, [PROBE1, "511", "512"], True),
    "compare_embedding_not_finite": (lambda: compare_bad([0.5] * 100 + [NAN] + [0.5] * 411),
                                     INVALID, [PROBE1, "finite"], True),
    "compare_empty_probe": (lambda: ("Compare", pb.CompareRequest(
        queries=[pb.Probe(embedding=pb.Embedding(values=[1.0] * lib.EMBEDDING_DIM)), pb.Probe()],
        references=[pb.Probe(embedding=pb.Embedding(values=[1.0] * lib.EMBEDDING_DIM))])),
        INVALID, [PROBE1, "neither|empty|no face"], True),
    "compare_embedding_zero_norm": (lambda: compare_bad([0.0] * lib.EMBEDDING_DIM),
                                    INVALID, [PROBE1, "zero"], True),
    "too_many_faces": (lambda: ("Embed", pb.EmbedRequest(
        faces=[good_face()] * (lib.R50_MAX_FACES + 1))),
        EXHAUSTED, [str(lib.R50_MAX_FACES + 1), str(lib.R50_MAX_FACES)], True),
    "faces_100000": (lambda: ("Embed", pb.EmbedRequest(faces=[
        pb.Face(image=pb.Image(raw=pb.RawImage(width=1, height=1, data=b"\0\0\0")))] * 100000)),
        EXHAUSTED, ["100000", str(lib.R50_MAX_FACES)], True),
    "compare_too_many_face_probes": (lambda: ("Compare", pb.CompareRequest(
        queries=[pb.Probe(face=good_face())] * 40,
        references=[pb.Probe(face=good_face())] * (lib.R50_MAX_FACES - 39))),
        EXHAUSTED, [str(lib.R50_MAX_FACES + 1), str(lib.R50_MAX_FACES)], True),
    # Refused by gRPC's receive limit (--max-message-bytes, 64 MiB by default) before any
    # handler runs; the message names the sizes.
    "message_100MiB": (lambda: embed_bad(pb.Face(image=pb.Image(raw=pb.RawImage(
        width=10240, height=10240, format=pb.GRAY8, data=b"\0" * (100 << 20))))),
        EXHAUSTED, ["larger than max|message.*large|too large"], False),
}


def _code_count(server, rpc, code):
    return server.metrics().get("arcface_requests_total", 0.0, rpc=rpc, code=code.name)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_request(r50_server, goldens, case):
    build, code, patterns, counted = CASES[case]
    rpc, request = build()
    before = _code_count(r50_server, rpc, code)
    before_internal = r50_server.metrics().sum("arcface_requests_total", code="INTERNAL")
    call = getattr(r50_server.stub, rpc)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)
    elapsed = time.monotonic() - t0
    assert err.value.code() == code, f"{case}: {err.value.code()} {err.value.details()!r}"
    assert elapsed < QUICK_S, f"{case}: took {elapsed:.2f} s"
    message = err.value.details() or ""
    for p in patterns:
        assert re.search(p, message), f"{case}: message {message!r} does not match {p!r}"

    # The server is still SERVING and answers the next valid call correctly.
    assert r50_server.health_status("") == lib.SERVING
    ref = goldens.cases["crop_uniform_0"]
    resp = r50_server.embed([goldens.face(ref)])
    lib.check_embedding(resp.embeddings[0], goldens.embedding(ref), "exact", "after " + case)

    if counted:  # the error was counted once, under its code; never as INTERNAL
        lib.wait_until(lambda: _code_count(r50_server, rpc, code) >= before + 1, 5,
                       what=f"arcface_requests_total{{rpc={rpc},code={code.name}}}")
        assert _code_count(r50_server, rpc, code) == before + 1
    assert r50_server.metrics().sum("arcface_requests_total", code="INTERNAL") == before_internal


def test_compare_matrix_cap(r50_server):
    """4097 × 4097 embedding probes exceed the default 4096 × 4096 cap: refused at once with a
    message naming the size."""
    probe = pb.Probe(embedding=pb.Embedding(values=[0.25] * lib.EMBEDDING_DIM))
    request = pb.CompareRequest(queries=[probe] * 4097, references=[probe] * 4097)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        r50_server.stub.Compare(request, timeout=60)
    assert time.monotonic() - t0 < QUICK_S * 2
    assert err.value.code() in (EXHAUSTED, INVALID), err.value.code()
    assert "4097" in err.value.details() and "4096" in err.value.details(), err.value.details()
    assert r50_server.health_status("") == lib.SERVING


def test_bad_requests_do_not_fail_others(r50_server, goldens):
    """Good and bad requests at the same time: every good one is answered correctly, every bad
    one gets INVALID_ARGUMENT (a failure in one request never fails another's crops)."""
    names = ["crop_gradient_3", "crop_stripes_4", "crop_saltpepper_6", "crop_photo_area_7"]
    bad = pb.EmbedRequest(faces=[encoded(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)])
    results = {}
    barrier = threading.Barrier(2 * len(names))

    def run(key, request):
        barrier.wait(timeout=30)
        try:
            results[key] = r50_server.stub.Embed(request, timeout=60)
        except grpc.RpcError as e:
            results[key] = e.code()

    threads = []
    for i, n in enumerate(names):
        threads.append(threading.Thread(target=run, args=(
            ("good", n), pb.EmbedRequest(faces=[goldens.face(goldens.cases[n])]))))
        threads.append(threading.Thread(target=run, args=(("bad", i), bad)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    for n in names:
        resp = results[("good", n)]
        assert isinstance(resp, pb.EmbedResponse), f"{n}: {resp}"
        lib.check_embedding(resp.embeddings[0], goldens.embedding(goldens.cases[n]), "exact", n)
    for i in range(len(names)):
        assert results[("bad", i)] == INVALID
