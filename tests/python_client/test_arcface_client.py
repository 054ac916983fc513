"""arcface_client (client/python) against a real server with the golden r50 weights: the
embeddings of ArcFaceClient and RemoteArcFace equal the reference goldens of tests/reference."""

import pathlib
import sys

import cv2
import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from conftest import MAX_FACES

from arcface_client import ArcFaceClient, ArcFaceError, FaceSpec, RemoteArcFace

CROPS = [f"crop_{n}" for n in ("uniform_0", "gaussian_1", "smooth_2", "gradient_3", "stripes_4",
                               "face_like_5", "saltpepper_6", "photo_area_7")]
MIN_COS = {"exact": 0.99999, "resampled": 0.9999}


def cosine_rows(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def assert_matches(got, cases, what, min_cos=None):
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == (len(cases), 512), (what, got.shape)
    for row, case in zip(got, cases):
        ref = lib.Goldens.embedding(case)
        c = lib.cosine(row, ref)
        need = min_cos or MIN_COS[case["tolerance"]]
        assert c >= need, f"{what} {case['name']}: cosine {c:.7f} < {need}"
        # raw embeddings: the norm is the reference's too
        assert abs(np.linalg.norm(row) - np.linalg.norm(ref)) <= 0.01 * np.linalg.norm(ref)


def read_rgb(path):
    bgr = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_import_without_torch():
    # torch is only for RemoteArcFace: importing the package must not pull it in.
    import subprocess

    code = "import sys, arcface_client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_model_info_and_wait_ready(client, goldens):
    assert client.wait_ready(30)
    info = client.model_info()
    assert info["arch"] == "r50"
    assert info["embedding_dim"] == 512 and info["input_size"] == 112
    assert info["weights_sha256"] == goldens.models["r50"]["sha256"]
    assert info["max_faces_per_request"] == MAX_FACES
    assert info["batching"]["max_batch_size"] == 8
    assert client.max_faces_per_request == MAX_FACES


def test_embed_crops_split_over_requests(target, goldens):
    cases = [goldens.cases[n] for n in CROPS]
    crops = [goldens.crop_u8(c) for c in cases]
    # 8 crops, the server takes 4 per request: the client reads that lazily and splits.
    with ArcFaceClient(target, timeout=120) as c:
        got = c.embed(crops)
        assert c.max_faces_per_request == MAX_FACES
    assert_matches(got, cases, "embed(crops)")
    # an explicit smaller limit: uneven chunks, still in order
    with ArcFaceClient(target, timeout=120, max_faces_per_request=3) as c:
        got3 = c.embed(crops[:5])
    assert_matches(got3, cases[:5], "embed(crops, 3 per request)")


def test_embed_normalize(client, goldens):
    case = goldens.cases["crop_face_like_5"]
    got = client.embed([goldens.crop_u8(case)], normalize=True)
    assert abs(np.linalg.norm(got[0]) - 1.0) < 1e-5
    assert lib.cosine(got[0], lib.Goldens.embedding(case)) >= 0.99999


def test_embed_photos_paths_bytes_arrays(client, goldens):
    whole = goldens.cases["whole_single_face"]
    box = goldens.cases["box_multi_p2"]
    align = goldens.cases["align_single_face"]
    gray = goldens.cases["whole_BWPictureHuman_gray"]
    whole_path = goldens.image_path(whole)
    box_path = goldens.image_path(box)
    images = [
        whole_path,                                   # str path
        pathlib.Path(whole_path),                     # Path
        lib.read_bytes(whole_path),                   # encoded bytes
        read_rgb(whole_path),                         # HxWx3 uint8 RGB
        box_path,                                     # with a box
        lib.read_bytes(goldens.image_path(align)),    # with landmarks
        cv2.imread(goldens.image_path(gray), cv2.IMREAD_GRAYSCALE),  # HxW → GRAY8
    ]
    boxes = [None, None, None, None, box["input"]["box"], None, None]
    landmarks = [None, None, None, None, None, align["input"]["landmarks"], None]
    got = client.embed(images, landmarks=landmarks, boxes=boxes)
    assert_matches(got, [whole, whole, whole, whole, box, align, gray], "embed(photos)")


def test_embed_face_spec_and_empty(client, goldens):
    box = goldens.cases["box_multi_p3"]
    got = client.embed([FaceSpec(goldens.image_path(box), box=box["input"]["box"])])
    assert_matches(got, [box], "FaceSpec")
    empty = client.embed([])
    assert empty.shape == (0, 512) and empty.dtype == np.float32


def test_remote_arcface_matches_goldens(target, goldens):
    import torch

    cases = [goldens.cases[n] for n in CROPS[:6]]
    crops = np.stack([goldens.crop_u8(c) for c in cases])        # [N, 112, 112, 3] uint8
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0  # [N, 3, 112, 112] in [0, 1]
    with RemoteArcFace(target, timeout=120) as model:
        model = model.eval()
        out = model(x)
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float32 and tuple(out.shape) == (len(cases), 512)
        assert out.device == x.device
        assert_matches(out.numpy(), cases, "RemoteArcFace", min_cos=0.9999)
        # the conversion is exact for u8 / 255
        np.testing.assert_array_equal(RemoteArcFace.to_uint8_images(x), crops)
        # .forward is the same; a single [3, H, W] image works too
        one = model.forward(x[0])
        assert tuple(one.shape) == (1, 512)
        assert lib.cosine(one[0].numpy(), out[0].numpy()) >= 0.99999


def test_compare_equals_golden_cosines(client, goldens):
    q_cases = [goldens.cases[n] for n in CROPS[:3]]
    r_cases = [goldens.cases[n] for n in CROPS[3:5]]
    q_ref = np.stack([lib.Goldens.embedding(c) for c in q_cases])
    r_ref = np.stack([lib.Goldens.embedding(c) for c in r_cases])
    expected = cosine_rows(q_ref, r_ref)

    # faces (3 + 2 > 4 per request: the client embeds them first, split)
    sim, matches = client.compare([goldens.crop_u8(c) for c in q_cases],
                                  [goldens.crop_u8(c) for c in r_cases])
    assert sim.dtype == np.float32 and sim.shape == (3, 2)
    np.testing.assert_allclose(sim, expected, atol=1e-4)
    # No threshold given: the model's own (ArcFace's 0.4, from GetModelInfo).
    assert client.default_threshold == pytest.approx(0.4)
    np.testing.assert_array_equal(matches, sim >= np.float32(0.4))

    # embeddings as given, with a threshold between the values
    thr = float(np.median(expected))
    sim2, matches2 = client.compare(q_ref.astype(np.float32), list(r_ref.astype(np.float32)),
                                    threshold=thr)
    np.testing.assert_allclose(sim2, expected, atol=1e-5)
    np.testing.assert_array_equal(matches2, sim2 >= thr)

    # a face and an embedding in one call (within the per-request limit)
    sim3, _ = client.compare([goldens.crop_u8(q_cases[0])], [r_ref[0].astype(np.float32)])
    np.testing.assert_allclose(sim3, expected[:1, :1], atol=1e-4)


def test_undecodable_image_is_invalid_argument(client, goldens):
    with pytest.raises(ArcFaceError) as e:
        client.embed([goldens.crop_u8(goldens.cases["crop_uniform_0"]), b"not an image"])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details
    assert "INVALID_ARGUMENT" in str(e.value)
    with pytest.raises(ArcFaceError) as e:
        client.compare([b"\x89PNG broken"], [np.ones(512, np.float32)])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(TypeError):
        client.embed([np.zeros((112, 112, 3), np.float32)])


def test_unreachable_server_is_unavailable(tmp_path):
    port = lib.free_port()
    with ArcFaceClient(f"127.0.0.1:{port}", timeout=5, max_faces_per_request=8) as c:
        with pytest.raises(ArcFaceError) as e:
            c.embed([np.zeros((112, 112, 3), np.uint8)])
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert not c.wait_ready(0.5)


def test_embed_stream_in_order(client, goldens):
    cases = [goldens.cases[n] for n in CROPS[:4]]
    crops = [goldens.crop_u8(c) for c in cases]

    def frames():  # a generator, like a video reader
        yield crops[0]
        yield crops[1]
        yield [crops[2], crops[3]]   # a frame with two faces
        yield crops[3]

    out = list(client.embed_stream(frames()))
    assert [o.shape for o in out] == [(512,), (512,), (2, 512), (512,)]
    assert_matches(np.stack([out[0], out[1], out[2][0], out[2][1], out[3]]),
                   [cases[0], cases[1], cases[2], cases[3], cases[3]], "embed_stream")


def test_embed_stream_errors(client, goldens):
    crop = goldens.crop_u8(goldens.cases["crop_smooth_2"])
    items = [crop, b"garbage", crop]
    out = list(client.embed_stream(iter(items), errors="yield"))
    assert len(out) == 3
    assert isinstance(out[1], ArcFaceError) and out[1].code == grpc.StatusCode.INVALID_ARGUMENT
    assert lib.cosine(out[0], out[2]) >= 0.99999
    with pytest.raises(ArcFaceError) as e:
        list(client.embed_stream(iter(items)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_tls_credentials(tmp_path, goldens):
    """credentials=grpc.ssl_channel_credentials(...) reaches a TLS server (a small demo-weights
    one: only the channel is under test)."""
    work = str(tmp_path)
    ca_pem, _ = lib.make_ca(work, "ca")
    cert, key = lib.make_leaf(work, "server", "ca", "serverAuth", san="IP:127.0.0.1,DNS:localhost")
    root = lib.read_bytes(ca_pem)
    srv = lib.ServerProcess(lib.demo_args("--tls-cert", cert, "--tls-key", key,
                                          "--warmup-batch-size", "1"),
                            work, name="tls", tls={"root": root})
    srv.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        with ArcFaceClient(f"localhost:{srv.grpc_port}", timeout=60, credentials=creds) as c:
            assert c.wait_ready(30)
            assert c.model_info()["demo_weights"] is True
            got = c.embed([goldens.crop_u8(goldens.cases["crop_uniform_0"])])
            assert got.shape == (1, 512) and np.all(np.isfinite(got))
        # the same server refuses a plaintext client
        with ArcFaceClient(f"localhost:{srv.grpc_port}", timeout=5,
                           max_faces_per_request=1) as plain:
            with pytest.raises(ArcFaceError) as e:
                plain.embed([goldens.crop_u8(goldens.cases["crop_uniform_0"])])
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()
