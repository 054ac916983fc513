#!/usr/bin/env bash
# Fails when a tracked file refers to a place outside the repository: the sibling folder named
# "shared" that once held the test photos and the design notes, or those notes by name (their
# facts now live in docs/ARCHITECTURE.md and docs/MODEL.md). A clone has nothing beside it,
# so the photos live in tests/data and the design in docs/ (issue 11).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  echo "repo_self_contained: not a git checkout (no list of tracked files); skipped"
  exit 77
fi
# Spelled in pieces so that this file does not match itself.
old=shared
notes="ARCFACE|DESIGN|ENVIRONMENT"
pattern="\.\./$old|$old/data|/work/$old|ARCFACE_${old^^}_DATA|\b($notes)\.m[d]"
rc=0
git grep -n -I -E "$pattern" -- . ':(exclude)tests/repo_self_contained.sh' || rc=$?
case $rc in
  0) echo "repo_self_contained: the lines above refer to files outside the repository" >&2
     exit 1 ;;
  1) echo "repo_self_contained: no tracked file refers to the old sibling folder" ;;
  *) echo "repo_self_contained: git grep failed ($rc)" >&2; exit 2 ;;
esac
