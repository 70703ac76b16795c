"""The model library as a user manages it: list, info, import, verify, rescan.

`ModelManager(home)` is the service behind `darkroom models ...` (and, later, the web UI's
models page). It sees every model file Darkroom uses, by kind: checkpoints, LoRAs, VAEs and
textual-inversion embeddings, in the home's folders and in the AUTOMATIC1111/Forge or
ComfyUI installs named as extra model folders (used in place, never modified).

- Listing is instant: it reads headers only and shows the hashes already in the SQLite
  hash cache (`HashCache`, by path, size and mtime); `rescan` hashes the rest.
- `info` reads the header (family, precision, `__metadata__`, LoRA rank/alpha/trigger
  words) and hashes the file if its hash is not cached yet.
- `import_paths` copies files from anywhere into the right home folder by the kind their
  header says: to `.name.part` beside the destination, fsync, re-read the copy from disk
  and compare its SHA-256 with the source's (computed while reading), then link it under
  its final name (never replacing a file). A killed import leaves only the `.part` file,
  which the next import of that file overwrites (and any import removes once stale).
- `verify` rehashes from disk and compares with the hash recorded when the file was
  indexed: a file whose size and mtime did not change but whose contents did has rotted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.errors import DarkroomError, Interrupted, ModelLoadError, ModelNotFound
from darkroom.home import Home
from darkroom.models.families import Detection, detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import SafetensorsHeader, read_header
from darkroom.models.library import CHECKPOINT_SUFFIXES, ModelEntry, ModelLibrary, diffusers_weights

KINDS = ("checkpoint", "lora", "vae", "embedding")
CHUNK = 4 << 20
PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp", ".preview.jpg", ".preview.jpeg",
                    ".preview.webp")
SIDECAR_SUFFIXES = (*PREVIEW_SUFFIXES, ".yaml", ".yml", ".civitai.info")
"""Files beside a model that travel with it on import (the .yaml can say v-prediction)."""
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
IMPORT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
STALE_PART_SECONDS = 600
"""A `.part` file untouched this long belongs to an import that was killed."""
SMALL_PICKLE = 1 << 20
"""A pickle this small cannot be a checkpoint or a LoRA: it is an embedding."""
FREE_SPACE_MARGIN = 64 << 20
MAX_META_VALUE = 160


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


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_time(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


class Progress:
    """Byte progress of long reads and copies. The CLI draws it with tqdm; this one is silent."""

    def start(self, total: int, label: str) -> None:
        pass

    def label(self, text: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def finish(self) -> None:
        pass


def hash_file(path: Path, progress: Progress | None = None, *, from_disk: bool = False,
              cancel: threading.Event | None = None) -> str:
    """SHA-256 of a file. `from_disk` first asks the OS to drop its cached pages of the file, so
    what is checked is what the disk holds (rot, a bad copy), not what memory remembers."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if from_disk and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        while block := fh.read(CHUNK):
            if cancel is not None and cancel.is_set():
                raise Interrupted(f"stopped while hashing {path.name}")
            h.update(block)
            if progress is not None:
                progress.advance(len(block))
    return h.hexdigest()


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


def _hidden(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def _is_vae_folder(p: Path) -> bool:
    cfg = p / "config.json"
    return p.is_dir() and cfg.exists() and '"AutoencoderKL"' in cfg.read_text(encoding="utf-8", errors="replace")


def _is_sidecar_vae(p: Path) -> bool:
    """`<checkpoint>.vae.safetensors` beside a checkpoint: a VAE, as the webui lists it."""
    return ".vae." in p.name.lower() and p.suffix.lower() in KIND_SPECS["vae"].suffixes


def _unique(dirs: Iterable[Path]) -> list[Path]:
    out, seen = [], set()
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


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


class ModelManager:
    """The model library of a Home: listing, details, import, verification, hashing."""

    def __init__(self, home: Home, hashes: HashCache | None = None):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)
        self.checkpoints = ModelLibrary(home, self.hashes)

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
            dirs += [extra / sub for sub in spec.install_dirs if (extra / sub).is_dir()]
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
        for folder in self.folders(kind):
            if not folder.is_dir():
                continue
            inside: list[Path] = []
            for p in sorted(folder.rglob("*")):
                if _hidden(p, folder) or any(d in p.parents for d in inside):
                    continue
                if kind == "vae" and _is_vae_folder(p):
                    inside.append(p)
                    found.append(p)
                elif p.is_file() and p.suffix.lower() in spec.suffixes:
                    found.append(p)
        if kind == "vae":
            for folder in self.home.checkpoint_dirs():
                if folder.is_dir():
                    found += [p for p in sorted(folder.rglob("*.vae.*")) if p.is_file() and _is_sidecar_vae(p)
                              and not _hidden(p, folder)]
        return found

    def describe(self, path: Path, kind: str | None = None, *, lora_base: bool = True) -> LibraryFile:
        """A LibraryFile for `path`; `kind` is the folder's (None: by location, else by header)."""
        path = Path(path)
        kind = kind or self._kind_of_location(path)
        if path.is_dir():
            vae = kind == "vae" or (kind is None and _is_vae_folder(path))
            entry = LibraryFile("vae" if vae else "checkpoint", path.name, path, _folder_size(path),
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
        if candidate.exists():
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

    # ---- hashing

    def sha256(self, entry: LibraryFile, progress: Progress | None = None) -> str | None:
        """The cached hash, or hash now (with progress) and remember it."""
        target = entry.hash_target
        if target is None:
            return None
        cached = self.hashes.cached_sha256(target)
        if cached:
            return cached
        return self._hash_and_record(target, progress)

    def _hash_and_record(self, target: Path, progress: Progress | None, *, from_disk: bool = False,
                         cancel: threading.Event | None = None) -> str:
        before = target.stat()
        digest = hash_file(target, progress, from_disk=from_disk, cancel=cancel)
        after = target.stat()
        if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
            self.hashes.record(target, digest, size=after.st_size, mtime_ns=after.st_mtime_ns)
        return digest

    # ---- info

    def info(self, name_or_path: str, *, kind: str | None = None, progress: Progress | None = None) -> ModelInfo:
        entry = self.find(name_or_path, kind)
        info = ModelInfo(entry)
        target = entry.hash_target
        if target is not None and target.suffix.lower() == ".safetensors" and not entry.error:
            header = read_header(target)
            info.tensors = len(header.tensors)
            info.parameters, info.dtype_bytes = _count(header)
            if info.dtype_bytes:
                dominant = max(info.dtype_bytes, key=info.dtype_bytes.__getitem__)
                info.precision = PRECISIONS.get(dominant, dominant.lower())
            info.metadata = dict(header.metadata)
            d = entry.detection
            if d is not None and d.kind == "checkpoint" and not entry.path.is_dir():
                info.native_size = self.checkpoints.native_size(
                    ModelEntry(entry.name, entry.path, entry.size, detection=d))
            if d is not None and d.kind == "lora":
                info.lora = lora_details(target, header)
        if target is not None:
            if progress is not None:
                progress.start(0 if self.hashes.cached_sha256(target) else target.stat().st_size,
                               f"hashing {entry.name}")
            try:
                info.sha256 = self.sha256(entry, progress)
            finally:
                if progress is not None:
                    progress.finish()
            entry.sha256 = info.sha256
        info.preview = find_preview(entry.path)
        return info

    # ---- rescan

    def rescan(self, progress: Progress | None = None, *, cancel: threading.Event | None = None) -> RescanSummary:
        """Hash every file not hashed yet (so listings show all hashes), forget files that are gone."""
        t0 = time.monotonic()
        files = self.files(lora_bases=False)
        todo = [f for f in files if f.sha256 is None and f.hash_target is not None]
        summary = RescanSummary(files=len(files), already=len(files) - len(todo))
        total = sum(f.hash_target.stat().st_size for f in todo)
        if progress is not None:
            progress.start(total, "hashing")
        try:
            for f in todo:
                if progress is not None:
                    progress.label(f"hashing {f.name}")
                try:
                    f.sha256 = self._hash_and_record(f.hash_target, progress, cancel=cancel)
                except OSError as e:
                    summary.failed.append((f.path, e.strerror or str(e)))
                    continue
                summary.hashed += 1
                summary.bytes += f.hash_target.stat().st_size
        finally:
            if progress is not None:
                progress.finish()
        for path, *_ in self._missing_records():
            self.hashes.forget(path)
            summary.forgotten += 1
        summary.seconds = time.monotonic() - t0
        return summary

    def _missing_records(self) -> list[tuple[str, int, int, str]]:
        """Hash records of files that were in the model folders and are gone."""
        roots = [d.resolve() for kind in KINDS for d in self.folders(kind) if d.exists()]
        out = []
        for rec in self.hashes.records():
            p = Path(rec[0])
            if any(p.is_relative_to(r) for r in roots) and not p.exists():
                out.append(rec)
        return out

    # ---- verify

    def verify(self, names: Iterable[str] = (), progress: Progress | None = None, *,
               cancel: threading.Event | None = None) -> list[VerifyOutcome]:
        """Rehash from disk and compare with the hash recorded when each file was indexed."""
        names = list(names)
        outcomes: list[VerifyOutcome] = []
        entries: list[LibraryFile] = []
        if names:
            for name in names:
                p = Path(name).expanduser()
                rec = None if p.exists() else self.hashes.recorded(p)
                if rec is not None:
                    outcomes.append(VerifyOutcome("MISSING", p.resolve(), p.name, None, None, rec[2],
                                                  "recorded, but the file is gone"))
                else:
                    entries.append(self.find(name, lora_base=False))
        else:
            entries = [f for f in self.files(lora_bases=False) if f.hash_target is not None]
            for path, _size, _mtime, sha in self._missing_records():
                p = Path(path)
                outcomes.append(VerifyOutcome("MISSING", p, p.name, self._kind_of_location(p.parent), None, sha,
                                              "recorded, but the file is gone (`rescan` forgets it)"))
        total = sum(e.hash_target.stat().st_size for e in entries if e.hash_target is not None)
        if progress is not None:
            progress.start(total, "verifying")
        checked: list[VerifyOutcome] = []
        try:
            for e in entries:
                if progress is not None:
                    progress.label(f"verifying {e.name}")
                checked.append(self._verify_one(e, progress, cancel))
        finally:
            if progress is not None:
                progress.finish()
        return checked + outcomes

    def _verify_one(self, e: LibraryFile, progress: Progress | None, cancel: threading.Event | None) -> VerifyOutcome:
        target = e.hash_target
        if target is None:
            return VerifyOutcome("MISSING", e.path, e.name, e.kind, None, None, "no weights file in this folder")
        rec = self.hashes.recorded(target)
        st = target.stat()
        digest = hash_file(target, progress, from_disk=True, cancel=cancel)
        out = VerifyOutcome("OK", e.path, e.name, e.kind, digest, rec[2] if rec else None)
        same_stat = rec is not None and (rec[0], rec[1]) == (st.st_size, st.st_mtime_ns)
        if rec is None:
            out.status, out.detail = "NEW", "not indexed before; indexed now"
            self.hashes.record(target, digest, size=st.st_size, mtime_ns=st.st_mtime_ns)
        elif digest == rec[2]:
            if not same_stat:
                out.detail = "modified date changed, contents did not"
                self.hashes.record(target, digest, size=st.st_size, mtime_ns=st.st_mtime_ns)
        elif same_stat:
            out.status = "ROTTED"
            out.detail = ("contents changed but size and modified date did not: silent corruption (failing disk or"
                          " memory); restore it from a backup or import it again")
        else:
            out.status = "CHANGED"
            what = []
            if rec[0] != st.st_size:
                what.append(f"size {human_size(rec[0])} -> {human_size(st.st_size)}")
            if rec[1] != st.st_mtime_ns:
                what.append("modified " + time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime_ns / 1e9)))
            out.detail = (", ".join(what) + " since it was indexed (`darkroom models rescan` accepts the new"
                          " contents)")
        return out

    # ---- import

    def import_paths(self, sources: Iterable[str | Path], *, kind: str = "auto", allow_pickle: bool = False,
                     rename: bool = False, progress: Progress | None = None) -> list[ImportOutcome]:
        """Copy model files (or every model file under folders) into the home's folders by kind."""
        if kind != "auto" and kind not in KINDS:
            raise DarkroomError(f"unknown kind {kind!r}", hint="auto, " + ", ".join(KINDS))
        files: list[Path] = []
        outcomes: list[ImportOutcome] = []
        for src in sources:
            src = Path(src).expanduser()
            if not src.exists():
                raise ModelNotFound(f"no such file or folder: {src}")
            if not src.is_dir():
                files.append(src)
                continue
            found, refused = _walk(src)
            outcomes += refused
            files += found
            if not found and not refused:
                outcomes.append(ImportOutcome(src, "refused", reason="no model files in this folder"
                                              f" ({', '.join(IMPORT_SUFFIXES)})"))
        for f in files:
            outcomes.append(self._import_one(f, kind, allow_pickle, rename, progress))
        return outcomes

    def _import_one(self, src: Path, kind: str, allow_pickle: bool, rename: bool,
                    progress: Progress | None) -> ImportOutcome:
        out = ImportOutcome(src, "refused")
        try:
            out.kind, dest_name, out.note = classify(src, kind, allow_pickle)
            folder = self.home_folder(out.kind)
            folder.mkdir(parents=True, exist_ok=True)
            out.removed_parts = _remove_stale_parts(folder)
            self._place(src, folder / dest_name, rename, progress, out)
        except ImportRefused as e:
            out.status, out.reason = "refused", str(e)
        except OSError as e:
            out.status, out.reason = "failed", f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        return out

    def _place(self, src: Path, dest: Path, rename: bool, progress: Progress | None, out: ImportOutcome) -> None:
        size = src.stat().st_size
        stem, suffix = _split_name(dest.name)
        src_hash: str | None = None
        n = 1
        while True:
            candidate = dest if n == 1 else dest.with_name(f"{stem}-{n}{suffix}")
            if not candidate.exists():
                break
            if candidate.is_file() and os.path.samefile(candidate, src):
                out.status, out.dest, out.sha256 = "already there", candidate, self.hashes.sha256(candidate)
                return
            if candidate.is_file() and candidate.stat().st_size == size:
                if src_hash is None:
                    src_hash = self._hash_with_bar(src, progress, f"comparing {src.name}")
                there = self.hashes.cached_sha256(candidate) or self._hash_with_bar(
                    candidate, progress, f"comparing {candidate.name}", record=True)
                if there == src_hash:
                    out.status, out.dest, out.sha256 = "already there", candidate, src_hash
                    return
            if not rename:
                raise ImportRefused(f"{candidate} already exists and is a different file; nothing was overwritten"
                                    f" (--rename imports it as {stem}-{n + 1}{suffix})")
            n += 1
        free = shutil.disk_usage(candidate.parent).free
        if free < size + FREE_SPACE_MARGIN:
            raise ImportRefused(f"not enough free space in {candidate.parent}: needs {human_size(size)},"
                                f" {human_size(free)} free")
        if progress is not None:
            progress.start(2 * size, f"copying {src.name}")
        try:
            digest = copy_verified(src, candidate, progress, expect=src_hash)
        finally:
            if progress is not None:
                progress.finish()
        st = candidate.stat()
        self.hashes.record(candidate, digest, size=st.st_size, mtime_ns=st.st_mtime_ns)
        out.status, out.dest, out.sha256 = "imported", candidate, digest
        if n > 1:
            out.note = _join(out.note, f"renamed: {candidate.name}")
        out.sidecars = _copy_sidecars(src, candidate)

    def _hash_with_bar(self, path: Path, progress: Progress | None, label: str, *, record: bool = False) -> str:
        if progress is not None:
            progress.start(path.stat().st_size, label)
        try:
            return self._hash_and_record(path, progress) if record else hash_file(path, progress)
        finally:
            if progress is not None:
                progress.finish()


# --------------------------------------------------------------------------- results


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
        }


@dataclass
class RescanSummary:
    files: int = 0
    already: int = 0
    hashed: int = 0
    bytes: int = 0
    forgotten: int = 0
    seconds: float = 0.0
    failed: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class VerifyOutcome:
    status: str  # OK, CHANGED, ROTTED, NEW, MISSING
    path: Path
    name: str
    kind: str | None
    sha256: str | None  # now
    recorded: str | None  # when indexed
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "name": self.name, "kind": self.kind, "path": str(self.path),
                "sha256": self.sha256, "recorded_sha256": self.recorded, "detail": self.detail}


@dataclass
class ImportOutcome:
    source: Path
    status: str  # imported, already there, refused, failed
    kind: str | None = None
    dest: Path | None = None
    sha256: str | None = None
    reason: str = ""
    note: str | None = None
    sidecars: list[Path] = field(default_factory=list)
    removed_parts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"source": str(self.source), "status": self.status, "kind": self.kind,
                "dest": str(self.dest) if self.dest else None, "sha256": self.sha256, "reason": self.reason,
                "note": self.note, "sidecars": [str(p) for p in self.sidecars]}


class ImportRefused(DarkroomError):
    """One file that import will not take (the others go on)."""

    status = 422


# --------------------------------------------------------------------------- helpers


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


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


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


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


def classify(src: Path, kind: str = "auto", allow_pickle: bool = False) -> tuple[str, str, str | None]:
    """(kind, file name in the library, note) for a file to import; ImportRefused says why not."""
    suffix = src.suffix.lower()
    try:
        header = read_header(src)
    except ModelLoadError as e:
        header, error = None, str(e).removeprefix(f"{src.name}: ")
    if header is not None:
        d = detect(header)
        if d.kind == "unknown":
            raise ImportRefused("not a Stable Diffusion model: its header has no checkpoint, LoRA, VAE or embedding"
                                " layout")
        if d.kind not in KINDS:
            raise ImportRefused(f"{d.detail}: Darkroom cannot use this kind of model")
        if kind not in ("auto", d.kind):
            raise ImportRefused(f"it is {KIND_SPECS[d.kind].word}, not {KIND_SPECS[kind].word} (leave out --kind to"
                                " import it as what it is)")
        if suffix == ".safetensors":
            return d.kind, src.name, None
        return d.kind, src.name[: -len(suffix)] + ".safetensors", "a .safetensors file by content: saved as one"
    if suffix == ".safetensors":
        raise ImportRefused(error)
    if suffix not in PICKLE_SUFFIXES:
        raise ImportRefused(f"not a model file ({suffix or 'no extension'}); Darkroom takes .safetensors files"
                            f" ({', '.join(PICKLE_SUFFIXES)} pickles with --allow-pickle)")
    if not _looks_like_pickle(src):
        raise ImportRefused(f"neither a .safetensors file nor a PyTorch pickle (a corrupt or unknown {suffix} file)")
    if not allow_pickle:
        raise ImportRefused(f"a pickle ({suffix}): loading one can run code hidden inside it; use a .safetensors"
                            " version, or --allow-pickle if you trust where it came from")
    note = None
    if kind == "auto":
        kind, how = guess_pickle_kind(src)
        note = f"pickle: kind guessed {how} (--kind chooses)"
    if suffix not in KIND_SPECS[kind].suffixes:
        raise ImportRefused(f"Darkroom does not read {suffix} files as {KIND_SPECS[kind].word}"
                            f" ({', '.join(KIND_SPECS[kind].suffixes)})")
    return kind, src.name, note


def _walk(folder: Path) -> tuple[list[Path], list[ImportOutcome]]:
    """Model files under `folder`, and diffusers folders (refused: they are used in place)."""
    files: list[Path] = []
    refused: list[ImportOutcome] = []
    for root, dirnames, filenames in os.walk(folder):
        here = Path(root)
        if (here / "model_index.json").exists():
            refused.append(ImportOutcome(here, "refused", reason="a diffusers folder: use it in place with"
                                         " --models-dir, or convert it to a single .safetensors file"))
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if not fn.startswith(".") and Path(fn).suffix.lower() in IMPORT_SUFFIXES:
                files.append(here / fn)
    return files, refused


def _split_name(name: str) -> tuple[str, str]:
    """("x.vae", ".safetensors") for "x.vae.safetensors"."""
    p = Path(name)
    return (p.stem, p.suffix) if p.suffix else (name, "")


def part_path(dest: Path) -> Path:
    """Where an import writes before the file is complete: hidden, so no listing shows it."""
    return dest.with_name(f".{dest.name}.part")


def _remove_stale_parts(folder: Path) -> int:
    """Remove `.part` files of imports killed long ago (a running import keeps touching its own)."""
    removed = 0
    now = time.time()
    for p in folder.glob(".*.part"):
        try:
            if p.is_file() and now - p.stat().st_mtime > STALE_PART_SECONDS:
                p.unlink()
                removed += 1
        except OSError:
            pass  # another import finished or removed it meanwhile
    return removed


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open folders; its renames are durable enough
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(part: Path, dest: Path) -> None:
    """Give the finished copy its name without ever replacing a file that appeared meanwhile."""
    try:
        os.link(part, dest)
    except FileExistsError:
        raise ImportRefused(f"{dest} appeared while copying; nothing was overwritten") from None
    except OSError:  # no hard links here (FAT, exFAT, some network shares)
        if dest.exists():
            raise ImportRefused(f"{dest} appeared while copying; nothing was overwritten") from None
        os.replace(part, dest)
    else:
        part.unlink()
    _fsync_dir(dest.parent)


def copy_verified(src: Path, dest: Path, progress: Progress | None = None, *, expect: str | None = None) -> str:
    """Copy `src` to `dest` safely; returns the SHA-256.

    Writes `.dest.part`, hashing the source as it is read; fsyncs; re-reads the copy from disk
    and compares; keeps the source's modified time; then links the copy under `dest` (which
    must not exist). On any error (or Ctrl-C) the `.part` file is removed; a killed process
    leaves only the `.part` file, never a partial `dest`.
    """
    part = part_path(dest)
    before = src.stat()
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout:
            while block := fin.read(CHUNK):
                h.update(block)
                fout.write(block)
                if progress is not None:
                    progress.advance(len(block))
            fout.flush()
            os.fsync(fout.fileno())
        digest = h.hexdigest()
        after = src.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (expect and digest != expect):
            raise ImportRefused("the source changed while it was being copied; try again")
        if progress is not None:
            progress.label(f"verifying {dest.name}")
        copied = hash_file(part, progress, from_disk=True)
        if copied != digest:
            raise ImportRefused(f"the copy differs from the source (SHA-256 {copied[:10]} != {digest[:10]}): a failing"
                                " drive, cable or memory; nothing was kept")
        os.utime(part, ns=(before.st_atime_ns, before.st_mtime_ns))
        _publish(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return digest


def _copy_sidecars(src: Path, dest: Path) -> list[Path]:
    """Copy `name.yaml`, previews and `name.civitai.info` beside `src` to beside `dest`."""
    src_stem, _ = _split_name(src.name)
    dest_stem, _ = _split_name(dest.name)
    copied = []
    for suffix in SIDECAR_SUFFIXES:
        side = src.with_name(src_stem + suffix)
        target = dest.with_name(dest_stem + suffix)
        if not side.is_file() or target.exists():
            continue
        try:
            copy_verified(side, target)
            copied.append(target)
        except (ImportRefused, OSError):
            continue  # a preview is not worth failing the import for
    return copied
