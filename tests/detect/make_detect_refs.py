#!/usr/bin/env python3
"""Writes the numpy reference's (tests/reference/detect_ref.py) inputs and raw outputs of
face-api's three networks on test photos, for face_detector_test's exactness checks.

Per case, into OUT: <case>.input.f32 (the padded, resized image the first layer takes, as
0..255 RGB, HxWx3 float32) and <case>.<output>.f32 (float32, C order), and index.json listing
the cases, the shapes, and the detections (scores, boxes relative to the square input as
x0, y0, x1, y1) that face-api's post-processing keeps. The landmark cases are the faces the SSD
reference finds in multi_face.jpg and single_face.jpg. Idempotent: returns at once when
index.json is newer than this script, the reference, the photos and the model files.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import detect_ref  # noqa: E402

PHOTOS = ["multi_face.jpg", "single_face.jpg", "0-f15-hao-ph.jpg"]
LANDMARK_PHOTOS = ["multi_face.jpg", "single_face.jpg"]
MODEL_FILES = ["ssd_mobilenetv1_model", "tiny_face_detector_model", "face_landmark_68_model"]


def up_to_date(out: str, sources) -> bool:
    index = os.path.join(out, "index.json")
    if not os.path.exists(index):
        return False
    newest = max(os.path.getmtime(s) for s in sources)
    return os.path.getmtime(index) > newest


def write(out: str, name: str, array: np.ndarray) -> list:
    np.ascontiguousarray(array, dtype=np.float32).tofile(os.path.join(out, name + ".f32"))
    return list(array.shape)


def relative(det_boxes: np.ndarray, width: int, height: int, size: int) -> list:
    """Image-pixel boxes back to the square input's 0..1, undoing face-api's scaling."""
    rw, rh = detect_ref.reshaped_dims(width, height, size)
    sx, sy = width * size / rw, height * size / rh
    return [[b[0] / sx, b[1] / sy, b[2] / sx, b[3] / sy] for b in det_boxes.tolist()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    sources = [os.path.abspath(__file__), detect_ref.__file__]
    sources += [os.path.join(args.data, p) for p in PHOTOS]
    for m in MODEL_FILES:
        sources += [os.path.join(args.models, m + "-weights_manifest.json"),
                    os.path.join(args.models, m + ".bin")]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        print("make_detect_refs: missing " + ", ".join(missing), file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    if up_to_date(args.out, sources):
        return 0

    cases = []
    for photo in PHOTOS:
        rgb = detect_ref.read_rgb(os.path.join(args.data, photo))
        height, width = rgb.shape[:2]
        stem = os.path.splitext(photo)[0]

        ssd = detect_ref.run_ssd(args.models, rgb)
        case = "ssd." + stem
        cases.append({
            "case": case, "net": "ssd", "photo": photo,
            "input": write(args.out, case + ".input", ssd["resized"]),
            "outputs": {k: write(args.out, f"{case}.{k}", ssd[k])
                        for k in ("box_encodings", "class_logits")},
            "det_scores": ssd["det_scores"].tolist(),
            "det_boxes": [[b[1], b[0], b[3], b[2]]
                          for b in ssd["boxes"][ssd["det_indices"]].tolist()],
        })

        tiny = detect_ref.run_tiny(args.models, rgb)
        case = "tiny." + stem
        cases.append({
            "case": case, "net": "tiny", "photo": photo,
            "input": write(args.out, case + ".input", tiny["resized"]),
            "outputs": {"grid": write(args.out, case + ".grid", tiny["grid"])},
            "det_scores": tiny["det_scores"].tolist(),
            "det_boxes": relative(tiny["det_boxes"], width, height, tiny["resized"].shape[0]),
        })

        if photo in LANDMARK_PHOTOS:
            for i, box in enumerate(ssd["det_boxes"].tolist()):
                lm = detect_ref.run_landmark68(args.models, rgb, box)
                case = f"landmark68.{stem}.{i}"
                cases.append({
                    "case": case, "net": "landmark68", "photo": photo,
                    "input": write(args.out, case + ".input", lm["resized"]),
                    "outputs": {"output": write(args.out, case + ".output", lm["output"])},
                })

    with open(os.path.join(args.out, "index.json"), "w") as f:
        json.dump({"cases": cases}, f, indent=1)
    print(f"make_detect_refs: {len(cases)} cases in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
