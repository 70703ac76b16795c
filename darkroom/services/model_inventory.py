"""What is in the model library: the files of each kind, as listings and `info` show them.

`ModelInventory(home)` finds every model file Darkroom uses, by kind (checkpoints, LoRAs, VAEs,
textual-inversion embeddings), in the home's folders and in the extra model folders of existing
installs, and describes each from its header alone (hashes only from the hash cache).
`ModelManager` (darkroom.services.model_manager) builds on it; this module also holds what `info` reads
from a header (precision, parameter counts, LoRA rank/alpha/trigger words) and preview lookup.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.errors import DarkroomError, ModelLoadError, ModelNotFound
from darkroom.fsutil import unique_dirs as _unique
from darkroom.home import Home, is_folder
from darkroom.humanize import human_size
from darkroom.models.cards import PREVIEW_SUFFIXES, ModelCard
from darkroom.models.families import Detection, detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import SafetensorsHeader, read_header
from darkroom.models.library import (
    CHECKPOINT_SUFFIXES,
    ModelLibrary,
    diffusers_weights,
    folder_size,
    has_suffix,
    walk_models,
)

KINDS = ("checkpoint", "lora", "vae", "embedding")
SMALL_PICKLE = 1 << 20
"""A pickle this small cannot be a checkpoint or a LoRA: it is an embedding."""
MAX_META_VALUE = 160
MAX_CONFIG = 1 << 20
"""A diffusers config.json is a few kilobytes; a larger one is not read."""


@dataclass(frozen=True)
class KindSpec:
    """Where files of one kind live. The subfolders of existing installs are those the
    libraries that load them search (darkroom.engine.lora.LoraLibrary.folders,
    darkroom.models.vae_file.VaeLibrary.dirs, darkroom.text.embeddings.EmbeddingLibrary.dirs;
    checkpoints: Home.checkpoint_dirs); repeated here so that listing imports no torch."""

    kind: str
    title: str
    word: str  # "a LoRA"
    home_attr: str
    install_dirs: tuple[str, ...]
    suffixes: tuple[str, ...]


KIND_SPECS: dict[str, KindSpec] = {
    s.kind: s
    for s in (
        KindSpec("checkpoint", "CHECKPOINTS", "a checkpoint", "checkpoints",
                 ("models/Stable-diffusion", "models/checkpoints"), CHECKPOINT_SUFFIXES),
        KindSpec("lora", "LORAS", "a LoRA", "loras", ("models/Lora", "models/LyCORIS", "models/loras"),
                 (".safetensors", ".pt", ".ckpt", ".pth")),
        KindSpec("vae", "VAES", "a VAE", "vae", ("models/VAE", "models/vae"), (".safetensors", ".pt", ".ckpt")),
        KindSpec("embedding", "EMBEDDINGS", "a textual inversion embedding", "embeddings",
                 ("embeddings", "models/embeddings"), (".safetensors", ".pt", ".bin")),
    )
}
# folder names of existing installs -> kind (to guess what a pickle is)
FOLDER_HINTS = {"stable-diffusion": "checkpoint", "checkpoints": "checkpoint", "lora": "lora", "loras": "lora",
                "lycoris": "lora", "vae": "vae", "embeddings": "embedding"}
PRECISIONS = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "F64": "fp64", "F8_E4M3": "fp8 (e4m3)",
              "F8_E5M2": "fp8 (e5m2)"}
_EMBEDDING_WIDTHS = {768: "SD1", 1024: "SD2"}


# --------------------------------------------------------------------------- what is there


@dataclass
class LibraryFile:
    """One model file (or diffusers folder) as listings show it."""

    kind: str  # where Darkroom looks for it (its folder), or what it is when outside the folders
    name: str
    path: Path
    size: int
    detection: Detection | None = None
    error: str | None = None
    family: str = ""  # the FAMILY column: checkpoint family, LoRA base model, embedding width...
    sha256: str | None = None  # from the hash cache; None when not hashed yet
    note: str | None = None  # e.g. a LoRA in a checkpoints folder
    in_library: bool = True

    @property
    def hash_target(self) -> Path | None:
        """The file whose hash identifies it (a diffusers folder: its weights)."""
        if not self.path.is_dir():
            return self.path
        if self.kind == "checkpoint":
            return diffusers_weights(self.path)
        for base in (self.path, self.path / "vae"):
            for fn in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                       "diffusion_pytorch_model.bin"):
                if (base / fn).exists():
                    return base / fn
        return None

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "size": self.size,
                "size_human": human_size(self.size), "family": self.family,
                "detected_kind": self.detection.kind if self.detection else None, "sha256": self.sha256,
                "short_hash": self.short_hash, "error": self.error, "note": self.note}


def _is_vae_folder(p: Path) -> bool:
    """A diffusers VAE folder; its config.json is read only when it is a small regular file (not a FIFO)."""
    cfg = p / "config.json"
    try:
        if not (p.is_dir() and cfg.is_file() and cfg.stat().st_size <= MAX_CONFIG):
            return False
        return '"AutoencoderKL"' in cfg.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def _is_sidecar_vae(p: Path) -> bool:
    """`<checkpoint>.vae.safetensors` beside a checkpoint: a VAE, as the webui lists it."""
    return ".vae." in p.name.lower() and p.suffix.lower() in KIND_SPECS["vae"].suffixes


def _embedding_family(h: SafetensorsHeader) -> str:
    if "clip_l" in h.tensors and "clip_g" in h.tensors:
        shape = h.shape("clip_l") or (0,)
        return f"SDXL, {shape[0]} vector{'s' if shape[0] != 1 else ''}"
    for key, info in h.tensors.items():
        if key == "emb_params" or key.startswith("string_to_param"):
            n, width = (info.shape[0], info.shape[-1]) if len(info.shape) == 2 else (1, info.shape[-1])
            what = _EMBEDDING_WIDTHS.get(width, f"width {width}")
            return f"{what}, {n} vector{'s' if n != 1 else ''}"
    return "embedding"


def _lora_base(path: Path, header: SafetensorsHeader) -> tuple[str | None, str]:
    """(base model label, evidence) of a LoRA file (imports torch: darkroom.engine.lora)."""
    from darkroom.engine.lora import LoraFile

    try:
        base = LoraFile(path, header).base
    except ModelLoadError:
        return None, ""
    return base.label, base.evidence


class ModelInventory:
    """The model files of a Home as listings see them: folders, listing, lookup by name or path
    (cached hashes only; ModelManager adds hashing, info, import, verify and rescan)."""

    def __init__(self, home: Home, hashes: HashCache | None = None):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)
        self.checkpoints = ModelLibrary(home, self.hashes)
        self.problems = self.checkpoints.problems  # models folders whose search stopped short

    # ---- folders

    def home_folder(self, kind: str) -> Path:
        """Darkroom's own folder for `kind`: where imports go."""
        return getattr(self.home, KIND_SPECS[kind].home_attr)

    def folders(self, kind: str) -> list[Path]:
        """Every folder searched for `kind`, Darkroom's own first."""
        if kind == "checkpoint":
            from darkroom.models.starter import builtin_dirs

            return _unique([*self.home.checkpoint_dirs(), *builtin_dirs(self.home)])
        spec = KIND_SPECS[kind]
        dirs = [self.home_folder(kind)]
        for extra in self.home.extra_model_dirs:
            dirs += [extra / sub for sub in spec.install_dirs if is_folder(extra / sub)]
        return _unique(dirs)

    def _kind_of_location(self, path: Path) -> str | None:
        """The kind whose folders hold `path` (a symlinked file counts where its link is)."""
        places = (path.absolute(), path.resolve())
        best: tuple[int, str] | None = None  # the deepest folder wins (a plain extra folder may hold others)
        for kind in KINDS:
            for folder in self.folders(kind):
                for f in (folder.absolute(), folder.resolve()):
                    if any(p.is_relative_to(f) for p in places) and (best is None or len(f.parts) > best[0]):
                        best = (len(f.parts), kind)
        if best is not None and best[1] == "checkpoint" and _is_sidecar_vae(path):
            return "vae"
        return best[1] if best else None

    # ---- listing

    def files(self, kinds: Iterable[str] | None = None, *, lora_bases: bool = True) -> list[LibraryFile]:
        """Every model file of the chosen kinds (all by default), with cached hashes only."""
        wanted = list(kinds) if kinds else list(KINDS)
        out: list[LibraryFile] = []
        for kind in KINDS:
            if kind not in wanted:
                continue
            paths = self._checkpoint_paths() if kind == "checkpoint" else self._paths(kind)
            seen: set[Path] = set()
            for p in paths:
                key = p.resolve()
                if key not in seen:
                    seen.add(key)
                    out.append(self.describe(p, kind, lora_base=lora_bases))
        return out

    def _checkpoint_paths(self) -> list[Path]:
        return [e.path for e in self.checkpoints.scan() if not (e.path.is_file() and _is_sidecar_vae(e.path))]

    def _paths(self, kind: str) -> list[Path]:
        spec = KIND_SPECS[kind]
        found: list[Path] = []
        bundle = _is_vae_folder if kind == "vae" else None
        for folder in self.folders(kind):
            if is_folder(folder):
                found += walk_models(folder, has_suffix(spec.suffixes), bundle, self.problems)
        if kind == "vae":
            for folder in self.home.checkpoint_dirs():
                if is_folder(folder):
                    found += walk_models(folder, lambda name: _is_sidecar_vae(Path(name)), None, self.problems)
        return found

    def describe(self, path: Path, kind: str | None = None, *, lora_base: bool = True) -> LibraryFile:
        """A LibraryFile for `path`; `kind` is the folder's (None: by location, else by header)."""
        path = Path(path)
        kind = kind or self._kind_of_location(path)
        if path.is_dir():
            vae = kind == "vae" or (kind is None and _is_vae_folder(path))
            entry = LibraryFile("vae" if vae else "checkpoint", path.name, path, folder_size(path),
                                in_library=kind is not None)
            entry.family = "VAE (diffusers folder)" if vae else "diffusers folder"
        else:
            if kind is None:  # outside the model folders: what its header (or, for a pickle, its name) says
                if path.suffix.lower() == ".safetensors":
                    try:
                        found = detect(read_header(path)).kind
                    except ModelLoadError:
                        found = "unknown"
                else:
                    found = guess_pickle_kind(path)[0]
                entry = LibraryFile(found, path.stem, path, path.stat().st_size, in_library=False)
            else:
                entry = LibraryFile(kind, path.stem, path, path.stat().st_size)
            if entry.kind == "vae":
                entry.name = path.name
            self._detect(entry, lora_base=lora_base)
        target = entry.hash_target
        if target is not None and target.exists():
            try:
                entry.sha256 = self.hashes.cached_sha256(target)
            except OSError:
                entry.sha256 = None
        return entry

    def _detect(self, entry: LibraryFile, *, lora_base: bool) -> None:
        path = entry.path
        if path.suffix.lower() != ".safetensors":
            entry.detection = Detection(entry.kind, detail=f"pickle ({path.suffix.lower()})")
            entry.family = f"pickle ({path.suffix.lower()})"
            return
        try:
            header = read_header(path)
        except ModelLoadError as e:
            entry.error = str(e).removeprefix(f"{path.name}: ")
            entry.family = "error: " + entry.error[:60]
            return
        d = entry.detection = detect(header)
        if d.kind not in KINDS:
            entry.family = f"{d.kind}: {d.detail}"
            if entry.in_library:
                entry.note = f"{path.name}: {d.detail}, which Darkroom cannot use"
            return
        if d.kind == "lora":
            base, _ = _lora_base(path, header) if lora_base else (None, "")
            entry.family = f"LoRA ({base})" if base else "LoRA"
        elif d.kind == "embedding":
            entry.family = _embedding_family(header)
        else:
            entry.family = d.label
        if d.kind != entry.kind and entry.in_library:
            entry.note = (f"{path.name} is {KIND_SPECS[d.kind].word}, found in a {entry.kind} folder; move it to "
                          f"{self.home_folder(d.kind)} (or `darkroom models import` it)")

    # ---- resolving what a user typed

    def find(self, name_or_path: str, kind: str | None = None, *, lora_base: bool = True) -> LibraryFile:
        """A path, or a name (file name with or without extension, any case) or short hash (of
        files already hashed) among the library's files; `kind` narrows the search."""
        candidate = Path(name_or_path).expanduser()
        try:
            exists = candidate.exists()
        except OSError:  # a name too long to be a file, say: then it can only be a library name
            exists = False
        if exists:
            return self.describe(candidate.resolve(), lora_base=lora_base)
        if any(sep in name_or_path for sep in ("/", "\\")):
            raise ModelNotFound(f"no such file: {name_or_path}")
        wanted = name_or_path.strip()
        files = self.files([kind] if kind else None, lora_bases=False)
        lowered = wanted.lower()
        tests: list[Callable[[LibraryFile], bool]] = [
            lambda f: wanted in (f.name, f.path.name, f.path.stem),
            lambda f: lowered in (f.name.lower(), f.path.name.lower(), f.path.stem.lower()),
        ]
        if 8 <= len(lowered) <= 64 and all(c in "0123456789abcdef" for c in lowered):
            tests.append(lambda f: bool(f.sha256) and f.sha256.startswith(lowered))
        for test in tests:
            matches = [f for f in files if test(f)]
            by_kind: dict[str, LibraryFile] = {}
            for f in matches:
                by_kind.setdefault(f.kind, f)  # the first folder wins, as the loaders do
            if len(by_kind) > 1:
                which = "; ".join(f"{k} {f.path}" for k, f in by_kind.items())
                raise DarkroomError(f"{wanted!r} names more than one model ({which})",
                                    hint="give the path, or --kind")
            if by_kind:
                return self.describe(next(iter(by_kind.values())).path, next(iter(by_kind)), lora_base=lora_base)
        what = KIND_SPECS[kind].word.split(" ", 1)[1] if kind else "model"
        raise ModelNotFound(f"no {what} named {name_or_path!r} in the model folders",
                            hint="`darkroom models list` shows them")


@dataclass
class ModelInfo:
    entry: LibraryFile
    sha256: str | None = None
    precision: str | None = None
    dtype_bytes: dict[str, int] = field(default_factory=dict)
    tensors: int | None = None
    parameters: int | None = None
    native_size: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    preview: Path | None = None
    card: ModelCard = field(default_factory=ModelCard)  # what the sidecars beside it say

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    def to_dict(self) -> dict[str, Any]:
        e = self.entry
        total = sum(self.dtype_bytes.values()) or 1
        return {
            "name": e.name, "path": str(e.path), "kind": e.kind, "family": e.family,
            "label": e.detection.label if e.detection else None, "error": e.error, "note": e.note,
            "precision": self.precision, "dtypes": {k: round(v / total, 4) for k, v in self.dtype_bytes.items()},
            "size": e.size, "size_human": human_size(e.size), "tensors": self.tensors, "parameters": self.parameters,
            "native_size": self.native_size, "sha256": self.sha256, "short_hash": self.short_hash,
            "metadata": self.metadata, "lora": self.lora, "preview": str(self.preview) if self.preview else None,
            "card": self.card.to_dict(),
        }


def _count(header: SafetensorsHeader) -> tuple[int, dict[str, int]]:
    params = 0
    by_dtype: Counter[str] = Counter()
    for t in header.tensors.values():
        n = 1
        for s in t.shape:
            n *= s
        params += n
        by_dtype[t.dtype] += t.offsets[1] - t.offsets[0]
    return params, dict(by_dtype)


def find_preview(path: Path) -> Path | None:
    """`name.preview.png`, `name.png`, `name.jpg` (.jpeg, .webp) beside a model file or folder."""
    stem = path.name if path.is_dir() else path.name[: -len(path.suffix)] if path.suffix else path.name
    for suffix in PREVIEW_SUFFIXES:
        p = path.with_name(stem + suffix)
        if p.is_file():
            return p
    return None


def _read_scalar(fh, header: SafetensorsHeader, key: str) -> float | None:
    info = header.tensors[key]
    begin, end = info.offsets
    fh.seek(8 + header.header_size + begin)
    raw = fh.read(end - begin)
    fmt = {"F32": "<f", "F16": "<e", "F64": "<d"}.get(info.dtype)
    try:
        if fmt:
            return float(struct.unpack(fmt, raw)[0])
        if info.dtype == "BF16":
            return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    except struct.error:
        return None
    return None


def _number(text: str) -> float | int | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return int(x) if x.is_integer() else x


def _span(values: list[float]) -> float | int | str | None:
    if not values:
        return None
    lo, hi = min(values), max(values)
    fmt = lambda v: int(v) if float(v).is_integer() else round(v, 4)  # noqa: E731
    return fmt(lo) if lo == hi else f"{fmt(lo)}-{fmt(hi)} (varies by layer)"


def lora_details(path: Path, header: SafetensorsHeader) -> dict[str, Any]:
    """Base model, rank, alpha, network type, trigger words of a LoRA, from its header (and its
    `.alpha` scalars when the metadata does not say)."""
    from darkroom.engine.lora import LoraFile

    meta = header.metadata
    out: dict[str, Any] = {"base": None, "base_evidence": "", "alias": meta.get("ss_output_name"),
                           "network": meta.get("ss_network_module"), "rank": _number(meta.get("ss_network_dim", "")),
                           "alpha": _number(meta.get("ss_network_alpha", "")), "trigger_words": [], "layers": 0}
    try:
        lora = LoraFile(path, header)
    except ModelLoadError as e:
        out["error"] = str(e)
        return out
    base = lora.base
    out["base"], out["base_evidence"] = base.label, base.evidence
    out["trigger_words"] = lora.trigger_words
    out["layers"] = len(lora.groups)
    if out["rank"] is None:
        ranks = [s[0] for g in lora.groups.values() if "down" in g.keys and (s := header.shape(g.keys["down"]))]
        out["rank"] = _span(ranks) if len(set(ranks)) > 1 else (Counter(ranks).most_common(1)[0][0] if ranks else None)
    if out["alpha"] is None:
        keys = [g.keys["alpha"] for g in lora.groups.values() if "alpha" in g.keys]
        if keys:
            with open(path, "rb") as fh:
                values = [v for k in keys if (v := _read_scalar(fh, header, k)) is not None]
            out["alpha"] = _span(values)
        elif raw := meta.get("lora_adapter_metadata"):
            try:
                doc = json.loads(raw)
                out["alpha"] = _span([float(v) for k, v in doc.items() if k.endswith(".lora_alpha")])
            except (ValueError, TypeError, AttributeError):
                pass
    return out


def guess_pickle_kind(path: Path) -> tuple[str, str]:
    """(kind, how it was guessed) for a pickle, which cannot be looked into safely."""
    for parent in list(path.parents)[:3]:
        if parent.name.lower() in FOLDER_HINTS:
            return FOLDER_HINTS[parent.name.lower()], f"from its folder {parent.name!r}"
    if ".vae." in path.name.lower():
        return "vae", "from its name"
    if path.suffix.lower() in (".pt", ".bin") and path.stat().st_size <= SMALL_PICKLE:
        return "embedding", "from its size"
    return "checkpoint", "checkpoint by default"
