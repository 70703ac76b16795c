#!/bin/sh
# Darkroom, portable (made by `darkroom bundle create --portable`): runs the frozen app next to this file.
# No Python needed. Works from the bundle folder itself (a USB drive) or from where install.sh copied it.
#
#   ./darkroom generate "a red circle on a white background"
#   ./darkroom serve            # web UI on http://127.0.0.1:7860
#
# The models carried in this folder (models/) are used in place, as an extra models folder.
set -eu

self=$(readlink -f "$0" 2>/dev/null || echo "$0")
here=$(cd "$(dirname "$self")" && pwd)
need="@GLIBC_FLOOR@"

if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
  echo "darkroom: this portable Darkroom is for Linux x86-64, not $(uname -s) $(uname -m)" >&2
  exit 1
fi
have=$(getconf GNU_LIBC_VERSION 2>/dev/null | sed -n 's/^glibc //p' || true)
if [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -t. -k1,1n -k2,2n | head -n 1)" != "$need" ]; then
  echo "darkroom: this portable Darkroom needs glibc $need or newer; this system has $have" \
       "(use a wheel bundle with this system's Python, or a portable bundle built on an older system)" >&2
  exit 1
fi
if [ ! -x "$here/app/darkroom" ]; then
  echo "darkroom: $here/app/darkroom is missing: copy the whole bundle folder (check it with install.sh --verify-only)" >&2
  exit 1
fi

if [ -d "$here/models/checkpoints" ]; then  # laid out as models/<kind>/, as a ComfyUI root
  exec "$here/app/darkroom" --models-dir "$here" "$@"
fi
exec "$here/app/darkroom" "$@"
