"""Offline bundle: prepare online, carry on USB, install offline.

`create_bundle()` writes into a folder: the wheels of Darkroom and of every runtime dependency for a
target platform and Python (pip's own download machinery, torch in the chosen variant), the chosen
models, `manifest.json` (SHA-256 and size of every file, the target), and the installers `install.sh` /
`install.ps1` with `bundle_check.py`, which verify the manifest, then install into a fresh venv with
`pip --no-index`. `verify_bundle()` checks a bundle with the same code the installers run.

Darkroom's own process never connects anywhere: the downloads are pip's, in a child process, and only
`darkroom bundle create` starts one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from darkroom.carry.bundle_target import Target, make_target, marker_environment, torch_requirement
from darkroom.errors import BundleError, StorageError
from darkroom.fsutil import copy_stream, discard, write_atomic, writes_to
from darkroom.home import Home, is_folder
from darkroom.models.cards import sidecars_of
from darkroom.models.library import walk_models

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "bundle"
NODEPS_FILE = "requirements-nodeps.txt"
"""Pinned packages installed with `pip --no-deps`, in the checkout and in a bundle (see the file: spandrel
declares torchvision, which must never be installed beside the pinned CPU torch)."""
SCRIPTS = ("install.sh", "install.ps1", "bundle_check.py", "bundle_update.py")
MANIFEST = "manifest.json"
# Detection.kind -> folder under models/ (in a bundle and in the Darkroom home alike)
KIND_FOLDERS = {"checkpoint": "checkpoints", "lora": "loras", "vae": "vae", "embedding": "embeddings"}
# where AUTOMATIC1111/Forge and ComfyUI roots keep the other kinds (darkroom.home does checkpoints)
OTHER_INSTALL_DIRS = {"lora": ("models/Lora", "models/loras"), "vae": ("models/VAE", "models/vae"),
                      "embedding": ("embeddings", "models/embeddings")}
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CLOSURE_ROUNDS = 20  # dependency depth, one pip run per level

Pip = Callable[[list[str]], None]
Echo = Callable[[str], None]


@functools.cache
def checker():
    """bundle_check.py, the standard-library-only checker that ships inside every bundle."""
    spec = importlib.util.spec_from_file_location("darkroom_bundle_check", ASSETS / "bundle_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- sources


def find_source(explicit: Path | None = None) -> Path:
    """The Darkroom checkout to build the wheel from: --source, else the one this package runs from."""
    root = Path(explicit).expanduser().resolve() if explicit else Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    ok = (pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"darkroom"', pyproject.read_text(encoding="utf-8"))
          and (root / "darkroom" / "__init__.py").is_file())
    if not ok:
        where = f"{root} is not a Darkroom checkout" if explicit else f"Darkroom runs from {root}, not a checkout"
        raise BundleError(f"{where}: bundle create builds Darkroom's wheel from its source; pass --source DIR")
    if not (root / "requirements.txt").is_file():
        raise BundleError(f"{root / 'requirements.txt'} not found: it pins the versions to bundle")
    return root


def read_requirements(path: Path) -> list[str]:
    """The pinned runtime requirements (comments and blank lines dropped)."""
    reqs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            if line.startswith("-"):
                raise BundleError(f"{path}: option lines ({line}) are not supported; list pinned requirements")
            reqs.append(line)
    return reqs


def _name(requirement: str) -> str:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return canonicalize_name(Requirement(requirement).name)


# ---------------------------------------------------------------------------------------------- pip


def run_pip(args: list[str], echo: Echo) -> None:
    """Run this interpreter's pip (with the user's pip configuration: a mirror or proxy keeps working).

    pip's stdout goes straight to our stderr (its progress bars show on a terminal); its stderr is
    passed on line by line and its last ERROR line becomes the one-line error.
    """
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.Popen(cmd, stdout=2, stderr=subprocess.PIPE, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=50)
    for line in proc.stderr:
        line = line.rstrip("\n")
        echo(line)
        tail.append(line)
    if proc.wait():
        errors = [t.removeprefix("ERROR:").strip() for t in tail if t.startswith("ERROR:")]
        raise BundleError(f"pip {args[0]} failed: {errors[-1] if errors else f'exit status {proc.returncode}'}")


def build_darkroom_wheel(source: Path, wheels: Path, pip: Pip) -> Path:
    """Darkroom's own wheel, built from a clean copy of the source (the checkout gets no build/ folder)."""
    with _scratch("darkroom-wheel-") as tmp:
        src = tmp / "src"
        with _writing_temp():
            shutil.copytree(source / "darkroom", src / "darkroom",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.partial"))
            for extra in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
                if (source / extra).is_file():
                    shutil.copy2(source / extra, src / extra)
        out = tmp / "out"
        isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
        pip(["wheel", "--no-deps", *isolation, "--wheel-dir", str(out), str(src)])
        built = sorted(out.glob("darkroom-*.whl"))
        if len(built) != 1:
            raise BundleError(f"building Darkroom's wheel from {source} gave {len(built)} wheels")
        _copy_in(built[0], wheels / built[0].name)
        return wheels / built[0].name


@contextlib.contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder in the system's temp folder (a full one is named, with the way around it)."""
    with _writing_temp():
        tmp = tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True)
    with tmp as name:
        yield Path(name)


def _writing_temp() -> contextlib.AbstractContextManager[None]:
    return writes_to(tempfile.gettempdir(), "prepare the bundle", instead="point TMPDIR at a folder with room")


def _copy_in(src: Path, dest: Path, progress: Callable[[int], None] | None = None) -> str:
    """Copy a file into the bundle through a hidden temp, renamed when complete; returns its SHA-256.
    A source that cannot be read names the source; writes that fail are left to the caller's writes_to."""
    h = hashlib.sha256()

    def take(block: bytes) -> None:
        h.update(block)
        if progress:
            progress(len(block))

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            copy_stream(fin, fout, src, take)
        shutil.copystat(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        discard(tmp)
        raise
    return h.hexdigest()


def _download(requirements: list[str], wheels: Path, target: Target, pip: Pip, *, no_deps: bool = False) -> None:
    """pip download into the wheels folder; for another system with --no-deps, as pip would follow the
    dependencies' environment markers for *this* machine (a Windows torch would drag in Linux's CUDA
    libraries): complete_for_target() then adds the dependencies the target's markers call for.
    `no_deps`: the packages of requirements-nodeps.txt, whose declared dependencies must not come along."""
    with _scratch("darkroom-reqs-") as tmp:
        req_file = tmp / "requirements.txt"
        with _writing_temp():
            req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
        no_deps = [] if target.native and not no_deps else ["--no-deps"]
        pip(["download", *no_deps, "--dest", str(wheels), "--find-links", str(wheels), *target.pip_args(),
             "-r", str(req_file)])


def download_wheels(requirements: list[str], torch_req: str, torch_index: str | None, wheels: Path,
                    target: Target, pip: Pip) -> None:
    """torch alone from its index, then everything else (torch's own dependencies included) from pip's sources.

    Two steps so that only torch is looked up on the torch index: every other package comes from the
    user's usual index (PyPI), and an unreachable torch index costs one lookup, not one per package.
    """
    index = ["--index-url", torch_index] if torch_index else []
    pip(["download", "--no-deps", "--dest", str(wheels), *target.pip_args(), *index, torch_req])
    _download([torch_req if _name(r) == "torch" else r for r in requirements], wheels, target, pip)


@dataclass
class WheelInfo:
    name: str
    version: str
    path: Path
    requires: list[str]


def read_wheels(wheels: Path) -> dict[str, WheelInfo]:
    """Every wheel in the folder by canonical project name (two versions of one project is an error)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    found: dict[str, WheelInfo] = {}
    for path in sorted(wheels.glob("*.whl")):
        try:
            name, version, _build, _tags = parse_wheel_filename(path.name)
        except InvalidWheelFilename as e:
            raise BundleError(f"{path.name}: {e}") from None
        try:
            with zipfile.ZipFile(path) as z:
                meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
                text = z.read(meta).decode("utf-8", "replace")
        except (zipfile.BadZipFile, StopIteration, OSError) as e:
            raise BundleError(f"{path.name}: not a readable wheel ({e or 'no METADATA'})") from None
        requires = Parser().parsestr(text, headersonly=True).get_all("Requires-Dist") or []
        if name in found:
            raise BundleError(f"two versions of {name} in the bundle ({found[name].path.name}, {path.name})")
        found[name] = WheelInfo(name, str(version), path, requires)
    return found


def missing_requirements(wheels: dict[str, WheelInfo], roots: list[str], env: dict[str, str]) -> list[str]:
    """Requirements (markers evaluated for the target) that no wheel in the bundle provides, one per project
    with the specifiers of every requirer combined. A wheel of the wrong version is an error naming both."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    missing: dict[str, tuple[set[str], SpecifierSet]] = {}
    visited: dict[str, set[str]] = {}
    queue: deque[tuple[str, frozenset[str], str]] = deque((r, frozenset([""]), "the pinned requirements")
                                                          for r in roots)
    while queue:
        text, parent_extras, parent = queue.popleft()
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in parent_extras):
            continue
        name = canonicalize_name(req.name)
        wheel = wheels.get(name)
        if wheel is None:
            extras, spec = missing.get(name, (set(), SpecifierSet()))
            missing[name] = (extras | set(req.extras), spec & req.specifier)
            continue
        if not req.specifier.contains(wheel.version, prereleases=True):
            raise BundleError(f"{parent} requires {req.name}{req.specifier} but the bundle has {wheel.path.name}"
                              " (adjust the pins in requirements.txt)")
        extras = {canonicalize_name(e) for e in req.extras} | {""}
        seen = visited.setdefault(name, set())
        if extras <= seen:
            continue
        seen |= extras
        queue.extend((dep, frozenset(seen), f"{wheel.name} {wheel.version}") for dep in wheel.requires)
    return [f"{name}{'[' + ','.join(sorted(extras)) + ']' if extras else ''}{spec}"
            for name, (extras, spec) in sorted(missing.items())]


def complete_for_target(wheels_dir: Path, roots: list[str], target: Target, pip: Pip, echo: Echo) -> None:
    """Follow every wheel's dependencies with the target's environment markers until nothing is missing.

    For this machine pip's resolver has done it all and this only confirms it; for another system it
    is the resolver (pinned versions first, the newest compatible release for the rest).
    """
    env = marker_environment(target)
    for _ in range(CLOSURE_ROUNDS):
        missing = missing_requirements(read_wheels(wheels_dir), roots, env)
        if not missing:
            return
        echo(f"darkroom: the target also needs {', '.join(missing)}")
        _download(missing, wheels_dir, target, pip)
    raise BundleError("could not complete the bundle for the target: still missing "
                      + ", ".join(missing_requirements(read_wheels(wheels_dir), roots, env)))


# ---------------------------------------------------------------------------------------------- models


@dataclass
class BundleModel:
    path: Path  # a file, or a diffusers folder
    kind: str  # a key of KIND_FOLDERS

    @property
    def dest(self) -> str:
        return f"models/{KIND_FOLDERS[self.kind]}/{self.path.name}"


def kind_dirs(home: Home) -> dict[str, list[Path]]:
    """The folders each kind of model is looked up in: the home's, then other installs' (used in place)."""
    dirs = {"checkpoint": home.checkpoint_dirs()}
    for kind in ("lora", "vae", "embedding"):
        found = [home.root / "models" / KIND_FOLDERS[kind]]
        for extra in home.extra_model_dirs:
            found += [extra / sub for sub in OTHER_INSTALL_DIRS[kind] if (extra / sub).is_dir()][:1]
        dirs[kind] = found
    return dirs


def _kind_of(path: Path, home: Home) -> str:
    """A .safetensors file's header decides; else the folder it sits in; else .ckpt means a checkpoint."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "checkpoint"
        raise BundleError(f"{path} is a folder but not a diffusers model (no model_index.json)")
    detection = None
    if path.suffix.lower() == ".safetensors":
        from darkroom.models.families import detect
        from darkroom.models.header import read_header

        detection = detect(read_header(path))
        if detection.kind in KIND_FOLDERS:
            return detection.kind
    homes = [(len(folder.resolve().parts), kind) for kind, folders in kind_dirs(home).items() for folder in folders
             if folder.is_dir() and path.is_relative_to(folder.resolve())]
    if homes:
        return max(homes)[1]  # the innermost: a plain models folder may hold an A1111 root's models/Lora
    if detection is not None:
        raise BundleError(f"{path.name}: {detection.label}; not a model Darkroom can use")
    if path.suffix.lower() == ".ckpt":
        return "checkpoint"
    raise BundleError(f"{path}: cannot tell what kind of model this is; put it in a models folder"
                      " (checkpoints, loras, vae, embeddings) or use a .safetensors file")


def _files_by_kind(home: Home) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for kind, folders in kind_dirs(home).items():
        if kind == "checkpoint":
            continue  # the library lists these (diffusers folders included)
        out[kind] = [p for folder in folders if is_folder(folder)
                     for p in walk_models(folder, lambda name: Path(name).suffix.lower() in MODEL_SUFFIXES)]
    return out


def resolve_models(home: Home, names: Sequence[str]) -> tuple[list[BundleModel], list[str]]:
    """(models to bundle, notes) for what the user typed: paths, or names in the models folders."""
    from darkroom.errors import ModelNotFound
    from darkroom.models import starter
    from darkroom.models.library import ModelLibrary

    library = ModelLibrary(home)
    builtin = {d.resolve() for d in starter.builtin_dirs(home)}
    chosen: list[BundleModel] = []
    notes: list[str] = []
    for name in names:
        candidate = Path(name).expanduser()
        if candidate.exists():
            path = candidate.resolve()
        elif any(sep in name for sep in ("/", "\\")):
            raise BundleError(f"model file not found: {name}")
        else:
            try:
                path = library.resolve(name).resolve()
            except ModelNotFound:
                path = _find_other_kind(home, name, library)
        if path.parent in builtin:
            notes.append(f"{path.stem} is built in: it ships inside Darkroom's wheel, nothing to copy")
            continue
        model = BundleModel(path, _kind_of(path, home))
        if any(m.dest.casefold() == model.dest.casefold() for m in chosen):
            if any(m.path == model.path for m in chosen):
                continue
            # names that differ only in case are one file on the FAT/exFAT drives bundles travel on
            raise BundleError(f"two models would be {model.dest}: {path} and "
                              f"{next(m.path for m in chosen if m.dest.casefold() == model.dest.casefold())}"
                              " (a FAT/exFAT drive does not tell names apart by letter case); rename one")
        chosen.append(model)
    return chosen, notes


def _find_other_kind(home: Home, name: str, library) -> Path:
    files = _files_by_kind(home)
    wanted = name.strip().lower()
    for paths in files.values():
        for p in paths:
            if wanted in (p.stem.lower(), p.name.lower()):
                return p.resolve()
    available = [f"checkpoints: {', '.join(e.name for e in library.scan()) or 'none'}"]
    available += [f"{KIND_FOLDERS[k]}: {', '.join(p.stem for p in v)}" for k, v in files.items() if v]
    raise BundleError(f"no model named {name!r} ({'; '.join(available)})")


def _model_files(model: BundleModel) -> list[tuple[Path, str]]:
    """(file, bundle path) of a model: a diffusers folder's files, or the file and the sidecars beside it
    (previews, .yaml, model cards: darkroom.models.cards.sidecars_of, links out of its folder skipped)."""
    if model.path.is_dir():
        return [(f, f"{model.dest}/{f.relative_to(model.path).as_posix()}")
                for f in sorted(p for p in model.path.rglob("*") if p.is_file())]
    folder = model.dest.rsplit("/", 1)[0]
    return [(model.path, model.dest), *((s, f"{folder}/{s.name}") for s in sidecars_of(model.path))]


def copy_models(models: list[BundleModel], root: Path, progress: Callable[[int], None] | None = None
                ) -> dict[str, str]:
    """Copy the models (with their sidecars) under root/models/<kind>/; returns {bundle path: SHA-256 of
    the source bytes}."""
    hashes = {}
    for model in models:
        for f, rel in _model_files(model):
            hashes[rel] = _copy_in(f, root / rel, progress)
    return hashes


def model_bytes(models: list[BundleModel]) -> int:
    return sum(f.stat().st_size for m in models for f, _ in _model_files(m))


# ---------------------------------------------------------------------------------------------- manifest


def write_manifest(root: Path, info: dict, expected: dict[str, str] | None = None,
                   progress: Callable[[int], None] | None = None) -> dict:
    """Hash every file under root into manifest.json (written last, atomically) and SHA256SUMS.

    `expected` holds hashes taken while copying: a file whose bytes on disk differ (a failing USB
    stick) stops here rather than at install time.
    """
    check = checker()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in _WRITTEN_LAST)
    entries = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        digest = check.sha256_file(path, progress)
        if expected and rel in expected and expected[rel] != digest:
            raise BundleError(f"{rel} in the bundle differs from its source after copying (disk failing?)")
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": digest})
    sums = "".join(f"{e['sha256']}  {e['path']}\n" for e in entries)
    data = sums.encode()
    _write_file(root / "SHA256SUMS", data, root)
    entries.append({"path": "SHA256SUMS", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": check.FORMAT, **info, "files": entries}
    _write_file(root / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), root)
    return manifest


_WRITTEN_LAST = (MANIFEST, "SHA256SUMS", MANIFEST + ".tmp", f".{MANIFEST}.tmp", ".SHA256SUMS.tmp")
"""Not listed in the manifest: the manifest and the checksums themselves, and their temps."""
OTHER_BUNDLE_FOLDER = "choose another folder for the bundle"


def _write_file(path: Path, data: bytes, root: Path) -> None:
    write_atomic(path, data, doing="write the bundle", folder=root, instead=OTHER_BUNDLE_FOLDER)


@dataclass
class VerifyReport:
    manifest: dict
    problems: list[str]  # "path: what is wrong"
    extra: list[str]  # files not in the manifest (not an error: the installers ignore them)

    @property
    def bad_files(self) -> list[str]:
        return [p.split(": ", 1)[0] for p in self.problems]


def verify_bundle(root: Path, progress: Callable[[int], None] | None = None) -> VerifyReport:
    check = checker()
    try:
        manifest = check.load_manifest(Path(root))
    except check.BundleError as e:
        raise BundleError(str(e)) from None
    problems, extra = check.check_files(Path(root), manifest, progress)
    return VerifyReport(manifest, problems, extra)


def manifest_bytes(manifest: dict) -> int:
    return sum(e["size"] for e in manifest["files"])


# ---------------------------------------------------------------------------------------------- create


def prepare_destination(dest: Path, home: Home, models: Sequence[str], echo: Echo) -> tuple[Path, list[BundleModel]]:
    """Every bundle kind's first step: the chosen models resolved (their notes echoed) and DEST new or empty,
    before anything is downloaded or written."""
    chosen, notes = resolve_models(home, models)
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} is not an empty folder: choose a new or empty one")
    for note in notes:
        echo(f"darkroom: {note}")
    return dest, chosen


def create_bundle(dest: Path, *, home: Home, models: Sequence[str] = (), platforms: Sequence[str] = (),
                  python_version: str | None = None, torch: str = "cpu", torch_index_url: str | None = None,
                  source: Path | None = None, pip: Pip | None = None, echo: Echo = print,
                  progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
                  since: Path | None = None) -> dict:
    """Write an offline bundle into dest (new or empty); returns the manifest.

    Everything cheap is checked before the first download: the target, the source, the models, dest.
    `torch_index_url`: None for download.pytorch.org's index of the variant, "none" for pip's own sources.
    `progress(label, total_bytes)` returns a per-chunk callback (the CLI draws bars with it).
    `since`: an older bundle or its manifest.json; write an update carrying only what changed (carry.update).
    """
    target = make_target(platforms, python_version, torch)
    src = find_source(source)
    requirements = read_requirements(src / "requirements.txt")
    nodeps_file = src / NODEPS_FILE
    nodeps = read_requirements(nodeps_file) if nodeps_file.is_file() else []
    torch_pins = [r for r in requirements if _name(r) == "torch"]
    m = re.fullmatch(r"torch\s*==\s*([\w.+]+)", torch_pins[0]) if len(torch_pins) == 1 else None
    if not m:
        raise BundleError(f"{src / 'requirements.txt'} must pin torch exactly once (torch==X.Y.Z)")
    torch_req, torch_index = torch_requirement(m[1], target, None if torch_index_url == "none" else torch_index_url)
    if torch_index_url == "none":
        torch_index = None  # pip's configured sources only (a local mirror or wheel folder)
    base = None
    if since is not None:
        from darkroom.carry.update import load_base

        base = load_base(since)
        base.check_target(target)
    dest, chosen = prepare_destination(dest, home, models, echo)
    pip = pip or functools.partial(run_pip, echo=echo)
    wheels = dest / "wheels"
    try:
        with writes_to(dest, "write the bundle", instead=OTHER_BUNDLE_FOLDER):
            wheels.mkdir(parents=True, exist_ok=True)
            return _fill(dest, wheels, src, requirements, torch_req, torch_index, target, chosen, pip, echo,
                         progress, nodeps, base)
    except (BundleError, StorageError) as e:  # the manifest, written last, is missing: no installer takes it
        raise type(e)(f"{e} ({dest} is incomplete: delete it before trying again)" if _has_files(dest)
                      else str(e)) from None


def _has_files(folder: Path) -> bool:
    try:
        return any(p.is_file() for p in folder.rglob("*"))
    except OSError:
        return True  # cannot tell (the drive is gone): say it may hold part of a bundle


def _fill(dest, wheels, src, requirements, torch_req, torch_index, target, chosen, pip, echo, progress,
          nodeps=(), base=None) -> dict:
    where = "this machine" if target.native else f"{target.os} {target.machine or ''} Python {target.python}"
    echo(f"darkroom: building Darkroom's wheel from {src}")
    own = build_darkroom_wheel(src, wheels, pip)
    version = own.name.split("-")[1]
    echo(f"darkroom: downloading {torch_req} for {where}" + (f" from {torch_index}" if torch_index else ""))
    download_wheels(requirements, torch_req, torch_index, wheels, target, pip)
    roots = [torch_req if _name(r) == "torch" else r for r in requirements] + [f"darkroom=={version}"]
    complete_for_target(wheels, roots, target, pip, echo)
    if nodeps:  # after the closure, so their declared dependencies (spandrel's torchvision) are never followed
        echo(f"darkroom: downloading {', '.join(nodeps)} without their declared dependencies")
        _download(list(nodeps), wheels, target, pip, no_deps=True)
    found = read_wheels(wheels)
    apart = {_name(r) for r in nodeps}

    expected = {}
    if chosen:
        echo(f"darkroom: copying {len(chosen)} model(s)")
        expected = copy_models(chosen, dest, progress("copying models", model_bytes(chosen)) if progress else None)
    _write_file(dest / "requirements-torch.txt", f"{found['torch'].name}=={found['torch'].version}\n".encode(),
                dest)
    _write_file(dest / "requirements.txt", "".join(f"{w.name}=={w.version}\n" for n, w in found.items()
                                                   if n not in apart).encode(), dest)
    if apart:
        _write_file(dest / NODEPS_FILE, "".join(f"{found[n].name}=={found[n].version}\n" for n in sorted(apart)
                                                if n in found).encode(), dest)
    for script in SCRIPTS:
        _copy_in(ASSETS / script, dest / script)
    (dest / "install.sh").chmod(0o755)

    info = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "darkroom_version": version,
        "target": {**target.as_json(), "torch_requirement": torch_req},
        "install": {"first": "requirements-torch.txt", "then": "requirements.txt",
                    **({"then_no_deps": NODEPS_FILE} if apart else {})},
        "models": [{"path": mdl.dest, "kind": mdl.kind} for mdl in chosen],
    }
    if base is not None:  # --since: leave out what the old bundle holds byte for byte
        from darkroom.carry.update import prune_to_update

        info = prune_to_update(dest, base, info, echo)
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    echo("darkroom: writing the manifest")
    return write_manifest(dest, info, expected, progress("hashing", total) if progress else None)
