#!/bin/sh
# Install the portable Darkroom from this bundle (made by `darkroom bundle create --portable`). No Python and
# no network needed: only sh and coreutils (sha256sum, cp).
#
#   sh install.sh [--prefix DIR] [--bin DIR] [--force] [--verify-only]
#
# 1. checks every file of the bundle against SHA256SUMS (itself checked against manifest.json), the machine
#    (Linux x86-64) and the glibc; refuses, naming the files, before anything is written;
# 2. copies the bundle to DIR (default ~/darkroom-portable, or $DARKROOM_PORTABLE_DIR) through a temporary
#    folder, checks the copy again, then renames it into place;
# 3. links DIR/darkroom into the bin folder (default ~/.local/bin) unless a different file is there.
# The carried models stay in DIR/models and are used in place. Running ./darkroom from the bundle itself
# (a USB drive) needs no install at all.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
prefix="${DARKROOM_PORTABLE_DIR:-$HOME/darkroom-portable}"
bin="$HOME/.local/bin"
force=0
verify_only="${DARKROOM_BUNDLE_VERIFY_ONLY:-0}"
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || { echo "darkroom: --prefix needs a folder" >&2; exit 2; }; prefix="$2"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --bin) [ $# -ge 2 ] || { echo "darkroom: --bin needs a folder" >&2; exit 2; }; bin="$2"; shift 2 ;;
    --bin=*) bin="${1#--bin=}"; shift ;;
    --force) force=1; shift ;;
    --verify-only) verify_only=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "darkroom: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

refuse() { echo "darkroom: refusing to install: $*" >&2; exit 1; }

# the SHA-256 of a file as manifest.json lists it (json.dumps(indent=1): "path", "size", "sha256" on own lines)
manifest_sha() {
  awk -v want="\"path\": \"$2\"," '
    index($0, want) { found = 1; next }
    found && /"sha256":/ { gsub(/[",]/, "", $2); print $2; exit }' "$1/manifest.json"
}

# every file of the bundle in folder $1 is there and intact; prints the bad ones' names, returns 1 if any
check_folder() {
  [ -f "$1/manifest.json" ] || { echo "manifest.json"; return 1; }
  [ -f "$1/SHA256SUMS" ] || { echo "SHA256SUMS"; return 1; }
  want=$(manifest_sha "$1" SHA256SUMS)
  got=$(sha256sum "$1/SHA256SUMS" | cut -d' ' -f1)
  [ -n "$want" ] && [ "$want" = "$got" ] || { echo "SHA256SUMS"; return 1; }
  listed=$(grep -c '"sha256": "' "$1/manifest.json")
  [ "$listed" -eq "$(($(wc -l < "$1/SHA256SUMS") + 1))" ] || { echo "manifest.json"; return 1; }
  failed=$(cd "$1" && sha256sum -c SHA256SUMS 2>/dev/null | sed -n 's/: FAILED.*$//p')
  [ -z "$failed" ] || { printf '%s\n' "$failed"; return 1; }
}

# 1. this machine, and every file of the bundle
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] || refuse "this bundle is for Linux x86-64, not $(uname -s) $(uname -m)"
command -v sha256sum >/dev/null 2>&1 || refuse "sha256sum (coreutils) is needed to check the bundle"
need=$(sed -n 's/^need="\(.*\)"$/\1/p' "$here/darkroom" 2>/dev/null || true)
have=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc //p' || true)
if [ -n "$need" ] && [ -n "$have" ] && \
   [ "$(printf '%s\n%s\n' "$need" "$have" | sort -t. -k1,1n -k2,2n | head -n 1)" != "$need" ]; then
  refuse "this bundle needs glibc $need or newer; this system has $have"
fi
echo "darkroom: checking every file of the bundle (SHA-256)" >&2
if ! bad=$(check_folder "$here"); then
  n=$(printf '%s\n' "$bad" | grep -c .)
  refuse "$n file(s) of the bundle are missing or corrupted: $(printf '%s\n' "$bad" | paste -sd, - | sed 's/,/, /g') (copy the bundle again from the original)"
fi
echo "darkroom: bundle OK ($(wc -l < "$here/SHA256SUMS") files checked)" >&2
[ "$verify_only" = 1 ] && exit 0

# 2. the copy, checked, then renamed into place
case "$prefix" in /*) ;; *) prefix="$(pwd)/$prefix" ;; esac
if [ -e "$prefix" ] && [ -n "$(ls -A "$prefix" 2>/dev/null)" ]; then
  [ "$force" = 1 ] || refuse "$prefix already exists (use --prefix DIR for another folder, or --force to replace it)"
fi
mkdir -p "$(dirname "$prefix")"
tmp="$prefix.partial-$$"
rm -rf "$tmp"
trap 'rm -rf "$tmp"' EXIT INT TERM
echo "darkroom: copying to $prefix" >&2
mkdir -p "$tmp"
cp -R "$here/." "$tmp/"
if ! bad=$(check_folder "$tmp"); then
  refuse "the copy in $tmp differs from the bundle (disk full or failing?): $(printf '%s\n' "$bad" | paste -sd, -)"
fi
rm -rf "$prefix"
mv "$tmp" "$prefix"
trap - EXIT INT TERM

# 3. the launcher on the PATH
mkdir -p "$bin"
link="$bin/darkroom"
if [ -L "$link" ] || [ ! -e "$link" ]; then
  ln -sfn "$prefix/darkroom" "$link"
  echo "darkroom: linked $link -> $prefix/darkroom" >&2
else
  echo "darkroom: warning: $link exists and is not a link: left as it is (run $prefix/darkroom)" >&2
fi

echo
echo "Darkroom is installed in $prefix. Try:"
echo "  \"$prefix/darkroom\" generate \"a red circle on a white background\""
echo "  \"$prefix/darkroom\" serve        # web UI on http://127.0.0.1:7860"
case ":${PATH:-}:" in *":$bin:"*) ;; *) echo "(add $bin to your PATH to type just 'darkroom')" ;; esac
