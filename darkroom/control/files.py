"""Where ControlNet files are, and the names users type for them.

Files live in the Darkroom home's `models/controlnet` and, used in place, in the folders the
webuis read under each extra models folder: AUTOMATIC1111/Forge's `models/ControlNet`, the
sd-webui-controlnet extension's own `extensions/sd-webui-controlnet/models`, and ComfyUI's
`models/controlnet`. Diffusers folders (config.json naming a ControlNet class beside its
weights) count as one model. The built-in starter ControlNet (for the built-in starter
checkpoint) is listed last when the package ships it. Listing reads headers only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from darkroom.control.config import RUNS
from darkroom.control.load import WEIGHT_NAMES, folder_class, header_kind
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.home import Home, is_folder
from darkroom.models.library import has_suffix, install_folders, walk_models

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
"""What the extension lists (its CN_MODEL_EXTS); pickles are read weights-only."""
INSTALL_DIRS = ("models/ControlNet", "extensions/sd-webui-controlnet/models", "models/controlnet",
                "models/ipadapter")  # ComfyUI keeps IP-Adapters in their own folder
FOLDER_CLASSES = ("ControlNetModel", "ControlNetUnionModel", "T2IAdapter")
STARTER_CONTROL = Path(__file__).resolve().parent.parent / "assets" / "controlnet" \
    / "darkroom-starter-control.safetensors"
"""The built-in ControlNet trained for the built-in starter checkpoint (SD1 architecture), in its own folder:
the starter checkpoint's folder is listed as checkpoints."""
NONE = "None"
_TITLE = re.compile(r"^(?P<name>.*?)\s*\[(?P<hash>[0-9a-fA-F]{8,10})\]$")


def legacy_hash(path: Path) -> str:
    """The 8-hex-digit hash the extension shows after a model's name (`name [d14c016b]`): the webui's old
    model hash, SHA-256 of the 64 KiB at offset 1 MiB. It reads 64 KiB, so it needs no cache."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            fh.seek(0x100000)
            h.update(fh.read(0x10000))
    except OSError:
        return "NOFILE"
    return h.hexdigest()[:8]


@dataclass
class ControlNetFile:
    """One ControlNet as listings show it; `family` is None where the header cannot tell (pickles)."""

    name: str  # the file stem or folder name: what infotexts and the API name it by (with its [hash])
    path: Path
    family: str | None
    size: int
    folder: str  # the install folder it was found in ("controlnet", "ControlNet", "models", "builtin")
    supported: bool = True
    detail: str = ""  # why it cannot be used, for unsupported kinds
    noun: str = "ControlNet"  # or "T2I-Adapter", for messages
    _hash: str | None = field(default=None, repr=False, compare=False)

    @property
    def weights(self) -> Path:
        """The file whose hash names the model (a diffusers folder's weights file)."""
        if self.path.is_dir():
            return next((self.path / n for n in WEIGHT_NAMES if (self.path / n).is_file()), self.path / WEIGHT_NAMES[0])
        return self.path

    @property
    def short_hash(self) -> str:
        if self._hash is None:
            self._hash = legacy_hash(self.weights)
        return self._hash

    @property
    def title(self) -> str:
        """`name [hash8]`, as the extension lists models and writes them into infotexts."""
        return f"{self.name} [{self.short_hash}]"


def controlnet_dirs(home: Home) -> list[tuple[Path, str]]:
    """(folder, label) pairs: the home's controlnet folder, then each extra models folder's webui folders."""
    return install_folders(home.controlnets, "controlnet", home, INSTALL_DIRS)


def is_controlnet_folder(path: Path) -> bool:
    """A diffusers ControlNet folder: config.json naming a ControlNet class, and its weights."""
    if folder_class(path) not in FOLDER_CLASSES:
        return False
    return any(p.name.startswith("diffusion_pytorch_model") and p.name.endswith(".safetensors")
               for p in path.iterdir())


def _describe(path: Path, label: str, problems: list[str] | None) -> ControlNetFile | None:
    try:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir()
                                                             if p.is_file())
        kind = header_kind(path)
    except DarkroomError as e:  # a damaged header: listed as unusable, with the reason
        if problems is not None:
            problems.append(f"{path}: {e}")
        return None
    except OSError:
        return None
    name = path.stem if path.is_file() else path.name
    if kind is None:
        return ControlNetFile(name, path, None, size, label)
    if not kind.supported:
        return ControlNetFile(name, path, None, size, label, supported=False, detail=kind.detail)
    return ControlNetFile(name, path, kind.family, size, label, noun=kind.noun)


def find_controlnets(home: Home, problems: list[str] | None = None) -> list[ControlNetFile]:
    """Every ControlNet, by name (sorted, ignoring case); the first folder wins a name, and a .safetensors
    file wins over a pickle of the same name. Files that are not ControlNets at all are left out; kinds
    we cannot run yet (the T2I style adapter, ControlNet-XS) are listed with `supported` False (T2I-Adapters
    and LLLite models run: darkroom.control.adapter, darkroom.control.lllite); Control-LoRAs are
    listed as the family they are built on (darkroom.control.control_lora)."""
    found: dict[str, ControlNetFile] = {}
    for folder, label in controlnet_dirs(home):
        if not is_folder(folder):
            continue
        paths = walk_models(folder, has_suffix(CONTROLNET_SUFFIXES), bundle=is_controlnet_folder, problems=problems)
        for path in sorted(paths, key=lambda p: p.suffix.lower() != ".safetensors"):
            name = path.stem if path.is_file() else path.name
            if name in found or name == NONE:
                continue
            entry = _describe(path, label, problems)
            if entry is not None and (entry.supported or entry.detail != "not a ControlNet"):
                found[name] = entry
    if STARTER_CONTROL.is_file() and STARTER_CONTROL.stem not in found:
        entry = _describe(STARTER_CONTROL, "builtin", problems)
        if entry is not None:
            found[entry.name] = entry
    return sorted(found.values(), key=lambda f: f.name.lower())


def split_title(wanted: str) -> tuple[str, str | None]:
    """("name", "hash") from "name [hash]"; ("name", None) without a hash."""
    m = _TITLE.match(wanted.strip())
    return (m.group("name"), m.group("hash").lower()) if m else (wanted.strip(), None)


def resolve(files: list[ControlNetFile], wanted: str) -> ControlNetFile:
    """The ControlNet a user names: its name, "name [hash]" (the hash is not required to match: another
    machine's copy may differ), its file name or its path; exactly first, then ignoring case."""
    wanted = (wanted or "").strip()
    name, _ = split_title(wanted)
    for exact in (True, False):
        for f in files:
            names = (f.name, f.path.name, str(f.path))
            if exact and (name in names or wanted in names):
                return _usable(f)
            if not exact and {name.lower(), wanted.lower()} & {n.lower() for n in names}:
                return _usable(f)
    try:
        as_path = Path(wanted).resolve()
        match = next((f for f in files if f.path.resolve() == as_path), None)
    except (OSError, ValueError):
        match = None
    if match is not None:
        return _usable(match)
    usable = [f.title for f in files if f.supported]
    raise InvalidRequest(f"no ControlNet named {wanted!r}; available: {', '.join(usable) or 'none'}"
                         + ("" if usable else " (put ControlNet files such as control_v11p_sd15_canny.pth in"
                            " models/controlnet, or point --models-dir at a webui install)"))


def _usable(f: ControlNetFile) -> ControlNetFile:
    if not f.supported:
        raise InvalidRequest(f"{f.name} is {f.detail}; {RUNS}")
    return f
