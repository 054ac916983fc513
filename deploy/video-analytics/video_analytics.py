"""video-analytics: an example sidecar client of the ArcFace service.

Reads frames from a video file, or from the images of a folder (looping), finds faces with
OpenCV's Haar cascade, embeds every face through the service next to it (in the compose stack
and the Kubernetes Pod example it shares the service's network namespace, so the default
target is localhost:50051), and gives each face a stable identity: the identity whose running
mean embedding is nearest by cosine, if that cosine reaches --threshold, else a new one. One
JSON object per face goes to stdout:

  {"frame": 12, "source": "multi_face.jpg", "face": 0, "box": [x0, y0, x1, y1],
   "identity": "person-3", "cosine": 0.97, "new": false}

With the demo weights the embeddings are not meaningful, but they are deterministic: the same
face in the same frame always gets the same identity, which is what this example shows.

Exit status: 0 after --max-frames frames or on SIGTERM/SIGINT, 1 when the input cannot be
read or the service stays unreachable for --wait seconds.
"""

import argparse
import json
import os
import signal
import sys
import time

import cv2
import numpy as np

from arcface_client import ArcFaceClient, ArcFaceError

CASCADE = "/usr/share/opencv4/haarcascades/haarcascade_frontalface_default.xml"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def log(**fields):
    print(json.dumps(fields, sort_keys=True), flush=True)


def frames(path, loop):
    """Yields (source name, BGR frame): the frames of a video file, or the images of a folder
    in name order; again from the start while `loop` holds. Unreadable images are reported
    and skipped; a folder without any readable image ends the program."""
    while True:
        produced = 0
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
            for name in names:
                frame = cv2.imread(os.path.join(path, name), cv2.IMREAD_COLOR)
                if frame is None:
                    log(event="unreadable", source=name)
                    continue
                produced += 1
                yield name, frame
        else:
            capture = cv2.VideoCapture(path)
            name = os.path.basename(path)
            while True:
                ok, frame = capture.read()
                if not ok:
                    break
                produced += 1
                yield name, frame
            capture.release()
        if produced == 0:
            raise SystemExit(f"video-analytics: no readable frames in {path}")
        if not loop:
            return


class Gallery:
    """Identities seen so far, each a running mean of its unit embeddings."""

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=os.environ.get("VIDEO_INPUT", "/input"),
                   help="video file or image folder (env VIDEO_INPUT; default /input)")
    p.add_argument("--server", default=os.environ.get("ARCFACE_SERVER", "localhost:50051"),
                   help="the service (env ARCFACE_SERVER; default localhost:50051)")
    p.add_argument("--no-loop", action="store_true", help="stop at the end of the input")
    p.add_argument("--fps", type=float, default=float(os.environ.get("VIDEO_FPS", "2")),
                   help="frames per second at most, 0: no pause (env VIDEO_FPS; default 2)")
    p.add_argument("--max-frames", type=int, default=0, help="stop after this many frames (0: never)")
    p.add_argument("--threshold", type=float, default=float(os.environ.get("VIDEO_THRESHOLD", "0.4")),
                   help="cosine at which a face is an identity already seen (env "
                        "VIDEO_THRESHOLD; default InsightFace's 0.4)")
    p.add_argument("--min-face", type=int, default=40, help="smallest face side in pixels")
    p.add_argument("--cascade", default=CASCADE, help="Haar cascade file (Debian opencv-data)")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for the service to be SERVING")
    args = p.parse_args(argv)

    detector = cv2.CascadeClassifier(args.cascade)
    if detector.empty():
        print(f"video-analytics: cannot load the Haar cascade {args.cascade}", file=sys.stderr)
        return 1
    if not os.path.exists(args.input):
        print(f"video-analytics: input {args.input} does not exist", file=sys.stderr)
        return 1

    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.append(True))

    gallery = Gallery(args.threshold)
    with ArcFaceClient(args.server, timeout=30) as client:
        if not client.wait_ready(args.wait):
            print(f"video-analytics: {args.server} not SERVING after {args.wait} s", file=sys.stderr)
            return 1
        info = client.model_info()
        log(event="connected", server=args.server, model_id=info["model_id"],
            demo_weights=info["demo_weights"])
        period = 1.0 / args.fps if args.fps > 0 else 0.0
        count = 0
        for source, frame in frames(args.input, loop=not args.no_loop):
            if stop or (args.max_frames and count >= args.max_frames):
                break
            started = time.monotonic()
            gray = cv2.equalizeHist(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))
            found = detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                              minSize=(args.min_face, args.min_face))
            boxes = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in found]
            boxes.sort()
            if boxes:
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                try:
                    embeddings = client.embed([rgb] * len(boxes), boxes=boxes)
                except ArcFaceError as e:
                    log(event="embed_failed", frame=count, source=source, code=e.code.name,
                        details=e.details)
                    embeddings = []
                for i, (box, emb) in enumerate(zip(boxes, embeddings)):
                    identity, cos, new = gallery.assign(np.asarray(emb, np.float64))
                    log(frame=count, source=source, face=i, box=list(box), identity=identity,
                        cosine=round(cos, 4), new=new)
            count += 1
            pause = period - (time.monotonic() - started)
            if pause > 0 and not stop:
                time.sleep(pause)
        log(event="done", frames=count, identities=len(gallery.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
