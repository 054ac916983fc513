#!/usr/bin/python3
"""Writes the reference golden files the C++ tests consume.

    /usr/bin/python3 tests/reference/make_goldens.py --out DIR --data tests/data

Into DIR: r50.safetensors (seed 50, with num_batches_tracked), r100.safetensors (seed 100),
r50.onnx (the fused r50 network, same weights), insightface_r50.onnx (an unfused
insightface-style IResNet-50 exported with BN folding, own weights), inputs/<case>.u8 (crop
cases), inputs/<case>.f32 (every case's model input), inputs/<case>.rounded.u8 (resampled cases:
the crop rounded to uint8), and goldens.json (schema in tests/reference/README.md).

Idempotent: if DIR/goldens.json was written by the same generator sources for the same data
directory and every file it names exists, nothing is done.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SCHEMA_VERSION = 1
GENERATOR_FILES = ("arcface_ref.py", "iresnet_modules.py", "safetensors_io.py",
                   "make_checkpoint.py", "onnx_graph.py", "make_goldens.py")

R50_SEED, R100_SEED, INSIGHTFACE_SEED = 50, 100, 5050


def generator_hash() -> str:
    h = hashlib.sha256()
    for f in GENERATOR_FILES:
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(f.encode() + b"\0" + fh.read() + b"\0")
    return h.hexdigest()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def up_to_date(out: str, data: str, ghash: str) -> bool:
    path = os.path.join(out, "goldens.json")
    try:
        with open(path) as f:
            g = json.load(f)
    except (OSError, ValueError):
        return False
    if g.get("generator_sha256") != ghash or g.get("data_dir") != data:
        return False
    files = [m["file"] for m in g["models"].values()] + [m["onnx"] for m in g["models"].values()
                                                          if "onnx" in m]
    for c in g["cases"]:
        for k in ("file", "f32", "u8_rounded"):
            if k in c["input"]:
                files.append(c["input"][k])
    return all(os.path.isfile(os.path.join(out, p)) for p in files)


# ---------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------

PORTRAITS = ("0-f1-su-ph.jpg", "0-f15-hao-ph.jpg", "15-f13-anc-ph.jpg", "45-m7-di-ph.jpg")

# Boxes (x_min, y_min, x_max, y_max) on multi_face.jpg (1000x667, five people in a row).
MULTI_FACE_BOXES = {
    "box_multi_p1_top_outside": [190.2, -30.5, 330.4, 190.6],   # rows -30..0 are black
    "box_multi_p2": [305.3, 229.6, 424.7, 375.2],
    "box_multi_p3": [425.0, 200.0, 535.0, 325.0],
    "box_multi_p4_halves": [520.5, 309.5, 645.5, 440.5],        # .5 rounds up
    "box_multi_p3_small_upscale": [455.0, 240.0, 505.0, 290.0],  # 50x50 -> 112 (upsampling)
    "box_multi_bottom_right_outside": [880.0, 560.0, 1040.2, 720.7],
}

SINGLE_FACE_LMK = [[230, 245], [318, 243], [272, 285], [250, 330], [305, 328]]


def _rotated(lmk, deg, centre_idx=2):
    th = math.radians(deg)
    c = lmk[centre_idx]
    out = []
    for x, y in lmk:
        dx, dy = x - c[0], y - c[1]
        out.append([round(c[0] + math.cos(th) * dx - math.sin(th) * dy, 3),
                    round(c[1] + math.sin(th) * dx + math.cos(th) * dy, 3)])
    return out


ALIGNED = {
    "align_single_face": ("single_face.jpg", SINGLE_FACE_LMK),
    "align_multi_p2": ("multi_face.jpg",
                       [[340, 280], [390, 282], [365, 305], [348, 330], [385, 330]]),
    "align_multi_p4": ("multi_face.jpg",
                       [[555.5, 355.2], [607.1, 354.8], [580.3, 380.6], [558.2, 398.4],
                        [600.7, 398.1]]),
    # rotated 15 degrees about the nose: the crop shows a tilted face
    "align_portrait_rotated": ("0-f15-hao-ph.jpg",
                               _rotated([[172, 248], [312, 248], [242, 300], [192, 370],
                                         [288, 370]], 15.0)),
    # landmarks near the top-left corner: part of the crop samples outside the image (black,
    # blended at the edge)
    "align_single_face_corner": ("single_face.jpg",
                                 [[round(1.5 * x - 60, 4), round(1.5 * y - 50, 4)]
                                  for x, y in [[38.2946, 51.6963], [73.5318, 51.5014],
                                               [56.0252, 71.7366], [41.5493, 92.3655],
                                               [70.7299, 92.2041]]]),
}


def build_cases(data: str):
    """Returns a list of case specs: dict(name, model, input (json), unit (float [3,112,112] in
    [0,1], float64), u8 (crop cases), tolerance)."""
    import cv2
    import numpy as np
    import arcface_ref as ref
    import make_checkpoint as mc

    cases = []
    img_cache: Dict[str, object] = {}

    def img(name):
        if name not in img_cache:
            img_cache[name] = ref.decode_image(os.path.join(data, name))
        return img_cache[name]

    def crop_case(model, name, u8):
        cases.append(dict(name=name, model=model, tolerance="exact", u8=u8,
                          unit=ref.to_unit_chw(u8),
                          input={"kind": "crop", "file": f"inputs/{name}.u8"}))

    def image_case(model, name, file, **extra):
        im = img(file)
        if "box" in extra:
            unit = ref.crop_box(im, extra["box"])
        elif "landmarks" in extra:
            unit = ref.crop_aligned(im, extra["landmarks"])
        else:
            unit = ref.crop_whole(im)
        inp = {"kind": "image", "path": os.path.join(data, file)}
        inp.update(extra)
        cases.append(dict(name=name, model=model, tolerance="resampled", unit=unit, input=inp))

    # ---- r50
    rng = np.random.default_rng(1000 + R50_SEED)
    for i, kind in enumerate(mc.SYNTH_KINDS):
        crop_case("r50", f"crop_{kind}_{i}", mc.synthetic_crop(rng, kind))
    sp = (rng.integers(0, 2, (112, 112, 3)) * 255).astype(np.uint8)  # only 0 and 255
    crop_case("r50", "crop_saltpepper_6", sp)
    face = img("single_face.jpg")[150:370, 180:400]  # 220x220 around the face
    area = cv2.resize(np.ascontiguousarray(face), (112, 112), interpolation=cv2.INTER_AREA)
    crop_case("r50", "crop_photo_area_7", area)
    for f in PORTRAITS + ("single_face.jpg",):
        image_case("r50", "whole_" + os.path.splitext(f)[0], f)
    for name, box in MULTI_FACE_BOXES.items():
        image_case("r50", name, "multi_face.jpg", box=box)
    for name, (f, lmk) in ALIGNED.items():
        image_case("r50", name, f, landmarks=lmk)
    image_case("r50", "whole_BWPictureHuman_gray", "BWPictureHuman.jpg")
    image_case("r50", "whole_Image_with_alpha_rgba", "Image_with_alpha.png")

    # ---- r100
    rng = np.random.default_rng(1000 + R100_SEED)
    for i, kind in enumerate(("uniform", "smooth", "face_like")):
        crop_case("r100", f"r100_crop_{kind}_{i}", mc.synthetic_crop(rng, kind))
    image_case("r100", "r100_whole_single_face", "single_face.jpg")

    # ---- insightface-style unfused r50 (ONNX import path)
    rng = np.random.default_rng(1000 + INSIGHTFACE_SEED)
    for i, kind in enumerate(("gaussian", "gradient", "face_like")):
        crop_case("insightface_r50", f"if50_crop_{kind}_{i}", mc.synthetic_crop(rng, kind))
    image_case("insightface_r50", "if50_whole_45-m7-di-ph", "45-m7-di-ph.jpg")
    return cases


# ---------------------------------------------------------------------------------------------

def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="ArcFace reference goldens")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True, help="the test photos (tests/data)")
    ap.add_argument("--force", action="store_true", help="regenerate even if up to date")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    out = os.path.abspath(a.out)
    data = os.path.abspath(a.data)
    ghash = generator_hash()
    if not a.force and up_to_date(out, data, ghash):
        print(f"make_goldens: {out} is up to date")
        return 0

    t0 = time.time()
    import numpy as np
    import torch
    import arcface_ref as ref
    import make_checkpoint as mc
    from iresnet_modules import fused_module_from_weights
    from onnx_graph import export_onnx, onnx_summary, strip_exporter_prefixes

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    log = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))
    os.makedirs(os.path.join(out, "inputs"), exist_ok=True)
    gpath = os.path.join(out, "goldens.json")
    if os.path.exists(gpath):
        os.remove(gpath)  # a half-written directory must not look complete

    calib = mc.calibration_batch()
    models = {}
    weights = {}
    for arch, seed in (("r50", R50_SEED), ("r100", R100_SEED)):
        t = time.time()
        f = f"{arch}.safetensors"
        w = mc.write_checkpoint(os.path.join(out, f), arch, seed, calib=calib)
        weights[arch] = {k: torch.from_numpy(v) for k, v in w.items()}
        models[arch] = {"file": f, "sha256": sha256_file(os.path.join(out, f)), "arch": arch,
                        "seed": seed, "layers": mc.ARCH_LAYERS[arch],
                        "num_batches_tracked": arch == "r50"}
        log(f"  {f}: {time.time() - t:.1f} s")

    t = time.time()
    fused50 = fused_module_from_weights(weights["r50"], mc.ARCH_LAYERS["r50"])
    export_onnx(fused50, os.path.join(out, "r50.onnx"))
    models["r50"]["onnx"] = "r50.onnx"
    models["r50"]["onnx_sha256"] = sha256_file(os.path.join(out, "r50.onnx"))
    ifr50 = mc.make_insightface_module(mc.ARCH_LAYERS["r50"], INSIGHTFACE_SEED, calib=calib)
    export_onnx(ifr50, os.path.join(out, "insightface_r50.onnx"))
    n_renamed = strip_exporter_prefixes(os.path.join(out, "insightface_r50.onnx"))
    if n_renamed != 53 * 2 + 25:
        raise RuntimeError(f"insightface_r50.onnx: renamed {n_renamed} initializers, expected 131")
    models["insightface_r50"] = {"file": "insightface_r50.onnx",
                                 "sha256": sha256_file(os.path.join(out, "insightface_r50.onnx")),
                                 "arch": "r50", "seed": INSIGHTFACE_SEED, "format": "onnx",
                                 "layers": mc.ARCH_LAYERS["r50"]}
    expected_ops = {"Conv": 53, "PRelu": 25, "BatchNormalization": 26, "Add": 24, "Flatten": 1,
                    "Gemm": 1}
    for key, f in (("r50", "r50.onnx"), ("insightface_r50", "insightface_r50.onnx")):
        s = onnx_summary(os.path.join(out, f))
        if s["op_counts"] != expected_ops or s["conv_without_bias"] or \
                s["inputs"] != ["input.1"] or s["outputs"] != ["embedding"]:
            raise RuntimeError(f"{f}: unexpected graph {s}")
        models[key]["onnx_ops"] = s["op_counts"]
    log(f"  onnx exports: {time.time() - t:.1f} s")

    # ---- cases
    t = time.time()
    specs = build_cases(data)
    for c in specs:
        name = c["name"]
        if "u8" in c:
            c["u8"].tofile(os.path.join(out, f"inputs/{name}.u8"))
        c["x"] = ref.model_input(c["unit"])
        c["x"].numpy().tofile(os.path.join(out, f"inputs/{name}.f32"))
        c["input"]["f32"] = f"inputs/{name}.f32"
        if c["tolerance"] == "resampled":
            q = ref.quantize_unit(c["unit"])
            q.tofile(os.path.join(out, f"inputs/{name}.rounded.u8"))
            c["input"]["u8_rounded"] = f"inputs/{name}.rounded.u8"
            c["xq"] = ref.model_input(ref.to_unit_chw(q))

    def run(model_key, xs):
        x = torch.stack(xs)
        with torch.no_grad():
            if model_key == "insightface_r50":
                return ifr50(x)
            return ref.forward(weights[model_key], x)

    for key in ("r50", "r100", "insightface_r50"):
        mine = [c for c in specs if c["model"] == key]
        e = run(key, [c["x"] for c in mine])
        for c, v in zip(mine, e):
            c["embedding"] = v
        rq = [c for c in mine if "xq" in c]
        if rq:
            eq = run(key, [c["xq"] for c in rq])
            for c, v in zip(rq, eq):
                c["embedding_u8_rounded"] = v
    log(f"  cases: {time.time() - t:.1f} s")

    def cos(u, v):
        u, v = u.double(), v.double()
        return float(u @ v / (u.norm() * v.norm()))

    cases_json = []
    for c in specs:
        cj = {"name": c["name"], "model": c["model"], "input": c["input"],
              "tolerance": c["tolerance"],
              "norm": float(c["embedding"].double().norm()),
              "embedding": [float(v) for v in c["embedding"]]}
        if "embedding_u8_rounded" in c:
            cj["embedding_u8_rounded"] = [float(v) for v in c["embedding_u8_rounded"]]
            cj["cosine_u8_rounded"] = cos(c["embedding"], c["embedding_u8_rounded"])
        cases_json.append(cj)

    g = {"version": SCHEMA_VERSION,
         "generator_sha256": ghash,
         "data_dir": data,
         "reference": {"compute_dtype": "float32", "torch": torch.__version__,
                       "preprocessing": "uint8 RGB -> /255 -> F.interpolate bilinear "
                                        "align_corners=False antialias=False to 112 -> *2-1",
                       "box_rounding": "floor(v+0.5); columns [x0,x1), rows [y0,y1); outside "
                                       "black",
                       "alignment": "Umeyama similarity onto the ArcFace template; exact "
                                    "(float64) bilinear warp, black outside"},
         "models": models,
         "cases": cases_json}
    tmp = gpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(g, f, indent=1)
    os.replace(tmp, gpath)

    # ---- summary
    for key in ("r50", "r100", "insightface_r50"):
        mine = [c for c in specs if c["model"] == key]
        E = torch.stack([c["embedding"] for c in mine]).double()
        En = E / E.norm(dim=1, keepdim=True)
        C = (En @ En.T).numpy()
        iu = np.triu_indices(len(mine), 1)
        worst = int(np.argmax(C[iu]))
        log(f"{key}: {len(mine)} cases; norms {E.norm(dim=1).min():.1f}..{E.norm(dim=1).max():.1f}; "
            f"pairwise cosine max {C[iu].max():.3f} ({mine[iu[0][worst]]['name']} vs "
            f"{mine[iu[1][worst]]['name']}), mean {C[iu].mean():.3f}")
    for cj in cases_json:
        if "cosine_u8_rounded" in cj:
            flag = "" if cj["cosine_u8_rounded"] >= 0.99995 else "   <-- below 0.99995"
            log(f"  u8-rounded vs float crop  {cj['name']:34s} {cj['cosine_u8_rounded']:.7f}{flag}")
    log(f"make_goldens: wrote {out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
