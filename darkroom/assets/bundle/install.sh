#!/usr/bin/env bash
# Install Darkroom from this offline bundle (made by `darkroom bundle create`). Never uses the network.
#
#   bash install.sh [--venv DIR] [--force]
#
# 1. checks every file of the bundle against manifest.json (SHA-256) and that this Python fits the bundle;
#    refuses, naming the files, if anything is missing or corrupted;
# 2. makes a fresh venv (default ~/darkroom-venv, or $DARKROOM_VENV);
# 3. installs the bundled wheels into it with `pip --no-index` (torch first), ignoring any pip configuration;
# 4. copies the bundled models into the Darkroom home ($DARKROOM_HOME, else the per-user data folder).
#
# PYTHON=/path/to/python3.X picks the interpreter (default python3). DARKROOM_BUNDLE_VERIFY_ONLY=1 stops after 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${DARKROOM_VENV:-$HOME/darkroom-venv}"
FORCE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || { echo "darkroom: --venv needs a folder" >&2; exit 2; }; VENV="$2"; shift 2 ;;
    --venv=*) VENV="${1#--venv=}"; shift ;;
    --force) FORCE=1; shift ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "darkroom: unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then PY="$candidate"; break; fi
  done
fi
[ -n "$PY" ] || { echo "darkroom: refusing to install: no python3 found (set PYTHON=/path/to/python3)" >&2; exit 1; }

# 1. the bundle is complete and intact, and this Python is the one it was made for
"$PY" "$HERE/bundle_check.py" verify "$HERE"
if [ "${DARKROOM_BUNDLE_VERIFY_ONLY:-0}" = 1 ]; then
  exit 0
fi

# 2. a fresh venv
if [ -e "$VENV" ] && [ -n "$(ls -A "$VENV" 2>/dev/null)" ]; then
  if [ "$FORCE" != 1 ]; then
    echo "darkroom: refusing to install: $VENV already exists (use --venv DIR for another folder, or --force to replace it)" >&2
    exit 1
  fi
  rm -rf "$VENV"
fi
echo "darkroom: creating the venv $VENV" >&2
if ! "$PY" -m venv "$VENV"; then
  echo "darkroom: error: '$PY -m venv' failed (on Debian/Ubuntu the python3-venv package provides it)" >&2
  exit 1
fi
VENV="$(cd "$VENV" && pwd)"
VPY="$VENV/bin/python"

# 3. the wheels, from this folder only: no index, no pip.conf, no PIP_* variables
pip_offline() {
  PIP_CONFIG_FILE=/dev/null "$VPY" -m pip --isolated --disable-pip-version-check --no-input install \
    --no-index --find-links "$HERE/wheels" --no-cache-dir "$@"
}
echo "darkroom: installing torch" >&2
pip_offline -r "$HERE/requirements-torch.txt"
echo "darkroom: installing Darkroom and its dependencies" >&2
pip_offline -r "$HERE/requirements.txt"
if [ -f "$HERE/requirements-nodeps.txt" ]; then  # packages whose declared dependencies must not be installed
  pip_offline --no-deps -r "$HERE/requirements-nodeps.txt"
fi

# 4. the models
"$VPY" "$HERE/bundle_check.py" install-models "$HERE"

echo
echo "Darkroom is installed in $VENV. Try:"
echo "  \"$VENV/bin/darkroom\" generate \"a red circle on a white background\""
echo "  \"$VENV/bin/darkroom\" serve        # web UI on http://127.0.0.1:7860"
echo "(add $VENV/bin to your PATH to type just 'darkroom')"
