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

The code is split by concern: darkroom.services.model_inventory (finding and describing files: kinds,
folders, `LibraryFile`, listing, lookup, previews, LoRA details), darkroom.services.model_import
(import rules and results: classification, `.part` files, publishing, `Progress`), and this
module: `ModelManager` with hashing, info, rescan, verify and import, and the verified copy.
Every name callers imported from here before the split is still importable from here.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from darkroom.errors import DarkroomError, Interrupted, ModelNotFound, StorageError
from darkroom.fsutil import NotARegularFile, copy_stream, discard, is_inside, kind_of, open_regular, writes_to
from darkroom.humanize import human_size, human_time
from darkroom.models.cards import model_stem, read_card, sidecars_of
from darkroom.models.header import read_header
from darkroom.models.library import ModelEntry
from darkroom.services.model_import import (
    CHUNK,
    FREE_SPACE_MARGIN,
    IMPORT_SUFFIXES,
    IN_PLACE,
    PICKLE_SUFFIXES,
    SIDECAR_SUFFIXES,
    STALE_PART_SECONDS,
    SUMS_FILE,
    ImportOutcome,
    ImportRefused,
    ImportStopped,
    Listed,
    Progress,
    RescanSummary,
    VerifyOutcome,
    _join,
    _publish,
    _remove_stale_parts,
    _split_name,
    _walk,
    classify,
    part_path,
)
from darkroom.services.model_inventory import (
    FOLDER_HINTS,
    KIND_SPECS,
    KINDS,
    MAX_META_VALUE,
    PRECISIONS,
    PREVIEW_SUFFIXES,
    SMALL_PICKLE,
    KindSpec,
    LibraryFile,
    ModelInfo,
    ModelInventory,
    _count,
    find_preview,
    guess_pickle_kind,
    lora_details,
)

log = logging.getLogger("darkroom.models")

__all__ = [
    "CHUNK", "FOLDER_HINTS", "FREE_SPACE_MARGIN", "IMPORT_SUFFIXES", "KIND_SPECS", "KINDS", "MAX_META_VALUE",
    "PICKLE_SUFFIXES", "PRECISIONS", "PREVIEW_SUFFIXES", "SIDECAR_SUFFIXES", "SMALL_PICKLE", "STALE_PART_SECONDS",
    "ImportOutcome", "ImportRefused", "ImportStopped", "KindSpec", "LibraryFile", "ModelInfo", "ModelInventory",
    "ModelManager", "Progress", "RescanSummary", "VerifyOutcome", "classify", "copy_verified", "find_preview",
    "guess_pickle_kind", "hash_file", "human_size", "human_time", "lora_details", "part_path",
]


# hash_file, copy_verified and the ModelManager methods that hash stay in this module: they look
# each other up here, so patching `manage.hash_file` (as the tests do) reaches every hash they take.
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


class ModelManager(ModelInventory):
    """The model library of a Home: listing, details, import, verification, hashing."""

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
        info.card = read_card(entry.path)
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
        # (file, the folder it was found in: it must stay inside, the SHA256SUMS of an export it came in)
        files: list[tuple[Path, Path | None, Listed]] = []
        outcomes: list[ImportOutcome] = []
        for src in sources:
            src = Path(src).expanduser()
            if not src.exists():
                raise ModelNotFound(f"no such file or folder: {src}")
            if not src.is_dir():
                files.append((src, None, Listed.around(src.parent)))
                continue
            found, refused = _walk(src)
            outcomes += refused
            listed = Listed.around(src)
            files += [(f, src, listed) for f in found]
            if not found and not refused:
                outcomes.append(ImportOutcome(src, "refused", reason="no model files in this folder"
                                              f" ({', '.join(IMPORT_SUFFIXES)})"))
        for f, root, listed in files:
            try:
                outcomes.append(self._import_one(f, kind, allow_pickle, rename, progress, root, listed))
            except StorageError as e:  # the folder is full, read-only or gone: so it is for every file after
                raise ImportStopped(e, outcomes) from e
        return outcomes

    def _import_one(self, src: Path, kind: str, allow_pickle: bool, rename: bool,
                    progress: Progress | None, root: Path | None = None, listed: Listed | None = None
                    ) -> ImportOutcome:
        out = ImportOutcome(src, "refused")
        listed = listed or Listed(src.parent)
        if listed.sums and listed.of(src) is None:
            out.note = f"not in {SUMS_FILE}: checked against itself only"
        try:
            _check_source(src, root)
            out.kind, dest_name, out.note = classify(src, kind, allow_pickle)
            folder = self.home_folder(out.kind)
            with writes_to(folder, f"import {src.name}", instead=IN_PLACE):
                folder.mkdir(parents=True, exist_ok=True)
            out.removed_parts = _remove_stale_parts(folder)
            self._place(src, folder / dest_name, rename, progress, out, root, listed)
        except (ImportRefused, NotARegularFile) as e:
            out.status, out.reason = "refused", str(e)
        except StorageError:
            raise
        except DarkroomError as e:  # the source could not be read (not its drive gone: that stops the import)
            out.status, out.reason = "failed", str(e)
        except OSError as e:
            out.status, out.reason = "failed", f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        return out

    def _place(self, src: Path, dest: Path, rename: bool, progress: Progress | None, out: ImportOutcome,
               root: Path | None = None, listed: Listed | None = None) -> None:
        listed = listed or Listed(src.parent)
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
            digest = copy_verified(src, candidate, progress, expect=src_hash, within=root, listed=listed.of(src))
        finally:
            if progress is not None:
                progress.finish()
        self._remember(candidate, digest)
        out.status, out.dest, out.sha256 = "imported", candidate, digest
        if n > 1:
            out.note = _join(out.note, f"renamed: {candidate.name}")
        out.sidecars, skipped = _copy_sidecars(src, candidate, listed)
        for note in skipped:
            out.note = _join(out.note, note)

    def _remember(self, path: Path, digest: str) -> None:
        """Record the hash taken while copying; the file is in place already, so a hash cache that cannot
        be written (a full or read-only home) only means the file is hashed again when next needed."""
        try:
            st = path.stat()
            self.hashes.record(path, digest, size=st.st_size, mtime_ns=st.st_mtime_ns)
        except (OSError, sqlite3.Error) as e:
            log.warning("could not record the hash of %s in the hash cache: %s", path, e)

    def _hash_with_bar(self, path: Path, progress: Progress | None, label: str, *, record: bool = False) -> str:
        if progress is not None:
            progress.start(path.stat().st_size, label)
        try:
            return self._hash_and_record(path, progress) if record else hash_file(path, progress)
        finally:
            if progress is not None:
                progress.finish()


def _check_source(src: Path, root: Path | None) -> None:
    """A file to import is a regular file (a FIFO would hang the import, a device never end), and
    one found in a folder is really inside it (not a link to a private file elsewhere)."""
    mode = os.stat(src).st_mode
    if not stat.S_ISREG(mode):
        raise ImportRefused(f"{kind_of(mode)}, not a model file")
    if root is not None and not is_inside(src, root):
        raise ImportRefused(f"a link to a file outside {root}; links out of the folder being imported are not"
                            " followed")


def copy_verified(src: Path, dest: Path, progress: Progress | None = None, *, expect: str | None = None,
                  within: Path | None = None, listed: str | None = None, doing: str | None = None,
                  instead: str = IN_PLACE) -> str:
    """Copy `src` to `dest` safely; returns the SHA-256.

    Writes `.dest.part`, hashing the source as it is read; fsyncs; re-reads the copy from disk
    and compares; keeps the source's modified time; then links the copy under `dest` (which
    must not exist). Only a regular file is read, and with `within` only one really inside that
    folder (see fsutil.open_regular). `listed`: the hash a SHA256SUMS gives it (a copy that differs is
    not kept); `doing`/`instead` word a failed write ("import x", IN_PLACE). On any error (or Ctrl-C) the
    `.part` file is removed; a killed process leaves only the `.part` file, never a partial `dest`. A
    destination folder that is full, read-only or gone is a StorageError naming it; a source whose drive
    is pulled out one naming the source.
    """
    part = part_path(dest)
    before = src.stat()
    h = hashlib.sha256()
    writing = functools.partial(writes_to, dest.parent, doing or f"import {src.name}", instead=instead)
    try:
        with open_regular(src, what="a model file", within=within) as fin, writing(), open(part, "wb") as fout:
            copy_stream(fin, fout, src, functools.partial(_hash_block, h, progress), chunk=CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        digest = h.hexdigest()
        after = src.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or (expect and digest != expect):
            raise ImportRefused("the source changed while it was being copied; try again")
        if listed and digest != listed:
            raise ImportRefused(f"its SHA-256 {digest[:10]} differs from the one in {SUMS_FILE} ({listed[:10]}):"
                                " damaged on the way; nothing was kept")
        if progress is not None:
            progress.label(f"verifying {dest.name}")
        with writing():
            copied = hash_file(part, progress, from_disk=True)
            if copied != digest:
                raise ImportRefused(f"the copy differs from the source (SHA-256 {copied[:10]} != {digest[:10]}): a"
                                    " failing drive, cable or memory; nothing was kept")
            os.utime(part, ns=(before.st_atime_ns, before.st_mtime_ns))
            _publish(part, dest)
    except BaseException:
        discard(part)  # where the folder no longer takes changes, the hidden .part waits for the next import
        raise
    return digest


def _hash_block(h, progress: Progress | None, block: bytes) -> None:
    h.update(block)
    if progress is not None:
        progress.advance(len(block))


def _copy_sidecars(src: Path, dest: Path, listed: Listed) -> tuple[list[Path], list[str]]:
    """Copy the sidecars beside `src` (previews, `.yaml`, model cards: darkroom.models.cards) to beside
    `dest`; returns (copies, notes on those left out).

    Only regular files that really are in the model's folder are taken: a sidecar that is a link
    to a file elsewhere (a private key, say) is skipped, so it is never copied in, listed, served
    as a preview, backed up or bundled. One that differs from its SHA256SUMS line is not kept."""
    src_stem, dest_stem = model_stem(src), _split_name(dest.name)[0]
    copied, notes = [], []
    for side in sidecars_of(src):
        target = dest.with_name(dest_stem + side.name[len(src_stem):])
        if target.exists():
            continue
        try:
            copy_verified(side, target, within=src.parent, listed=listed.of(side))
            copied.append(target)
        except ImportRefused as e:
            notes.append(f"{side.name} left out: {e}")
        except (DarkroomError, OSError):  # not a regular file, no room left for it
            continue  # a preview is not worth failing the import for
    return copied, notes
