"""`darkroom models export DIR NAME...`: chosen models, with the sidecars beside them, onto a drive.

Each model goes to `DIR/<kind folder>/` (checkpoints, loras, vae, embeddings: the folder names also
tell `models import` what a pickle is) with its previews, `.yaml` and model cards
(darkroom.models.cards.sidecars_of: links out of the model's folder are not followed). Every file is
written by the import's verified copy (`copy_verified`: a hidden `.part`, synced, re-read from the
drive and compared by SHA-256, then named, never replacing a file), and `DIR/SHA256SUMS` lists them
all (merged with an earlier export's), so `darkroom models import DIR` on the other machine checks
each file against it, and so does `sha256sum -c SHA256SUMS`.

Everything that can be known before copying is checked first: names that differ only in letter
case (one file on the FAT/exFAT drives models travel on), two models of one name, the free space.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.errors import DarkroomError, StorageError
from darkroom.fsutil import case_collisions, write_atomic, writes_to
from darkroom.humanize import human_size
from darkroom.models.cards import sidecars_of
from darkroom.services.model_import import SUMS_FILE, ImportRefused, read_sums
from darkroom.services.model_manager import KINDS, ModelManager, Progress, copy_verified, hash_file

EXPORT_FOLDERS = {"checkpoint": "checkpoints", "lora": "loras", "vae": "vae", "embedding": "embeddings"}
OTHER_DRIVE = "choose another drive or folder"
SPACE_MARGIN = 16 << 20


@dataclass
class ExportOutcome:
    name: str
    kind: str
    source: Path
    dest: Path
    status: str = "refused"  # exported, already there, refused
    sha256: str | None = None
    sidecars: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "source": str(self.source), "dest": str(self.dest),
                "status": self.status, "sha256": self.sha256, "sidecars": [str(p) for p in self.sidecars],
                "notes": self.notes, "reason": self.reason}


@dataclass
class _Planned:
    name: str
    kind: str
    source: Path
    rel: str  # under DIR, posix
    sidecars: list[tuple[Path, str]]


def _plan(manager: ModelManager, names: Sequence[str]) -> list[_Planned]:
    plans: list[_Planned] = []
    for name in names:
        entry = manager.find(name, lora_base=False)
        if any(p.source.resolve() == entry.path.resolve() for p in plans):
            continue
        if entry.path.is_dir():
            raise DarkroomError(f"{entry.name} is a diffusers folder: export takes single-file models",
                                hint="copy the folder itself, or convert it to one .safetensors file")
        if entry.kind not in KINDS:
            raise DarkroomError(f"{entry.path} is not a model Darkroom uses ({entry.family or entry.kind})")
        folder = EXPORT_FOLDERS[entry.kind]
        rel = f"{folder}/{entry.path.name}"
        clash = next((p for p in plans if p.rel == rel), None)
        if clash is not None:
            raise DarkroomError(f"two models would be {rel}: {clash.source} and {entry.path}",
                                hint="export them to different folders")
        plans.append(_Planned(entry.name, entry.kind, entry.path, rel,
                              [(s, f"{folder}/{s.name}") for s in sidecars_of(entry.path)]))
    return plans


def _refuse_case_collisions(dest: Path, plans: list[_Planned]) -> None:
    """Names that differ only in case, among those planned and those already on the drive, are refused."""
    there = set(read_sums(dest))
    for folder in {p.rel.split("/")[0] for p in plans}:
        if (dest / folder).is_dir():
            there |= {f"{folder}/{n}" for n in os.listdir(dest / folder) if not n.startswith(".")}
    planned = [rel for p in plans for rel in (p.rel, *(r for _, r in p.sidecars))]
    pairs = [(a, b) for a, b in case_collisions([*sorted(there), *planned]) if b in planned]
    if pairs:
        a, b = pairs[0]
        raise DarkroomError(f"{a} and {b} differ only in letter case: FAT and exFAT drives (and Windows and macOS)"
                            " keep them as one file; nothing was copied", hint="rename one of them")


def _same(src: Path, dest: Path, progress: Progress | None, known: str | None = None) -> str | None:
    """The SHA-256 both files share, or None when `dest` differs (a different file of that name)."""
    if not dest.is_file() or dest.stat().st_size != src.stat().st_size:
        return None
    digest = known or hash_file(src, progress)
    return digest if hash_file(dest, progress) == digest else None


def _copy(src: Path, dest: Path, progress: Progress | None, *, within: Path | None, label: str) -> str:
    size = src.stat().st_size
    if progress is not None:
        progress.start(2 * size, label)
    try:
        return copy_verified(src, dest, progress, within=within, doing=f"export {src.name}", instead=OTHER_DRIVE)
    finally:
        if progress is not None:
            progress.finish()


def export_models(manager: ModelManager, dest: Path, names: Sequence[str],
                  progress: Progress | None = None) -> list[ExportOutcome]:
    """Copy the models `names` (as `models info` finds them) and their sidecars under `dest`, verified,
    and list them in `dest/SHA256SUMS`. A file of the same name already there is kept: the same bytes
    count as exported, different ones refuse that model (the others go on)."""
    if not names:
        raise DarkroomError("name at least one model to export", hint="`darkroom models list` shows them")
    plans = _plan(manager, names)
    dest = Path(dest).expanduser()
    with writes_to(dest, "export models", instead=OTHER_DRIVE):
        dest.mkdir(parents=True, exist_ok=True)
    _refuse_case_collisions(dest, plans)
    files = [(p.source, p.rel) for p in plans] + [s for p in plans for s in p.sidecars]
    need = sum(src.stat().st_size for src, rel in files if not (dest / rel).exists())
    free = shutil.disk_usage(dest).free
    if need + SPACE_MARGIN > free:
        raise StorageError(f"not enough free space in {dest}: the export needs {human_size(need)},"
                           f" {human_size(free)} free; nothing was copied", code="DR-STORAGE-FULL")

    sums = read_sums(dest)
    outcomes: list[ExportOutcome] = []
    try:
        for p in plans:
            outcomes.append(_export_one(manager, p, dest, sums, progress))
    except BaseException:  # a full or vanished drive: what is complete is still listed, if it can be
        with contextlib.suppress(StorageError):
            _write_sums(dest, sums)
        raise
    _write_sums(dest, sums)
    return outcomes


def _write_sums(dest: Path, sums: dict[str, str]) -> None:
    if sums:
        text = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(sums.items()))
        write_atomic(dest / SUMS_FILE, text.encode(), doing=f"write {SUMS_FILE}", folder=dest, instead=OTHER_DRIVE)


def _export_one(manager: ModelManager, p: _Planned, dest: Path, sums: dict[str, str],
                progress: Progress | None) -> ExportOutcome:
    target = dest / p.rel
    out = ExportOutcome(p.name, p.kind, p.source, target)
    with writes_to(target.parent, f"export {p.source.name}", instead=OTHER_DRIVE):
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if target.exists():
            known = manager.hashes.cached_sha256(p.source)
            out.sha256 = _same(p.source, target, progress, known)
            if out.sha256 is None:
                raise ImportRefused(f"{target} already exists and is a different file; nothing was overwritten")
            out.status = "already there"
        else:
            out.sha256 = _copy(p.source, target, progress, within=None, label=f"exporting {p.name}")
            out.status = "exported"
    except ImportRefused as e:
        out.reason = str(e)
        return out
    sums[p.rel] = out.sha256
    for side, rel in p.sidecars:
        there = dest / rel
        try:
            if there.exists():
                digest = _same(side, there, None)
                if digest is None:
                    raise ImportRefused(f"{there} already exists and is a different file")
            else:
                digest = _copy(side, there, None, within=p.source.parent, label=f"exporting {side.name}")
                out.sidecars.append(there)
            sums[rel] = digest
        except StorageError:
            raise
        except (DarkroomError, OSError) as e:  # refused, not a regular file: the model itself is there
            out.notes.append(f"{side.name} left out: {e}")
    return out
