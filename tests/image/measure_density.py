"""Measures how dense real encodings get: declared pixels per encoded byte (and bits per pixel)
of the test photos (tests/data) and of flat one-colour images, per format, as server/image's
MaxPixelsPerByte limits assume (docs/RELIABILITY.md has the table).

Each photo is encoded as is, scaled to ~112 px, upscaled 2x (at most 3 MP), blurred (sigma 15)
and in grey, at several qualities. Run: /usr/bin/python3 tests/image/measure_density.py [DATA]
(DATA defaults to ARCFACE_TEST_DATA or tests/data).
"""

import collections
import os
import sys

import cv2
import numpy as np

ENCODINGS = {
    "JPEG": (".jpg", [("q95", [cv2.IMWRITE_JPEG_QUALITY, 95]), ("q75", [cv2.IMWRITE_JPEG_QUALITY, 75]),
                      ("q10", [cv2.IMWRITE_JPEG_QUALITY, 10]), ("q1", [cv2.IMWRITE_JPEG_QUALITY, 1]),
                      ("q1 progressive optimised", [cv2.IMWRITE_JPEG_QUALITY, 1,
                                                    cv2.IMWRITE_JPEG_PROGRESSIVE, 1,
                                                    cv2.IMWRITE_JPEG_OPTIMIZE, 1])]),
    "PNG": (".png", [("level 3", []), ("level 9", [cv2.IMWRITE_PNG_COMPRESSION, 9])]),
    "WebP": (".webp", [("lossless", [cv2.IMWRITE_WEBP_QUALITY, 101]),
                       ("q80", [cv2.IMWRITE_WEBP_QUALITY, 80]), ("q1", [cv2.IMWRITE_WEBP_QUALITY, 1])]),
    "TIFF": (".tiff", [("LZW", []), ("PackBits", [cv2.IMWRITE_TIFF_COMPRESSION, 32773]),
                       ("deflate", [cv2.IMWRITE_TIFF_COMPRESSION, 8])]),
    "BMP": (".bmp", [("24-bit", [])]),
}


def variants(bgr):
    h, w = bgr.shape[:2]
    scale = 112 / max(h, w)
    out = {"as is": bgr,
           "~112 px": cv2.resize(bgr, (max(16, round(w * scale)), max(16, round(h * scale))),
                                 interpolation=cv2.INTER_AREA),
           "blurred": cv2.GaussianBlur(bgr, (0, 0), 15),
           "grey": cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)}
    if w * h <= 3_000_000:
        out["2x upscaled"] = cv2.resize(bgr, (2 * w, 2 * h), interpolation=cv2.INTER_CUBIC)
    return out


def density(img, ext, params):
    ok, buf = cv2.imencode(ext, img, params)
    assert ok
    return img.shape[0] * img.shape[1] / len(buf)


def main():
    data = sys.argv[1] if len(sys.argv) > 1 else os.environ.get(
        "ARCFACE_TEST_DATA", os.path.join(os.path.dirname(__file__), "..", "data"))
    photos = [cv2.imread(os.path.join(data, f), cv2.IMREAD_COLOR) for f in sorted(os.listdir(data))
              if f.lower().endswith((".jpg", ".png"))]
    per_photo = collections.defaultdict(list)
    densest = {}
    for bgr in photos:
        for vname, img in variants(bgr).items():
            for fmt, (ext, encodings) in ENCODINGS.items():
                for ename, params in encodings:
                    d = density(img, ext, params)
                    per_photo[fmt].append(d)
                    if d > densest.get(fmt, (0,))[0]:
                        densest[fmt] = (d, f"{vname} {img.shape[1]}x{img.shape[0]}, {ename}")
    flat = collections.defaultdict(float)
    for w, h in [(112, 112), (512, 512), (1000, 1000), (1920, 1080), (4000, 3000)]:
        img = np.full((h, w, 3), 128, np.uint8)
        for fmt, (ext, encodings) in ENCODINGS.items():
            for ename, params in encodings:
                key = fmt + (" lossless" if ename == "lossless" else "")
                flat[key] = max(flat[key], density(img, ext, params))
    print("| format | photos: median px/byte (bits/px) | photos: densest px/byte (bits/px), which "
          "| flat images up to 12 MP: densest px/byte |")
    print("|---|---|---|---|")
    for fmt in ENCODINGS:
        med = float(np.median(per_photo[fmt]))
        d, which = densest[fmt]
        flats = ", ".join(f"{k}: {v:.1f}" for k, v in flat.items() if k.startswith(fmt))
        print(f"| {fmt} | {med:.1f} ({8 / med:.3f}) | {d:.1f} ({8 / d:.4f}), {which} | {flats} |")


if __name__ == "__main__":
    main()
