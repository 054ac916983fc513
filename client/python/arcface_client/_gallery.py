"""The typed results of ArcFaceClient's gallery calls (arcface.v1.FaceGallery), made from the
response messages; plain frozen dataclasses, no gRPC objects kept."""

import re
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Candidate", "Enrollment", "ForgetResult", "GalleryInfo", "GalleryLimits",
           "Identification", "Subject"]


@dataclass(frozen=True)
class GalleryLimits:
    """The server's gallery limits (its flags), from GetModelInfo or GalleryInfo."""

    enabled: bool = False  # False: --gallery-store none, the gallery calls are UNIMPLEMENTED
    store: str = ""
    max_faces_per_enroll: int = 0
    max_probes_per_identify: int = 0
    max_top_k: int = 0
    approximate_min_faces: int = 0  # galleries this large are searched by HNSW (0: never)

    @classmethod
    def from_proto(cls, m):
        return cls(m.enabled, m.store, m.max_faces_per_enroll, m.max_probes_per_identify,
                   m.max_top_k, m.approximate_min_faces)


@dataclass(frozen=True)
class Enrollment:
    """What Enroll added: one face id per face given, in order."""

    subject_id: str
    face_ids: tuple
    gallery_version: int


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    face_id: str  # the subject's best-matching face
    similarity: float  # cosine


@dataclass(frozen=True)
class Identification:
    """The answer for all probes of an ``identify`` call: ``results[i]`` holds probe i's
    candidates (distinct subjects, similarity descending; empty when none qualifies)."""

    results: tuple  # of tuples of Candidate
    model_id: str
    gallery_version: int
    # True when the server runs random (demo) weights: the candidates are no identity verdict.
    random_weights: bool = False
    # The similarity the candidates were cut at: the one asked for, else the gallery's model's
    # default_threshold (ArcFace 0.4, dlib 0.9144); None when none applied (embeddings of a
    # model of a family the server does not know).
    threshold: Optional[float] = None

    def best(self):
        """Each probe's best candidate, or None where it has none."""
        return [r[0] if r else None for r in self.results]


@dataclass(frozen=True)
class ForgetResult:
    faces_removed: int
    gallery_version: int


@dataclass(frozen=True)
class Subject:
    subject_id: str
    num_faces: int
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GalleryInfo:
    gallery: str
    model_id: str  # the model the gallery is bound to (its first enrollment's)
    num_subjects: int
    num_faces: int
    version: int
    store: str  # e.g. "sqlite:/var/lib/arcface/gallery.db" (never a password)
    index: str  # "flat" (exact) or "hnsw(M=32)"
    limits: GalleryLimits

    @classmethod
    def from_proto(cls, m):
        return cls(m.gallery, m.model_id, m.num_subjects, m.num_faces, m.version, m.store,
                   m.index, GalleryLimits.from_proto(m.limits))


_INDEXED = re.compile(r"^(faces?|probes?) (\d+)")


def shift_index(details, offset):
    """The server names a face or probe by its index within one request ("faces 3: ..."); a
    call the client split into several requests names it by its index in the caller's list."""
    if not offset:
        return details
    return _INDEXED.sub(lambda m: f"{m.group(1)} {int(m.group(2)) + offset}", details, count=1)
