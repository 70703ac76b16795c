"""Find checkpoints in the models folders and resolve what a user typed to one of them."""

from __future__ import annotations

import json
import logging
import os
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from darkroom.errors import ModelLoadError, ModelNotFound
from darkroom.home import Home, is_folder
from darkroom.models.families import Detection, detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import read_header

log = logging.getLogger("darkroom.models")

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
MAX_DEPTH = 8
"""Folder levels searched below a models folder: collections sort models into a few subfolders,
and a models folder of `/` must not become a walk of the whole disk."""
MAX_ENTRIES = 50_000
"""Files and folders looked at in one models folder before the search stops (and says so)."""
DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
MAX_INDEX = 1 << 20
"""A model_index.json is a few hundred bytes; a larger one is not read."""


@dataclass
class ModelEntry:
    name: str  # what users type and what the infotext records: file stem / folder name
    path: Path
    size: int
    detection: Detection | None = None
    error: str | None = None

    @property
    def is_diffusers(self) -> bool:
        return self.path.is_dir()


def diffusers_weights(folder: Path) -> Path | None:
    """The file whose hash identifies a diffusers folder (its UNet weights)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / "unet" / name).exists():
            return folder / "unet" / name
    return None


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def read_model_index(folder: Path) -> dict:
    """A diffusers folder's model_index.json, checked: a JSON object whose components Darkroom
    reads are [library, class] pairs, so a damaged file is one error naming the folder and entry."""
    path = folder / "model_index.json"
    try:
        if not path.is_file() or path.stat().st_size > MAX_INDEX:
            raise ValueError(f"not a regular file of at most {MAX_INDEX} bytes")
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise ModelLoadError(f"{folder.name}: unreadable model_index.json ({why})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{folder.name}: model_index.json holds {_describe(index)}, not an object"
                             " naming the pipeline's components; copy the folder again")
    for name in DIFFUSERS_COMPONENTS:
        entry = index.get(name)
        if entry is not None and not _component(entry):
            raise ModelLoadError(f"{folder.name}: model_index.json entry {name!r} is {_describe(entry)},"
                                 ' not a [library, class] pair such as ["diffusers", "UNet2DConditionModel"];'
                                 " copy the folder again")
    return index


def _describe(value: object) -> str:
    """A JSON value in a few words (never by recursing into it: it may nest deeply)."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'JSON object'} of {len(value)} item(s)"
    return json.dumps(value)[:40]


def _component(entry: object) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and all(x is None or isinstance(x, str) for x in entry)


def has_component(index: dict, name: str) -> bool:
    """Whether a checked model_index.json (read_model_index) names component `name`."""
    return bool(index.get(name) and index[name][0])


def walk_models(folder: Path, wanted: Callable[[str], bool], bundle: Callable[[Path], bool] | None = None,
                problems: list[str] | None = None) -> list[Path]:
    """Regular files under `folder` whose name is `wanted`, and `bundle` folders (not searched
    inside, e.g. diffusers folders), in path order.

    A models folder is whatever a user typed (`/`, a drive with unreadable folders), so the
    search is bounded and never fails: hidden names, unreadable folders and special files (FIFOs,
    sockets, devices) are skipped; symlinked folders are not searched (no loops; a symlinked
    bundle still counts); it goes MAX_DEPTH levels down, breadth first, and stops after
    MAX_ENTRIES entries, adding a line to `problems` (and the log) when it does.
    """
    found: list[Path] = []
    pending = deque([(folder, 0)])
    looked = 0
    while pending:
        here, depth = pending.popleft()
        for entry in _entries(here):
            looked += 1
            if looked > MAX_ENTRIES:
                note_problem(problems, f"{folder}: stopped looking for models after {MAX_ENTRIES} files and folders;"
                                       " name the folder that holds the models (--models-dir, models_dirs)")
                return sorted(found)
            kind, path = _kind(entry), Path(entry.path)
            if kind in ("dir", "linked dir") and bundle is not None and _safely(bundle, path):
                found.append(path)
            elif kind == "dir" and depth < MAX_DEPTH:
                pending.append((path, depth + 1))
            elif kind == "file" and wanted(entry.name):
                found.append(path)
    return sorted(found)


def install_folders(own: Path, label: str, home: Home, subdirs: tuple[str, ...]) -> list[tuple[Path, str]]:
    """(folder, label) pairs for one kind of file: the home's own folder, then each extra models folder's
    webui folders among `subdirs` ("models/ESRGAN", ...; labelled by their last part), each folder once."""
    from darkroom.fsutil import unique_dirs

    out = [(own, label)]
    for extra in home.extra_model_dirs:
        for sub in subdirs:
            if is_folder(extra / sub):
                out.append((extra / sub, sub.rsplit("/", 1)[1]))
    kept = {str(p) for p in unique_dirs(p for p, _ in out)}
    return [(p, name) for p, name in out if str(p) in kept]


def has_suffix(suffixes: tuple[str, ...]) -> Callable[[str], bool]:
    return lambda name: os.path.splitext(name)[1].lower() in suffixes


def folder_size(folder: Path) -> int:
    """Bytes in the regular files of a model folder, within walk_models' bounds."""
    total = 0
    for path in walk_models(folder, lambda name: True):
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


def note_problem(problems: list[str] | None, line: str) -> None:
    """Log `line` and keep it (once) where the caller can show it (`darkroom doctor` does)."""
    if problems is not None:
        if line in problems:
            return
        problems.append(line)
    log.warning("%s", line)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []  # unreadable (permissions, /proc), or gone meanwhile


def _kind(entry: os.DirEntry) -> str | None:
    """'dir', 'linked dir', 'file' (a regular file, or a link to one), or None: hidden, special, unreadable."""
    if entry.name.startswith("."):
        return None
    try:
        if entry.is_symlink():
            mode = os.stat(entry.path).st_mode  # the target; a loop raises ELOOP
            return "linked dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else None
        if entry.is_dir(follow_symlinks=False):
            return "dir"
        return "file" if entry.is_file(follow_symlinks=False) else None
    except OSError:
        return None


def _safely(test: Callable[[Path], bool], path: Path) -> bool:
    try:
        return test(path)
    except OSError:
        return False


class ModelLibrary:
    """The checkpoints of a Home (and the extra model folders it names)."""

    def __init__(self, home: Home, hashes: HashCache | None = None):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)
        self.problems: list[str] = []  # models folders whose search stopped short (walk_models)

    def scan(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        seen: set[Path] = set()
        from darkroom.models.starter import builtin_dirs

        for folder in [*self.home.checkpoint_dirs(), *builtin_dirs(self.home)]:
            if not is_folder(folder):
                continue
            for path in walk_models(folder, has_suffix(CHECKPOINT_SUFFIXES), is_diffusers_folder, self.problems):
                if path not in seen and not any(parent in seen for parent in path.parents):
                    seen.add(path)  # (a folder listed twice, or nested in another, counts once)
                    entries.append(self.describe(path))
        return entries

    def describe(self, path: Path) -> ModelEntry:
        if path.is_dir():
            return ModelEntry(path.name, path, folder_size(path))
        entry = ModelEntry(path.stem, path, path.stat().st_size)
        if path.suffix.lower() == ".safetensors":
            try:
                entry.detection = detect(read_header(path))
            except ModelLoadError as e:
                entry.error = str(e)
        else:
            entry.detection = Detection("checkpoint", detail="pickle (.ckpt), family unknown until loaded")
        return entry

    def short_hash(self, entry: ModelEntry) -> str:
        target = diffusers_weights(entry.path) if entry.is_diffusers else entry.path
        return self.hashes.short_hash(target) if target else ""

    def native_size(self, entry: ModelEntry) -> int | None:
        """The side the model was trained at, from its header alone (no loading)."""
        import json

        from darkroom.models.families import FAMILIES

        d = entry.detection
        if entry.error or d is None or d.family not in FAMILIES:
            return None
        try:
            cfg = json.loads(read_header(entry.path).metadata.get("darkroom_config", "{}") or "{}")
            unet, vae = cfg.get("unet", {}), cfg.get("vae", {})
            if "sample_size" in unet and "block_out_channels" in vae:
                return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        except (ModelLoadError, ValueError, TypeError, AttributeError):
            pass
        return 768 if d.family == "sd2" and d.v_prediction else FAMILIES[d.family].native_size

    def resolve(self, name_or_path: str, *, paths: bool = True) -> Path:
        """A path, or a name (with or without extension) or short hash in the models folders.
        With `paths=False` only names and hashes are looked up (a client's reference is never
        opened as a path relative to wherever the server runs)."""
        candidate = Path(name_or_path).expanduser()
        if paths and candidate.exists():
            return candidate.resolve()
        if any(sep in name_or_path for sep in ("/", "\\")) and not name_or_path.startswith(("[", "(")):
            raise ModelNotFound(f"model file not found: {name_or_path}")
        wanted = name_or_path.strip()
        # "name [hash]" as the A1111 API's sd-models titles read
        if wanted.endswith("]") and " [" in wanted:
            wanted = wanted[: wanted.rindex(" [")]
        entries = self.scan()
        for entry in entries:
            if wanted in (entry.name, entry.path.name):
                return entry.path
        lowered = wanted.lower()
        for entry in entries:
            if lowered in (entry.name.lower(), entry.path.name.lower()):
                return entry.path
        if 8 <= len(wanted) <= 64 and all(c in "0123456789abcdef" for c in lowered):
            for entry in entries:
                if entry.error is None and self.short_hash(entry).startswith(lowered[:10]):
                    return entry.path
        names = ", ".join(e.name for e in entries) or "none"
        raise ModelNotFound(
            f"no model named {name_or_path!r} in {', '.join(str(d) for d in self.home.checkpoint_dirs())}"
            f" (available: {names})"
        )
