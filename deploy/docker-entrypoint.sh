#!/bin/sh
# The image's entry point: picks the weights, then runs arcface-server as PID 1 (it handles
# SIGTERM itself: drain, then exit 0).
#   ARCFACE_DEMO_WEIGHTS=true   the demo: the default model `dlib` is dlib's trained face
#                               descriptor (face-api's face_recognition_model, which the image
#                               carries in /opt/arcface/face-api with the detector's files: real
#                               verdicts), and model `arcface-demo` ArcFace on seeded random
#                               weights (the pipeline is real, the embeddings are not
#                               meaningful); ARCFACE_WEIGHTS is then ignored
#   ARCFACE_WEIGHTS=/models/..  otherwise (default /models/arcface_r50.safetensors, mounted read-only)
# Arguments starting with "-" go to arcface-server; anything else runs as a command
# (e.g. `docker run IMAGE arcface-client info --server host:50051`).
set -eu

case "${1:-}" in
  "" | -*) ;;
  *) exec "$@" ;;
esac

demo=false
case "${ARCFACE_DEMO_WEIGHTS:-false}" in
  true | TRUE | True | 1 | yes | on) demo=true ;;
esac
for arg in "$@"; do
  case "$arg" in
    --demo-weights) demo=true ;;
    --weights | --weights=*) demo=explicit ;;
  esac
done

# The server refuses both a weights file and the demo weights: keep only the chosen one.
if [ "$demo" = true ]; then
  unset ARCFACE_WEIGHTS
  echo "docker-entrypoint: DEMO: the default model 'dlib' is dlib's trained face descriptor;" \
    "'arcface-demo' is ArcFace on seeded random weights, its embeddings are NOT meaningful" >&2
  set -- --model dlib=/opt/arcface/face-api "$@"
else
  unset ARCFACE_DEMO_WEIGHTS
  if [ "$demo" = false ] && [ ! -r "${ARCFACE_WEIGHTS:-}" ]; then
    echo "docker-entrypoint: no readable weights at ARCFACE_WEIGHTS='${ARCFACE_WEIGHTS:-}'." >&2
    echo "docker-entrypoint:   mount them: -v \$PWD/models:/models:ro (deploy/fetch-weights.sh gets py-feat's file)" >&2
    echo "docker-entrypoint:   or try the pipeline on random weights: -e ARCFACE_DEMO_WEIGHTS=true" >&2
    exit 2
  fi
fi
exec arcface-server "$@"
