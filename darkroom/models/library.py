"""Find checkpoints in the models folders and resolve what a user typed to one of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from darkroom.errors import ModelLoadError, ModelNotFound
from darkroom.home import Home
from darkroom.models.families import Detection, detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import read_header

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


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


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class ModelLibrary:
    """The checkpoints of a Home (and the extra model folders it names)."""

    def __init__(self, home: Home, hashes: HashCache | None = None):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)

    def scan(self) -> list[ModelEntry]:
        entries: list[ModelEntry] = []
        seen: set[Path] = set()
        from darkroom.models.starter import builtin_dirs

        for folder in [*self.home.checkpoint_dirs(), *builtin_dirs(self.home)]:
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                if path in seen or any(p.name.startswith(".") for p in path.relative_to(folder).parents if p.name):
                    continue
                if path.is_dir() and (path / "model_index.json").exists():
                    seen.add(path)
                    entries.append(ModelEntry(path.name, path, _folder_size(path)))
                elif path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES and not path.name.startswith("."):
                    if any(parent in seen for parent in path.parents):
                        continue  # a component file inside a diffusers folder
                    seen.add(path)
                    entries.append(self.describe(path))
        return entries

    def describe(self, path: Path) -> ModelEntry:
        if path.is_dir():
            return ModelEntry(path.name, path, _folder_size(path))
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

    def resolve(self, name_or_path: str) -> Path:
        """A path, or a name (with or without extension) or short hash in the models folders."""
        candidate = Path(name_or_path).expanduser()
        if candidate.exists():
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
