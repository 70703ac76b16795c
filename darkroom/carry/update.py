"""Updates by USB: `darkroom bundle create DIR --since OLD` carries only what changed against OLD.

An update is a bundle folder (same installers, checker and manifest format) whose manifest says
`"kind": "update"` and holds an `update` section:

    base      the manifest it applies to: SHA-256 of OLD's manifest.json bytes, and OLD's Darkroom version
    adds      wheels and models that OLD did not have
    replaces  {new wheel: the wheel of the same project in OLD}
    removes   OLD's wheels that the new version no longer has
    wheels    every wheel of the new version (the update carries only the new or changed ones)
    models    every model of OLD and of this update (models are never removed from a home)

The wheels and models that OLD already holds byte for byte are left out. The installer builds the new venv
from the installed version's wheels plus the update's, and refuses an update whose base is not what is
installed (see assets/bundle/bundle_update.py). OLD may itself be an update: updates chain.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

from darkroom.carry.bundle_target import Target
from darkroom.errors import BundleError

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "bundle"
MANIFEST = "manifest.json"


@functools.cache
def installer():
    """bundle_update.py, the standard-library-only script that applies updates and rolls them back."""
    saved = list(sys.path)  # it puts its own folder on sys.path to import bundle_check
    try:
        spec = importlib.util.spec_from_file_location("darkroom_bundle_update", ASSETS / "bundle_update.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


class Base:
    """The bundle an update applies to: its manifest, that manifest's SHA-256, and what it installs."""

    def __init__(self, path: Path, data: bytes):
        from darkroom.carry.bundle import checker

        check = checker()
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise BundleError(f"--since {path}: the manifest is unreadable (corrupted?): {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != check.FORMAT \
                or not isinstance(manifest.get("files"), list):
            raise BundleError(f"--since {path}: not a {check.FORMAT} manifest")
        problem = check._malformed(manifest)
        if problem:
            raise BundleError(f"--since {path}: the manifest is damaged: {problem}")
        if manifest.get("kind") not in (None, "update"):
            raise BundleError(f"--since {path}: a {manifest['kind']} bundle cannot be updated; give a wheel bundle")
        self.manifest = manifest
        self.version = str(manifest.get("darkroom_version") or "?")

    @property
    def wheels(self) -> dict[str, dict]:
        return {e["path"]: e for e in installer().result_wheels(self.manifest)}

    @property
    def models(self) -> dict[str, dict]:
        if self.manifest.get("kind") == "update":
            return {e["path"]: e for e in self.manifest["update"]["models"]}
        return {e["path"]: e for e in self.manifest["files"] if e["path"].startswith("models/")}

    def check_target(self, target: Target) -> None:
        """An update is for the machine its base was made for (same OS, machine and Python)."""
        old, new = self.manifest.get("target") or {}, target.as_json()
        differ = [k for k in ("os", "machine", "python") if old.get(k) and new.get(k) and old[k] != new[k]]
        if differ:
            raise BundleError(f"--since {self.path} is a bundle for {old.get('os')} {old.get('machine') or ''}"
                              f" Python {old.get('python')}, this update would be for {new.get('os')}"
                              f" {new.get('machine') or ''} Python {new.get('python')}: give the same --platform"
                              " and --python-version")


def load_base(since: Path) -> Base:
    """--since: a bundle (or update) folder, or its manifest.json (the folder's files are not needed)."""
    path = Path(since).expanduser()
    file = path / MANIFEST if path.is_dir() else path
    try:
        data = file.read_bytes()
    except OSError as e:
        raise BundleError(f"--since {since}: cannot read {file} ({e.strerror or e}): give the old bundle's folder"
                          " or its manifest.json") from None
    return Base(path, data)


def _project(rel: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(Path(rel).name.split("-", 1)[0])


def prune_to_update(dest: Path, base: Base, info: dict, echo) -> dict:
    """Delete from the full bundle in dest what base holds byte for byte; return info for an update manifest."""
    from darkroom.carry.bundle import checker

    sha = checker().sha256_file
    new_files = {p.relative_to(dest).as_posix(): p for sub in ("wheels", "models") if (dest / sub).is_dir()
                 for p in sorted((dest / sub).rglob("*")) if p.is_file()}
    entries = {rel: {"path": rel, "size": p.stat().st_size, "sha256": sha(p)} for rel, p in new_files.items()}
    old = {**base.wheels, **base.models}
    kept = [rel for rel, e in entries.items() if rel in old and old[rel]["sha256"] == e["sha256"]]
    for rel in kept:
        new_files[rel].unlink()
    for folder in sorted((p for p in dest.joinpath("models").rglob("*") if p.is_dir()), reverse=True) \
            if (dest / "models").is_dir() else []:
        if not any(folder.iterdir()):
            folder.rmdir()
    carried = [rel for rel in entries if rel not in kept]
    old_wheels = {_project(rel): rel for rel in base.wheels}
    new_wheels = {_project(rel): rel for rel in entries if rel.startswith("wheels/")}
    replaces = {rel: old_wheels[p] for p, rel in new_wheels.items() if p in old_wheels and rel in carried}
    update = {
        "base": {"manifest_sha256": base.sha256, "darkroom_version": base.version},
        "adds": sorted(rel for rel in carried if rel not in replaces),
        "replaces": replaces,
        "removes": sorted(rel for p, rel in old_wheels.items() if p not in new_wheels),
        "wheels": [entries[rel] for rel in sorted(entries) if rel.startswith("wheels/")],
        "models": sorted({**base.models, **{r: e for r, e in entries.items() if r.startswith("models/")}}.values(),
                         key=lambda e: e["path"]),
    }
    echo(f"darkroom: update for Darkroom {base.version} (bundle {base.sha256[:12]}): {len(carried)} new or changed"
         f" file(s) carried, {len(kept)} left out (already in {base.path})")
    carried_models = [m for m in info.get("models", []) if m["path"] in carried]
    return {**info, "kind": "update", "models": carried_models, "update": update}


def installed_venv() -> Path:
    """The install this Darkroom runs from: VENV when sys.prefix is VENV.versions/<id> (made by install.sh)."""
    version = Path(sys.prefix).resolve()
    if not version.parent.name.endswith(".versions"):
        raise BundleError(f"this Darkroom ({sys.prefix}) was not installed from a bundle by install.sh: pass --venv")
    return version.parent.with_name(version.parent.name.removesuffix(".versions"))


def rollback_install(venv: Path | None = None) -> dict:
    """Switch an install back to its previous version; returns the record of the version now active."""
    script = installer()
    try:
        return script.rollback(Path(venv).expanduser().absolute() if venv else installed_venv())
    except script.BundleError as e:
        raise BundleError(str(e)) from None
