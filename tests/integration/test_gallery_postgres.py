"""Two arcface-server replicas sharing one PostgreSQL gallery store (--gallery-store
postgres://...): a write acknowledged by one is identified by the other within a second, and an
outage of the database stops writes (UNAVAILABLE, with the reason) but not Identify, which goes
on answering from memory; when the database comes back the replicas catch up.

The database is a throwaway PostgreSQL 15 cluster that the test starts itself
(tests/gallery/pg_cluster.py: initdb + postgres as an unprivileged user on a free loopback port).
The replicas run the demo weights; the faces are given as embeddings (random unit vectors), so
the scores are exact and nothing waits on the model.
"""

import os
import sys
import time

import grpc
import numpy as np
import pytest

import arcface_testlib as lib
from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_gallery_pb2 as gpb
from arcface.v1 import face_gallery_pb2_grpc as gpb_grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "gallery"))
import pg_cluster  # noqa: E402

GALLERY = "staff"


@pytest.fixture
def cluster():
    with pg_cluster.PgCluster() as c:
        yield c


def unit_vectors(n, seed):
    v = np.random.default_rng(seed).standard_normal((n, lib.EMBEDDING_DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def probe(vector):
    return pb.Probe(embedding=pb.Embedding(values=[float(x) for x in vector]))


class Replica:
    def __init__(self, server):
        self.server = server
        self.gallery = gpb_grpc.FaceGalleryStub(server.channel)

    def enroll(self, subject, vectors, **kw):
        return self.gallery.Enroll(gpb.EnrollRequest(
            gallery=GALLERY, subject_id=subject, faces=[probe(v) for v in vectors], **kw),
            timeout=30)

    def identify(self, vector, top_k=1):
        """The top candidates' subject ids for one probe; [] when the gallery is not there."""
        try:
            r = self.gallery.Identify(gpb.IdentifyRequest(
                gallery=GALLERY, probes=[probe(vector)], top_k=top_k), timeout=30)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return []
            raise
        return [c.subject_id for c in r.results[0].candidates]

    def forget(self, subject):
        return self.gallery.Forget(gpb.ForgetRequest(gallery=GALLERY, subject_id=subject),
                                   timeout=30)


def start_replicas(start_server, uri):
    return [Replica(start_server(lib.demo_args("--gallery-store", uri), name=name))
            for name in ("replica_a", "replica_b")]


def wait_seen(replica, vector, subject, timeout, present=True):
    """Seconds until `replica` identifies `vector` as `subject` (or no longer, present=False)."""
    start = time.monotonic()
    lib.wait_until(lambda: (subject in replica.identify(vector)) == present, timeout,
                   interval=0.002, what=f"{subject} {'on' if present else 'gone from'} "
                                        f"{replica.server.name}")
    return time.monotonic() - start


def store_up(replica):
    """The replica's gallery-store gauge on /metrics (1 reachable, 0 down)."""
    return replica.server.metrics().get("arcface_gallery_store_up")


def test_a_write_on_one_replica_reaches_the_other(cluster, start_server):
    a, b = start_replicas(start_server, cluster.uri)
    vectors = unit_vectors(8, seed=1)

    delays = []
    for i in range(5):
        subject = f"person-{i}"
        response = a.enroll(subject, vectors[i:i + 1])
        assert response.subject_id == subject and len(response.face_ids) == 1
        delays.append(wait_seen(b, vectors[i], subject, timeout=5))
    delays.sort()
    print(f"\n[measure] Enroll acknowledged by A -> identified by B: median "
          f"{delays[2] * 1e3:.1f} ms, max {delays[-1] * 1e3:.1f} ms (5 enrollments)")
    assert delays[-1] < 1.0, delays

    # Forget on B: gone on A.
    assert b.forget("person-0").faces_removed == 1
    gone = wait_seen(a, vectors[0], "person-0", timeout=5, present=False)
    print(f"[measure] Forget acknowledged by B -> gone from A after {gone * 1e3:.1f} ms")
    assert gone < 1.0
    info_a = a.gallery.GetGalleryInfo(gpb.GetGalleryInfoRequest(gallery=GALLERY), timeout=10)
    info_b = b.gallery.GetGalleryInfo(gpb.GetGalleryInfoRequest(gallery=GALLERY), timeout=10)
    assert (info_a.version, info_a.num_faces, info_a.num_subjects) == (6, 4, 4)
    assert (info_b.version, info_b.num_faces, info_b.num_subjects) == (6, 4, 4)
    assert info_a.store.startswith("postgres://") and "@127.0.0.1:" in info_a.store


def test_database_outage_stops_writes_not_identify_and_replicas_catch_up(cluster, start_server):
    # B connects as a role of its own: NOLOGIN keeps it from reconnecting after the restart
    # (live sessions are not touched), so what A writes meanwhile can reach B only through its
    # catch-up once it is back, never through a notification.
    cluster.sql("CREATE ROLE replica_b LOGIN SUPERUSER")
    a = Replica(start_server(lib.demo_args("--gallery-store", cluster.uri), name="replica_a"))
    b = Replica(start_server(lib.demo_args("--gallery-store", cluster.uri_as("replica_b")),
                             name="replica_b"))
    vectors = unit_vectors(4, seed=2)
    a.enroll("before", vectors[0:1])
    wait_seen(b, vectors[0], "before", timeout=5)
    assert store_up(a) == 1 and store_up(b) == 1

    cluster.sql("ALTER ROLE replica_b NOLOGIN")
    cluster.stop()
    # Writes: UNAVAILABLE, naming why (libpq's reason), within the connect timeout.
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        a.enroll("during", vectors[1:2])
    took = time.monotonic() - start
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert "Connection refused" in refused.value.details(), refused.value.details()
    print(f"\n[measure] Enroll while PostgreSQL is down: UNAVAILABLE after {took * 1e3:.0f} ms: "
          f"{refused.value.details()}")
    assert took < 5
    # Identify goes on from memory, on both; /metrics and the log say the store is down.
    assert a.identify(vectors[0]) == ["before"]
    assert b.identify(vectors[0]) == ["before"]
    lib.wait_until(lambda: store_up(a) == 0 and store_up(b) == 0, 10, what="store_up 0")
    assert "is down" in b.server.log_text()

    # Back, but not for B: A writes (on a new connection); B keeps failing to log in and goes
    # on answering from memory without the new face.
    cluster.start()
    lib.wait_until(lambda: _enrolled(a, "meanwhile", vectors[2:3]), 10, interval=0.05,
                   what="an Enroll on A after the restart")
    lib.wait_until(lambda: store_up(a) == 1, 10, what="A's store_up 1")
    assert store_up(b) == 0
    assert b.identify(vectors[2]) != ["meanwhile"]

    # B may log in again: it reconnects and catches up.
    cluster.sql("ALTER ROLE replica_b LOGIN")
    allowed = time.monotonic()
    seen = wait_seen(b, vectors[2], "meanwhile", timeout=10)
    print(f"[measure] B allowed back in -> identifies what A enrolled meanwhile after "
          f"{seen:.2f} s (its reconnect backoff is at most 2 s)")
    lib.wait_until(lambda: store_up(b) == 1, 10, what="B's store_up 1")
    assert time.monotonic() - allowed < 5
    assert b.identify(vectors[0]) == ["before"]
    info = b.gallery.GetGalleryInfo(gpb.GetGalleryInfoRequest(gallery=GALLERY), timeout=10)
    assert (info.version, info.num_faces) == (2, 2)


def _enrolled(replica, subject, vectors):
    try:
        replica.enroll(subject, vectors, request_id=f"{subject}-once")
        return True
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False
