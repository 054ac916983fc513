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
# Usage: deploy/fetch-models.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PKG=@vladmandic/face-api
VERSION=1.7.15
INTEGRITY=sha512-WDMmK3CfNLo8jylWqMoQgf4nIst3M0fzx1dnac96wv/dvMTN4DxC/Pq1DGtduDk1lktCamQ3MIDXFnvrdHTXDw==
# sha256 and path inside the package (package/...); installed as DIR/<basename>.
FILES=(
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
dest=${1:-models/face-api}
cache=${ARCFACE_MODEL_CACHE:-$HOME/.cache/arcface-models}
tarball=$cache/vladmandic-face-api-$VERSION.tgz
say() { echo "fetch-models: $*"; }
die() { echo "fetch-models: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
# Whether DIR holds every file with its checksum.
complete() {
  local entry sum path
  for entry in "${FILES[@]}"; do
    read -r sum path <<<"$entry"
    [[ -f $dest/${path##*/} && $(sha256_of "$dest/${path##*/}") == "$sum" ]] || return 1
  done
}

if complete; then
  say "$dest already holds $PKG@$VERSION's ${#FILES[@]} files (sha256 checked); nothing to do"
  exit 0
fi

command -v openssl >/dev/null ||
  die "openssl is missing (to check the package's sha512); deploy/install-deps.sh installs it"
integrity_of() { echo "sha512-$(openssl dgst -sha512 -binary "$1" | base64 -w0)"; }

mkdir -p "$cache"
if [[ -f $tarball && $(integrity_of "$tarball") != "$INTEGRITY" ]]; then
  say "the cached $tarball does not match $PKG@$VERSION's integrity; fetching it again"
  rm -f "$tarball"
fi
tmp=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
if [[ -f $tarball ]]; then
  say "using the cached $tarball"
else
  command -v npm >/dev/null ||
    die "npm is missing: it fetches $PKG@$VERSION (deploy/install-deps.sh installs it)"
  registry=$(npm config get registry 2>/dev/null || echo "npm's registry")
  say "downloading $PKG@$VERSION from $registry into $cache"
  if ! npm pack "$PKG@$VERSION" --pack-destination "$tmp" --fetch-retries=1 \
      --fetch-timeout=60000 --loglevel=error >"$tmp/npm.log" 2>&1; then
    echo "fetch-models: cannot download $PKG@$VERSION from $registry (no network, or the" \
         "registry is unreachable; npm_config_registry picks a mirror). npm said:" >&2
    sed 's/^/  /' "$tmp/npm.log" >&2
    exit 1
  fi
  packed=("$tmp"/*.tgz)
  [[ -f ${packed[0]} ]] || die "npm pack left no tarball in $tmp"
  got=$(integrity_of "${packed[0]}")
  [[ $got == "$INTEGRITY" ]] ||
    die "the downloaded $PKG@$VERSION has integrity $got, expected $INTEGRITY: refusing it"
  mv "${packed[0]}" "$tarball"
fi
# Checked on every use: the cache may have changed since it was written.
[[ $(integrity_of "$tarball") == "$INTEGRITY" ]] ||
  die "$tarball does not have $PKG@$VERSION's integrity $INTEGRITY: remove it and run again"

members=()
for entry in "${FILES[@]}"; do members+=("package/${entry#* }"); done
tar -xzf "$tarball" -C "$tmp" "${members[@]}" ||
  die "$tarball lacks some of: ${members[*]}"
mkdir -p "$dest"
for entry in "${FILES[@]}"; do
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
say "$dest: $PKG@$VERSION's ${#FILES[@]} files (MIT licence: $dest/LICENSE), sha256 checked"
