"""64 client threads at once, each with its own single-face request: every answer is its own
input's embedding (never another caller's), batches form (mean > 1) within the limit, and the
counters account for every call exactly."""

import threading

import grpc
import numpy as np

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb

THREADS = 64


def _variants(crops, count, taken):
    """Deterministic distinct crops derived from the golden crops (flips, rotations, channel
    orders, inversion, shifts), none equal to a crop already taken."""
    transforms = [
        lambda c: c[:, ::-1], lambda c: c[::-1], lambda c: np.rot90(c, 1), lambda c: 255 - c,
        lambda c: c[:, :, ::-1], lambda c: np.roll(c, 17, axis=1), lambda c: np.rot90(c, 2),
        lambda c: np.roll(c, 29, axis=0),
    ]
    out = []
    seen = set(taken)
    for t in transforms:
        for c in crops:
            v = np.ascontiguousarray(t(c))
            key = v.tobytes()
            if key in seen:
                continue
            seen.add(key)
            out.append(v)
            if len(out) == count:
                return out
    raise AssertionError("not enough distinct variants")


def test_64_concurrent_callers(r50_server, goldens):
    server = r50_server
    r50 = goldens.cases_of("r50")
    # Inputs with golden references: every r50 case (crops exact, photos resampled).
    items = [(f"golden:{c['name']}", goldens.face(c), goldens.embedding(c), c["tolerance"])
             for c in r50]
    crops = [goldens.crop_u8(c) for c in r50 if c["input"]["kind"] == "crop"]
    # The rest: variants of the golden crops, whose reference is the same crop sent alone.
    variants = _variants(crops, THREADS - len(items), {c.tobytes() for c in crops})
    for i, v in enumerate(variants):
        alone = server.embed([lib.raw_face(v)], request_id=f"alone-{i}").embeddings[0]
        items.append((f"variant:{i}", lib.raw_face(v), np.asarray(alone.values), "same"))
    assert len(items) == THREADS
    assert len({it[1].SerializeToString() for it in items}) == THREADS, "inputs not distinct"

    before = server.metrics()
    log_lines = len(server.log_text().splitlines())
    results = [None] * THREADS
    barrier = threading.Barrier(THREADS)

    def call(i):
        barrier.wait(timeout=60)
        try:
            results[i] = server.stub.Embed(
                pb.EmbedRequest(faces=[items[i][1]], request_id=f"caller-{i}"), timeout=120)
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=call, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
        assert not t.is_alive(), "a caller hung"

    ok = [i for i, r in enumerate(results) if isinstance(r, pb.EmbedResponse)]
    rejected = [i for i, r in enumerate(results)
                if isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    others = [(i, r.code(), r.details()) for i, r in enumerate(results)
              if i not in ok and i not in rejected]
    assert not others, f"calls neither OK nor RESOURCE_EXHAUSTED: {others}"
    assert len(ok) + len(rejected) == THREADS
    # The default queue (4096 crops) holds every one of these calls.
    assert len(ok) == THREADS, f"{len(rejected)} rejected with an ample queue"

    for i in ok:
        name, _, ref, tolerance = items[i]
        resp = results[i]
        assert resp.request_id == f"caller-{i}"
        assert len(resp.embeddings) == 1
        emb = resp.embeddings[0]
        if tolerance == "same":
            got = np.asarray(emb.values, np.float64)
            diff = float(np.max(np.abs(got - ref)))
            assert diff <= 1e-5 * np.linalg.norm(ref), f"{name}: alone vs under load {diff:.3g}"
        else:
            lib.check_embedding(emb, ref, tolerance, name)

    def settled():
        m = server.metrics()
        return m if m.get("arcface_faces_total") - before.get("arcface_faces_total") >= len(ok) \
            and m.get("arcface_requests_total", 0.0, rpc="Embed", code="OK") - \
            before.get("arcface_requests_total", 0.0, rpc="Embed", code="OK") >= len(ok) \
            and m.histogram("arcface_batch_size")["sum"] \
            - before.histogram("arcface_batch_size")["sum"] >= len(ok) else None

    after = lib.wait_until(settled, 5, what="the counters to account for every call and batch")
    assert after.get("arcface_faces_total") - before.get("arcface_faces_total") == len(ok)
    assert (after.get("arcface_requests_total", 0.0, rpc="Embed", code="OK")
            - before.get("arcface_requests_total", 0.0, rpc="Embed", code="OK")) == len(ok)
    assert (after.get("arcface_rejected_total", 0.0, reason="queue_full")
            - before.get("arcface_rejected_total", 0.0, reason="queue_full")) == len(rejected)

    h0 = before.histogram("arcface_batch_size")
    h1 = after.histogram("arcface_batch_size")
    limit = float(lib.R50_MAX_BATCH)
    assert limit in h1["buckets"], f"no bucket le={limit}: {sorted(h1['buckets'])}"
    batches = h1["count"] - h0["count"]
    faces = h1["sum"] - h0["sum"]
    # Every face of the load went through the model once, in batches within the limit.
    assert faces == len(ok)
    assert h1["buckets"][limit] - h0["buckets"][limit] == batches, "a batch above the limit"
    assert 0 < batches < len(ok)
    assert faces / batches > 1, f"mean batch {faces / batches}"
    assert after.get("arcface_queue_depth") == 0
    # No per-request lines at the default (info) level.
    assert len(server.log_text().splitlines()) == log_lines, server.log_tail(20)
