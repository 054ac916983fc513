"""The typed results of ArcFaceClient.detect and detect_stream (Detect, DetectStream of
arcface.v1.FaceEmbedding), made from the response messages: plain values and NumPy arrays, no
gRPC objects kept; and the request they send, checked before it goes."""

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ._gallery import Candidate

__all__ = ["DetectedFace", "Detection"]


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One face found in a frame, in the frame's pixels as sent.

    ``landmarks``: float32 [5, 2], (x, y) of the left eye, right eye, nose tip, left and right
    mouth corners: the order ``embed(..., landmarks=...)`` and ``FaceSpec`` take.
    ``embedding``: float32 [512] with ``embed`` or a ``gallery`` (unit length with
    ``normalize``), else None; ``norm``: the raw vector's L2 norm (0 without one).
    ``candidates``: with a ``gallery``, the best-matching subjects (``Candidate``), similarity
    descending; empty when none qualified.
    """

    box: tuple  # (x_min, y_min, x_max, y_max)
    score: float  # the detector's confidence, in [0, 1]
    landmarks: np.ndarray
    embedding: object = None
    norm: float = 0.0
    candidates: tuple = ()

    @property
    def identity(self):
        """The best candidate's subject_id, or None."""
        return self.candidates[0].subject_id if self.candidates else None


@dataclass(frozen=True, eq=False)
class Detection:
    """The faces of one frame, by score descending, and what found them."""

    faces: tuple  # of DetectedFace
    width: int  # the frame as the server decoded it
    height: int
    detector_id: str
    model_id: str  # the embedding model, with embed or a gallery; else ""
    request_id: str
    # True when that model runs random (demo) weights: the embeddings and identities are no
    # identity verdict (the boxes and landmarks come from the detector's trained weights).
    random_weights: bool = False
    # With a gallery: the similarity the candidates were cut at (the one asked for, else the
    # model's default_threshold); else None.
    threshold: Optional[float] = None

    def embeddings(self):
        """float32 [n, 512]: the faces' embeddings (ValueError when they were not asked for)."""
        if any(f.embedding is None for f in self.faces):
            raise ValueError("detect() was called without embed=True or a gallery")
        if not self.faces:
            return np.zeros((0, 512), np.float32)
        return np.stack([f.embedding for f in self.faces])


def detection_from_proto(resp, random_weights=False):
    faces = []
    for f in resp.faces:
        embedding = None
        if f.HasField("embedding"):
            embedding = np.asarray(f.embedding.values, np.float32)
        faces.append(DetectedFace(
            box=(f.box.x_min, f.box.y_min, f.box.x_max, f.box.y_max),
            score=f.score,
            landmarks=np.asarray([(p.x, p.y) for p in f.landmarks], np.float32).reshape(-1, 2),
            embedding=embedding,
            norm=f.embedding.norm if embedding is not None else 0.0,
            candidates=tuple(Candidate(c.subject_id, c.face_id, c.similarity)
                             for c in f.identification.candidates)))
    return Detection(tuple(faces), resp.image_width, resp.image_height, resp.detector_id,
                     resp.model_id, resp.request_id, random_weights,
                     resp.threshold if resp.HasField("threshold") else None)


def _count(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if value > 0xFFFFFFFF:
        raise ValueError(f"{name} must fit in 32 bits, got {value!r}")
    return int(value)


def _number(name, value, low=None, high=None):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bounds}, got {value!r}")
    return v


def detect_fields(min_score, max_faces, embed, normalize, gallery, top_k, threshold,
                  min_face_size):
    """The DetectRequest fields but the image and request_id, checked: ValueError naming the
    argument that is wrong."""
    if not isinstance(gallery, str):
        raise ValueError(f"gallery must be a gallery name (str), got {gallery!r}")
    if not gallery and (top_k or threshold is not None):
        raise ValueError("top_k and threshold need a gallery")
    fields = dict(min_score=_number("min_score", min_score, 0.0, 1.0),
                  max_faces=_count("max_faces", max_faces),
                  embed=bool(embed), normalize=bool(normalize), gallery=gallery,
                  top_k=_count("top_k", top_k),
                  min_face_size=_number("min_face_size", min_face_size, 0.0))
    if threshold is not None:
        fields["threshold"] = _number("threshold", threshold)
    return fields
