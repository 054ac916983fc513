"""Helpers of the packaging tests: the in-tree client's answer that the installed packages must
reproduce, and running a program with its output quoted on failure."""

import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

import arcface_testlib as lib  # noqa: E402


def in_tree_embedding(target, image):
    """The raw embedding of the whole image, from the client in <build>/python."""
    from arcface_client import ArcFaceClient

    with ArcFaceClient(target, timeout=120) as client:
        emb = client.embed([image])
    assert emb.shape == (1, lib.EMBEDDING_DIM) and emb.dtype == np.float32
    return emb[0]


def assert_same_embedding(got, want, what):
    """Same server, same model, same input: equal up to float noise; any other face, colour
    order or crop lands far outside this."""
    got = np.asarray(got, np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    scale = float(np.abs(want).max())
    assert scale > 0, "the reference embedding is all zeros"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=what)


def run(cmd, what, timeout, **kwargs):
    """Runs cmd; asserts a zero exit, quoting its output when not. Returns stdout."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)
    assert proc.returncode == 0, (f"{what} exited with {proc.returncode}: {' '.join(map(str, cmd))}"
                                  f"\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n"
                                  f"{proc.stderr[-4000:]}")
    return proc.stdout
