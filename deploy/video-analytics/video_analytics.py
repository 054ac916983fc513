"""video-analytics: an example sidecar client of the ArcFace service.

Reads frames from a video file, or from the images of a folder (looping), and sends them
through one DetectStream call to the service next to it (in the compose stack and the
Kubernetes Pod example it shares the service's network namespace, so the default target is
localhost:50051): the server finds every face (box, landmarks), aligns and embeds it, and with
--gallery identifies it in that gallery. One JSON object per face goes to stdout.

Without a gallery, each face gets a stable identity of this program's own: the identity whose
running mean embedding is nearest by cosine, if that cosine reaches --threshold, else a new one:

  {"frame": 12, "source": "multi_face.jpg", "face": 0, "box": [x0, y0, x1, y1], "score": 0.99,
   "identity": "person-3", "cosine": 0.97, "new": false, "random_weights": false}

With --gallery NAME (people enrolled with `arcface-client gallery enroll`), the server's answer:
the best subject at or above --threshold, or null when nobody in the gallery is that close:

  {"frame": 12, "source": "multi_face.jpg", "face": 0, "box": [...], "score": 0.99,
   "identity": "alice", "similarity": 0.71, "random_weights": false}

"random_weights": true says the service runs its demo (random) weights: the embeddings are not
meaningful, so an identity is no verdict on who it is; they are deterministic, though: the same
face in the same frame always gets the same identity, which is what this example shows.

Exit status: 0 after --max-frames frames, at the end of the input (--no-loop) or on
SIGTERM/SIGINT; 1 when the input cannot be read, the service runs without a detector (or
without galleries, for --gallery), or it stays unreachable for --wait seconds.
"""

import argparse
import collections
import json
import os
import signal
import sys
import threading
import time

import cv2
import numpy as np

from arcface_client import ArcFaceClient, ArcFaceError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def log(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


class NoFrames(Exception):
    pass


def frames(path, loop):
    """Yields (source name, frame): the frames of a video file (RGB arrays), or the images of a
    folder in name order (their file bytes, which the server decodes: smaller than pixels);
    again from the start while `loop` holds. Images OpenCV cannot decode are reported and
    skipped; an input without any readable frame raises NoFrames."""
    while True:
        produced = 0
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            for name in names:
                with open(os.path.join(path, name), "rb") as f:
                    data = f.read()
                if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None:
                    log(event="unreadable", source=name)
                    continue
                produced += 1
                yield name, data
        else:
            capture = cv2.VideoCapture(path)
            name = os.path.basename(path)
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                produced += 1
                yield name, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            capture.release()
        if produced == 0:
            raise NoFrames(f"no readable frames in {path}")
        if not loop:
            return


class Identities:
    """Identities seen so far (without a gallery), each a running mean of its unit embeddings."""

    def __init__(self, threshold):
        self.threshold = threshold
        self.names = []
        self.sums = []  # per identity: sum of unit embeddings

    def assign(self, embedding):
        """(identity, cosine to it, new?) for one raw embedding."""
        unit = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
        best, best_cos = -1, -1.0
        for i, s in enumerate(self.sums):
            c = float(unit @ s) / max(float(np.linalg.norm(s)), 1e-12)
            if c > best_cos:
                best, best_cos = i, c
        if best >= 0 and best_cos >= self.threshold:
            self.sums[best] = self.sums[best] + unit
            return self.names[best], best_cos, False
        self.names.append(f"person-{len(self.names) + 1}")
        self.sums.append(unit.astype(np.float64))
        return self.names[-1], 1.0, True


class Pacer:
    """The frames to send, at most `fps` a second, until `limit` frames (0: no limit) or a
    stop; remembers (index, source) of each frame sent and not yet answered, in order. Pulled
    by gRPC's request thread, answered on the main thread; `failure` says why the input ended
    early (NoFrames), if it did."""

    def __init__(self, source, fps, limit, stop):
        self.source = source
        self.period = 1.0 / fps if fps > 0 else 0.0
        self.limit = limit
        self.stop = stop
        self.sent = 0
        self.pending = collections.deque()
        self.lock = threading.Lock()
        self.last = None
        self.failure = None

    def __iter__(self):
        try:
            yield from self._paced()
        except NoFrames as e:  # raised on gRPC's thread: the main thread reports it
            self.failure = str(e)

    def _paced(self):
        for name, frame in self.source:
            if self.stop or (self.limit and self.sent >= self.limit):
                return
            if self.last is not None:
                pause = self.period - (time.monotonic() - self.last)
                if pause > 0:
                    time.sleep(pause)
            self.last = time.monotonic()
            with self.lock:
                self.pending.append((self.sent, name))
                self.sent += 1
            yield frame

    def answered(self):
        with self.lock:
            return self.pending.popleft()

    def unanswered(self):
        with self.lock:
            out = list(self.pending)
            self.pending.clear()
            return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=os.environ.get("VIDEO_INPUT", "/input"),
                   help="video file or image folder (env VIDEO_INPUT; default /input, which the "
                        "image fills with the repository's test photos)")
    p.add_argument("--server", default=os.environ.get("ARCFACE_SERVER", "localhost:50051"),
                   help="the service (env ARCFACE_SERVER; default localhost:50051)")
    p.add_argument("--gallery", default=os.environ.get("VIDEO_GALLERY", ""),
                   help="identify the faces in this gallery of the service (env VIDEO_GALLERY; "
                        "default: none, identities of this program's own)")
    p.add_argument("--no-loop", action="store_true", help="stop at the end of the input")
    p.add_argument("--fps", type=float, default=float(os.environ.get("VIDEO_FPS", "2")),
                   help="frames per second at most, 0: no pause (env VIDEO_FPS; default 2)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0: never)")
    threshold = os.environ.get("VIDEO_THRESHOLD")
    p.add_argument("--threshold", type=float, default=float(threshold) if threshold else None,
                   help="cosine at which a face is an identity already seen, or a gallery's "
                        "subject (env VIDEO_THRESHOLD; default the served model's: ArcFace 0.4, "
                        "InsightFace's; dlib 0.9144)")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="the detector's score below which a face is left out (0: the server's)")
    p.add_argument("--min-face", type=float, default=40,
                   help="smallest face (shorter box side) in pixels")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the service to be SERVING")
    args = p.parse_args(argv)

    if not os.path.exists(args.input):
        print(f"video-analytics: input {args.input} does not exist", file=sys.stderr)
        return 1

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))

    with ArcFaceClient(args.server, timeout=30) as client:
        if not client.wait_ready(args.wait):
            print(f"video-analytics: {args.server} not SERVING after {args.wait} s", file=sys.stderr)
            return 1
        info = client.model_info()
        if not info["detector"]["enabled"]:
            print(f"video-analytics: {args.server} runs without a face detector (--detector "
                  "none): start it with --detector", file=sys.stderr)
            return 1
        if args.gallery and not info["gallery"]["enabled"]:
            print(f"video-analytics: {args.server} keeps no galleries (--gallery-store none): "
                  f"--gallery {args.gallery} needs a store", file=sys.stderr)
            return 1
        threshold = info["default_threshold"] if args.threshold is None else args.threshold
        identities = Identities(threshold)
        options = dict(min_score=args.min_score, min_face_size=args.min_face)
        if args.gallery:
            options.update(gallery=args.gallery, top_k=1, threshold=threshold)
        else:
            options.update(embed=True)
        log(event="connected", server=args.server, model_id=info["model_id"],
            demo_weights=info["demo_weights"], detector_id=info["detector"]["detector_id"],
            gallery=args.gallery or None, threshold=threshold)
        pacer = Pacer(frames(args.input, loop=not args.no_loop), args.fps, args.max_frames, stop)
        while True:
            try:
                # Two frames in flight: the next is read once one is answered, so a server
                # slower than --fps is not handed an ever longer queue (and a stop is quick).
                for result in client.detect_stream(pacer, errors="yield", max_in_flight=2,
                                                   **options):
                    count, source = pacer.answered()
                    if isinstance(result, ArcFaceError):
                        log(event="detect_failed", frame=count, source=source,
                            code=result.code.name, details=result.details)
                        continue
                    for i, face in enumerate(result.faces):
                        entry = dict(frame=count, source=source, face=i,
                                     box=[round(v) for v in face.box], score=round(face.score, 4))
                        if args.gallery:
                            best = face.candidates[0] if face.candidates else None
                            entry.update(identity=best.subject_id if best else None,
                                         similarity=round(best.similarity, 4) if best else None)
                        else:
                            identity, cos, new = identities.assign(
                                np.asarray(face.embedding, np.float64))
                            entry.update(identity=identity, cosine=round(cos, 4), new=new)
                        log(**entry, random_weights=result.random_weights)
                break  # the input ended, --max-frames, or a stop
            except ArcFaceError as e:  # the stream broke (say, the service restarted)
                lost = pacer.unanswered()
                log(event="stream_failed", code=e.code.name, details=e.details,
                    frames_lost=len(lost))
                if stop:
                    break
                if not client.wait_ready(args.wait):
                    print(f"video-analytics: {args.server} not SERVING after {args.wait} s",
                          file=sys.stderr)
                    return 1
        if pacer.failure:
            print(f"video-analytics: {pacer.failure}", file=sys.stderr)
            return 1
        log(event="done", frames=pacer.sent, identities=len(identities.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
