"""ArcFaceClient's gallery calls (enroll, identify, forget, list_subjects, gallery_info) against
a real arcface-server with the golden r50 weights and a SQLite store on a real file. The server's
limits are small (3 faces per Enroll, 2 probes per Identify) so that the client's splitting of
long lists, and its renumbering of a bad face across requests, are exercised. Answers are
checked against a brute-force numpy scan of the same embeddings."""

import grpc
import numpy as np
import pytest

import arcface_testlib as lib

from arcface_client import (ArcFaceClient, ArcFaceError, Candidate, Enrollment, FaceSpec,
                            GalleryInfo, Identification, Subject)

MAX_ENROLL = 3
MAX_PROBES = 2
MAX_TOP_K = 10
CROPS = ["crop_face_like_5", "crop_photo_area_7", "crop_gradient_3", "crop_smooth_2"]


@pytest.fixture(scope="module")
def gallery_server(tmp_path_factory, goldens):
    work = tmp_path_factory.mktemp("pygallery")
    srv = lib.ServerProcess([
        "--weights", goldens.model_path("r50"),
        "--device", "cpu", "--threads", str(lib.THREADS),
        "--max-batch-size", "8",
        "--gallery-store", f"sqlite:{work / 'gallery.db'}",
        "--gallery-max-faces-per-enroll", str(MAX_ENROLL),
        "--gallery-max-probes", str(MAX_PROBES),
        "--gallery-max-top-k", str(MAX_TOP_K),
        "--drain-timeout", "20",
    ], str(work), name="r50_pygallery")
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def gc(gallery_server):
    with ArcFaceClient(f"127.0.0.1:{gallery_server.grpc_port}", timeout=120) as c:
        yield c


def unit_rows(rng, n):
    x = rng.standard_normal((n, lib.EMBEDDING_DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(probes, faces, top_k, threshold=None):
    """faces: (subject_id, face_id, vector) rows. Per probe: [(subject, face, cosine)] of the
    best face of each subject, by cosine descending, top_k of them, at or above threshold."""
    out = []
    for p in probes:
        best = {}
        for subject, face, v in faces:
            c = float(np.dot(p, v) / (np.linalg.norm(p) * np.linalg.norm(v)))
            if subject not in best or c > best[subject][1]:
                best[subject] = (face, c)
        ranked = sorted(((s, f, c) for s, (f, c) in best.items()), key=lambda t: -t[2])
        if threshold is not None:
            ranked = [r for r in ranked if r[2] >= threshold]
        out.append(ranked[:top_k])
    return out


def assert_same_ranking(got, expected, what):
    assert len(got) == len(expected), what
    for i, (g, e) in enumerate(zip(got, expected)):
        assert [c.subject_id for c in g] == [s for s, _, _ in e], f"{what} probe {i}"
        assert [c.face_id for c in g] == [f for _, f, _ in e], f"{what} probe {i}"
        np.testing.assert_allclose([c.similarity for c in g], [c for _, _, c in e], atol=1e-5,
                                   err_msg=f"{what} probe {i}")


def enroll_random(client, gallery, rng, counts):
    """Enrolls counts[s] random unit vectors for subject s-<i>; returns the (subject, face_id,
    vector) rows."""
    rows = []
    for i, n in enumerate(counts):
        vectors = unit_rows(rng, n)
        e = client.enroll(f"s-{i}", vectors, gallery=gallery)
        assert isinstance(e, Enrollment) and e.subject_id == f"s-{i}"
        assert len(e.face_ids) == n and len(set(e.face_ids)) == n
        rows += [(f"s-{i}", f, v) for f, v in zip(e.face_ids, vectors)]
    return rows


def test_model_info_reports_the_gallery_limits(gc):
    g = gc.model_info()["gallery"]
    assert g["enabled"] is True and g["store"].startswith("sqlite:")
    assert (g["max_faces_per_enroll"], g["max_probes_per_identify"], g["max_top_k"]) == (
        MAX_ENROLL, MAX_PROBES, MAX_TOP_K)
    assert gc.gallery_limits.max_faces_per_enroll == MAX_ENROLL


def test_identify_equals_a_brute_force_scan(gc):
    rng = np.random.default_rng(13)
    # 7 faces for one subject: three Enroll requests of at most 3.
    faces = enroll_random(gc, "bf", rng, [1, 7, 2, 3, 1, 4])
    versions = gc.gallery_info("bf").version
    # Probes near some faces, and random ones; 5 probes: three Identify requests of at most 2.
    probes = np.stack([faces[3][2] + 0.05 * unit_rows(rng, 1)[0], faces[9][2],
                       *unit_rows(rng, 3)]).astype(np.float32)
    for top_k in (1, 3, MAX_TOP_K):
        got = gc.identify(probes, gallery="bf", top_k=top_k, threshold=-1)  # every candidate
        assert isinstance(got, Identification) and got.gallery_version == versions
        assert got.model_id == gc.model_info()["model_id"] and got.threshold == -1
        assert_same_ranking(got.results, brute_force(probes, faces, top_k), f"top_k {top_k}")
    best = got.best()[1]
    assert best.face_id == faces[9][1] and best.similarity == pytest.approx(1, abs=1e-5)
    threshold = 0.06
    got = gc.identify(probes, gallery="bf", top_k=5, threshold=threshold)
    expected = brute_force(probes, faces, 5, threshold)
    assert any(len(e) < 5 for e in expected), "the threshold must cut something"
    assert_same_ranking(got.results, expected, "threshold")
    assert got.threshold == pytest.approx(threshold)
    # None: the server cuts at the model's own (ArcFace 0.4), which only the near probes reach.
    got = gc.identify(probes, gallery="bf", top_k=5)
    assert got.threshold == pytest.approx(gc.default_threshold) == pytest.approx(0.4)
    expected = brute_force(probes, faces, 5, gc.default_threshold)
    assert [len(e) for e in expected] == [1, 1, 0, 0, 0]
    assert_same_ranking(got.results, expected, "the model's threshold")
    # top_k 0 means 1
    assert [len(r) for r in gc.identify(probes[:1], gallery="bf", top_k=0).results] == [1]


def test_faces_given_as_images_are_embedded_by_the_server(gc, goldens):
    cases = [goldens.cases[n] for n in CROPS]
    crops = [goldens.crop_u8(c) for c in cases]
    e = gc.enroll("alice", [crops[0], FaceSpec(crops[1])], gallery="photos",
                  labels={"team": "red"})
    bob = gc.enroll("bob", [crops[2]], gallery="photos")
    got = gc.identify([crops[1], crops[3]], gallery="photos", top_k=2, threshold=-1)
    # The same crop finds its own face; the server's embedding of the others decides the rest.
    first = got.results[0][0]
    assert (first.subject_id, first.face_id) == ("alice", e.face_ids[1])
    assert first.similarity == pytest.approx(1.0, abs=1e-4)
    emb = gc.embed(crops)
    rows = [("alice", e.face_ids[0], emb[0]), ("alice", e.face_ids[1], emb[1]),
            ("bob", bob.face_ids[0], emb[2])]
    expected = brute_force(emb[[1, 3]], rows, 2)
    assert ([[c.subject_id for c in r] for r in got.results]
            == [[s for s, _, _ in r] for r in expected])
    for g, x in zip(got.results, expected):
        np.testing.assert_allclose([c.similarity for c in g], [c for _, _, c in x], atol=1e-4)
    # a face from a path, with its golden's box
    box = goldens.cases["box_multi_p2"]
    gc.enroll("carol", [FaceSpec(goldens.image_path(box), box=box["input"]["box"])],
              gallery="photos")
    hit = gc.identify([lib.Goldens.embedding(box).astype(np.float32)], gallery="photos")
    assert hit.results[0][0].subject_id == "carol" and hit.results[0][0].similarity > 0.999


def test_forget_faces_then_the_subject(gc):
    rng = np.random.default_rng(7)
    faces = enroll_random(gc, "fg", rng, [3, 2])
    before = gc.gallery_info("fg")
    assert (before.num_subjects, before.num_faces) == (2, 5)
    # one face of s-0: that face no longer answers, the rest still do
    gone = faces[0]
    r = gc.forget("s-0", face_ids=[gone[1]], gallery="fg")
    assert r.faces_removed == 1 and r.gallery_version > before.version
    rest = faces[1:]
    got = gc.identify(np.stack([gone[2]]), gallery="fg", top_k=2, threshold=-1)
    assert gone[1] not in [c.face_id for c in got.results[0]]
    assert_same_ranking(got.results, brute_force([gone[2]], rest, 2), "after forgetting a face")
    # the whole subject s-0
    r = gc.forget("s-0", gallery="fg")
    assert r.faces_removed == 2
    got = gc.identify(np.stack([faces[1][2]]), gallery="fg", top_k=MAX_TOP_K, threshold=-1)
    assert {c.subject_id for c in got.results[0]} == {"s-1"}
    assert [s.subject_id for s in gc.list_subjects("fg")] == ["s-1"]
    # a subject whose last face goes is gone
    last = [f for s, f, _ in faces if s == "s-1"]
    assert gc.forget(face_ids=last, gallery="fg").faces_removed == 2
    info = gc.gallery_info("fg")
    assert (info.num_subjects, info.num_faces) == (0, 0)
    with pytest.raises(TypeError):
        gc.forget("s-1", face_ids="one-id", gallery="fg")


def test_list_subjects_pages_through_everything_with_labels(gc):
    rng = np.random.default_rng(3)
    names = [f"p{i:02d}" for i in range(8)]
    for n in reversed(names):
        gc.enroll(n, unit_rows(rng, 1 + (n == "p03")), gallery="pages", labels={"name": n})
    gc.enroll("p05", unit_rows(rng, 1), gallery="pages", labels={"team": "blue"})
    subjects = list(gc.list_subjects("pages", page_size=3))  # three pages
    assert all(isinstance(s, Subject) for s in subjects)
    assert [s.subject_id for s in subjects] == names
    by_id = {s.subject_id: s for s in subjects}
    assert [by_id[n].num_faces for n in ("p00", "p03", "p05")] == [1, 2, 2]
    # labels: the keys given replace their values, the others are kept
    assert by_id["p05"].labels == {"name": "p05", "team": "blue"}
    assert [s.subject_id for s in gc.list_subjects("pages")] == names


def test_gallery_info(gc, gallery_server):
    rng = np.random.default_rng(5)
    enroll_random(gc, "info", rng, [2, 1])
    info = gc.gallery_info("info")
    assert isinstance(info, GalleryInfo)
    assert (info.gallery, info.num_subjects, info.num_faces) == ("info", 2, 3)
    assert info.model_id == gc.model_info()["model_id"]
    assert info.store.startswith("sqlite:") and info.store.endswith("gallery.db")
    assert info.index == "flat"
    assert info.limits.enabled and info.limits.max_faces_per_enroll == MAX_ENROLL
    assert info.version >= 2
    # "" is "default"
    gc.enroll("d", unit_rows(rng, 1))
    assert gc.gallery_info().gallery == "default"
    assert [s.subject_id for s in gc.list_subjects("default")] == ["d"]


def test_request_id_makes_enroll_idempotent_also_when_split(gc):
    rng = np.random.default_rng(11)
    five = unit_rows(rng, 5)  # two Enroll requests
    a = gc.enroll("idem", five, gallery="idem", request_id="batch-1")
    b = gc.enroll("idem", five, gallery="idem", request_id="batch-1")
    assert a.face_ids == b.face_ids and len(a.face_ids) == 5
    assert gc.gallery_info("idem").num_faces == 5
    c = gc.enroll("idem", five[:1], gallery="idem")  # no key: added
    assert c.face_ids[0] not in a.face_ids
    assert gc.gallery_info("idem").num_faces == 6


def test_bad_inputs_are_named(gc):
    rng = np.random.default_rng(1)
    good = unit_rows(rng, 5)
    with pytest.raises(ArcFaceError) as e:
        gc.identify(good[:1], gallery="never-enrolled")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "never-enrolled" in e.value.details

    bad = good.copy()
    bad[4, 7] = np.nan  # the 5th face: the second request's second face
    with pytest.raises(ArcFaceError) as e:
        gc.enroll("nan", bad, gallery="bad", request_id="nan-1")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("faces 4"), e.value.details

    probes = good.copy()
    probes[2, 0] = np.inf  # the second request's first probe
    gc.enroll("ok", good[:1], gallery="bad")
    with pytest.raises(ArcFaceError) as e:
        gc.identify(probes, gallery="bad")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("probes 2"), e.value.details

    for subject in ("", "x" * 257, "tab\there"):
        with pytest.raises(ArcFaceError) as e:
            gc.enroll(subject, good[:1], gallery="bad")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, subject
    with pytest.raises(ArcFaceError) as e:
        gc.enroll("short", [np.ones(128, np.float32)], gallery="bad")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "faces 0" in e.value.details
    with pytest.raises(ArcFaceError) as e:
        gc.enroll("other-model", good[:1], gallery="bad", model_id="some-other-model")
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "some-other-model" in e.value.details
    # Of the split call with a NaN, the first request (3 faces) was stored, as documented;
    # every other failed call stored nothing.
    assert gc.gallery_info("bad").num_faces == MAX_ENROLL + 1


def test_without_a_store_the_gallery_is_unimplemented(tmp_path):
    srv = lib.ServerProcess(lib.demo_args("--gallery-store", "none"), str(tmp_path),
                            name="nogallery")
    srv.start()
    try:
        with ArcFaceClient(f"127.0.0.1:{srv.grpc_port}", timeout=60) as c:
            assert c.model_info()["gallery"]["enabled"] is False
            with pytest.raises(ArcFaceError) as e:
                c.enroll("x", [np.ones(512, np.float32)])
            assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
            assert "--gallery-store" in e.value.details
            with pytest.raises(ArcFaceError) as e:
                list(c.list_subjects())
            assert e.value.code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        srv.stop()


def test_candidate_is_a_plain_value():
    c = Candidate("s", "f", 0.5)
    assert c == Candidate("s", "f", 0.5) and hash(c) == hash(Candidate("s", "f", 0.5))
    with pytest.raises(Exception):
        c.similarity = 1.0
