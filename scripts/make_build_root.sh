#!/bin/sh
# Make the build root for the release portable bundle: a minimal Debian 11 (bullseye, glibc 2.31) with a
# shared CPython 3.11 in /opt/python3.11, so that `darkroom bundle create DIR --portable --build-root ROOT`
# freezes Darkroom against glibc 2.31 instead of this machine's. See docs/bundle.md ("glibc floor").
#
#   sudo scripts/make_build_root.sh ROOT
#
# Needs root, debootstrap, curl or wget, sha256sum and unshare; reaches deb.debian.org (or
# $DARKROOM_DEBIAN_MIRROR). Re-running it skips the steps that are done. Bullseye has no Python 3.11
# package, so CPython is built from source: the orig tarball of bookworm's python3.11 source package
# (the upstream 3.11.2 release), pinned by its SHA-256, from Debian's pool (or a local copy:
# $DARKROOM_CPYTHON_TARBALL=/path/to/python3.11_3.11.2.orig.tar.gz).
set -eu

SUITE=bullseye
MIRROR=${DARKROOM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PY_PREFIX=/opt/python3.11
PY_TARBALL=python3.11_3.11.2.orig.tar.gz
PY_SHA256=2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849
PY_URL=$MIRROR/pool/main/p/python3.11/$PY_TARBALL
PACKAGES=build-essential,pkg-config,xz-utils,ca-certificates,libssl-dev,zlib1g-dev,libffi-dev,libsqlite3-dev,\
libbz2-dev,liblzma-dev,libreadline-dev,uuid-dev,libgdbm-dev,libncurses-dev
JOBS=${DARKROOM_BUILD_JOBS:-2}

die() { echo "make_build_root: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 ROOT   (a new or empty folder, or a root this script made before)"
[ "$(id -u)" = 0 ] || die "needs root (debootstrap and chroot)"
for tool in debootstrap sha256sum unshare chroot; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found (apt-get install debootstrap util-linux coreutils)"
done
mkdir -p "$1"
ROOT=$(cd "$1" && pwd)
STAMP=$ROOT$PY_PREFIX/.darkroom-build-root

if [ -f "$STAMP" ]; then
    echo "make_build_root: $ROOT is ready ($(cat "$STAMP"))"
    exit 0
fi

# 1. the Debian root
if [ ! -f "$ROOT/.darkroom-debootstrap-done" ]; then
    [ -z "$(ls -A "$ROOT")" ] || die "$ROOT is not empty and was not made by this script: choose a new folder"
    echo "make_build_root: debootstrap $SUITE into $ROOT"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOT" "$MIRROR"
    touch "$ROOT/.darkroom-debootstrap-done"
fi

# 2. CPython's source, checked against the pinned SHA-256 before it is unpacked
SRC=$ROOT/usr/src/$PY_TARBALL
if [ ! -f "$SRC" ] || ! echo "$PY_SHA256  $SRC" | sha256sum -c --status; then
    if [ -n "${DARKROOM_CPYTHON_TARBALL:-}" ]; then
        cp "$DARKROOM_CPYTHON_TARBALL" "$SRC.part"
    elif command -v curl >/dev/null 2>&1; then
        curl -fsSL -o "$SRC.part" "$PY_URL"
    else
        wget -q -O "$SRC.part" "$PY_URL"
    fi
    echo "$PY_SHA256  $SRC.part" | sha256sum -c --status \
        || die "$PY_TARBALL does not match its pinned SHA-256 $PY_SHA256 (from $PY_URL)"
    mv "$SRC.part" "$SRC"
fi

# 3. build and install it inside the root (a private mount namespace: /proc and /dev go away with it)
echo "make_build_root: building CPython in $ROOT (about 10 minutes on 2 cores)"
start=$(date +%s)
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
unshare -m sh -ec '
    mount -t proc proc "$1/proc"
    mount --rbind /dev "$1/dev"
    exec chroot "$1" /bin/sh -ec "
        cd /usr/src && rm -rf Python-3.11.2 && tar -xzf $2
        cd Python-3.11.2
        ./configure --enable-shared --prefix=$3 LDFLAGS=-Wl,-rpath,$3/lib >/usr/src/configure.log
        make -j$4 >/usr/src/make.log 2>&1
        make install >/usr/src/install.log 2>&1
        $3/bin/python3.11 -c \"import ssl, sqlite3, lzma, bz2, zlib, ctypes, readline, uuid\"
    "
' sh "$ROOT" "$PY_TARBALL" "$PY_PREFIX" "$JOBS" || die "the CPython build failed: see $ROOT/usr/src/*.log"
rm -rf "$ROOT/usr/src/Python-3.11.2"
glibc=$(chroot "$ROOT" ldd --version | head -n 1 | sed 's/.* //')
echo "debian $SUITE, glibc $glibc, python 3.11.2 ($PY_SHA256), built in $(( $(date +%s) - start )) s" > "$STAMP"
echo "make_build_root: $ROOT is ready ($(cat "$STAMP"))"
