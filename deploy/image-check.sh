#!/bin/sh
# The runtime image's smoke test, run by the Dockerfile while it builds the image, so that a
# missing library, Python module or loader path fails the build and not the first user:
#   sh deploy/image-check.sh
# Runs both binaries' --help, `id`, and arcface-server with the demo weights, the face detector
# of ARCFACE_DETECTOR (read before the scrub below; the image's /opt/arcface/face-api) and a
# SQLite gallery store on loopback (ephemeral ports, no other ARCFACE_* variable of the
# environment) until it writes its port file (SERVING); then the health check, an Embed of a PNG
# through arcface-client, an Embed of a raw crop, a Detect, a gallery Enroll and Identify and
# /readyz through the Python client, `arcface-client detect` and `gallery list`; then SIGTERM,
# which must end the server with 0.
# IMAGE_CHECK_MAPS=FILE: the running server's /proc/PID/maps (every file it mapped, libraries
# it dlopen'ed included) is written to FILE before it stops (deploy/image-rootfs.sh uses it).
# POSIX sh and coreutils only: the image has no other shell tools. Exits 1 with the server's log
# on any failure.
set -eu

detector=${ARCFACE_DETECTOR:-}
set -f # no pathname expansion of the environment's words
for v in $(env); do
  case $v in ARCFACE_*=*) unset "${v%%=*}" ;; esac
done
set +f

fail() {
  echo "image-check: $*" >&2
  [ -f "$dir/log" ] && tail -n 40 "$dir/log" >&2
  [ -n "${pid:-}" ] && kill -KILL "$pid" 2>/dev/null
  rm -rf "$dir"
  exit 1
}

dir=$(mktemp -d)
pid=
[ -d "$detector" ] || fail "ARCFACE_DETECTOR='$detector' is not the detector's folder"
arcface-server --help >/dev/null || fail "arcface-server --help failed"
arcface-client --help >/dev/null || fail "arcface-client --help failed"
id -u >/dev/null || fail "id failed"

arcface-server --demo-weights --detector "$detector" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --gallery-store "sqlite:$dir/gallery.db" --port-file "$dir/ports" >"$dir/log" 2>&1 &
pid=$!
tries=0
until [ -s "$dir/ports" ]; do
  kill -0 "$pid" 2>/dev/null || fail "arcface-server exited before serving"
  tries=$((tries + 1))
  [ "$tries" -le 3000 ] || fail "arcface-server not serving after 300 s"
  sleep 0.1
done
read -r grpc_port http_port <"$dir/ports"
server=127.0.0.1:$grpc_port

arcface-client --server "$server" health >/dev/null || fail "health is not SERVING"

python3 - "$dir/face.png" "$server" "$http_port" <<'EOF' || fail "the Python client failed"
import struct, sys, urllib.request, zlib
import numpy as np
from arcface_client import ArcFaceClient

png, server, http_port = sys.argv[1:]
# A 112 x 112 RGB gradient as a PNG (zlib alone), for arcface-client's decode path.
rows = b"".join(b"\0" + bytes((x * 2, y * 2, 128)[c] for x in range(112) for c in range(3))
                for y in range(112))
def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
with open(png, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 112, 112, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
crop = np.random.default_rng(1).integers(0, 256, (112, 112, 3), dtype=np.uint8)
with ArcFaceClient(server, timeout=120) as client:
    e = client.embed([crop])
    enrolled = client.enroll("image-check", [crop])
    found = client.identify([crop]).best()[0]
    detection = client.detect(png, embed=True)  # no face in a gradient: the networks still run
assert (detection.width, detection.height, detection.faces) == (112, 112, ()), detection
assert e.shape == (1, 512) and np.isfinite(e).all() and np.abs(e).sum() > 0, e
assert (found.subject_id, found.face_id) == ("image-check", enrolled.face_ids[0]), found
with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=10) as r:
    assert r.status == 200, r.status
EOF
arcface-client --server "$server" embed "$dir/face.png" >/dev/null ||
  fail "arcface-client embed of a PNG failed"
arcface-client --server "$server" detect "$dir/face.png" --json >/dev/null ||
  fail "arcface-client detect of a PNG failed"
arcface-client --server "$server" gallery list >/dev/null 2>&1 ||
  fail "arcface-client gallery list failed"

[ -z "${IMAGE_CHECK_MAPS:-}" ] || cp "/proc/$pid/maps" "$IMAGE_CHECK_MAPS"
kill -TERM "$pid"
rc=0
wait "$pid" || rc=$?
pid=
[ "$rc" -eq 0 ] || fail "arcface-server exited with $rc on SIGTERM"
rm -rf "$dir"
echo "image-check: arcface-server served with the demo weights and the detector and drained; clients, Python ok" >&2
