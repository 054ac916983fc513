#!/usr/bin/env bash
# Installs what is missing, builds, and starts arcface-server (gRPC on :50051, HTTP /metrics
# /healthz /readyz on :8080; every flag also has an ARCFACE_* variable: arcface-server --help).
# Weights: $ARCFACE_WEIGHTS, else models/arcface_r50.safetensors (deploy/fetch-weights.sh gets
# it). Without weights it says so and offers the demo (--demo-weights or
# ARCFACE_DEMO_WEIGHTS=true): the default model is then dlib's trained ResNet face descriptor
# (face-api's face_recognition_model in models/face-api, fetched with the detector's files:
# real identity verdicts), and model `arcface-demo` is ArcFace on seeded random weights (the
# real ArcFace pipeline, meaningless embeddings: arcface-client --model arcface-demo ...).
# The face gallery: a SQLite store in the state folder $ARCFACE_DATA_DIR (default var/ in the
# repository, git-ignored): --gallery-store sqlite:$ARCFACE_DATA_DIR/gallery.db, unless a
# --gallery-store argument or ARCFACE_GALLERY_STORE chooses another (postgres://..., none).
# Face detection (Detect, DetectStream): deploy/fetch-models.sh installs the detector's files
# into models/face-api once (npm, checksummed; later runs find them there) and the server gets
# --detector models/face-api, unless a --detector argument or ARCFACE_DETECTOR chooses another
# folder or `none` (no detection; nothing is fetched).
# Usage: deploy/run.sh [--demo-weights] [extra arguments for arcface-server, e.g. --listen 0.0.0.0:50052]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${ARCFACE_BUILD_DIR:-build}

demo=${ARCFACE_DEMO_WEIGHTS:-false}
args=()
for a in "$@"; do
  if [[ $a == --demo-weights ]]; then demo=true; else args+=("$a"); fi
done

# The server alone needs no test tools (PyTorch, Node, Prometheus).
deploy/install-deps.sh --runtime-only
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DARCFACE_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target arcface-server

weights=${ARCFACE_WEIGHTS:-models/arcface_r50.safetensors}
weight_args=()
if [[ $demo == true ]]; then
  :
elif [[ -f $weights ]]; then
  weight_args=(--weights "$weights")
else
  echo "run: no weights at '$weights'." >&2
  echo "run:   get them:  deploy/fetch-weights.sh   (py-feat/arcface_r50, non-commercial licence)" >&2
  echo "run:   or point ARCFACE_WEIGHTS at a .safetensors or InsightFace .onnx file" >&2
  echo "run:   or try the demo (dlib's trained model; ArcFace on seeded random weights):" \
    "deploy/run.sh --demo-weights" >&2
  if [[ -t 0 ]]; then
    read -r -p "Use the demo now? [y/N] " answer
    [[ $answer == [yY]* ]] || exit 1
    demo=true
  else
    exit 1
  fi
fi
# Face-api's files carry both the detector's networks and dlib's trained descriptor.
fetched_face_api=false
fetch_face_api() {
  [[ $fetched_face_api == false ]] || return 0
  deploy/install-deps.sh --models && deploy/fetch-models.sh models/face-api && fetched_face_api=true
}
if [[ $demo == true ]]; then
  if ! fetch_face_api; then
    echo "run: could not fetch face-api's files into models/face-api (above: why)." >&2
    exit 1
  fi
  echo "run: DEMO: the default model 'dlib' is dlib's trained face descriptor (real verdicts);" \
    "'arcface-demo' is ArcFace on seeded random weights: the pipeline is real, its embeddings" \
    "are NOT meaningful (arcface-client --model arcface-demo ...)" >&2
  weight_args=(--model dlib=models/face-api --demo-weights)
fi
store_chosen=false
[[ -z ${ARCFACE_GALLERY_STORE:-} ]] || store_chosen=true
for a in "${args[@]}"; do
  [[ $a != --gallery-store && $a != --gallery-store=* ]] || store_chosen=true
done
if [[ $store_chosen == false ]]; then
  data=${ARCFACE_DATA_DIR:-var}
  mkdir -p "$data"
  data=$(cd "$data" && pwd)
  echo "run: the gallery is kept in $data/gallery.db (ARCFACE_DATA_DIR, --gallery-store)" >&2
  args+=(--gallery-store "sqlite:$data/gallery.db")
fi

detector_chosen=false
[[ -z ${ARCFACE_DETECTOR:-} ]] || detector_chosen=true
for a in "${args[@]}"; do
  [[ $a != --detector && $a != --detector=* ]] || detector_chosen=true
done
if [[ $detector_chosen == false ]]; then
  if ! fetch_face_api; then
    echo "run: could not fetch the face detector's files into models/face-api (above: why)." >&2
    echo "run:   serve without detection: ARCFACE_DETECTOR=none deploy/run.sh" >&2
    exit 1
  fi
  args+=(--detector models/face-api)
fi

# The choice is made here: the server must not see a second one through its environment.
unset ARCFACE_WEIGHTS ARCFACE_DEMO_WEIGHTS
exec "$BUILD/server/arcface-server" "${weight_args[@]}" "${args[@]}"
