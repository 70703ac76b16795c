"""The backup folder format: marker, content-addressed objects, snapshot manifests, `latest`, locking, verify.

Layout of a backup folder (DEST):

    darkroom-backup.json            marker + format version (a folder without it is not touched)
    objects/ab/cdef...              every file's bytes once, named by its SHA-256
    snapshots/<id>/manifest.json    one per backup: path -> size, mtime_ns, sha256 (+ options)
    latest                          the id of the newest complete snapshot
    tmp/                            objects being written (a killed backup leaves them here)

Crash safety: an object is written to tmp/, fsynced and renamed into objects/ only when
complete; a snapshot's manifest is written last (temp + fsync + rename), and `latest`
after it. So a backup killed at any point leaves every earlier snapshot complete, and
the next run removes its leftovers and reuses the objects it finished.

What goes into a snapshot and how a home is restored from one live in darkroom.carry.backup.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from darkroom.errors import DarkroomError
from darkroom.fsutil import (
    NotARegularFile,
    copy_stream,
    discard,
    open_regular,
    read_error,
    read_regular,
    write_atomic,
    writes_to,
)
from darkroom.fsutil import fsync_dir as _fsync_dir

CHUNK = 1 << 20
FORMAT = 1
MARKER = "darkroom-backup.json"
HISTORY = "history.sqlite3"
SETTINGS = "settings.json"
SOURCES = "history-sources"  # img2img sources and masks that history rows refer to (darkroom.services.history)
FOLDERS = ("outputs", "models", SOURCES)  # the home's folders a snapshot can hold files of
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9A-Za-z._-]+")
MAX_MANIFEST_BYTES = 256 << 20  # a manifest of a million files fits


class BackupError(DarkroomError):
    """A backup folder that is missing, foreign, damaged or busy."""

    code = "DR-BACKUP"


class Progress(Protocol):
    """Byte progress; the CLI draws a bar, the library passes None."""

    def start(self, total: int, desc: str) -> None: ...

    def advance(self, n: int) -> None: ...

    def close(self) -> None: ...


class _NoProgress:
    def start(self, total: int, desc: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


# --- small helpers ---------------------------------------------------------------------------


def _os_errors(fn):
    """A disk that is full, read-only or unplugged is a one-line error naming the file, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise BackupError(f"{fn.__name__.replace('_', ' ')} failed: {e.strerror or e}{where}") from e

    return wrapper


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


OTHER_BACKUP_FOLDER = "choose another backup folder"


def _write_atomic(path: Path, data: bytes, *, root: Path | None = None) -> None:
    """fsutil.write_atomic, a failure naming the backup folder `root` (the folder the user chose)."""
    write_atomic(path, data, doing="back up", folder=root, instead=OTHER_BACKUP_FOLDER)


def _safe_rel(rel: str) -> PurePosixPath:
    """A manifest path, refused unless it is a plain relative path inside the backed-up scope."""
    p = PurePosixPath(rel)
    if (not rel or p.is_absolute() or "\\" in rel or any(part in ("", ".", "..") for part in p.parts)
            or (p.parts[0] not in FOLDERS and rel not in (SETTINGS, HISTORY))
            or (p.parts[0] in FOLDERS and len(p.parts) < 2)):
        raise BackupError(f"backup manifest names a path outside the home's backed-up folders: {rel!r}")
    return p


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_manifest(manifest: object) -> None:
    """Raise ValueError (BackupError for a path outside the home) naming what is wrong unless
    `manifest` has a snapshot manifest's shape: a
    backup drive is outside data, and a manifest that is a list, has a string size or no hash
    must be refused as damaged, not crash whatever reads it."""
    if not isinstance(manifest, dict):
        raise ValueError(f"a JSON {type(manifest).__name__}, not an object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError("no file list")
    created = manifest.get("created", 0)
    if isinstance(created, bool) or not isinstance(created, (int, float)) or not math.isfinite(created):
        raise ValueError(f"'created' is {created!r}, not a time")
    scope = manifest.get("scope", [])
    if not isinstance(scope, list) or not all(isinstance(x, str) for x in scope):
        raise ValueError("'scope' is not a list of folder names")
    for rel, e in files.items():
        _safe_rel(rel)
        if not isinstance(e, dict):
            raise ValueError(f"the entry for {rel} is a JSON {type(e).__name__}, not an object")
        if not isinstance(e.get("sha256"), str) or not _SHA.fullmatch(e["sha256"]):
            raise ValueError(f"the entry for {rel} has no valid sha256")
        if not _count(e.get("size")) or not _count(e.get("mtime_ns")):
            raise ValueError(f"the entry for {rel} has no valid size and mtime_ns")
        if not isinstance(e.get("kind", ""), str):
            raise ValueError(f"the entry for {rel} has a malformed kind")


# --- the backup folder -----------------------------------------------------------------------


@dataclass
class Snapshot:
    id: str
    manifest: dict

    @property
    def files(self) -> dict[str, dict]:
        return self.manifest["files"]

    @property
    def created(self) -> float:
        return float(self.manifest.get("created", 0))


class Repository:
    """A backup folder on disk (see the module docstring for its layout)."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.damaged: dict[str, str] = {}  # snapshot id -> why its manifest cannot be used (see snapshots)

    objects = property(lambda self: self.root / "objects")
    snapshots_dir = property(lambda self: self.root / "snapshots")
    tmp = property(lambda self: self.root / "tmp")
    latest_file = property(lambda self: self.root / "latest")

    def writing(self) -> contextlib.AbstractContextManager[None]:
        """Around writes into the backup folder: a full, read-only or unplugged drive is one line naming it."""
        return writes_to(self.root, "back up", instead=OTHER_BACKUP_FOLDER)

    def object_path(self, sha: str) -> Path:
        if not _SHA.fullmatch(sha):
            raise BackupError(f"backup manifest has a malformed hash {sha!r}")
        return self.objects / sha[:2] / sha[2:]

    # opening

    def is_backup(self) -> bool:
        return (self.root / MARKER).is_file()

    def require(self) -> Repository:
        if not self.root.is_dir():
            raise BackupError(f"no backup folder at {self.root}")
        if not self.is_backup():
            raise BackupError(f"{self.root} is not a Darkroom backup folder (no {MARKER})")
        try:
            fmt = json.loads((self.root / MARKER).read_text(encoding="utf-8")).get("format")
        except (OSError, ValueError, AttributeError) as e:
            raise BackupError(f"{self.root / MARKER} is unreadable: {e}") from e
        if fmt != FORMAT:
            raise BackupError(f"{self.root} is a backup in format {fmt}; this Darkroom reads format {FORMAT}")
        return self

    def init(self) -> Repository:
        if self.root.exists() and not self.root.is_dir():
            raise BackupError(f"{self.root} is a file, not a folder")
        if self.root.is_dir() and not self.is_backup() and any(self.root.iterdir()):
            raise BackupError(f"{self.root} is not empty and not a Darkroom backup folder",
                              hint="choose an empty or new folder")
        with self.writing():
            for d in (self.root, self.objects, self.snapshots_dir, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
        if not self.is_backup():
            _write_atomic(self.root / MARKER, json.dumps({"format": FORMAT, "tool": "darkroom"}).encode(),
                          root=self.root)
        return self.require()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time; the OS drops the lock when a killed backup's process dies."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no locking
            yield
            return
        with self.writing():
            fh = open(self.root / ".lock", "a+b")  # noqa: SIM115 (closed below, after the lock is let go)
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raise BackupError(f"another backup is writing to {self.root} right now") from e
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # snapshots

    def snapshots(self) -> tuple[list[Snapshot], list[str]]:
        """(complete snapshots oldest first, ids of incomplete ones: killed before their manifest).

        A snapshot whose manifest does not read as one (edited, truncated, from a tampered or
        damaged drive) is left out and recorded in `self.damaged` (id -> why), so the others stay
        usable and `verify` names it."""
        done: list[Snapshot] = []
        incomplete: list[str] = []
        self.damaged = {}
        if not self.snapshots_dir.is_dir():
            return done, incomplete
        for d in sorted(self.snapshots_dir.iterdir()):
            if not d.is_dir():
                continue
            mf = d / "manifest.json"
            if not mf.is_file():
                incomplete.append(d.name)
                continue
            try:
                manifest = json.loads(read_regular(mf, what="a manifest", limit=MAX_MANIFEST_BYTES).decode("utf-8"))
                check_manifest(manifest)
            except (OSError, ValueError, RecursionError, DarkroomError) as e:
                self.damaged[d.name] = f"its manifest ({mf}) is damaged: {e}"
                continue
            done.append(Snapshot(d.name, manifest))
        done.sort(key=lambda s: (s.created, s.id))
        return done, incomplete

    def latest_id(self) -> str | None:
        try:
            return self.latest_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def snapshot(self, snapshot_id: str | None = None, *, strict: bool = True) -> Snapshot:
        """A complete snapshot: `snapshot_id`, else the latest. A damaged one is an error naming it
        (with `strict=False`, a damaged latest falls back to the newest complete one)."""
        done, _ = self.snapshots()
        wanted = snapshot_id if snapshot_id is not None else self.latest_id()
        if strict and wanted in self.damaged:
            raise BackupError(f"snapshot {wanted} in {self.root} cannot be used: {self.damaged[wanted]}",
                              hint="choose another with --snapshot: " + (", ".join(s.id for s in done) or "none"))
        if not done:
            raise BackupError(f"{self.root} holds no complete snapshot")
        by_id = {s.id: s for s in done}
        if snapshot_id is None:
            return by_id.get(self.latest_id() or "", done[-1])
        if snapshot_id not in by_id:
            raise BackupError(f"no snapshot {snapshot_id!r} in {self.root}",
                              hint="available: " + ", ".join(s.id for s in done))
        return by_id[snapshot_id]

    def new_snapshot_id(self, now: float) -> str:
        base = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
        sid, n = base, 1
        while (self.snapshots_dir / sid).exists():
            n += 1
            sid = f"{base}-{n}"
        return sid

    # objects

    def adopt(self, tmp: Path, progress: Progress, *, source: Path | None = None) -> tuple[str, int, bool]:
        """Store `source` (streamed through `tmp`) or the finished `tmp` as an object.

        Returns (sha256, size, newly stored). The object appears under its name only when
        complete and fsynced; an object already there is kept and the temp dropped. A source
        that is gone raises FileNotFoundError; a failed write is one line naming the backup folder.
        """
        h = hashlib.sha256()
        size = 0

        def take(block: bytes) -> None:
            h.update(block)
            progress.advance(len(block))

        try:
            with open(source or tmp, "rb") as fi, self.writing():
                with open(tmp, "wb") if source is not None else contextlib.nullcontext(_Nowhere()) as fo:
                    size = copy_stream(fi, fo, source or tmp, take, chunk=CHUNK)
                sha = h.hexdigest()
                obj = self.object_path(sha)
                new = not (obj.is_file() and obj.stat().st_size == size)
                if new:
                    _fsync_file(tmp)
                    obj.parent.mkdir(exist_ok=True)
                    os.replace(tmp, obj)
                    _fsync_dir(obj.parent)
            return sha, size, new
        finally:
            discard(tmp)  # where the drive no longer takes changes, the next backup clears tmp/

    def clear_tmp(self) -> int:
        """Remove what killed or failed backups left: files in tmp/, snapshot folders that never got
        their manifest (call with the lock held)."""
        n = 0
        with self.writing():
            if self.tmp.is_dir():
                for f in self.tmp.iterdir():
                    if f.is_file():
                        f.unlink()
                        n += 1
            if self.snapshots_dir.is_dir():
                for d in self.snapshots_dir.iterdir():
                    if d.is_dir() and not (d / "manifest.json").exists():
                        shutil.rmtree(d)
                        n += 1
        return n

    def drop_snapshot(self, sid: str) -> None:
        """Remove the snapshot a failed backup was writing (best effort: a leftover goes at the next run)."""
        shutil.rmtree(self.snapshots_dir / sid, ignore_errors=True)


class _Nowhere:
    """A writer that keeps nothing: `copy_stream` into it only reads (and hashes) a file."""

    def write(self, block: bytes) -> int:
        return len(block)


def _fsync_file(path: Path) -> None:
    """Flush a closed file to the disk (written by another handle: SQLite's, or one closed already)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_object(repo: Repository, sha: str, rel: str) -> BinaryIO:
    """An object of the backup for reading. Objects are only ever plain files that backup wrote, so
    a link (it could point at any file on the machine, or /dev/zero) or a FIFO (it would block for
    ever) is a damaged or tampered backup, refused before anything is read."""
    obj = repo.object_path(sha)
    try:
        return open_regular(obj, what="a backup object", follow_links=False)
    except NotARegularFile as e:
        raise BackupError(f"the backup copy of {rel} is damaged: {e}", hint=f"run `darkroom verify {repo.root}`") \
            from None


def _extract(repo: Repository, rel: str, e: dict, tmp: Path, progress: Progress) -> None:
    """Copy an object to `tmp`, hashing while writing; a mismatch is an error and leaves nothing.

    Reading the backup fails as a BackupError or fsutil.read_error (its drive pulled out), so an
    OSError out of here is a write to `tmp` that failed (the caller names that folder)."""
    obj = repo.object_path(e["sha256"])
    h = hashlib.sha256()

    def take(block: bytes) -> None:
        h.update(block)
        progress.advance(len(block))

    try:
        fi = open_object(repo, e["sha256"], rel)
    except FileNotFoundError as e_:
        raise BackupError(f"the backup copy of {rel} is missing (object {obj.relative_to(repo.root)})",
                          hint=f"run `darkroom verify {repo.root}`") from e_
    except OSError as e_:
        raise read_error(e_, obj) from e_
    try:
        with fi, open(tmp, "wb") as fo:
            copy_stream(fi, fo, obj, take, chunk=CHUNK)
            if h.hexdigest() != e["sha256"]:
                raise BackupError(f"the backup copy of {rel} is corrupt (object {obj.relative_to(repo.root)})",
                                  hint=f"run `darkroom verify {repo.root}`")
            fo.flush()
            os.fsync(fo.fileno())
    except BaseException:
        discard(tmp)
        raise


# --- verify ----------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    snapshots: list[Snapshot] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    objects_checked: int = 0
    bytes_checked: int = 0
    missing: dict[str, list[str]] = field(default_factory=dict)  # "snapshot:path" names per object
    corrupt: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # one line each
    leftovers: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


@_os_errors
def verify_backup(src: Path, *, progress: Progress | None = None) -> VerifyResult:
    """Check that every object every snapshot names exists and has its hash (each object read once)."""
    progress = progress or _NoProgress()
    t0 = time.monotonic()
    repo = Repository(src).require()
    result = VerifyResult()
    result.snapshots, result.incomplete = repo.snapshots()
    result.problems += [f"snapshot {sid}: {why}" for sid, why in repo.damaged.items()]
    result.leftovers = sum(1 for f in repo.tmp.iterdir() if f.is_file()) if repo.tmp.is_dir() else 0
    latest = repo.latest_id()
    if result.snapshots and latest not in {s.id for s in result.snapshots} and latest not in repo.damaged:
        result.problems.append(f"the latest pointer names {latest!r}, which is not a complete snapshot")
    users: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for snap in result.snapshots:
        for rel, e in snap.files.items():
            sha = str(e.get("sha256", ""))
            try:
                _safe_rel(rel)
                repo.object_path(sha)
            except BackupError as err:
                result.problems.append(f"snapshot {snap.id}: {err}")
                continue
            users.setdefault(sha, []).append(f"{snap.id}:{rel}")
            sizes[sha] = int(e.get("size", 0))
    progress.start(sum(sizes.values()), "Verifying")
    try:
        for sha in sorted(users):
            obj = repo.object_path(sha)
            if not os.path.lexists(obj):
                result.missing[sha] = users[sha]
                progress.advance(sizes[sha])
                continue
            h = hashlib.sha256()
            try:
                fh = open_object(repo, sha, users[sha][0].split(":", 1)[1])
            except BackupError:  # a link or a FIFO where an object should be: as bad as corrupt
                result.corrupt[sha] = users[sha]
                progress.advance(sizes[sha])
                continue
            with fh:
                while block := fh.read(CHUNK):
                    h.update(block)
                    progress.advance(len(block))
                result.bytes_checked += os.fstat(fh.fileno()).st_size
            result.objects_checked += 1
            if h.hexdigest() != sha:
                result.corrupt[sha] = users[sha]
    finally:
        progress.close()
    for kind, table in (("missing", result.missing), ("corrupt", result.corrupt)):
        for sha, names in table.items():
            files = sorted({n.split(":", 1)[1] for n in names})
            snaps = sorted({n.split(":", 1)[0] for n in names})
            result.problems.append(f"{kind}: {', '.join(files)} (object {sha[:2]}/{sha[2:12]}..., "
                                   f"in snapshot{'s' if len(snaps) > 1 else ''} {', '.join(snaps)})")
    result.seconds = time.monotonic() - t0
    return result
