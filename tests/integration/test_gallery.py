"""The FaceGallery service on a real server with a real SQLite file: Identify against a numpy
brute-force scan, faces through the batcher, every bad input's code and message, the limits,
model binding, crash safety under kill -9, 32 concurrent clients, the metrics."""

import os
import random
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_gallery_pb2 as gpb
from arcface.v1 import face_gallery_pb2_grpc as gpb_grpc

DIM = 512


def unit_rows(n, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def emb_probe(v):
    return pb.Probe(embedding=pb.Embedding(values=[float(x) for x in v]))


def image_probe(path):
    with open(path, "rb") as f:
        return pb.Probe(face=pb.Face(image=pb.Image(encoded=f.read())))


def gallery_stub(server):
    return gpb_grpc.FaceGalleryStub(server.channel)


def sqlite_server(start_server, tmp_path, name="gallery", extra=()):
    db = os.path.join(str(tmp_path), f"{name}.db")
    server = start_server(lib.demo_args("--gallery-store", f"sqlite:{db}", *extra), name=name)
    return server, db


@pytest.fixture(scope="module")
def gallery_server(tmp_path_factory):
    servers = lib.ServerSet(str(tmp_path_factory.mktemp("gallery")))
    db = os.path.join(servers.workdir, "shared.db")
    server = servers(lib.demo_args("--gallery-store", f"sqlite:{db}", "--gallery-max-top-k", "20",
                                   "--gallery-max-faces-per-enroll", "16",
                                   "--gallery-max-probes", "64"), name="gallery")
    yield server
    servers.stop_all()


def code_of(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kw)
    return e.value.code(), e.value.details()


def brute_force(stored, probe, top_k, threshold):
    """stored: list of (subject, face_id, unit vector). Per subject its best face, best first."""
    best = {}
    for subject, face_id, v in stored:
        s = float(np.dot(probe.astype(np.float64), v.astype(np.float64)))
        if subject not in best or s > best[subject][1]:
            best[subject] = (face_id, s)
    ranked = sorted(((s, subject, face) for subject, (face, s) in best.items()), reverse=True)
    if threshold is not None:
        ranked = [r for r in ranked if r[0] >= threshold]
    return ranked[:top_k]


def enroll_random_gallery(stub, gallery, subjects, seed):
    rng = random.Random(seed)
    vectors = unit_rows(subjects * 6, seed)
    stored, at = [], 0
    for s in range(subjects):
        n = rng.randint(1, 5)
        rows = vectors[at:at + n]
        at += n
        r = stub.Enroll(gpb.EnrollRequest(gallery=gallery, subject_id=f"subject-{s:03d}",
                                          faces=[emb_probe(v) for v in rows]), timeout=30)
        assert r.subject_id == f"subject-{s:03d}" and len(r.face_ids) == n
        stored += [(r.subject_id, fid, v) for fid, v in zip(r.face_ids, rows)]
    return stored


def check_identify(stub, gallery, stored, probes, top_k, threshold, model_default):
    """threshold None: unset, so the server cuts at the gallery's model's `model_default`."""
    req = gpb.IdentifyRequest(gallery=gallery, probes=[emb_probe(p) for p in probes], top_k=top_k)
    if threshold is not None:
        req.threshold = threshold
    r = stub.Identify(req, timeout=30)
    applied = model_default if threshold is None else threshold
    assert r.HasField("threshold") and r.threshold == pytest.approx(applied, abs=1e-7)
    assert len(r.results) == len(probes)
    for i, (probe, result) in enumerate(zip(probes, r.results)):
        want = brute_force(stored, probe, max(top_k, 1), applied)
        got = [(c.similarity, c.subject_id, c.face_id) for c in result.candidates]
        assert len(got) == len(want), (i, top_k, threshold)
        for (gs, gsub, gface), (ws, wsub, wface) in zip(got, want):
            assert abs(gs - ws) < 1e-5, (i, gs, ws)
            # Ties aside: a different subject only where the similarities are equal.
            if gsub != wsub:
                assert abs(gs - ws) < 1e-6
            else:
                assert gface == wface
        assert all(a[0] >= b[0] for a, b in zip(got, got[1:]))
        assert len({c.subject_id for c in result.candidates}) == len(got)


def test_identify_equals_brute_force_with_thresholds_topk_and_forgets(gallery_server):
    stub = gallery_stub(gallery_server)
    stored = enroll_random_gallery(stub, "brute", 60, seed=3)
    default = gallery_server.stub.GetModelInfo(pb.GetModelInfoRequest(),
                                               timeout=30).default_threshold
    assert default == pytest.approx(0.4)  # ArcFace's
    # Random unit rows: cosines near 0 to each other, a few above 0.05, none at 0.4; the two
    # stored rows are 1 to themselves. -1 keeps every candidate.
    probes = np.concatenate([unit_rows(6, 77), np.stack([stored[5][2], stored[40][2]])])
    for top_k in (0, 1, 2, 5, 10):
        for threshold in (None, -1.0, 0.05, 0.999):
            check_identify(stub, "brute", stored, probes, top_k, threshold, default)
    # Forget a subject, then single faces (one of them its subject's last).
    gone = stored[5][0]
    r = stub.Forget(gpb.ForgetRequest(gallery="brute", subject_id=gone), timeout=30)
    assert r.faces_removed == sum(1 for s in stored if s[0] == gone)
    stored = [s for s in stored if s[0] != gone]
    singles = {}
    for s in stored:
        singles.setdefault(s[0], []).append(s)
    lone = next(v[0] for v in singles.values() if len(v) == 1)
    pair = next(v[0] for v in singles.values() if len(v) > 1)
    r = stub.Forget(gpb.ForgetRequest(gallery="brute", face_ids=[lone[1], pair[1]]), timeout=30)
    assert r.faces_removed == 2
    stored = [s for s in stored if s[1] not in (lone[1], pair[1])]
    for top_k in (1, 3, 10):
        for threshold in (None, -1.0, 0.05):
            check_identify(stub, "brute", stored, probes, top_k, threshold, default)
    listed = set()
    token = ""
    while True:
        page = stub.ListSubjects(gpb.ListSubjectsRequest(gallery="brute", page_size=7,
                                                         page_token=token), timeout=30)
        listed |= {s.subject_id for s in page.subjects}
        token = page.next_page_token
        if not token:
            break
    assert listed == {s[0] for s in stored}
    assert gone not in listed and lone[0] not in listed
    info = stub.GetGalleryInfo(gpb.GetGalleryInfoRequest(gallery="brute"), timeout=30)
    assert info.num_faces == len(stored) and info.num_subjects == len(listed)
    assert info.index == "flat" and info.store.startswith("sqlite:")


def test_faces_go_through_the_batcher_and_match_embed(gallery_server, goldens):
    stub = gallery_stub(gallery_server)
    path = os.path.join(lib.TEST_DATA, "single_face.jpg")
    before = gallery_server.metrics().sum("arcface_faces_total")
    r = stub.Enroll(gpb.EnrollRequest(gallery="photos", subject_id="single",
                                      faces=[image_probe(path)],
                                      labels={"source": "single_face.jpg"}), timeout=60)
    assert len(r.face_ids) == 1
    assert gallery_server.metrics().sum("arcface_faces_total") == before + 1
    embedded = gallery_server.embed([image_probe(path).face], normalize=True).embeddings[0]
    found = stub.Identify(gpb.IdentifyRequest(gallery="photos", probes=[emb_probe(embedded.values),
                                                                        image_probe(path)]),
                          timeout=60)
    for result in found.results:
        assert result.candidates[0].face_id == r.face_ids[0]
        assert result.candidates[0].similarity > 0.99999
    page = stub.ListSubjects(gpb.ListSubjectsRequest(gallery="photos"), timeout=30)
    assert page.subjects[0].labels["source"] == "single_face.jpg"


def test_request_id_makes_enroll_idempotent(gallery_server):
    stub = gallery_stub(gallery_server)
    v = unit_rows(2, 5)
    req = gpb.EnrollRequest(gallery="idem", subject_id="ann", faces=[emb_probe(x) for x in v],
                            request_id="upload-1")
    first = stub.Enroll(req, timeout=30)
    again = stub.Enroll(req, timeout=30)
    assert list(again.face_ids) == list(first.face_ids)
    assert again.gallery_version == first.gallery_version
    info = stub.GetGalleryInfo(gpb.GetGalleryInfoRequest(gallery="idem"), timeout=30)
    assert info.num_faces == 2
    code, details = code_of(stub.Enroll, gpb.EnrollRequest(
        gallery="idem", subject_id="bob", faces=[emb_probe(v[0])], request_id="upload-1"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "subject 'ann'" in details


def test_a_gallery_is_bound_to_its_first_model(gallery_server):
    stub = gallery_stub(gallery_server)
    served = gallery_server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_id
    v = unit_rows(1, 9)[0]
    stub.Enroll(gpb.EnrollRequest(gallery="bound", subject_id="a", faces=[emb_probe(v)]))
    other = "arcface-r100@0123456789ab"
    for call, req in [
        (stub.Enroll, gpb.EnrollRequest(gallery="bound", subject_id="b", faces=[emb_probe(v)],
                                        model_id=other)),
        (stub.Identify, gpb.IdentifyRequest(gallery="bound", probes=[emb_probe(v)],
                                            model_id=other)),
    ]:
        code, details = code_of(call, req)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert served in details and other in details
    # A gallery of the other model: the server's faces do not go into it.
    stub.Enroll(gpb.EnrollRequest(gallery="other-model", subject_id="x", faces=[emb_probe(v)],
                                  model_id=other))
    code, details = code_of(stub.Identify, gpb.IdentifyRequest(
        gallery="other-model", probes=[image_probe(os.path.join(lib.TEST_DATA,
                                                                "single_face.jpg"))]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and served in details and other in details
    r = stub.Identify(gpb.IdentifyRequest(gallery="other-model", probes=[emb_probe(v)],
                                          model_id=other))
    assert r.model_id == other and r.results[0].candidates[0].subject_id == "x"
    # Not served here, but of a served family: cut at ArcFace's threshold.
    assert r.HasField("threshold") and r.threshold == pytest.approx(0.4)
    # Faces and another model's embeddings in one call.
    code, details = code_of(stub.Enroll, gpb.EnrollRequest(
        gallery="other-model", subject_id="y", model_id=other,
        faces=[emb_probe(v), image_probe(os.path.join(lib.TEST_DATA, "single_face.jpg"))]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "separate calls" in details


V = [0.04] * DIM
GOOD = pb.Probe(embedding=pb.Embedding(values=V))
BAD_INPUTS = [
    ("Enroll", gpb.EnrollRequest(subject_id="", faces=[GOOD]), "INVALID_ARGUMENT",
     "subject_id is empty"),
    ("Enroll", gpb.EnrollRequest(subject_id="x" * 257, faces=[GOOD]), "INVALID_ARGUMENT",
     "subject_id: 257 bytes, the limit is 256"),
    ("Enroll", gpb.EnrollRequest(subject_id="tab\there", faces=[GOOD]), "INVALID_ARGUMENT",
     "subject_id: control character U+0009"),
    ("Enroll", gpb.EnrollRequest(gallery="g\x00", subject_id="a", faces=[GOOD]),
     "INVALID_ARGUMENT", "gallery: control character U+0000"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[]), "INVALID_ARGUMENT",
     "faces is empty"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[GOOD, pb.Probe(embedding=pb.Embedding(
        values=[1.0] * 3))]), "INVALID_ARGUMENT", "faces 1: embedding has 3 values, expected 512"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[pb.Probe(embedding=pb.Embedding(
        values=[float("nan")] + [0.1] * 511))]), "INVALID_ARGUMENT",
     "faces 0: embedding value 0 is not finite"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[pb.Probe(embedding=pb.Embedding(
        values=[0.0] * 512))]), "INVALID_ARGUMENT", "faces 0: embedding has zero norm"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[GOOD, pb.Probe()]), "INVALID_ARGUMENT",
     "faces 1: probe has neither a face nor an embedding"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[pb.Probe(face=pb.Face(
        image=pb.Image(encoded=b"not an image")))]), "INVALID_ARGUMENT", "faces 0:"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[GOOD] * 17), "RESOURCE_EXHAUSTED",
     "the limit is 16 (--gallery-max-faces-per-enroll)"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[GOOD], labels={"k": "v\n"}),
     "INVALID_ARGUMENT", "labels['k']: control character U+000A"),
    ("Enroll", gpb.EnrollRequest(subject_id="a", faces=[GOOD], request_id="r" * 300),
     "INVALID_ARGUMENT", "request_id: 300 bytes"),
    ("Identify", gpb.IdentifyRequest(probes=[]), "INVALID_ARGUMENT", "probes is empty"),
    ("Identify", gpb.IdentifyRequest(gallery="no-such-gallery", probes=[GOOD]), "NOT_FOUND",
     "gallery 'no-such-gallery' does not exist"),
    ("Identify", gpb.IdentifyRequest(probes=[GOOD], top_k=21), "INVALID_ARGUMENT",
     "top_k is 21, the limit is 20 (--gallery-max-top-k)"),
    ("Identify", gpb.IdentifyRequest(probes=[GOOD], top_k=4294967295), "INVALID_ARGUMENT",
     "top_k is 4294967295"),
    ("Identify", gpb.IdentifyRequest(probes=[GOOD], threshold=float("inf")), "INVALID_ARGUMENT",
     "threshold is not finite"),
    ("Identify", gpb.IdentifyRequest(probes=[GOOD] * 65), "RESOURCE_EXHAUSTED",
     "the limit is 64 (--gallery-max-probes)"),
    ("Identify", gpb.IdentifyRequest(probes=[GOOD, pb.Probe(embedding=pb.Embedding(
        values=[1.0] * 513))]), "INVALID_ARGUMENT", "probes 1: embedding has 513 values"),
    ("Forget", gpb.ForgetRequest(), "INVALID_ARGUMENT", "nothing to forget"),
    ("Forget", gpb.ForgetRequest(subject_id="nobody"), "NOT_FOUND", "subject 'nobody'"),
    ("Forget", gpb.ForgetRequest(face_ids=["ok", ""]), "INVALID_ARGUMENT", "face_ids 1 is empty"),
    ("Forget", gpb.ForgetRequest(face_ids=["0" * 32]), "NOT_FOUND", "face '" + "0" * 32 + "'"),
    ("Forget", gpb.ForgetRequest(gallery="no-such-gallery", subject_id="a"), "NOT_FOUND",
     "gallery 'no-such-gallery' does not exist"),
    ("ListSubjects", gpb.ListSubjectsRequest(page_token="garbage!"), "INVALID_ARGUMENT",
     "page_token is not one this server gave"),
    ("ListSubjects", gpb.ListSubjectsRequest(gallery="no-such-gallery"), "NOT_FOUND",
     "does not exist"),
    ("GetGalleryInfo", gpb.GetGalleryInfoRequest(gallery="no-such-gallery"), "NOT_FOUND",
     "does not exist"),
    ("GetGalleryInfo", gpb.GetGalleryInfoRequest(gallery="\u0085"), "INVALID_ARGUMENT",
     "control character U+0085"),
]


@pytest.mark.parametrize("rpc,request_msg,code,text", BAD_INPUTS,
                         ids=[f"{i}-{b[0]}-{b[2]}" for i, b in enumerate(BAD_INPUTS)])
def test_bad_input_gets_its_code_and_names_what_is_wrong(gallery_server, rpc, request_msg, code,
                                                         text):
    stub = gallery_stub(gallery_server)
    # The default gallery exists (the NOT_FOUND cases name other galleries).
    stub.Enroll(gpb.EnrollRequest(subject_id="anchor", faces=[GOOD], request_id="anchor"))
    got, details = code_of(getattr(stub, rpc), request_msg, timeout=30)
    assert got.name == code, details
    assert text in details
    # The server is unharmed: the next call works.
    assert stub.GetGalleryInfo(gpb.GetGalleryInfoRequest(), timeout=30).num_faces >= 1


def test_limits_are_reported(gallery_server):
    info = gallery_server.stub.GetModelInfo(pb.GetModelInfoRequest()).gallery
    assert info.enabled and info.store.startswith("sqlite:")
    assert (info.max_faces_per_enroll, info.max_probes_per_identify, info.max_top_k) == (16, 64, 20)
    stub = gallery_stub(gallery_server)
    stub.Enroll(gpb.EnrollRequest(subject_id="anchor", faces=[GOOD], request_id="anchor"))
    assert stub.GetGalleryInfo(gpb.GetGalleryInfoRequest()).limits == info


def test_without_a_store_the_gallery_says_how_to_enable_it(start_server):
    server = start_server(lib.demo_args(), name="nogallery")
    stub = gallery_stub(server)
    code, details = code_of(stub.Identify, gpb.IdentifyRequest(probes=[GOOD]))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "--gallery-store sqlite:PATH" in details
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest()).gallery
    assert not info.enabled and info.store == "none"


def test_deadline_and_cancellation_while_faces_are_embedded(gallery_server):
    stub = gallery_stub(gallery_server)
    path = os.path.join(lib.TEST_DATA, "multi_face.jpg")
    code, _ = code_of(stub.Enroll, gpb.EnrollRequest(subject_id="late",
                                                     faces=[image_probe(path)] * 16),
                      timeout=0.001)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    future = stub.Identify.future(gpb.IdentifyRequest(probes=[image_probe(path)] * 16))
    future.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    # Nothing of the dead Enroll was written.
    page = stub.ListSubjects(gpb.ListSubjectsRequest(page_size=1000), timeout=30)
    assert "late" not in {s.subject_id for s in page.subjects}


def test_32_clients_enrolling_and_identifying_lose_and_duplicate_nothing(gallery_server):
    stub = gallery_stub(gallery_server)
    stub.Enroll(gpb.EnrollRequest(gallery="busy", subject_id="seed", faces=[GOOD]))
    acknowledged, errors, lock = {}, [], threading.Lock()
    per_thread = 6

    def enroller(t):
        vectors = unit_rows(per_thread * 2, 1000 + t)
        for i in range(per_thread):
            rows = vectors[2 * i:2 * i + 2]
            try:
                r = stub.Enroll(gpb.EnrollRequest(gallery="busy", subject_id=f"t{t}-{i % 2}",
                                                  faces=[emb_probe(v) for v in rows]),
                                timeout=60)
            except grpc.RpcError as e:
                errors.append(e)
                continue
            with lock:
                for fid, v in zip(r.face_ids, rows):
                    acknowledged[fid] = (r.subject_id, v)

    def identifier(t):
        probes = unit_rows(4, 5000 + t)
        for _ in range(6):
            try:
                r = stub.Identify(gpb.IdentifyRequest(gallery="busy", probes=[
                    emb_probe(p) for p in probes], top_k=5), timeout=60)
                for res in r.results:
                    subjects = [c.subject_id for c in res.candidates]
                    assert len(subjects) == len(set(subjects))
            except grpc.RpcError as e:
                errors.append(e)

    threads = [threading.Thread(target=enroller, args=(t,)) for t in range(16)]
    threads += [threading.Thread(target=identifier, args=(t,)) for t in range(16)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[:3]
    assert len(acknowledged) == 16 * per_thread * 2
    info = stub.GetGalleryInfo(gpb.GetGalleryInfoRequest(gallery="busy"), timeout=30)
    assert info.num_faces == len(acknowledged) + 1
    assert info.version == 16 * per_thread + 1  # one version per acknowledged Enroll
    # Every acknowledged face is found as itself.
    items = list(acknowledged.items())
    for at in range(0, len(items), 64):
        chunk = items[at:at + 64]
        r = stub.Identify(gpb.IdentifyRequest(gallery="busy", probes=[
            emb_probe(v) for _, (_, v) in chunk]), timeout=60)
        for (fid, (subject, _)), res in zip(chunk, r.results):
            assert res.candidates[0].face_id == fid and res.candidates[0].subject_id == subject


def test_metrics_follow_the_galleries(gallery_server):
    stub = gallery_stub(gallery_server)
    stub.Enroll(gpb.EnrollRequest(gallery="metered", subject_id="a", faces=[GOOD, GOOD]))
    stub.Identify(gpb.IdentifyRequest(gallery="metered", probes=[GOOD, GOOD, GOOD]))
    m = gallery_server.metrics()
    assert m.get("arcface_gallery_faces", gallery="metered") == 2
    assert m.get("arcface_gallery_subjects", gallery="metered") == 1
    assert m.get("arcface_gallery_store_up") == 1
    assert m.histogram("arcface_gallery_identify_search_seconds")["count"] >= 1
    m.get("arcface_gallery_load_seconds")  # present (raises when not)
    assert m.get("arcface_requests_total", rpc="Identify", code="OK") >= 1


def stored_faces(db):
    con = sqlite3.connect(db)
    try:
        return {row[0]: row[1] for row in con.execute(
            "SELECT face_id, request_id FROM faces WHERE removed_version IS NULL")}
    finally:
        con.close()


def test_kill_9_loses_no_acknowledged_enrollment_and_leaves_no_torn_write(start_server, tmp_path):
    """Enrollments of 3 faces each, acknowledged one by one; the server is killed (SIGKILL) at a
    random moment, restarted, and the one call in flight is retried with its request_id. Then
    the store holds exactly the acknowledged faces, each request's 3 or none of them."""
    db = os.path.join(str(tmp_path), "crash.db")
    args = lib.demo_args("--gallery-store", f"sqlite:{db}")
    acknowledged = {}  # face_id -> request_id
    rng = random.Random(42)
    counter = 0
    for round_ in range(4):
        server = start_server(args, name=f"crash{round_}")
        stub = gallery_stub(server)
        # The call in flight when the last round's server died: retried, acknowledged now.
        if round_ > 0 and pending is not None:
            r = stub.Enroll(pending, timeout=30)
            for fid in r.face_ids:
                acknowledged[fid] = pending.request_id
        pending = None
        stop = threading.Event()
        box = {}

        def enroll_loop():
            nonlocal counter
            while not stop.is_set():
                counter += 1
                req = gpb.EnrollRequest(subject_id=f"s{counter % 5}", request_id=f"req-{counter}",
                                        faces=[emb_probe(v) for v in unit_rows(3, counter)])
                box["pending"] = req
                try:
                    r = stub.Enroll(req, timeout=30)
                except grpc.RpcError:
                    return
                for fid in r.face_ids:
                    acknowledged[fid] = req.request_id
                box["pending"] = None

        th = threading.Thread(target=enroll_loop)
        th.start()
        time.sleep(rng.uniform(0.3, 1.5))
        server.kill()
        stop.set()
        th.join()
        start_server.forget(server)
        pending = box.get("pending")
    server = start_server(args, name="crash-final")
    stub = gallery_stub(server)
    if pending is not None:
        r = stub.Enroll(pending, timeout=30)
        for fid in r.face_ids:
            acknowledged[fid] = pending.request_id
    assert len(acknowledged) >= 3 * 4, "too few enrollments to mean anything"
    info = stub.GetGalleryInfo(gpb.GetGalleryInfoRequest(), timeout=30)
    assert info.num_faces == len(acknowledged)
    server.stop()
    start_server.forget(server)
    stored = stored_faces(db)
    assert set(stored) == set(acknowledged)
    per_request = {}
    for fid, req in stored.items():
        per_request[req] = per_request.get(req, 0) + 1
    assert set(per_request.values()) == {3}
