"""Identity accuracy on real faces, end to end (ctest identity_accuracy): one arcface-server with
dlib's trained ResNet (`--model dlib=face-api`, the default) beside ArcFace's random demo
weights (`arcface-demo`), the face detector and a SQLite gallery; `arcface-client eval --json`
on dlib's examples/johns (five people, eleven 150x150 aligned chips each: 1485 pairs, 275 of
them same-person) through the server's paths:

- the chips whole -> the dlib model, and top-1 again through the server's FaceGallery;
- each chip padded (`--pad 1`) -> the server's detector -> alignment by its five landmarks into
  dlib's chip -> the dlib model (without the border the detector misses 39 of the 55 tight
  chips);
- the same chips whole through the random ArcFace, and its gallery: the control.

Measured (docs/BENCHMARKS.md, "Identity accuracy on real faces"): dlib 1.0000 accuracy, AUC
1.0000, TAR 1.0 at FAR 1e-3 and top-1 55/55 on all three dlib paths; the control 0.8169 accuracy
(always "different": 0.8148), AUC 0.7402, top-1 0.6909. The bounds leave room for another CPU's
rounding, never for a model that stopped telling these five people apart."""

import json
import os
import re

import pytest

import arcface_testlib as lib
from conftest import run_cli

PAIRS, SAME = 55 * 54 // 2, 5 * 11 * 10 // 2


@pytest.fixture(scope="module")
def server(session_servers, tmp_path_factory):
    store = tmp_path_factory.mktemp("identity") / "gallery.db"
    started = session_servers(
        ["--model", f"dlib={lib.DETECTOR_MODELS}", "--demo-weights", *lib.detector_args(),
         "--device", "cpu", "--threads", str(lib.THREADS), "--gallery-store", f"sqlite:{store}"],
        name="identity")
    return f"127.0.0.1:{started.grpc_port}"


def evaluate(server, johns, *args, model=None):
    model_args = ["--model", model] if model else []
    r = run_cli("--server", server, *model_args, "eval", johns, *args, "--json")
    assert r.returncode == 0, r.stderr  # 1 would mean an image failed (no face found, say)
    doc = json.loads(r.stdout)
    assert (doc["images"], doc["images_failed"]) == (55, 0), doc["errors"]
    assert doc["pairs"] == {"total": PAIRS, "same": SAME, "different": PAIRS - SAME, "skipped": 0}
    figures = (f"accuracy {doc['accuracy']['mean']:.4f} (chance {doc['accuracy']['chance']:.4f}), "
               f"AUC {doc['roc_auc']:.4f}, TAR@FAR1e-3 {doc['tar_at_far'][0].get('tar')}, "
               f"top-1 {doc['top1']['rate']:.4f}")
    print(f"johns {' '.join(model_args + list(args))}: {doc['model_id']}: {figures}")
    return doc, figures


def assert_tells_people_apart(doc, figures):
    assert doc["random_weights"] is False and doc["model_id"].startswith("dlib-resnet@")
    assert doc["accuracy"]["mean"] >= 0.98, figures
    assert doc["roc_auc"] >= 0.99, figures
    assert doc["tar_at_far"][0]["far"] == 1e-3 and doc["tar_at_far"][0]["tar"] >= 0.9, figures
    assert doc["top1"]["rate"] >= 0.95, figures
    # The 10-fold thresholds sit at dlib's verification threshold: cosine 0.9144 between unit
    # descriptors is its Euclidean 0.6 at their typical norm (docs/MODEL.md).
    assert 0.88 <= doc["accuracy"]["threshold_mean"] <= 0.94, figures


def test_dlib_tells_the_johns_apart_whole_and_through_the_gallery(server, johns):
    doc, figures = evaluate(server, johns, "--gallery", "identity-scratch")
    assert doc["faces"] == "whole"
    assert_tells_people_apart(doc, figures)
    gallery = doc["gallery_top1"]
    assert gallery["probes"] == 55 and gallery["rate"] >= 0.95, gallery


def test_dlib_tells_the_johns_apart_through_detection_and_alignment(server, johns):
    doc, figures = evaluate(server, johns, "--faces", "detect", "--pad", "1")
    assert doc["faces"] == "detect" and doc["pad"] == 1
    assert_tells_people_apart(doc, figures)


def test_random_arcface_is_the_control(server, johns):
    # Its gallery binds to the model eval measures (a 512-d one here), not the default (dlib's).
    doc, figures = evaluate(server, johns, "--gallery", "identity-control", model="arcface-demo")
    assert doc["random_weights"] is True and doc["model_id"].startswith("arcface-r50@")
    # No identity model: its 10-fold accuracy is that of always answering "different" (1210 of
    # the 1485 pairs). Its AUC is still above one half: a random network sees each person's
    # lighting, framing and background, alike in their eleven photos, so a person's photos land
    # a little closer together than two people's.
    assert doc["accuracy"]["mean"] <= doc["accuracy"]["chance"] + 0.03, figures
    assert 0.5 <= doc["roc_auc"] <= 0.85, figures
    assert doc["top1"]["rate"] <= 0.85, figures
    gallery = doc["gallery_top1"]
    # The gallery's exact search finds the nearest face as the client's scan does (float
    # cosines may break a near tie the other way).
    assert gallery["probes"] == 55, gallery
    assert abs(gallery["correct"] - doc["top1"]["correct"]) <= 1, (gallery, doc["top1"])


def test_compare_gives_dlibs_verdict_at_its_threshold(server, johns):
    """What a new user of `deploy/run.sh --demo-weights` sees: compare's threshold is the served
    model's, dlib's 0.9144, and its verdicts are right; `--model arcface-demo` says its own are
    no identity verdict."""
    def photos(person):
        return [os.path.join(johns, person, f)
                for f in sorted(os.listdir(os.path.join(johns, person)))]
    (a, b), other = photos("John_Salley")[:2], photos("John_Savage")[0]
    for x, y, verdict in ((a, b, "same"), (a, other, "different")):
        r = run_cli("--server", server, "compare", x, y)
        assert r.returncode == 0, r.stderr
        assert re.search(rf"cosine=[0-9.]+\t{verdict} \(threshold 0\.9144\)$", r.stdout), r.stdout
    r = run_cli("--server", server, "--model", "arcface-demo", "compare", a, other)
    assert r.returncode == 0 and re.search(
        r"\(threshold 0\.40; random weights: not an identity verdict\)$", r.stdout), r.stdout
