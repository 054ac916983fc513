"""Python client of the ArcFace embedding service (arcface.v1.FaceEmbedding).

    PYTHONPATH=<build>/python:client/python python3 -c 'import arcface_client'

``ArcFaceClient``: NumPy in, NumPy out (embed, compare, model_info, embed_stream, wait_ready).
``RemoteArcFace``: a drop-in for py-feat's ArcFace torch module (torch imported lazily).
``ArcFaceError``: every failed call, with ``.code`` (grpc.StatusCode) and ``.details``.
"""

from ._client import (DEFAULT_MAX_FACES_PER_REQUEST, ArcFaceClient, ArcFaceError,  # noqa: F401
                      FaceSpec)
from ._remote import RemoteArcFace  # noqa: F401  (imports torch only when instantiated)

__all__ = ["ArcFaceClient", "ArcFaceError", "FaceSpec", "RemoteArcFace",
           "DEFAULT_MAX_FACES_PER_REQUEST"]
__version__ = "0.1.0"
