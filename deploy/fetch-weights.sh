#!/usr/bin/env bash
# Downloads py-feat's ArcFace IResNet-50 weights (arcface_r50.safetensors, ~166 MiB) from the
# Hugging Face repo py-feat/arcface_r50 into models/. Resumable: an interrupted download
# continues where it stopped. HF_ENDPOINT selects a mirror.
#
# Licence: the trained weights (InsightFace, WebFace600K) are for NON-COMMERCIAL RESEARCH ONLY.
# This project never bundles them; by downloading them you accept InsightFace's terms.
set -euo pipefail
cd "$(dirname "$0")/.."
ENDPOINT=${HF_ENDPOINT:-https://huggingface.co}
URL="$ENDPOINT/py-feat/arcface_r50/resolve/main/arcface_r50.safetensors"
DEST=models/arcface_r50.safetensors

if [[ -s $DEST ]]; then
  echo "fetch-weights: $DEST is already there ($(du -h "$DEST" | cut -f1)); remove it to fetch again"
  exit 0
fi
mkdir -p models
command -v curl >/dev/null || { echo "fetch-weights: curl is missing (deploy/install-deps.sh installs it)" >&2; exit 1; }
echo "fetch-weights: downloading $URL"
echo "fetch-weights: the weights are licensed for non-commercial research only (InsightFace terms)"
if ! curl -fL --retry 3 --connect-timeout 20 -C - --progress-bar -o "$DEST.part" "$URL"; then
  echo "fetch-weights: could not download $URL (no network, or the host is unreachable)." >&2
  echo "fetch-weights: a partial file, if any, stays at $DEST.part and the next run resumes it." >&2
  echo "fetch-weights: without the weights, deploy/run.sh --demo-weights runs the real pipeline" >&2
  echo "fetch-weights: on seeded random weights (embeddings are then NOT meaningful)." >&2
  exit 1
fi
mv "$DEST.part" "$DEST"
echo "fetch-weights: $DEST sha256 $(sha256sum "$DEST" | cut -d' ' -f1)"
