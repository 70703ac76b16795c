"""Import and verification building blocks: what an import takes, where it writes, what results say.

`classify` decides a file's kind and library name from its header (or refuses it); `_walk`
collects model files under a folder; a copy is written to a hidden `.name.part` file beside its
destination (`part_path`), and `_publish` links it under its final name without ever replacing
a file. `Progress` is how long reads (hashing, copying, verifying) report their bytes. The
copy-and-verify itself (`copy_verified`) and the ModelManager operations that use these live in
darkroom.services.model_manager.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.errors import DarkroomError, ModelLoadError, StorageError
from darkroom.fsutil import discard, open_regular
from darkroom.fsutil import fsync_dir as _fsync_dir
from darkroom.models.cards import SIDECAR_SUFFIXES as SIDECAR_SUFFIXES  # what travels with a model
from darkroom.models.families import detect
from darkroom.models.header import read_header
from darkroom.services.model_inventory import KIND_SPECS, KINDS, guess_pickle_kind

CHUNK = 4 << 20
SUMS_FILE = "SHA256SUMS"
"""Written by `darkroom models export` (and bundles) at the top of a folder: `models import` checks against it."""
MAX_SUMS = 8 << 20
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
IMPORT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
STALE_PART_SECONDS = 600
"""A `.part` file untouched this long belongs to an import that was killed."""
FREE_SPACE_MARGIN = 64 << 20


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
    code = "DR-IMPORT-REFUSED"


IN_PLACE = "use the models where they are with --models-dir"
"""The way around a models folder that cannot take a copy: Darkroom reads models in place."""


class ImportStopped(StorageError):
    """A full, read-only or vanished folder stopped an import: the files after it would fail the same
    way. `outcomes` are those of the files before it (complete); the one it stopped at left nothing."""

    def __init__(self, error: StorageError, outcomes: list[ImportOutcome]):
        done = sum(o.status == "imported" for o in outcomes)
        super().__init__(str(error) + (f" ({done} file(s) imported before it are complete)" if done else ""),
                         code=error.code)  # the folder's trouble: full, read-only, gone
        self.outcomes = outcomes


def _join(a: str | None, b: str) -> str:
    return f"{a}; {b}" if a else b


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


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


def read_sums(folder: Path) -> dict[str, str]:
    """{path relative to `folder`: SHA-256} from its SHA256SUMS (`sha256sum` lines); {} when there is
    none. Lines that are not a hash and a name are skipped; so is a file that is not a small regular file."""
    path = folder / SUMS_FILE
    try:
        with open_regular(path, what="a SHA256SUMS file", within=folder) as fh:
            data = fh.read(MAX_SUMS + 1)
    except (OSError, DarkroomError):
        return {}
    if len(data) > MAX_SUMS:
        return {}
    sums = {}
    for line in data.decode("utf-8", errors="replace").splitlines():
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest.lower()) and name:
            sums[name] = digest.lower()
    return sums


@dataclass
class Listed:
    """The SHA256SUMS of a folder being imported (an export): the hash each file in it must have."""

    base: Path
    sums: dict[str, str] = field(default_factory=dict)

    @classmethod
    def around(cls, folder: Path) -> Listed:
        """The SHA256SUMS of `folder`, else of the folder above it (an export's kind folder, or a
        file in one, imported alone)."""
        for base in (folder, folder.parent):
            sums = read_sums(base)
            if sums:
                return cls(base, sums)
        return cls(folder)

    def of(self, path: Path) -> str | None:
        try:
            return self.sums.get(path.relative_to(self.base).as_posix())
        except ValueError:
            return None


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


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV}
"""What `os.link` says on file systems without hard links (FAT, exFAT, some network shares)."""


def _publish(part: Path, dest: Path) -> None:
    """Give the finished copy its name without ever replacing a file that appeared meanwhile.

    Any other failure (a full, read-only or vanished folder) is raised: `dest` is then not there."""
    try:
        os.link(part, dest)
    except FileExistsError:
        raise ImportRefused(f"{dest} appeared while copying; nothing was overwritten") from None
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        if dest.exists():
            raise ImportRefused(f"{dest} appeared while copying; nothing was overwritten") from None
        os.replace(part, dest)
    else:
        discard(part)  # the copy has its name; a .part the folder keeps is removed as stale later
    _fsync_dir(dest.parent)
