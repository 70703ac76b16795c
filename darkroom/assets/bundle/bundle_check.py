"""Check and unpack a Darkroom offline bundle; runs on the offline machine before Darkroom is installed.

Standard library only: `install.sh` / `install.ps1` run it with the Python that will hold the venv,
and `darkroom bundle verify` loads this same file, so both check a bundle the same way.

    python3 bundle_check.py verify BUNDLE_DIR       # every file against manifest.json (+ this Python fits)
    python3 bundle_check.py install-models BUNDLE_DIR  # copy models/ into the Darkroom home (run by the venv's Python)

An update (`darkroom bundle create --since`) is checked the same way; bundle_update.py applies it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "darkroom-bundle/1"
CHUNK = 1 << 20
# models/<folder> in a bundle -> the same folder under the Darkroom home (darkroom.home.SUBDIRS)
MODEL_FOLDERS = ("checkpoints", "loras", "vae", "embeddings")


class BundleError(Exception):
    """A bundle that cannot be used: the message is one line naming what is wrong."""


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def load_manifest(root: Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path} not found: not a Darkroom bundle, or `darkroom bundle create` did not finish")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BundleError(f"{path} is unreadable (corrupted?): {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("files"), list):
        raise BundleError(f"{path} is not a {FORMAT} manifest")
    problem = _malformed(manifest)
    if problem:
        raise BundleError(f"{path} is damaged: {problem}")
    manifest.setdefault("target", {})
    return manifest


def _malformed(manifest: dict) -> str | None:
    """What makes a manifest unusable, or None: it comes from a USB drive, so every entry is checked
    for its shape before anything reads it (a list entry or a string size must not crash install)."""
    for n, e in enumerate(manifest["files"]):
        if not isinstance(e, dict):
            return f"file entry {n + 1} is not an object"
        rel = e.get("path")
        if not isinstance(rel, str) or not rel or ".." in Path(rel).parts or Path(rel).is_absolute():
            return f"file entry {n + 1} has no valid relative path"
        if not isinstance(e.get("size"), int) or isinstance(e.get("size"), bool) or e["size"] < 0:
            return f"{rel}: the size is not a byte count"
        sha = e.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            return f"{rel}: no valid sha256"
    target = manifest.get("target", {})
    if not isinstance(target, dict) or not all(isinstance(target.get(k), (str, type(None)))
                                                for k in ("python", "os", "machine", "torch_requirement")):
        return "'target' does not name a Python, an OS and a machine"
    for key in ("darkroom_version", "created"):
        if not isinstance(manifest.get(key, ""), str):
            return f"'{key}' is not text"
    if not isinstance(manifest.get("models", []), list):
        return "'models' is not a list"
    if manifest.get("kind") == "update":
        return _malformed_update(manifest.get("update"))
    return None


def _malformed_update(update) -> str | None:
    """What makes an update's description unusable (bundle_update.py relies on its shape), or None."""
    if not isinstance(update, dict) or not isinstance(update.get("base"), dict):
        return "'update' does not name the base it applies to"
    base = update["base"]
    sha = base.get("manifest_sha256")
    if not isinstance(sha, str) or len(sha) != 64 or not isinstance(base.get("darkroom_version"), str):
        return "'update.base' has no manifest_sha256 and darkroom_version"
    for key in ("wheels", "models"):
        if not isinstance(update.get(key), list):
            return f"'update.{key}' is not a list"
        problem = _malformed({"files": update[key]})
        if problem:
            return f"update.{key}: {problem}"
    if any(e["path"].count("/") != 1 or not e["path"].startswith("wheels/") for e in update["wheels"]):
        return "'update.wheels' names a file outside wheels/"
    return None


def check_files(root: Path, manifest: dict, progress=None) -> tuple[list[str], list[str]]:
    """(problems, extra files). A problem is 'path: what is wrong'; extra files are not in the manifest.

    Sizes are checked for every file first (a missing or truncated file shows at once), then the
    files of the right size are hashed. `progress(n_bytes)` is called as bytes are read.
    """
    root = Path(root)
    problems: list[str] = []
    to_hash = []
    for entry in manifest["files"]:
        rel = entry["path"]
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            problems.append(f"{rel}: unsafe path in the manifest")
        elif not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{rel}: wrong size ({path.stat().st_size} bytes, expected {entry['size']})")
        else:
            to_hash.append((rel, path, entry))
    for rel, path, entry in to_hash:
        if sha256_file(path, progress) != entry["sha256"]:
            problems.append(f"{rel}: corrupted (SHA-256 differs from the manifest)")
    listed = {e["path"] for e in manifest["files"]} | {MANIFEST}
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.is_file() and p.relative_to(root).as_posix() not in listed and "__pycache__" not in p.parts)
    return problems, extra


def _os_name() -> str:
    return {"win32": "windows", "darwin": "macos"}.get(sys.platform, "linux" if sys.platform.startswith("linux")
                                                       else sys.platform)


def _machine(name: str) -> str:
    name = name.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


def check_python(manifest: dict) -> str | None:
    """Why this Python cannot install the bundle, or None."""
    target = manifest.get("target", {})
    want_py = target.get("python")
    have_py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    want_os, want_machine = target.get("os"), target.get("machine")
    wrong = []
    if want_py and want_py != have_py:
        wrong.append(f"Python {want_py}")
    if want_os and want_os != _os_name():
        wrong.append(want_os)
    if want_machine and _machine(want_machine) != _machine(platform.machine()):
        wrong.append(want_machine)
    if not wrong:
        return None
    return (f"this bundle is for {want_os or '?'} {want_machine or '?'} with Python {want_py or '?'}, but"
            f" {sys.executable} is Python {have_py} on {_os_name()} {platform.machine()}"
            f" (set PYTHON to a Python {want_py} interpreter, or create a bundle for this machine)")


def _progress_printer(total: int):
    if not sys.stderr.isatty() or total <= 0:
        return None
    done = [0, -1]

    def update(n: int) -> None:
        done[0] += n
        pct = done[0] * 100 // total
        if pct != done[1]:
            done[1] = pct
            sys.stderr.write(f"\rchecking the bundle: {pct}%")
            sys.stderr.flush()

    return update


def cmd_verify(root: Path) -> int:
    manifest = load_manifest(root)
    why = check_python(manifest)
    if why:
        print(f"darkroom: refusing to install: {why}", file=sys.stderr)
        return 1
    total = sum(e["size"] for e in manifest["files"])
    progress = _progress_printer(total)
    problems, _extra = check_files(root, manifest, progress)
    if progress:
        sys.stderr.write("\n")
    if problems:
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        names = ", ".join(p.split(": ", 1)[0] for p in problems)
        print(f"darkroom: refusing to install: {len(problems)} file(s) of the bundle are missing or corrupted:"
              f" {names} (copy the bundle again from the original)", file=sys.stderr)
        return 1
    print(f"darkroom: bundle OK ({len(manifest['files'])} files, {total / 1e6:.0f} MB checked)", file=sys.stderr)
    return 0


def darkroom_home() -> Path:
    """The Darkroom home as the installed Darkroom resolves it ($DARKROOM_HOME, else the per-user folder)."""
    try:
        from darkroom.home import Home
    except ImportError:  # run outside the new venv: the same rule, without platformdirs
        if os.environ.get("DARKROOM_HOME"):
            return Path(os.environ["DARKROOM_HOME"]).expanduser().resolve()
        raise BundleError("run install-models with the Python of the venv Darkroom was installed into") from None
    return Home.resolve().root


def install_models(root: Path, home: Path) -> int:
    """Copy every file under models/ into the home; never overwrite a different file of the same name."""
    manifest = load_manifest(root)
    files = [e for e in manifest["files"] if e["path"].startswith("models/")]
    kept = 0
    for entry in files:
        rel = Path(entry["path"])
        if len(rel.parts) < 3 or rel.parts[1] not in MODEL_FOLDERS:
            continue
        dest = home / "models" / Path(*rel.parts[1:])
        src = Path(root) / rel
        if src.is_symlink() or not src.is_file():  # only the bundle's own files are ever copied in
            raise BundleError(f"{src} is not a regular file in the bundle (run verify)")
        if dest.exists():
            if dest.stat().st_size == entry["size"] and sha256_file(dest) == entry["sha256"]:
                print(f"darkroom: {dest} already there", file=sys.stderr)
            else:
                kept += 1
                print(f"darkroom: warning: kept your existing {dest}; it differs from the bundle's {rel}"
                      " (rename one of them and run install again to have both)", file=sys.stderr)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.partial")
        print(f"darkroom: copying {rel} -> {dest}", file=sys.stderr)
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if sha256_file(tmp) != entry["sha256"]:
            tmp.unlink()
            raise BundleError(f"the copy of {rel} in {dest.parent} does not match the manifest (disk full or failing?)")
        tmp.replace(dest)
    return kept


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("verify", "install-models"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    try:
        if argv[0] == "verify":
            return cmd_verify(root)
        home = darkroom_home()
        install_models(root, home)
        print(f"darkroom: models are in {home / 'models'}", file=sys.stderr)
        return 0
    except (BundleError, OSError) as e:
        print(f"darkroom: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
