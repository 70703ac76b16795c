"""Textual-inversion embeddings: find them, read them safely, match them to a model.

An embedding is a few learned token vectors saved under the word that triggers it (the
file name without extension). Formats, as the webui's `textual_inversion.py` reads them:

- A1111 `.pt`: `{"string_to_param": {"*": [n, width]}, "name", "step", "sd_checkpoint", ...}`
  (a pickle: read only with `torch.load(weights_only=True)`; old files keep the vectors in
  a `torch.nn.ParameterDict`, the one class allowed besides tensors and plain containers).
- diffusers `.bin` ("concepts"): `{"<token>": [width]}`, one entry.
- `.safetensors`: `emb_params` [n, width] (SD1/SD2), or `clip_l` [n, 768] + `clip_g`
  [n, 1280] (SDXL).

`EmbeddingLibrary(home).for_model(model)` keeps those whose widths fit the model's text
encoders (widths are read from the encoders, so tiny test models work like real ones) and
lists the others as skipped with the reason, as the webui's `/sdapi/v1/embeddings` does.
The prompt side is in darkroom.text.prompt_parser (`EmbeddingVocab`) and
darkroom.text.conditioning (`PromptEncoder(..., embeddings=...)`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkroom.errors import ModelLoadError
from darkroom.fsutil import unique_dirs
from darkroom.home import is_folder
from darkroom.models.families import detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import read_header
from darkroom.models.library import walk_models

if TYPE_CHECKING:
    from darkroom.home import Home
    from darkroom.models.loader import LoadedModel

log = logging.getLogger(__name__)

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_EMBEDDING_BYTES = 64 * 1024 * 1024
"""Real embeddings are kilobytes; anything bigger in an embeddings folder (a checkpoint
put there by mistake) is skipped without being read."""
MAX_VECTORS = 75
"""An embedding must fit one 75-token chunk."""
SHORT_HASH = 12
"""The webui's `Embedding.shorthash`: the first 12 hex digits of the file's SHA-256."""


class EmbeddingError(ModelLoadError):
    """A file in an embeddings folder that is not a usable embedding."""

    code = "DR-EMBEDDING"


@dataclass
class EmbeddingFile:
    """An embedding as stored. `vectors` maps "" (one text encoder: SD1/SD2) or "clip_l" /
    "clip_g" (SDXL) to float32 CPU tensors [count, width]."""

    name: str
    path: Path
    vectors: dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        """Token positions it takes in a prompt (the webui's `vectors`)."""
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def shape(self) -> int:
        """The webui's `shape`: the vector width, summed over clip_l and clip_g for SDXL."""
        return sum(int(v.shape[1]) for v in self.vectors.values())

    @property
    def is_sdxl(self) -> bool:
        return "" not in self.vectors

    def describe(self) -> str:
        if self.is_sdxl:
            parts = " + ".join(f"{k} {int(v.shape[1])}" for k, v in sorted(self.vectors.items(), key=_clip_order))
            return f"an SDXL embedding ({parts} wide)"
        return f"a {self.shape}-wide embedding"

    def a1111(self) -> dict[str, Any]:
        """The webui API's description of one embedding (`/sdapi/v1/embeddings`)."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.count}


def _clip_order(item: tuple[str, Any]) -> int:
    return 0 if item[0] == "clip_l" else 1


@dataclass
class Embedding:
    """An embedding matched to one model: `tensors[i]` feeds `model.text_encoders[i]`."""

    name: str
    file: EmbeddingFile
    tensors: tuple[torch.Tensor, ...]
    hashes: HashCache = field(repr=False, default_factory=lambda: HashCache(None))

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def count(self) -> int:
        return self.file.count

    @property
    def sha256(self) -> str:
        return self.hashes.sha256(self.file.path)

    @property
    def shorthash(self) -> str:
        """What the infotext's `TI hashes` records (the webui's 12-digit short hash); "" when the
        file has gone since it was read (the webui then leaves it out too)."""
        try:
            return self.sha256[:SHORT_HASH]
        except OSError:
            return ""


@dataclass
class SkippedEmbedding:
    name: str
    path: Path
    reason: str
    file: EmbeddingFile | None = None  # None: the file could not be read at all


class EmbeddingSet(Mapping[str, Embedding]):
    """The embeddings usable with one model, by trigger word (a read-only dict), plus the
    `skipped` ones (wrong widths for this model) and the unreadable files in `errors`."""

    def __init__(self, loaded: dict[str, Embedding], skipped: dict[str, SkippedEmbedding],
                 errors: dict[str, SkippedEmbedding]):
        self.loaded = dict(sorted(loaded.items(), key=lambda kv: kv[0].lower()))
        self.skipped = dict(sorted(skipped.items(), key=lambda kv: kv[0].lower()))
        self.errors = errors

    def __getitem__(self, name: str) -> Embedding:
        return self.loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaded)

    def __len__(self) -> int:
        return len(self.loaded)

    def a1111(self) -> dict[str, dict[str, dict[str, Any]]]:
        """The `/sdapi/v1/embeddings` answer: {"loaded": {name: {...}}, "skipped": {name: {...}}}."""
        return {
            "loaded": {name: e.file.a1111() for name, e in self.loaded.items()},
            "skipped": {name: s.file.a1111() for name, s in self.skipped.items() if s.file is not None},
        }


def format_ti_hashes(used: Mapping[str, str]) -> str:
    """The infotext value of `TI hashes` ("name: hash, name2: hash"), as the webui writes it:
    `:` and `,` are dropped from names so the list can be read back. Empty when none."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in used.items() if h)


def parse_ti_hashes(value: str) -> dict[str, str]:
    """`format_ti_hashes` read back."""
    out: dict[str, str] = {}
    for part in value.split(","):
        name, sep, h = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


# --------------------------------------------------------------------------- reading


def _as_matrix(value: Any, path: Path, what: str) -> torch.Tensor:
    if not torch.is_tensor(value):
        raise EmbeddingError(f"{path.name}: {what} is not a tensor")
    t = value.detach()
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0 or not t.is_floating_point():
        raise EmbeddingError(f"{path.name}: {what} has shape {list(value.shape)}; expected [vectors, width]")
    return t.to(device="cpu", dtype=torch.float32).contiguous()


def _from_data(data: Any, path: Path) -> EmbeddingFile:
    """The webui's `create_embedding_from_data`, with precise errors."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"{path.name}: not a textual-inversion embedding (holds a {type(data).__name__})")
    name = path.stem
    info: dict[str, Any] = {}
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        value = data.get(key)
        if key == "step":
            info[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
        else:
            info[key] = value if isinstance(value, str) else None
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # an old torch.nn.ParameterDict
        if not isinstance(params, Mapping) or len(params) != 1:
            terms = len(params) if isinstance(params, Mapping) else "no"
            raise EmbeddingError(f"{path.name}: embedding file has {terms} terms in it; expected one")
        vectors = {"": _as_matrix(next(iter(params.values())), path, "string_to_param")}
    elif "clip_l" in data or "clip_g" in data:
        vectors = {k: _as_matrix(data[k], path, k) for k in ("clip_l", "clip_g") if k in data}
        counts = {int(v.shape[0]) for v in vectors.values()}
        if len(counts) != 1:
            raise EmbeddingError(f"{path.name}: clip_l and clip_g have different vector counts ({sorted(counts)})")
    else:
        tensors = {k: v for k, v in data.items() if torch.is_tensor(v)}
        if len(tensors) != 1:
            raise EmbeddingError(
                f"{path.name}: not a textual-inversion embedding ({len(tensors)} tensors; expected emb_params,"
                " string_to_param, clip_l/clip_g or one diffusers concept)"
            )
        key, value = next(iter(tensors.items()))
        vectors = {"": _as_matrix(value, path, key)}
        info = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    count = int(next(iter(vectors.values())).shape[0])
    if count > MAX_VECTORS:
        raise EmbeddingError(f"{path.name}: {count} vectors do not fit a 75-token prompt chunk")
    return EmbeddingFile(name, path, vectors, **info)


def _read_safetensors(path: Path) -> dict[str, Any]:
    header = read_header(path)  # truncated/corrupt files: the same errors as checkpoints
    keys = set(header.tensors)
    if len(keys) > 2:
        d = detect(header)
        what = f"a {d.label} file" if d.kind != "unknown" else f"a file with {len(keys)} tensors"
        raise EmbeddingError(f"{path.name}: this is {what}, not a textual-inversion embedding")
    from darkroom.models.tensor_file import TensorReadError, read_tensors

    try:  # plain reads, not a memory map: a drive pulled out mid-read is this error, not SIGBUS
        return read_tensors(path, header=header)
    except TensorReadError as e:
        raise EmbeddingError(str(e)) from None


def _read_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EmbeddingError(
            f"{path.name}: refused: this pickle holds more than tensors and plain data, so it cannot be loaded"
            f" safely ({type(e).__name__}: {first[:200]})"
        ) from None


def read_embedding(path: str | Path) -> EmbeddingFile:
    """Read one embedding file (name = file stem); raise EmbeddingError saying what is wrong."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(f"{path.name}: not an embedding file (expected {', '.join(EMBEDDING_SUFFIXES)})")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise EmbeddingError(f"{path.name}: cannot read file: {e.strerror or e}") from None
    if size > MAX_EMBEDDING_BYTES:
        raise EmbeddingError(f"{path.name}: {size // (1024 * 1024)} MB is far too big for an embedding; not read")
    try:
        data = _read_safetensors(path) if suffix == ".safetensors" else _read_pickle(path)
    except EmbeddingError:
        raise
    except ModelLoadError as e:  # the header checks (truncated, corrupt), worded as for checkpoints
        raise EmbeddingError(e.message, hint=e.hint) from None
    return _from_data(data, path)


# --------------------------------------------------------------------------- matching


def _encoder_width(slot) -> int:
    return int(slot.model.get_input_embeddings().weight.shape[1])


def match(file: EmbeddingFile, model: LoadedModel) -> tuple[torch.Tensor, ...] | str:
    """One tensor per text encoder of `model`, or why this embedding does not fit it."""
    slots = model.text_encoders
    widths = [_encoder_width(s) for s in slots]
    family = model.family
    wants = " + ".join(f"{w}" for w in widths)
    if file.is_sdxl:
        if family.id == "sdxl":
            keys = ("clip_l", "clip_g")
        elif family.id == "sdxl-refiner":
            keys = ("clip_g",)
        else:
            return f"{file.describe()}; {family.label} models take {wants}-wide vectors"
        missing = [k for k in keys if k not in file.vectors]
        if missing:
            return f"{file.describe()} without {' and '.join(missing)}, which {family.label} needs"
        tensors = tuple(file.vectors[k] for k in keys)
    else:
        if len(slots) != 1:
            return f"{file.describe()}; {family.label} needs clip_l and clip_g vectors ({wants} wide)"
        tensors = (file.vectors[""],)
    got = [int(t.shape[1]) for t in tensors]
    if got != widths:
        return f"{file.describe()}; {family.label} text encoders take {wants}-wide vectors"
    return tensors


# --------------------------------------------------------------------------- folders


class EmbeddingLibrary:
    """The embeddings folders of a Home: `models/embeddings`, and in each extra model folder
    an A1111 root's `embeddings/` or a ComfyUI root's `models/embeddings`. Parsed files are
    kept (by size and mtime), so listing again only reads what changed."""

    def __init__(self, home: Home, hashes: HashCache | None = None):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)
        self._cache: dict[Path, tuple[tuple[int, int], EmbeddingFile | EmbeddingError]] = {}
        self._lock = threading.Lock()

    def dirs(self) -> list[Path]:
        dirs = [self.home.embeddings]
        for extra in self.home.extra_model_dirs:
            for sub in ("embeddings", "models/embeddings"):
                if (extra / sub).is_dir():
                    dirs.append(extra / sub)
        return unique_dirs(dirs)

    def files(self) -> list[Path]:
        """Candidate files: per folder, its own files first, then subfolders, each sorted."""
        out: list[Path] = []
        for folder in self.dirs():
            if not is_folder(folder):
                continue
            found = []
            # the bounded walk every models folder gets (no symlink loops, special files skipped)
            for p in walk_models(folder, lambda name: Path(name).suffix.lower() in EMBEDDING_SUFFIXES):
                rel = p.relative_to(folder)
                found.append(((tuple(s.lower() for s in rel.parent.parts), p.name.lower()), p))
            out.extend(p for _, p in sorted(found))
        return out

    def read(self, path: Path) -> EmbeddingFile:
        """`read_embedding`, cached by (size, mtime)."""
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            result = cached[1]
        else:
            try:
                result = read_embedding(path)
            except EmbeddingError as e:
                result = e
                log.warning("textual inversion embedding skipped: %s", e)
            with self._lock:
                self._cache[path] = (key, result)
        if isinstance(result, EmbeddingError):
            raise result
        return result

    def scan(self) -> tuple[list[EmbeddingFile], list[SkippedEmbedding]]:
        """Every readable embedding file, and the unreadable ones with the reason."""
        files, errors = [], []
        for path in self.files():
            try:
                if path.stat().st_size == 0:
                    continue
                files.append(self.read(path))
            except (EmbeddingError, OSError) as e:
                errors.append(SkippedEmbedding(path.stem, path, str(e)))
        return files, errors

    def for_model(self, model: LoadedModel) -> EmbeddingSet:
        """The embeddings that fit `model`, by trigger word; a name found twice loads the
        first fitting file (folder order, then top level before subfolders)."""
        files, errors = self.scan()
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, SkippedEmbedding] = {}
        for f in files:
            fit = match(f, model)
            if f.name in loaded:
                log.warning("textual inversion embedding %s is not loaded: %s has the same name %r",
                            f.path, loaded[f.name].path, f.name)
                continue
            if isinstance(fit, str):
                skipped.setdefault(f.name, SkippedEmbedding(f.name, f.path, fit, f))
                continue
            skipped.pop(f.name, None)
            loaded[f.name] = Embedding(f.name, f, fit, self.hashes)
        return EmbeddingSet(loaded, skipped, {str(e.path): e for e in errors})
