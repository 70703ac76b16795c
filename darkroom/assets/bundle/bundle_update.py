"""Install, update and roll back the Darkroom of a bundle in versioned venvs; standard library only.

`install.sh` / `install.ps1` run it with the Python that holds the venvs. VENV is the folder users run
(default ~/darkroom-venv):

    VENV                          a link (a junction on Windows) to the active version
    VENV.versions/<id>/           one version: a venv, its wheels in bundle-wheels/, its record darkroom-bundle.json
    VENV.versions/previous        the id of the version `rollback` returns to
    VENV.versions/bundle_*.py     copies of these scripts, so rollback works without the USB drive

A venv cannot move, so each version is built in its own folder, from the wheels of the active version plus
the update's (hard links where possible). VENV is switched to it only after its self-check passes, by one
atomic rename of the link: a refused, failed or interrupted update leaves the old version active, and
rollback is one more rename. Two versions are kept (the active one and the previous one).

    python3 bundle_update.py prepare BUNDLE VENV [--force]   # refuse, or print the new version's folder
    python3 bundle_update.py self-check BUNDLE VENV NEW        # darkroom --version + a tiny generation
    python3 bundle_update.py commit BUNDLE VENV NEW            # record, switch VENV to NEW, prune
    python3 bundle_update.py discard VENV NEW                  # remove NEW unless it is active
    python3 bundle_update.py rollback VENV                     # back to the previous version (again: forward)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_check import MANIFEST, BundleError, load_manifest, sha256_file  # noqa: E402

RECORD = "darkroom-bundle.json"
WHEELS = "bundle-wheels"
PREVIOUS = "previous"
SELF_CHECK_TIMEOUT = 900


def versions_dir(venv: Path) -> Path:
    return venv.with_name(venv.name + ".versions")


def _link_target(venv: Path) -> Path | None:
    try:
        target = os.readlink(venv)  # a symlink, or a junction on Windows
    except (OSError, ValueError):
        return None
    target = target.removeprefix("\\\\?\\")
    return Path(target) if os.path.isabs(target) else venv.parent / target


def active_version(venv: Path) -> Path | None:
    """The version folder VENV links to, or None when VENV is no link (absent, or a plain venv)."""
    target = _link_target(venv)
    if target is None:
        return None
    if not (target / RECORD).is_file():
        raise BundleError(f"{venv} links to {target}, which is not a Darkroom version installed from a bundle")
    return target


def read_record(version: Path) -> dict:
    try:
        return json.loads((version / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{version / RECORD} is unreadable ({e}): reinstall the full bundle with --force") from None


def _versions(venv: Path) -> list[Path]:
    folder = versions_dir(venv)
    return sorted(p for p in folder.iterdir() if (p / "pyvenv.cfg").is_file()) if folder.is_dir() else []


def previous_version(venv: Path, active: Path) -> Path | None:
    """What rollback returns to: the recorded previous version, else the newest other complete one."""
    folder = versions_dir(venv)
    name = (folder / PREVIOUS).read_text(encoding="utf-8").strip() if (folder / PREVIOUS).is_file() else ""
    if name and name != active.name and (folder / name / RECORD).is_file():
        return folder / name
    others = [v for v in _versions(venv) if v.name != active.name and (v / RECORD).is_file()]
    return max(others, key=lambda v: read_record(v).get("installed", ""), default=None)


def _label(record: dict) -> str:
    return f"Darkroom {record.get('darkroom_version') or '?'} (bundle {str(record.get('manifest_sha256'))[:12]})"


def _bundle(root: Path) -> tuple[dict, str]:
    manifest = load_manifest(root)
    return manifest, sha256_file(root / MANIFEST)


def result_wheels(manifest: dict) -> list[dict]:
    """Every wheel the version installed from this bundle holds (an update lists them all, it carries only some)."""
    if manifest.get("kind") == "update":
        return manifest["update"]["wheels"]
    return [e for e in manifest["files"] if e["path"].startswith("wheels/") and e["path"].count("/") == 1]


# ---------------------------------------------------------------------------------------------- prepare


def prepare(root: Path, venv: Path, force: bool = False) -> Path | None:
    """Check the bundle fits VENV, then make NEW with the wheels to install; None when it is installed already."""
    manifest, sha = _bundle(root)
    update = manifest.get("update") if manifest.get("kind") == "update" else None
    this = _label({"darkroom_version": manifest.get("darkroom_version"), "manifest_sha256": sha})
    active = active_version(venv)
    plain = active is None and venv.is_dir() and any(venv.iterdir())
    if update is not None:
        base = _label(update["base"])
        if plain:
            raise BundleError(f"refusing to update: {venv} was installed before updates were possible and records"
                              f" no bundle (this update is for {base}): install the full bundle with --force once")
        if active is None:
            raise BundleError(f"refusing to update: no Darkroom installed from a bundle in {venv} (this update is"
                              f" for {base}): install the full bundle first, or pass the right --venv")
        record = read_record(active)
        if record.get("manifest_sha256") != update["base"]["manifest_sha256"]:
            raise BundleError(f"refusing to update: this update is for {base}, but {venv} has {_label(record)}"
                              " (create the update with --since the bundle that was installed here)")
    elif (plain or active is not None) and not force:
        what = f" ({_label(read_record(active))})" if active is not None else ""
        raise BundleError(f"refusing to install: {venv} already exists{what} (use --venv DIR for another folder,"
                          " or --force to replace it" + ("; rollback returns to it" if active else "") + ")")
    new = versions_dir(venv) / f"{manifest.get('darkroom_version') or 'unknown'}-{sha[:12]}"
    if active is not None and new.resolve() == active.resolve():
        print(f"darkroom: {this} is installed in {venv} already", file=sys.stderr)
        return None
    if new.exists():
        shutil.rmtree(new)  # a partial build, or the version rolled back from: built again
    try:
        _stage_wheels(root, manifest, active, new / WHEELS)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return new


def _stage_wheels(root: Path, manifest: dict, active: Path | None, dest: Path) -> None:
    """Link or copy every wheel of the new version into dest, each checked against its SHA-256."""
    carried = {e["path"] for e in manifest["files"]}
    dest.mkdir(parents=True)
    bad = []
    for entry in result_wheels(manifest):
        name = entry["path"].split("/", 1)[1]
        src = root / entry["path"] if entry["path"] in carried else (active / WHEELS / name if active else None)
        if src is None or not src.is_file() or src.stat().st_size != entry["size"]:
            bad.append(name)
            continue
        try:
            os.link(src, dest / name)
        except OSError:
            shutil.copyfile(src, dest / name)
        if sha256_file(dest / name) != entry["sha256"]:
            bad.append(name)
    if bad:
        raise BundleError(f"refusing to update: {len(bad)} wheel(s) of the installed version are missing or"
                          f" damaged: {', '.join(bad)} (install the full bundle with --force)")


# ---------------------------------------------------------------------------------------------- self-check


def _exe(venv: Path, name: str) -> Path:
    return venv / "Scripts" / f"{name}.exe" if os.name == "nt" else venv / "bin" / name


def self_check(root: Path, venv: Path, new: Path) -> None:
    """`darkroom --version` names the bundle's version, and a 1-step 64x64 generation (starter model) works,
    in a scratch home: the user's history and outputs are not touched."""
    manifest = load_manifest(root)
    want = manifest.get("darkroom_version") or ""
    with tempfile.TemporaryDirectory(prefix="darkroom-self-check-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["DARKROOM_HOME"] = str(Path(tmp) / "home")
        out = Path(tmp) / "out"
        steps = [("darkroom --version", ["--version"]),
                 ("a test generation", ["generate", "darkroom self-check", "--steps", "1", "-W", "64", "-H", "64",
                                        "-o", str(out)])]
        print(f"darkroom: checking the new version ({', '.join(s for s, _ in steps)})", file=sys.stderr)
        for what, args in steps:
            try:
                p = subprocess.run([str(_exe(new, "darkroom")), *args], capture_output=True, text=True,
                                   errors="replace", env=env, cwd=tmp, timeout=SELF_CHECK_TIMEOUT)
                why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1] if p.returncode else ""
            except (OSError, subprocess.TimeoutExpired) as e:
                why = str(e)
            if not why and args == ["--version"] and want not in p.stdout:
                why = f"it says {p.stdout.strip()!r}, the bundle has {want}"
            if not why and args[0] == "generate" and not (out.is_dir() and any(out.iterdir())):
                why = "no image written"
            if why:
                raise BundleError(f"the new version failed its self-check ({what}: {why}); {venv} still runs the"
                                  " version it ran before")


# ---------------------------------------------------------------------------------------------- switch


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def switch(venv: Path, version: Path) -> None:
    """Point VENV at version: one atomic rename of a new link over the old one (POSIX)."""
    tmp = venv.with_name(f".{venv.name}.switch")
    if os.path.lexists(tmp):
        tmp.unlink()
    if os.name == "nt":  # junctions need no privilege; no atomic replace there (a moment without VENV)
        import _winapi

        if _link_target(venv) is not None:
            os.rmdir(venv)
        _winapi.CreateJunction(str(version), str(venv))
        return
    os.symlink(os.path.relpath(version, venv.parent), tmp)
    os.replace(tmp, venv)


def commit(root: Path, venv: Path, new: Path) -> None:
    """Record what NEW came from, keep the active version as the previous one, switch VENV to NEW, prune."""
    manifest, sha = _bundle(root)
    active = active_version(venv)
    record = {"darkroom_version": manifest.get("darkroom_version"), "manifest_sha256": sha,
              "kind": manifest.get("kind", "bundle"), "base": (manifest.get("update") or {}).get("base"),
              "installed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds"),
              "target": manifest.get("target"), "wheels": result_wheels(manifest)}
    _write(new / RECORD, json.dumps(record, indent=1) + "\n")
    folder = versions_dir(venv)
    for script in ("bundle_check.py", "bundle_update.py"):  # rollback without the USB drive
        tmp = folder / f".{script}.tmp"
        shutil.copyfile(root / script, tmp)
        os.replace(tmp, folder / script)
    if active is not None:
        _write(folder / PREVIOUS, active.name + "\n")
    elif venv.is_dir() and not venv.is_symlink():
        shutil.rmtree(venv)  # a plain venv from before versions, replaced with --force (prepare checked)
    switch(venv, new)
    keep = {new.name, active.name if active else ""}
    for version in _versions(venv):
        if version.name not in keep:
            shutil.rmtree(version, ignore_errors=True)
    was = f" (was {_label(read_record(active))}; `install.sh --rollback` returns to it)" if active else ""
    print(f"darkroom: {venv} now runs {_label(record)}{was}", file=sys.stderr)


def discard(venv: Path, new: Path) -> None:
    """Remove a version that was being built, unless VENV already runs it."""
    active = _link_target(venv)
    if new.exists() and (active is None or active.resolve() != new.resolve()):
        shutil.rmtree(new, ignore_errors=True)


def rollback(venv: Path) -> dict:
    """Switch VENV back to the previous version (which becomes the one a second rollback returns to)."""
    active = active_version(venv)
    if active is None:
        raise BundleError(f"cannot roll back: {venv} is not a Darkroom installed from a bundle with versions")
    previous = previous_version(venv, active)
    if previous is None:
        raise BundleError(f"cannot roll back: {venv} keeps no previous version (it runs {_label(read_record(active))})")
    if not _exe(previous, "python").exists():
        raise BundleError(f"cannot roll back: the previous version in {previous} is damaged (no python)")
    switch(venv, previous)
    _write(versions_dir(venv) / PREVIOUS, active.name + "\n")
    now, was = read_record(previous), read_record(active)
    print(f"darkroom: rolled back {venv} to {_label(now)} from {_label(was)} (roll back again to return)",
          file=sys.stderr)
    return now


def main(argv: list[str]) -> int:
    usage = {"prepare": (2, 3), "self-check": (3, 3), "commit": (3, 3), "discard": (2, 2), "rollback": (1, 1)}
    force = "--force" in argv
    args = [a for a in argv if a != "--force"]
    if not args or args[0] not in usage or not usage[args[0]][0] <= len(args) - 1 <= usage[args[0]][1]:
        print(__doc__, file=sys.stderr)
        return 2
    paths = [Path(os.path.abspath(a)) for a in args[1:]]
    try:
        if args[0] == "prepare":
            new = prepare(*paths[:2], force=force)
            print(new or "")
        elif args[0] == "self-check":
            self_check(*paths)
        elif args[0] == "commit":
            commit(*paths)
        elif args[0] == "discard":
            discard(*paths)
        else:
            rollback(*paths)
        return 0
    except (BundleError, OSError) as e:
        print(f"darkroom: {e}" if str(e).startswith(("refusing", "cannot")) else f"darkroom: error: {e}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
