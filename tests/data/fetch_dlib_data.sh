#!/usr/bin/env bash
# Fetches dlib's example face photos from Debian's archive into DEST, once:
#   DEST/faces/  PASCAL VOC photos with face boxes and 68-point landmarks (the *.xml files)
#   DEST/johns/  five people, eleven aligned 150x150 photos each
#   DEST/copyright  Debian's copyright file of the package (the licence travels with the data)
# They ship in the documentation of Debian's libdlib19.1, which minimal images leave out of
# /usr/share/doc, so the package is downloaded (apt-get download: no root needed) and unpacked
# into a temporary folder (dpkg -x), never installed. DEST/.complete marks a finished fetch; with
# it present nothing is done. Exits non-zero, naming the package and the archive, when the
# package cannot be downloaded. tests/data/README.md describes the data.
# Usage: tests/data/fetch_dlib_data.sh DEST
set -euo pipefail
PKG=libdlib19.1
dest=${1:?usage: fetch_dlib_data.sh DEST}
stamp=$dest/.complete
[[ -f $stamp ]] && exit 0

for tool in apt-get dpkg; do
  command -v $tool >/dev/null ||
    { echo "fetch_dlib_data: needs $tool (Debian) to fetch the package $PKG" >&2; exit 1; }
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Where apt would fetch it from: the URI when apt knows the package, else the configured sources.
archive=$(apt-get download --print-uris "$PKG" 2>/dev/null |
          sed -n "1s/^'\([^']*\)'.*/\1/p" || true)
[[ -n $archive ]] ||
  archive="the archives in /etc/apt/sources.list* ($PKG unknown to apt: run apt-get update as root)"
if ! (cd "$tmp" && apt-get download "$PKG") >"$tmp/apt.log" 2>&1; then
  echo "fetch_dlib_data: cannot download the Debian package $PKG (dlib's example faces) from" \
       "$archive; apt-get said:" >&2
  sed 's/^/  /' "$tmp/apt.log" >&2
  exit 1
fi
deb=("$tmp"/"$PKG"_*.deb)
dpkg -x "${deb[0]}" "$tmp/root"
doc=$tmp/root/usr/share/doc/$PKG
for d in faces johns; do
  [[ -d $doc/examples/$d ]] ||
    { echo "fetch_dlib_data: ${deb[0]##*/} has no examples/$d/" >&2; exit 1; }
done

mkdir -p "$dest"
rm -rf "$dest/faces" "$dest/johns"
cp -r "$doc/examples/faces" "$doc/examples/johns" "$dest/"
cp "$doc/copyright" "$dest/copyright"
dpkg-deb -f "${deb[0]}" Package Version >"$stamp"
echo "fetch_dlib_data: $(tr '\n' ' ' <"$stamp")-> $dest"
