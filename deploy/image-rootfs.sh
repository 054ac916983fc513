#!/usr/bin/env bash
# Gathers the runtime image's root file system into DEST, from the Dockerfile stage `rootfs`
# (every runtime package installed there):
#   image-rootfs.sh [--no-run] DEST PROGRAM...
# Debian's libtorch1.13 depends on OpenCV's video and GUI modules, FFmpeg, GDAL and Qt, which
# bring 325 packages beside the base's 88; the image takes only the files that are loaded:
# - the shared libraries of the PROGRAMs (not the PROGRAMs themselves: the Dockerfile copies them
#   in their own layer), resolved by the dynamic loader (ldd: the whole closure, whatever the
#   programs link), each with its chain of symbolic links (sonames, /etc/alternatives);
# - every file the server maps while deploy/image-check.sh runs it here (demo weights, a PNG and
#   a raw crop embedded, the detector of ARCFACE_DETECTOR run): libraries it dlopen()s too; --no-run skips this (the CUDA variant,
#   which cannot start without the host's driver);
# - tools: /bin/sh (dash: the entry point, a shell for `docker exec`) and coreutils (`sleep`
#   of the Kubernetes preStop hook, `id`, ...);
# - the Python client's interpreter and modules: the files of python3, python3-grpcio,
#   python3-numpy and of the Python packages they depend on (documentation left out), and the
#   shared libraries of their programs and extension modules;
# - merged-/usr's top-level links as here, /etc/ld.so.cache for exactly these libraries,
#   /etc/passwd and /etc/group with `arcface` (uid/gid 10001), /tmp, /models, and
#   /var/lib/arcface (the gallery's volume, owned by arcface).
# Files under /opt/libtorch are skipped: the Dockerfile copies that directory whole (the CUDA
# variant's libtorch; empty otherwise). A library that ldd cannot find fails the script, except
# the sonames in IMAGE_ALLOW_MISSING (space-separated; the CUDA variant's driver, libcuda.so.1,
# comes from the host).
set -euo pipefail

run=1
if [[ ${1:-} == --no-run ]]; then run=0; shift; fi
(($# >= 2)) || { echo "usage: $0 [--no-run] DEST PROGRAM..." >&2; exit 2; }
DEST=$1
shift
PROGRAMS=("$@")
PYTHON_ROOTS=(python3 python3-grpcio python3-numpy)
TOOL_PACKAGES=(coreutils)

mkdir -p "$DEST"
for top in bin sbin lib lib32 lib64 libx32; do
  [[ -L /$top ]] && ln -sfn "$(readlink "/$top")" "$DEST/$top"
done

declare -A real_dir=()
# Copies PATH to DEST at its place (directories resolved), then the file each link points to,
# until a regular file.
copy_path() {
  local p=$1 dir name target
  while :; do
    dir=${p%/*}
    name=${p##*/}
    [[ -n ${real_dir[$dir]:-} ]] || real_dir[$dir]=$(readlink -f "${dir:-/}")
    dir=${real_dir[$dir]%/}
    p=$dir/$name
    if [[ $p == /opt/libtorch/* || -e $DEST$p || -L $DEST$p ]]; then return 0; fi
    mkdir -p "$DEST$dir"
    cp -a "$p" "$DEST$p"
    [[ -L $p ]] || return 0
    target=$(readlink "$p")
    [[ $target == /* ]] || target=$dir/$target
    p=$target
  done
}

missing=()
# Copies the libraries ldd resolves for ELF file $1 (a non-ELF file has none).
copy_libraries() {
  local soname arrow path _
  while read -r soname arrow path _; do
    if [[ $arrow == "=>" ]]; then
      if [[ $path == not ]]; then
        [[ " ${IMAGE_ALLOW_MISSING:-} " == *" $soname "* ]] || missing+=("$1: $soname")
      elif [[ $path == /* ]]; then
        copy_path "$path"
      fi
    elif [[ $soname == /* ]]; then  # the dynamic loader
      copy_path "$soname"
    fi
  done < <(ldd "$1" 2>/dev/null || true)
}

# The files of a package, without documentation.
package_files() {
  local f
  dpkg-query -L "$1" | while read -r f; do
    [[ $f == /* && ( -f $f || -L $f ) && ! -d $f ]] || continue
    case $f in /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/* | /usr/share/locale/* | \
      /usr/share/info/* | /usr/share/doc-base/*) continue ;; esac
    echo "$f"
  done
}

# PYTHON_ROOTS and the installed Python packages they depend on, recursively.
python_packages() {
  local -A seen=()
  local queue=("${PYTHON_ROOTS[@]}") p dep
  while ((${#queue[@]})); do
    p=${queue[0]}
    queue=("${queue[@]:1}")
    [[ -z ${seen[$p]:-} ]] || continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || continue
    seen[$p]=1
    echo "$p"
    for dep in $(dpkg-query -W -f='${Pre-Depends},${Depends}' "$p" | tr '|' ',' | tr ',' '\n' |
                 sed -E 's/\(.*\)//; s/:any//; s/^ +//; s/ +$//'); do
      if [[ $dep =~ ^(lib)?python3 ]]; then queue+=("$dep"); fi
    done
  done
}

elf_roots=("${PROGRAMS[@]}" /bin/sh)
for pkg in "${TOOL_PACKAGES[@]}" $(python_packages); do
  while read -r f; do
    copy_path "$f"
    case $f in */bin/* | *.so | *.so.*) elf_roots+=("$f") ;; esac
  done < <(package_files "$pkg")
done
copy_path /bin/sh
for f in "${elf_roots[@]}"; do copy_libraries "$f"; done
if ((${#missing[@]})); then
  printf 'image-rootfs: not found: %s\n' "${missing[@]}" >&2
  exit 1
fi

if ((run)); then
  maps=$(mktemp)
  IMAGE_CHECK_MAPS=$maps sh "$(dirname "$0")/image-check.sh"
  declare -A program=()
  for f in "${PROGRAMS[@]}"; do program[$(readlink -f "$f")]=1; done
  while read -r f; do
    [[ -z ${program[$(readlink -f "$f")]:-} ]] || continue
    # /opt/arcface (the Python client, the detector's files): the Dockerfile copies it whole.
    case $f in /dev/* | /proc/* | /tmp/* | /memfd:* | /opt/arcface/*) continue ;; esac
    if [[ -f $f ]]; then
      copy_path "$f"
      copy_libraries "$f"
    fi
  done < <(awk '$6 ~ /^\// && NF == 6 {print $6}' "$maps" | sort -u)
  rm -f "$maps"
fi

mkdir -p "$DEST/etc" "$DEST/models" "$DEST/tmp"
chmod 1777 "$DEST/tmp"
install -d -o 10001 -g 10001 -m 0750 "$DEST/var/lib/arcface"
cp -a /etc/ld.so.conf /etc/ld.so.conf.d "$DEST/etc/"
[[ ! -f /etc/nsswitch.conf ]] || cp -a /etc/nsswitch.conf "$DEST/etc/"
ldconfig -r "$DEST"
cat >"$DEST/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
arcface:x:10001:10001::/home/arcface:/usr/sbin/nologin
EOF
cat >"$DEST/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
arcface:x:10001:
EOF
echo "image-rootfs: $(find "$DEST" -type f | wc -l) files, $(du -sh "$DEST" | cut -f1)" >&2
