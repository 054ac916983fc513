#!/usr/bin/env bash
# Builds Debian's own abseil (the exact source of the installed libabsl20220623) with
# -fsanitize=thread into DIR/lib, as shared libraries with the system's sonames.
#
#   tests/sanitizers/tsan_abseil.sh DIR
#
# Why: absl::Mutex, CondVar and Notification tell ThreadSanitizer about their locking through
# annotations compiled into abseil itself; Debian's build has none, so under TSan every
# ABSL_GUARDED_BY field (ours and gRPC's, whose mutexes are absl's too) would look racy. The TSan
# build links its binaries with an RPATH to DIR/lib (ARCFACE_TSAN_ABSEIL_DIR), so that they and
# the gRPC libraries they load use these copies; nothing else (Python, the tools) sees them.
# Idempotent: returns at once when DIR/lib holds this version's build.
set -euo pipefail
DIR=$(mkdir -p "$1" && cd "$1" && pwd)
VERSION=$(dpkg-query -W -f='${Version}' libabsl-dev)
# Locking code, and every library that inlines absl's SpinLock (its fast path carries TSan's
# annotations, its slow path in libabsl_base expects them: an uninstrumented caller that reaches
# the slow path trips TSan's own CHECK). `nm -D --undefined-only` on Debian's libabsl_*.so lists
# those that call SpinLock::SlowLock/SlowUnlock.
LIBS=(synchronization base spinlock_wait malloc_internal graphcycles_internal
      time symbolize cordz_handle cordz_info random_internal_pool_urbg)
STAMP=$DIR/lib/.built-$VERSION-$(echo "${LIBS[*]}" | sha256sum | cut -c1-12)
[[ -e $STAMP ]] && exit 0

src=$DIR/src
rm -rf "$src" && mkdir -p "$src/parts" "$src/lists/partial" "$src/cache"
# The source through apt itself (signed Release files), from the suites the binaries came from,
# without touching the system's apt configuration.
# The same archive (and keyring) as the system's own binary sources, as source entries.
sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > "$src/parts/src.sources"
apt_opts=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$src/parts"
          -o Dir::State::Lists="$src/lists" -o Dir::Cache="$src/cache" -qq)
apt-get "${apt_opts[@]}" update
(cd "$src" && apt-get "${apt_opts[@]}" source --download-only "abseil=$VERSION" 2>/dev/null)
# (apt checked the files against the signed Sources index; dpkg-source need not.)
(cd "$src" && dpkg-source -x ./*.dsc absl > "$src/extract.log" 2>&1)

# Debian's configuration (debian/rules: C++17, shared), clang with TSan on top; no RPATH, so
# that the binaries' RPATH finds the libraries' own dependencies here too.
# ccache where there is one (tests/run.sh's lanes: a second clone reuses the first's objects).
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$src/absl" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
  -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON \
  -DCMAKE_SKIP_RPATH=ON \
  -DCMAKE_CXX_FLAGS="-fsanitize=thread -gline-tables-only" > "$src/configure.log" 2>&1
cmake --build "$src/build" -j2 --target "${LIBS[@]}" > "$src/build.log" \
  || { tail -30 "$src/build.log"; exit 1; }
# Only those: the rest of abseil (strings, time zones, status, cord) stays Debian's,
# uninstrumented like gRPC, which hands such values between its threads unseen by TSan.
rm -rf "$DIR/lib" && mkdir -p "$DIR/lib"
for lib in "${LIBS[@]}"; do
  cp -P "$src"/build/absl/*/libabsl_$lib.so.* "$DIR/lib/"
done
rm -rf "$src"
touch "$STAMP"
echo "tsan_abseil: $(ls "$DIR/lib" | grep -c '\.so\.[0-9]*$') libraries in $DIR/lib"
