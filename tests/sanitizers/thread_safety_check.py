#!/usr/bin/python3
"""Runs clang's thread-safety analysis over every .cc of server/ and client/: each compile
command of BUILD_DIR/compile_commands.json (a build configured with clang and
-DARCFACE_THREAD_SAFETY=ON, so the commands carry -Wthread-safety -Werror=thread-safety) again
with -fsyntax-only, which analyses as much as a compile but emits nothing.

    tests/sanitizers/thread_safety_check.py BUILD_DIR [-j N]

Exit status 1 when any file has a finding (or fails to compile), with clang's messages.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKED = ("server/", "client/")


def syntax_only(entry):
    args = shlex.split(entry["command"])
    if "-Wthread-safety" not in args:
        return entry["file"], 1, "compiled without -Wthread-safety (ARCFACE_THREAD_SAFETY off?)"
    if "-o" in args:  # the object file: -fsyntax-only writes none
        i = args.index("-o")
        del args[i:i + 2]
    r = subprocess.run(args + ["-fsyntax-only"], cwd=entry["directory"], capture_output=True,
                       text=True)
    return entry["file"], r.returncode, r.stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("build_dir")
    ap.add_argument("-j", type=int, default=os.cpu_count())
    a = ap.parse_args(argv)
    with open(os.path.join(a.build_dir, "compile_commands.json")) as f:
        entries = [e for e in json.load(f)
                   if os.path.relpath(e["file"], ROOT).startswith(CHECKED)]
    if not entries:
        print(f"thread_safety_check: no server/ or client/ files in {a.build_dir}")
        return 1
    failed = 0
    with ThreadPoolExecutor(a.j) as pool:
        for path, rc, err in pool.map(syntax_only, entries):
            if rc != 0:
                print(f"--- {os.path.relpath(path, ROOT)}\n{err}", end="")
            failed += rc != 0
    print(f"thread_safety_check: {len(entries)} files, {failed} with errors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
