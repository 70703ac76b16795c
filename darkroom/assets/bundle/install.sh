#!/usr/bin/env bash
# Install Darkroom from this offline bundle (made by `darkroom bundle create`). Never uses the network.
#
#   bash install.sh [--venv DIR] [--force]     install this bundle, or apply this update (`bundle create --since`)
#   bash install.sh --rollback [--venv DIR]     return to the version before the last install or update
#
# 1. checks every file of the bundle against manifest.json (SHA-256) and that this Python fits the bundle;
#    refuses, naming the files, if anything is missing or corrupted; an update must fit the installed version;
# 2. makes a fresh venv in DIR.versions/ (DIR: default ~/darkroom-venv, or $DARKROOM_VENV);
# 3. installs the wheels into it with `pip --no-index` (torch first), ignoring any pip configuration;
# 4. checks the new venv (darkroom --version, a tiny generation) and copies the models into the Darkroom home
#    ($DARKROOM_HOME, else the per-user data folder), keeping history, outputs, settings and models;
# 5. switches DIR (a link) to the new venv; the previous one is kept for --rollback.
#
# PYTHON=/path/to/python3.X picks the interpreter (default python3). DARKROOM_BUNDLE_VERIFY_ONLY=1 stops after 1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${DARKROOM_VENV:-$HOME/darkroom-venv}"
FORCE=0
ROLLBACK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) [ $# -ge 2 ] || { echo "darkroom: --venv needs a folder" >&2; exit 2; }; VENV="$2"; shift 2 ;;
    --venv=*) VENV="${1#--venv=}"; shift ;;
    --force) FORCE=1; shift ;;
    --rollback) ROLLBACK=1; shift ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
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

if [ "$ROLLBACK" = 1 ]; then
  exec "$PY" "$HERE/bundle_update.py" rollback "$VENV"
fi

# 1. the bundle is complete and intact, and this Python is the one it was made for
"$PY" "$HERE/bundle_check.py" verify "$HERE"
if [ "${DARKROOM_BUNDLE_VERIFY_ONLY:-0}" = 1 ]; then
  exit 0
fi

# 2. where the new version goes: VENV links to VENV.versions/<version>, and an update needs the version it was made for
cleanup() { [ -z "${NEW:-}" ] || "$PY" "$HERE/bundle_update.py" discard "$VENV" "$NEW" || true; }
trap cleanup EXIT  # a failed step removes the half-built version; VENV still runs the one it ran before
NEW="$("$PY" "$HERE/bundle_update.py" prepare "$HERE" "$VENV" $([ "$FORCE" = 1 ] && echo --force))"
if [ -z "$NEW" ]; then
  exit 0  # this bundle is installed there already
fi
echo "darkroom: creating the venv $NEW" >&2
if ! "$PY" -m venv "$NEW"; then
  echo "darkroom: error: '$PY -m venv' failed (on Debian/Ubuntu the python3-venv package provides it)" >&2
  exit 1
fi
VPY="$NEW/bin/python"

# 3. the wheels, from this folder (and, for an update, the installed version's): no index, no pip.conf, no PIP_*
pip_offline() {
  PIP_CONFIG_FILE=/dev/null "$VPY" -m pip --isolated --disable-pip-version-check --no-input install \
    --no-index --find-links "$NEW/bundle-wheels" --no-cache-dir "$@"
}
echo "darkroom: installing torch" >&2
pip_offline -r "$HERE/requirements-torch.txt"
echo "darkroom: installing Darkroom and its dependencies" >&2
pip_offline -r "$HERE/requirements.txt"
if [ -f "$HERE/requirements-nodeps.txt" ]; then  # packages whose declared dependencies must not be installed
  pip_offline --no-deps -r "$HERE/requirements-nodeps.txt"
fi

# 4. the self-check (darkroom --version, a tiny generation in a scratch home), then the models
"$PY" "$HERE/bundle_update.py" self-check "$HERE" "$VENV" "$NEW"
"$VPY" "$HERE/bundle_check.py" install-models "$HERE"

# 5. the switch: VENV now runs the new version; the one before stays for --rollback
"$PY" "$HERE/bundle_update.py" commit "$HERE" "$VENV" "$NEW"
NEW=""

echo
echo "Darkroom is installed in $VENV. Try:"
echo "  \"$VENV/bin/darkroom\" generate \"a red circle on a white background\""
echo "  \"$VENV/bin/darkroom\" serve        # web UI on http://127.0.0.1:7860"
echo "(add $VENV/bin to your PATH to type just 'darkroom')"
