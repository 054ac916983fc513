"""ArcFaceClient: a thin, NumPy-native client of arcface.v1.FaceEmbedding and
arcface.v1.FaceGallery (and arcface.v1.ModelAdmin's reloads).

Needs the stubs the build generates (``<build>/python`` on PYTHONPATH: ``arcface.v1`` and
``grpc_health_v1``), Debian's ``python3-grpcio`` and ``python3-numpy``. Nothing here imports
OpenCV or torch.
"""

import json
import os
import socket
import threading
import time
import uuid

import grpc
import numpy as np

from arcface.v1 import face_embedding_pb2 as pb
from arcface.v1 import face_embedding_pb2_grpc as pb_grpc
from arcface.v1 import face_gallery_pb2 as gpb
from arcface.v1 import face_gallery_pb2_grpc as gpb_grpc

from ._admin import ModelReload
from ._detect import detect_fields, detection_from_proto
from ._gallery import (Candidate, Enrollment, ForgetResult, GalleryInfo, GalleryLimits,
                       Identification, Subject, shift_index)

try:  # the health stubs are generated next to arcface.v1; wait_ready needs them
    from grpc_health_v1 import health_pb2, health_pb2_grpc
except ImportError:  # pragma: no cover
    health_pb2 = health_pb2_grpc = None

__all__ = ["ArcFaceClient", "ArcFaceError", "FaceSpec", "DEFAULT_MAX_FACES_PER_REQUEST"]

EMBEDDING_DIM = 512
DEFAULT_MAX_FACES_PER_REQUEST = 256  # the server's default --max-faces-per-request
DEFAULT_TIMEOUT = 60.0

# gRPC's Python default caps received messages at 4 MiB; the server has its own limit
# (ModelInfo.max_message_bytes), which is the one a large request should meet.
DEFAULT_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


DEFAULT_RETRIES = 5


# Retried on UNAVAILABLE: every call but Forget, whose repetition would report 0 faces removed
# for faces the first attempt removed, and ReloadModels, whose repetition would report UNCHANGED
# a model the first attempt reloaded. Enroll is safe to repeat: it always carries a request_id
# (the caller's, else one made per call), with which the server adds the faces only once.
_RETRIED = [{"service": "arcface.v1.FaceEmbedding"}, {"service": "grpc.health.v1.Health"}] + [
    {"service": "arcface.v1.FaceGallery", "method": m}
    for m in ("Enroll", "Identify", "ListSubjects", "GetGalleryInfo")]


def _service_config(retries):
    """Channel service config: round_robin, and (retries > 1) gRPC's retry of UNAVAILABLE."""
    config = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 1:
        config["methodConfig"] = [{
            "name": _RETRIED,
            "retryPolicy": {"maxAttempts": int(min(retries, 5)), "initialBackoff": "0.2s",
                            "maxBackoff": "5s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]},
        }]
    return json.dumps(config)


def _channel_target(target):
    """One server: the target as given. Several ("h1:p1,h2:p2" or a list): an ipv4:/ipv6:
    target of their addresses, resolved now (IPv4 preferred per name)."""
    addresses = target.split(",") if isinstance(target, str) else list(target)
    addresses = [a.strip() for a in addresses]
    if len(addresses) == 1:
        return addresses[0]
    resolved = []
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{address!r} is not host:port")
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
        v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
        for ip in v4 or v6:
            entry = f"{ip}:{port}" if ip in v4 else f"[{ip}]:{port}"
            if entry not in resolved:
                resolved.append(entry)
    families = {e.startswith("[") for e in resolved}
    if len(families) != 1:
        raise ValueError(f"cannot mix IPv4 and IPv6 servers in one target: {resolved}")
    return ("ipv6:" if families == {True} else "ipv4:") + ",".join(resolved)


class ArcFaceError(Exception):
    """A failed call. ``code`` is the ``grpc.StatusCode`` (e.g. ``INVALID_ARGUMENT`` for an
    undecodable image, ``UNAVAILABLE`` when the server cannot be reached), ``details`` the
    server's message."""

    def __init__(self, code, details, method=""):
        self.code = code
        self.details = details or ""
        self.method = method
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        where = f"{method}: " if method else ""
        super().__init__(f"{where}{name}: {self.details}")

    @classmethod
    def from_rpc_error(cls, err, method=""):
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code, details, method)


def _status_code(value):
    """grpc.StatusCode of a numeric code (EmbedResponse.error.code)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN


class FaceSpec:
    """One face to embed: an image with optional 5 landmarks or a box, for the places that
    take one item per face (``embed_stream``, ``compare``).

    ``image``: a file path (``str`` / ``os.PathLike``), encoded bytes (JPEG, PNG, BMP, WebP,
    TIFF), or a uint8 array (HxWx3 RGB, HxWx4 RGBA — alpha dropped —, HxW or HxWx1 gray).
    ``landmarks``: 5 (x, y) pixel points: left eye, right eye, nose, left and right mouth
    corner; the face is aligned to the ArcFace template. ``box``: (x_min, y_min, x_max, y_max)
    pixels, cropped and resized. Neither: the whole image is the crop (resized to 112x112).
    """

    __slots__ = ("image", "landmarks", "box")

    def __init__(self, image, landmarks=None, box=None):
        self.image = image
        self.landmarks = landmarks
        self.box = box


def _image_message(image):
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return pb.Image(encoded=f.read())
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (got {image.dtype}); "
                            "scale floats to 0..255 first")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim == 2:
            fmt = pb.GRAY8
        elif image.ndim == 3 and image.shape[2] in (3, 4):
            image = image[:, :, :3]
            fmt = pb.RGB8
        else:
            raise ValueError(f"image arrays must be HxWx3 RGB or HxW gray, got {image.shape}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            raise ValueError(f"empty image array {image.shape}")
        data = np.ascontiguousarray(image).tobytes()
        return pb.Image(raw=pb.RawImage(width=w, height=h, format=fmt, data=data))
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, "
                    "encoded bytes or a uint8 numpy array")


def _face_message(image, landmarks=None, box=None):
    if isinstance(image, pb.Face):
        return image
    if isinstance(image, FaceSpec):
        image, landmarks, box = image.image, image.landmarks, image.box
    face = pb.Face(image=_image_message(image))
    if landmarks is not None:
        pts = np.asarray(landmarks, np.float64).reshape(-1, 2)
        face.landmarks.extend(pb.Point(x=float(x), y=float(y)) for x, y in pts)
    if box is not None:
        b = [float(v) for v in np.asarray(box, np.float64).reshape(-1)]
        if len(b) != 4:
            raise ValueError(f"a box is (x_min, y_min, x_max, y_max), got {box!r}")
        face.box.CopyFrom(pb.Box(x_min=b[0], y_min=b[1], x_max=b[2], y_max=b[3]))
    return face


def _is_single_image(images):
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, pb.Image,
                               pb.Face, FaceSpec)) or (
        isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim in (2, 3)
        and not (images.ndim == 3 and images.shape[2] not in (1, 3, 4)))


def _per_face(values, n, what):
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{len(values)} {what} for {n} images")
    return values


def _embeddings_array(embeddings, dim=None):
    if not embeddings:
        return np.zeros((0, dim or EMBEDDING_DIM), np.float32)
    return np.asarray([e.values for e in embeddings], np.float32)


class Comparison(tuple):
    """What ``compare`` returns: the pair ``(similarity, matches)``, so that
    ``sim, same = client.compare(...)`` unpacks it, and ``random_weights``: True when the server
    runs random (demo) weights, whose cosines and matches are no identity verdict (the repr says
    so)."""

    def __new__(cls, similarity, matches, random_weights):
        self = super().__new__(cls, (similarity, matches))
        self.random_weights = bool(random_weights)
        return self

    def __getnewargs__(self):
        return (self[0], self[1], self.random_weights)

    @property
    def similarity(self):
        return self[0]

    @property
    def matches(self):
        return self[1]

    def __repr__(self):
        note = " (random weights: not an identity verdict)" if self.random_weights else ""
        return (f"Comparison(similarity={self[0]!r}, matches={self[1]!r}, "
                f"random_weights={self.random_weights}){note}")


class ArcFaceClient:
    """A client of the ArcFace embedding service.

    >>> with ArcFaceClient("localhost:50051") as client:
    ...     client.wait_ready(30)
    ...     emb = client.embed(["a.jpg", "b.jpg"])            # float32 [2, 512], raw
    ...     sim, same = client.compare(["a.jpg"], ["b.jpg"], threshold=0.4)

    ``target``: ``host:port`` (any gRPC target string), or several servers as a list or a
    comma-separated ``"h1:p1,h2:p2"``: their names are resolved once, here, and calls are spread
    over all of them by gRPC's ``round_robin`` policy (used for one target too, so a name with
    several addresses is spread over). ``timeout``: deadline of each call (attempt) in seconds.
    ``retries``: attempts per call when the server answers UNAVAILABLE (down, loading,
    draining), with gRPC's own exponential backoff (0.2 s doubling to 5 s, randomized); gRPC
    caps it at 5; 1 disables retries. No other code is retried (never INVALID_ARGUMENT). ``credentials``: a ``grpc.ChannelCredentials`` (``grpc.ssl_channel_credentials``,
    with a key and chain for mutual TLS) for a TLS channel; plaintext when None.
    ``options``: extra channel arguments, added to unlimited client-side message sizes.
    ``model``: the served model (``list_models()`` names them) that ``embed``, ``embed_stream``,
    ``compare``, ``detect``, ``detect_stream`` and ``model_info`` use; "" means the server's
    default model. An unknown name raises ArcFaceError ``NOT_FOUND`` naming the served ones.
    ``max_faces_per_request``: faces per Embed request; None reads the server's limit from
    GetModelInfo on first use (256 if that fails). Large lists are split into several calls;
    the result keeps the input order.

    The gallery (``enroll``, ``identify``, ``forget``, ``list_subjects``, ``gallery_info``)
    needs a server started with a gallery store (``--gallery-store``); without one its calls
    raise ArcFaceError with ``UNIMPLEMENTED``.
    """

    def __init__(self, target, timeout=DEFAULT_TIMEOUT, credentials=None, options=(),
                 max_faces_per_request=None, channel=None, retries=DEFAULT_RETRIES, model=""):
        self.target = _channel_target(target)
        self.timeout = timeout
        if not isinstance(model, str):
            raise ValueError(f"model must be a served model's name (str), got {model!r}")
        self.model = model
        merged = dict(DEFAULT_OPTIONS)
        merged["grpc.service_config"] = _service_config(retries)
        if self.target != target and credentials is not None:
            # An ipv4:/ipv6: target has no host name: check the certificate against the first.
            first = (target.split(",") if isinstance(target, str) else list(target))[0].strip()
            merged["grpc.ssl_target_name_override"] = first.rsplit(":", 1)[0].strip("[]")
        merged.update(dict(options or ()))
        target = self.target
        if channel is not None:
            self._channel = channel
        elif credentials is not None:
            self._channel = grpc.secure_channel(target, credentials, options=list(merged.items()))
        else:
            self._channel = grpc.insecure_channel(target, options=list(merged.items()))
        self._stub = pb_grpc.FaceEmbeddingStub(self._channel)
        self._gallery_stub = gpb_grpc.FaceGalleryStub(self._channel)
        self._admin_stub = pb_grpc.ModelAdminStub(self._channel)
        self._max_faces = max_faces_per_request
        self._gallery_limits = None
        self._max_bytes = None
        self._info = None
        self._lock = threading.Lock()

    # -- life cycle -------------------------------------------------------------------------

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def channel(self):
        return self._channel

    def wait_ready(self, timeout=30.0):
        """Polls the standard gRPC health service until it answers SERVING (the model is
        loaded and warmed up). Returns True, or False when ``timeout`` seconds passed first."""
        if health_pb2 is None:
            raise RuntimeError("grpc_health_v1 stubs are not on PYTHONPATH")
        stub = health_pb2_grpc.HealthStub(self._channel)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""),
                               timeout=min(max(left, 0.05), 5.0), wait_for_ready=True)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))

    # -- calls ------------------------------------------------------------------------------

    def _call(self, method, request, timeout=None, stub=None):
        try:
            return getattr(stub or self._stub, method)(
                request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise ArcFaceError.from_rpc_error(e, method) from None

    def model_info(self, timeout=None):
        """GetModelInfo as a dict (proto field names; ``batching`` a nested dict)."""
        info = self._call("GetModelInfo", pb.GetModelInfoRequest(model=self.model), timeout)
        with self._lock:
            self._info = info
            if self._max_faces is None and info.max_faces_per_request:
                self._max_faces = int(info.max_faces_per_request)
            if info.max_message_bytes:
                self._max_bytes = int(info.max_message_bytes)
            self._gallery_limits = GalleryLimits.from_proto(info.gallery)
        b = info.batching
        g = info.gallery
        d = info.detector
        return {
            "name": info.name,
            "family": info.family,
            "metric": info.metric,
            "default_threshold": info.default_threshold,
            "is_default": info.is_default,
            "arch": info.arch,
            "embedding_dim": info.embedding_dim,
            "input_size": info.input_size,
            "weights_sha256": info.weights_sha256,
            "model_id": info.model_id,
            "device": info.device,
            "precision": info.precision,
            "demo_weights": info.demo_weights,
            "server_version": info.server_version,
            "batching": {
                "max_batch_size": b.max_batch_size,
                "max_queue_delay_us": b.max_queue_delay_us,
                "max_queue_size": b.max_queue_size,
                "max_batches_in_flight": b.max_batches_in_flight,
            },
            "max_faces_per_request": info.max_faces_per_request,
            "max_message_bytes": info.max_message_bytes,
            "gallery": {
                "enabled": g.enabled,
                "store": g.store,
                "max_faces_per_enroll": g.max_faces_per_enroll,
                "max_probes_per_identify": g.max_probes_per_identify,
                "max_top_k": g.max_top_k,
                "approximate_min_faces": g.approximate_min_faces,
            },
            # enabled False: --detector none, and detect() raises UNIMPLEMENTED.
            "detector": {
                "enabled": d.enabled,
                "detector_id": d.detector_id,
                "detector": d.detector,
                "landmarks": d.landmarks,
                "weights_sha256": d.weights_sha256,
                "input_size": d.input_size,
                "default_min_score": d.default_min_score,
                "max_faces_per_frame": d.max_faces_per_frame,
                "device": d.device,
                "batching": {
                    "max_batch_size": d.batching.max_batch_size,
                    "max_queue_delay_us": d.batching.max_queue_delay_us,
                    "max_queue_size": d.batching.max_queue_size,
                    "max_batches_in_flight": d.batching.max_batches_in_flight,
                },
            },
        }

    def list_models(self, timeout=None):
        """The served models, the default first: a list of dicts (name, family, metric,
        default_threshold, embedding_dim, input_size, model_id, demo_weights, is_default)."""
        resp = self._call("ListModels", pb.ListModelsRequest(), timeout)
        return [{"name": m.name, "family": m.family, "metric": m.metric,
                 "default_threshold": m.default_threshold, "embedding_dim": m.embedding_dim,
                 "input_size": m.input_size, "model_id": m.model_id,
                 "demo_weights": m.demo_weights, "is_default": m.is_default}
                for m in resp.models]

    def reload_models(self, models=None, timeout=None):
        """Has the server re-read its models' files and swap in those that changed
        (ModelAdmin.ReloadModels, as SIGHUP does): ``models`` names served models (a list of
        names; None or empty: every one). Returns one ``ModelReload`` per model, in the order
        asked (all: the served order); a file that fails is a ``"FAILED"`` result, its model
        serving on as before. Raises ArcFaceError: ``UNIMPLEMENTED`` when the server runs
        without ``--admin-rpc``, ``NOT_FOUND`` (naming the served models) for an unknown name.
        The answer waits for every new version to load and warm up: ``timeout`` must cover
        that (a deadline that passes first loses the answer, not the reload). Not retried on
        UNAVAILABLE (a repeat would report UNCHANGED a model the first call reloaded)."""
        if isinstance(models, (str, bytes)):
            raise TypeError("models is a list of model names, not one string")
        resp = self._call("ReloadModels", pb.ReloadModelsRequest(models=list(models or ())),
                          timeout, stub=self._admin_stub)
        return [ModelReload.from_proto(m) for m in resp.models]

    @property
    def random_weights(self):
        """True when the server runs random (demo) weights: its embeddings, cosines and
        identities tell nothing about who is who. Read from GetModelInfo once per client (on
        first need); ``compare``, ``identify`` and ``detect`` put it on their results."""
        return bool(self._cached_info().demo_weights)

    def _cached_info(self):
        """The model's GetModelInfo answer, asked for once per client."""
        with self._lock:
            info = self._info
        if info is None:
            self.model_info()
            with self._lock:
                info = self._info
        return info

    @property
    def default_threshold(self):
        """The model's own verification threshold as a cosine (ArcFace 0.4, dlib 0.9144): what
        ``compare`` uses when given none. Read from GetModelInfo once per client."""
        return float(self._cached_info().default_threshold)

    @property
    def max_faces_per_request(self):
        """Faces per Embed request: the constructor's value, else the server's (read once)."""
        if self._max_faces is None:
            try:
                self.model_info()
            except ArcFaceError:
                pass
            if self._max_faces is None:
                self._max_faces = DEFAULT_MAX_FACES_PER_REQUEST
        return self._max_faces

    def _chunks(self, faces, limit=None):
        """Splits faces (or probes) into requests of at most ``limit`` (default:
        max_faces_per_request) items and (when the server's limit is known) under its message
        size."""
        limit = max(1, int(self.max_faces_per_request if limit is None else limit))
        max_bytes = self._max_bytes
        budget = int(max_bytes * 0.9) if max_bytes else None
        chunk, size = [], 0
        for face in faces:
            fsize = face.ByteSize() + 8
            if chunk and (len(chunk) >= limit or (budget and size + fsize > budget)):
                yield chunk
                chunk, size = [], 0
            chunk.append(face)
            size += fsize
        if chunk:
            yield chunk

    def faces(self, images, landmarks=None, boxes=None):
        """The Face messages embed() would send (also useful with the raw stubs)."""
        if _is_single_image(images):
            raise TypeError("embed() takes a list of images; wrap a single image in a list")
        images = list(images)
        lms = _per_face(landmarks, len(images), "landmarks")
        bxs = _per_face(boxes, len(images), "boxes")
        return [_face_message(img, lm, bx) for img, lm, bx in zip(images, lms, bxs)]

    def embed(self, images, landmarks=None, boxes=None, normalize=False, timeout=None):
        """Embeds one face per image → float32 array [N, 512] in input order.

        ``images``: a list of file paths, encoded bytes, uint8 arrays (HxWx3 RGB, HxW gray),
        or ``FaceSpec`` items. ``landmarks``: None or one entry per image (5 (x, y) points or
        None). ``boxes``: None or one entry per image ((x_min, y_min, x_max, y_max) or None).
        ``normalize``: unit-length rows instead of the raw embeddings.
        Raises ArcFaceError (``code`` INVALID_ARGUMENT for a bad image, naming its index
        within the request).
        """
        faces = self.faces(images, landmarks, boxes)
        if not faces:
            return np.zeros((0, EMBEDDING_DIM), np.float32)
        parts = []
        for chunk in self._chunks(faces):
            resp = self._call("Embed", pb.EmbedRequest(faces=chunk, normalize=normalize,
                                                       model=self.model), timeout)
            if len(resp.embeddings) != len(chunk):
                raise ArcFaceError(grpc.StatusCode.INTERNAL,
                                   f"{len(resp.embeddings)} embeddings for {len(chunk)} faces",
                                   "Embed")
            parts.append(_embeddings_array(resp.embeddings))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def embed_stream(self, images, normalize=False, timeout=None, errors="raise"):
        """Embeds a (possibly endless) iterable through one EmbedStream call, one request per
        item, and yields the results in order as they arrive: for video frames.

        Each item is one face (path, bytes, uint8 array, FaceSpec), which yields a float32
        array [512]; or a list of them (say, every face of a frame), which yields [k, 512].
        ``errors``: "raise" raises ArcFaceError at a failed item (ending the stream);
        "yield" yields the ArcFaceError in its place and goes on. ``timeout`` bounds the whole
        stream (None: no deadline).
        """
        if errors not in ("raise", "yield"):
            raise ValueError("errors must be 'raise' or 'yield'")
        shapes = []  # per request: True when the item was a single face
        lock = threading.Lock()

        def requests():
            for i, item in enumerate(images):
                single = _is_single_image(item)
                faces = [_face_message(item)] if single else [_face_message(f) for f in item]
                with lock:
                    shapes.append(single)
                yield pb.EmbedRequest(faces=faces, normalize=normalize, request_id=str(i),
                                      model=self.model)

        call = self._stub.EmbedStream(requests(), timeout=timeout)
        index = 0
        try:
            for resp in call:
                with lock:
                    single = shapes[index]
                if resp.request_id != str(index):
                    raise ArcFaceError(grpc.StatusCode.INTERNAL,
                                       f"response {resp.request_id!r} for request {index}",
                                       "EmbedStream")
                index += 1
                if resp.HasField("error") and resp.error.code != 0:
                    err = ArcFaceError(_status_code(resp.error.code), resp.error.message,
                                       "EmbedStream")
                    if errors == "raise":
                        raise err
                    yield err
                    continue
                arr = _embeddings_array(resp.embeddings)
                yield arr[0] if single else arr
        except grpc.RpcError as e:
            raise ArcFaceError.from_rpc_error(e, "EmbedStream") from None
        finally:
            call.cancel()

    # -- detection (Detect, DetectStream) -----------------------------------------------------

    def detect(self, image, min_score=0.0, max_faces=0, embed=False, normalize=False,
               gallery="", top_k=0, threshold=None, min_face_size=0.0, request_id="",
               timeout=None):
        """The faces of one frame, found by the server's detector: a ``Detection`` whose
        ``faces`` (``DetectedFace``: box, score, five landmarks, in the frame's pixels) come
        by score descending; none found is an empty tuple, not an error.

        ``image``: a file path, encoded bytes or a uint8 array (HxWx3 RGB, HxW gray), as
        ``embed`` takes them. ``min_score``: leave out faces below it (0: the server's default,
        ``model_info()["detector"]["default_min_score"]``). ``max_faces``: the best ones only (0:
        all). ``min_face_size``: leave out boxes whose shorter side is smaller, in pixels.
        ``embed``: also align each face by its landmarks and embed it (``normalize``: unit
        length). ``gallery``: also identify each face there (implies ``embed``), with up to
        ``top_k`` candidates (0 means 1) at or above ``threshold`` (None: the model's
        ``default_threshold``; the ``Detection``'s ``threshold`` says the one used).
        Raises ValueError for a bad argument before any call; ArcFaceError for the server's
        answer: INVALID_ARGUMENT (an undecodable, empty or too large image), NOT_FOUND (no
        such gallery), UNIMPLEMENTED (a server with ``--detector none``).
        """
        fields = detect_fields(min_score, max_faces, embed, normalize, gallery, top_k,
                               threshold, min_face_size)
        req = pb.DetectRequest(image=_image_message(image), request_id=request_id,
                               model=self.model, **fields)
        resp = self._call("Detect", req, timeout)
        return detection_from_proto(resp, self._model_random_weights(fields))

    def _model_random_weights(self, fields):
        """Whether a Detect with these fields has the model speak (embeddings, identities)
        from random weights; the detector's own answer (boxes, landmarks) never is."""
        return bool(fields["embed"] or fields["gallery"]) and self.random_weights

    def detect_stream(self, frames, min_score=0.0, max_faces=0, embed=False, normalize=False,
                      gallery="", top_k=0, threshold=None, min_face_size=0.0, timeout=None,
                      errors="raise", max_in_flight=8):
        """``detect`` over a (possibly endless) iterable of frames through one DetectStream
        call: yields one ``Detection`` per frame, in order, as the answers arrive (for video).
        The options apply to every frame. ``errors``: "raise" raises ArcFaceError at a failed
        frame (ending the stream); "yield" yields the ArcFaceError in its place and goes on.
        ``timeout`` bounds the whole stream (None: no deadline). ``max_in_flight``: frames
        sent and not yet answered at most; the next frame is taken from ``frames`` only when
        one is answered, so a source faster than the server waits instead of queueing frames
        without bound. A bad argument raises ValueError here, before the stream opens.
        """
        if errors not in ("raise", "yield"):
            raise ValueError("errors must be 'raise' or 'yield'")
        if isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or (
                max_in_flight < 1):
            raise ValueError(f"max_in_flight must be a whole number >= 1, got {max_in_flight!r}")
        fields = detect_fields(min_score, max_faces, embed, normalize, gallery, top_k,
                               threshold, min_face_size)
        return self._detect_stream(frames, fields, timeout, errors, max_in_flight)

    def _detect_stream(self, frames, fields, timeout, errors, max_in_flight):
        random_weights = self._model_random_weights(fields)
        slots = threading.Semaphore(max_in_flight)  # one per frame sent and not answered
        closed = threading.Event()

        def requests():  # on gRPC's thread; it must end once the call does
            source = iter(frames)
            i = 0
            while True:
                while not slots.acquire(timeout=0.1):
                    if closed.is_set():
                        return
                if closed.is_set():
                    return
                try:
                    frame = next(source)
                except StopIteration:
                    return
                yield pb.DetectRequest(image=_image_message(frame), request_id=str(i),
                                       model=self.model, **fields)
                i += 1

        call = self._stub.DetectStream(requests(), timeout=timeout)
        index = 0
        try:
            for resp in call:
                slots.release()
                if resp.request_id != str(index):
                    raise ArcFaceError(grpc.StatusCode.INTERNAL,
                                       f"response {resp.request_id!r} for frame {index}",
                                       "DetectStream")
                index += 1
                if resp.HasField("error") and resp.error.code != 0:
                    err = ArcFaceError(_status_code(resp.error.code), resp.error.message,
                                       "DetectStream")
                    if errors == "raise":
                        raise err
                    yield err
                    continue
                yield detection_from_proto(resp, random_weights)
        except grpc.RpcError as e:
            raise ArcFaceError.from_rpc_error(e, "DetectStream") from None
        finally:
            closed.set()
            call.cancel()

    def _probe(self, item):
        if isinstance(item, pb.Probe):
            return item
        if isinstance(item, np.ndarray) and item.dtype != np.uint8 and item.ndim == 1:
            return pb.Probe(embedding=pb.Embedding(values=np.asarray(item, np.float32).tolist()))
        return pb.Probe(face=_face_message(item))

    def _probes(self, items):
        if isinstance(items, np.ndarray) and items.dtype != np.uint8 and items.ndim == 2:
            items = list(items)  # [N, 512] embeddings
        elif _is_single_image(items):
            items = [items]
        return [self._probe(x) for x in items]

    def compare(self, queries, references, threshold=None, timeout=None):
        """Cosine similarity of every query against every reference.

        Queries and references are lists of faces (paths, bytes, uint8 arrays, FaceSpec) or
        embeddings (1-D float arrays, or one float array [N, 512]); faces are embedded by the
        server. Returns a ``Comparison``, the pair ``(similarity, matches)``: float32 [rows,
        cols], and bool [rows, cols] (similarity >= threshold; None: the model's own,
        ``default_threshold``); its ``random_weights`` says whether the server's weights are
        random (then the matches are no identity verdict). When the faces exceed
        the server's per-request limit they are embedded first (split) and compared as
        embeddings, which gives the same numbers.
        """
        q = self._probes(queries)
        r = self._probes(references)
        n_faces = sum(p.HasField("face") for p in q + r)
        if n_faces > self.max_faces_per_request:
            q, r = self._embed_probes(q, timeout), self._embed_probes(r, timeout)
        if threshold is None:
            threshold = self.default_threshold
        req = pb.CompareRequest(queries=q, references=r, model=self.model,
                                threshold=float(threshold))
        resp = self._call("Compare", req, timeout)
        sim = np.asarray(resp.similarities, np.float32).reshape(resp.rows, resp.cols)
        matches = np.asarray(resp.matches, bool).reshape(resp.rows, resp.cols)
        return Comparison(sim, matches, self.random_weights)

    def _embed_probes(self, probes, timeout):
        idx = [i for i, p in enumerate(probes) if p.HasField("face")]
        if not idx:
            return probes
        emb = self.embed([probes[i].face for i in idx], timeout=timeout)
        out = list(probes)
        for i, e in zip(idx, emb):
            out[i] = pb.Probe(embedding=pb.Embedding(values=e.tolist()))
        return out

    # -- gallery (arcface.v1.FaceGallery) -------------------------------------------------------

    @property
    def gallery_limits(self):
        """The server's GalleryLimits (from GetModelInfo, read once); all zero while unknown."""
        if self._gallery_limits is None:
            try:
                self.model_info()
            except ArcFaceError:
                pass
        return self._gallery_limits or GalleryLimits()

    def _gallery_call(self, method, request, timeout, offset=0):
        try:
            return getattr(self._gallery_stub, method)(
                request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            err = ArcFaceError.from_rpc_error(e, method)
            raise ArcFaceError(err.code, shift_index(err.details, offset), method) from None

    def _split(self, items, limit):
        """(offset, chunk) pairs: at most ``limit`` items (0: no count limit) per request."""
        offset = 0
        for chunk in self._chunks(items, limit or max(len(items), 1)):
            yield offset, chunk
            offset += len(chunk)

    def enroll(self, subject_id, faces_or_embeddings, gallery="", labels=None, request_id="",
               model_id="", timeout=None, model=""):
        """Adds faces to ``subject_id`` in ``gallery`` ("" means "default"), creating the
        subject and the gallery when new; returns an ``Enrollment`` (one face id per face, in
        order) once the faces are durable in the server's store.

        ``faces_or_embeddings``: as ``compare`` takes them: faces (paths, bytes, uint8 arrays,
        ``FaceSpec``), embedded by the server's model, or embeddings (1-D float arrays, or one
        float array [N, 512]) taken as given (``model_id``: the model that computed them; ""
        means the server's). ``model``: the served model that embeds the faces of a new
        gallery ("": the gallery's own model, for a new gallery the server's default); a
        gallery's faces are always embedded by the model it is bound to. ``labels``: a dict of strings set on the subject (keys given
        replace their values). ``request_id``: the idempotency key: repeating a call with it
        adds nothing twice. More faces than the server's ``max_faces_per_enroll`` go in several
        requests (keys ``<request_id>#<n>``): a call that fails part way may have enrolled its
        first requests; repeating it with the same ``request_id`` completes it without
        duplicates. Without a ``request_id`` the client makes one per call, so that a retry
        after UNAVAILABLE never enrolls a face twice.
        """
        probes = self._probes(faces_or_embeddings)
        base = request_id or uuid.uuid4().hex
        chunks = list(self._split(probes, self.gallery_limits.max_faces_per_enroll)) or [(0, [])]
        face_ids, resp = [], None
        for n, (offset, chunk) in enumerate(chunks):
            req = gpb.EnrollRequest(gallery=gallery, subject_id=subject_id, faces=chunk,
                                    labels=labels or {}, model_id=model_id, model=model,
                                    request_id=base if len(chunks) == 1 else f"{base}#{n}")
            resp = self._gallery_call("Enroll", req, timeout, offset)
            if len(resp.face_ids) != len(chunk):
                raise ArcFaceError(grpc.StatusCode.INTERNAL,
                                   f"{len(resp.face_ids)} face ids for {len(chunk)} faces",
                                   "Enroll")
            face_ids.extend(resp.face_ids)
        return Enrollment(resp.subject_id, tuple(face_ids), resp.gallery_version)

    def identify(self, probes, gallery="", top_k=1, threshold=None, model_id="", timeout=None):
        """For each probe, the best-matching subjects of ``gallery``: an ``Identification``
        whose ``results[i]`` lists probe i's candidates (up to ``top_k`` distinct subjects,
        each with its best face, by cosine similarity descending, only those at or above
        ``threshold``; None: the gallery's model's ``default_threshold``, ArcFace 0.4, dlib
        0.9144; -1 keeps all; the answer's ``threshold`` says the one used). Probes are faces
        or embeddings, as ``enroll`` takes them; more
        than the server's ``max_probes_per_identify`` (faces: its ``max_faces_per_request``)
        go in several requests. An unknown gallery raises ArcFaceError ``NOT_FOUND``.
        """
        items = self._probes(probes)
        limit = self.gallery_limits.max_probes_per_identify
        if any(p.HasField("face") for p in items):  # face probes: also max_faces_per_request
            limit = min(limit or self.max_faces_per_request, self.max_faces_per_request)
        results, resp = [], None
        for offset, chunk in self._split(items, limit):
            req = gpb.IdentifyRequest(gallery=gallery, probes=chunk, top_k=top_k,
                                      model_id=model_id)
            if threshold is not None:
                req.threshold = float(threshold)
            resp = self._gallery_call("Identify", req, timeout, offset)
            if len(resp.results) != len(chunk):
                raise ArcFaceError(grpc.StatusCode.INTERNAL,
                                   f"{len(resp.results)} results for {len(chunk)} probes",
                                   "Identify")
            results.extend(tuple(Candidate(c.subject_id, c.face_id, c.similarity)
                                 for c in r.candidates) for r in resp.results)
        if resp is None:
            return Identification((), "", 0)
        return Identification(tuple(results), resp.model_id, resp.gallery_version,
                              self.random_weights,
                              resp.threshold if resp.HasField("threshold") else None)

    def forget(self, subject_id=None, face_ids=(), gallery="", timeout=None):
        """Removes ``subject_id`` with all its faces, or the faces ``face_ids`` (which must be
        the subject's when it is given too); a subject left without faces is removed. Returns a
        ``ForgetResult``. Not retried on UNAVAILABLE (a repeat would report 0 faces removed)."""
        if isinstance(face_ids, (str, bytes)):
            raise TypeError("face_ids is a list of face ids, not one string")
        req = gpb.ForgetRequest(gallery=gallery, subject_id=subject_id or "",
                                face_ids=list(face_ids))
        resp = self._gallery_call("Forget", req, timeout)
        return ForgetResult(resp.faces_removed, resp.gallery_version)

    def list_subjects(self, gallery="", page_size=0, timeout=None):
        """Iterates over every ``Subject`` of ``gallery`` (by subject_id), fetching pages of
        ``page_size`` (0: the server's default, 100) as it goes."""
        token = ""
        while True:
            req = gpb.ListSubjectsRequest(gallery=gallery, page_size=page_size, page_token=token)
            resp = self._gallery_call("ListSubjects", req, timeout)
            for s in resp.subjects:
                yield Subject(s.subject_id, s.num_faces, dict(s.labels))
            if not resp.next_page_token:
                return
            if resp.next_page_token == token:
                raise ArcFaceError(grpc.StatusCode.INTERNAL,
                                   f"page token {token!r} answered with itself", "ListSubjects")
            token = resp.next_page_token

    def gallery_info(self, gallery="", timeout=None):
        """GetGalleryInfo as a ``GalleryInfo`` (sizes, version, store, index, limits)."""
        return GalleryInfo.from_proto(
            self._gallery_call("GetGalleryInfo", gpb.GetGalleryInfoRequest(gallery=gallery),
                               timeout))
