"""Python client of the ArcFace embedding service (arcface.v1.FaceEmbedding, FaceGallery).

    PYTHONPATH=<build>/python:client/python python3 -c 'import arcface_client'

``ArcFaceClient``: NumPy in, NumPy out (embed, compare, model_info, embed_stream, wait_ready),
the server's face detector (detect, detect_stream: Detection of DetectedFace),
and the face gallery (enroll, identify, forget, list_subjects, gallery_info), whose results are
the dataclasses Enrollment, Identification (of Candidate), ForgetResult, Subject, GalleryInfo.
``compare`` returns a ``Comparison`` (the pair similarity, matches). ``random_weights`` on the
client, and on a Comparison, Identification or Detection, is True when the server runs random
(demo) weights: then no cosine, match or identity says anything about who is who.
``reload_models``: the server re-reads its models' files (a server with ``--admin-rpc``), one
``ModelReload`` per model.
``RemoteArcFace``: a drop-in for py-feat's ArcFace torch module (torch imported lazily).
``ArcFaceError``: every failed call, with ``.code`` (grpc.StatusCode) and ``.details``.
"""

from ._admin import ModelReload  # noqa: F401
from ._client import (DEFAULT_MAX_FACES_PER_REQUEST, ArcFaceClient, ArcFaceError,  # noqa: F401
                      Comparison, FaceSpec)
from ._detect import DetectedFace, Detection  # noqa: F401
from ._gallery import (Candidate, Enrollment, ForgetResult, GalleryInfo,  # noqa: F401
                       GalleryLimits, Identification, Subject)
from ._remote import RemoteArcFace  # noqa: F401  (imports torch only when instantiated)

__all__ = ["ArcFaceClient", "ArcFaceError", "Comparison", "FaceSpec", "RemoteArcFace",
           "DEFAULT_MAX_FACES_PER_REQUEST", "Candidate", "Enrollment", "ForgetResult",
           "GalleryInfo", "GalleryLimits", "Identification", "Subject", "DetectedFace",
           "Detection", "ModelReload"]
__version__ = "0.1.0"
