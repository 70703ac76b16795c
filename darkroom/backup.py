"""Backup, restore and verify of a Darkroom home: incremental, content-addressed, crash-safe.

Layout of a backup folder (DEST):

    darkroom-backup.json            marker + format version (a folder without it is not touched)
    objects/ab/cdef...              every file's bytes once, named by its SHA-256
    snapshots/<id>/manifest.json    one per backup: path -> size, mtime_ns, sha256 (+ options)
    latest                          the id of the newest complete snapshot
    tmp/                            objects being written (a killed backup leaves them here)

What is backed up: settings.json, the history database (a consistent snapshot taken with
SQLite's backup API, never a raw copy of the live WAL files), every file under outputs/
and, on request, every file under models/. Not backed up: the hash cache (cache.sqlite3
is keyed by absolute path and rebuilt on demand), logs/ and builtin/ (made again).

Crash safety: an object is written to tmp/, fsynced and renamed into objects/ only when
complete; a snapshot's manifest is written last (temp + fsync + rename), and `latest`
after it. So a backup killed at any point leaves every earlier snapshot complete, and
the next run removes its leftovers and reuses the objects it finished.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Protocol

import darkroom
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.home import Home
from darkroom.models.hashing import sha256_file

CHUNK = 1 << 20
FORMAT = 1
MARKER = "darkroom-backup.json"
HISTORY = "history.sqlite3"
SETTINGS = "settings.json"
SAFETY_DIR = "restore-saved"
_SHA = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9A-Za-z._-]+")
_RESTORE_TMP = ".restore-tmp"


class BackupError(DarkroomError):
    """A backup folder that is missing, foreign, damaged or busy."""


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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _safe_rel(rel: str) -> PurePosixPath:
    """A manifest path, refused unless it is a plain relative path inside the backed-up scope."""
    p = PurePosixPath(rel)
    if (not rel or p.is_absolute() or "\\" in rel or any(part in ("", ".", "..") for part in p.parts)
            or (p.parts[0] not in ("outputs", "models") and rel not in (SETTINGS, HISTORY))
            or (p.parts[0] in ("outputs", "models") and len(p.parts) < 2)):
        raise BackupError(f"backup manifest names a path outside the home's backed-up folders: {rel!r}")
    return p


def _sqlite_snapshot(src: Path, dst: Path) -> None:
    """A consistent copy of a (possibly live, WAL-mode) database via SQLite's backup API."""
    dst.unlink(missing_ok=True)
    try:
        s = sqlite3.connect(src, timeout=30)
        try:
            d = sqlite3.connect(dst)
            try:
                s.backup(d)
                d.execute("PRAGMA journal_mode=DELETE")  # one self-contained file (History turns WAL back on)
            finally:
                d.close()
        finally:
            s.close()
    except sqlite3.Error as e:
        dst.unlink(missing_ok=True)
        raise BackupError(f"could not snapshot the database {src}: {e}") from e


def _content_digest(db: Path) -> str:
    """SHA-256 of a database's SQL dump (schema and rows), independent of its header counters."""
    h = hashlib.sha256()
    con = sqlite3.connect(db, timeout=30)
    try:
        for line in con.iterdump():
            h.update(line.encode("utf-8", "surrogatepass") + b"\n")
    except sqlite3.Error as e:
        raise BackupError(f"could not read the database {db}: {e}") from e
    finally:
        con.close()
    return h.hexdigest()


def _row_count(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=30)
        try:
            return con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return -1  # no table or unreadable: count it as something that would be lost


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under `root`, sorted, symlinks skipped (they could point anywhere)."""
    if not root.is_dir() or root.is_symlink():
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)))
        for name in sorted(filenames):
            full = Path(dirpath) / name
            if full.is_symlink() or not full.is_file() or name.endswith(_RESTORE_TMP):
                continue
            yield full


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

    objects = property(lambda self: self.root / "objects")
    snapshots_dir = property(lambda self: self.root / "snapshots")
    tmp = property(lambda self: self.root / "tmp")
    latest_file = property(lambda self: self.root / "latest")

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
        for d in (self.root, self.objects, self.snapshots_dir, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        if not self.is_backup():
            _write_atomic(self.root / MARKER, json.dumps({"format": FORMAT, "tool": "darkroom"}).encode())
        return self.require()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One writer at a time; the OS drops the lock when a killed backup's process dies."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no locking
            yield
            return
        with open(self.root / ".lock", "a+b") as fh:
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
        """(complete snapshots oldest first, ids of incomplete ones: killed before their manifest)."""
        done: list[Snapshot] = []
        incomplete: list[str] = []
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
                manifest = json.loads(mf.read_text(encoding="utf-8"))
                if not isinstance(manifest.get("files"), dict):
                    raise ValueError("no file list")
            except (OSError, ValueError, AttributeError) as e:
                raise BackupError(f"snapshot manifest {mf} is damaged: {e}") from e
            done.append(Snapshot(d.name, manifest))
        done.sort(key=lambda s: (s.created, s.id))
        return done, incomplete

    def latest_id(self) -> str | None:
        try:
            return self.latest_file.read_text(encoding="utf-8").strip() or None
        except OSError:
            return None

    def snapshot(self, snapshot_id: str | None = None) -> Snapshot:
        done, _ = self.snapshots()
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
        complete and fsynced; an object already there is kept and the temp dropped.
        """
        h = hashlib.sha256()
        size = 0
        try:
            if source is not None:
                with open(source, "rb") as fi, open(tmp, "wb") as fo:
                    while block := fi.read(CHUNK):
                        h.update(block)
                        fo.write(block)
                        size += len(block)
                        progress.advance(len(block))
                    sha = h.hexdigest()
                    obj = self.object_path(sha)
                    new = not (obj.is_file() and obj.stat().st_size == size)
                    if new:
                        fo.flush()
                        os.fsync(fo.fileno())
            else:
                with open(tmp, "rb+") as fo:
                    while block := fo.read(CHUNK):
                        h.update(block)
                        size += len(block)
                        progress.advance(len(block))
                    sha = h.hexdigest()
                    obj = self.object_path(sha)
                    new = not (obj.is_file() and obj.stat().st_size == size)
                    if new:
                        os.fsync(fo.fileno())
            if new:
                obj.parent.mkdir(exist_ok=True)
                os.replace(tmp, obj)
                _fsync_dir(obj.parent)
            return sha, size, new
        finally:
            tmp.unlink(missing_ok=True)

    def clear_tmp(self) -> int:
        """Remove what killed backups left in tmp/ (call with the lock held)."""
        n = 0
        if self.tmp.is_dir():
            for f in self.tmp.iterdir():
                if f.is_file():
                    f.unlink()
                    n += 1
        return n


# --- backup ----------------------------------------------------------------------------------


@dataclass
class BackupResult:
    snapshot_id: str
    dest: Path
    files: int = 0
    total_bytes: int = 0
    copied: int = 0
    copied_bytes: int = 0
    skipped: int = 0
    history_rows: int | None = None
    leftovers_removed: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@_os_errors
def backup_home(home: Home, dest: Path, *, models: bool = False, outputs: bool = True,
                progress: Progress | None = None, now: float | None = None) -> BackupResult:
    """Take a new snapshot of `home` in the backup folder `dest` (created if needed)."""
    progress = progress or _NoProgress()
    t0 = time.monotonic()
    home_root = home.root.resolve()
    repo = Repository(dest)
    for inside in [home.outputs, home.root / "models"]:
        with contextlib.suppress(ValueError):
            repo.root.relative_to(inside.resolve())
            raise InvalidRequest(f"the backup folder {repo.root} is inside {inside}, which it would back up")
    repo.init()
    with repo.lock():
        leftovers = repo.clear_tmp()
        done, _ = repo.snapshots()
        previous = repo.snapshot() if done else None
        prev_files = previous.files if previous else {}
        created = time.time() if now is None else now
        sid = repo.new_snapshot_id(created)
        result = BackupResult(sid, repo.root, leftovers_removed=leftovers)
        files: dict[str, dict] = {}
        scope = [SETTINGS, HISTORY] + (["outputs"] if outputs else []) + (["models"] if models else [])

        # 1. the history database: a consistent snapshot, into tmp/ (never a raw copy of the live files)
        db_tmp = None
        history = home_root / HISTORY
        if history.is_file():
            db_tmp = repo.tmp / f"history-{os.getpid()}.sqlite3"
            _sqlite_snapshot(history, db_tmp)
            result.history_rows = max(_row_count(db_tmp), 0)

        # 2. the file list
        sources: list[tuple[str, Path]] = []
        if (home_root / SETTINGS).is_file():
            sources.append((SETTINGS, home_root / SETTINGS))
        for top, on in (("outputs", outputs), ("models", models)):
            if on:
                sources += [(f"{top}/{p.relative_to(home_root / top).as_posix()}", p)
                            for p in _walk_files(home_root / top)]
        stats = {}
        for rel, p in sources:
            with contextlib.suppress(FileNotFoundError):  # deleted since listed: not in this snapshot
                stats[rel] = p.stat()
        total = sum(st.st_size for st in stats.values()) + (db_tmp.stat().st_size if db_tmp else 0)
        progress.start(total, "Backing up")

        def record(rel: str, sha: str, size: int, mtime_ns: int, new: bool, **extra) -> None:
            files[rel] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha, **extra}
            result.files += 1
            result.total_bytes += size
            if new:
                result.copied += 1
                result.copied_bytes += size
            else:
                result.skipped += 1

        try:
            if db_tmp is not None:
                sha, size, new = repo.adopt(db_tmp, progress)
                record(HISTORY, sha, size, time.time_ns() if now is None else int(now * 1e9), new, kind="sqlite")
            # 3. the files: unchanged ones (same size and mtime as in the previous snapshot, object present) are
            # not even read; the rest are streamed once through tmp/ while hashed
            for rel, p in sources:
                st = stats.get(rel)
                if st is None:
                    continue
                prev = prev_files.get(rel)
                if (prev and prev.get("size") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns
                        and _SHA.fullmatch(str(prev.get("sha256", "")))):
                    obj = repo.object_path(prev["sha256"])
                    if obj.is_file() and obj.stat().st_size == st.st_size:
                        record(rel, prev["sha256"], st.st_size, st.st_mtime_ns, False)
                        progress.advance(st.st_size)
                        continue
                try:
                    sha, size, new = repo.adopt(repo.tmp / f"{os.getpid()}-{result.files}.part", progress, source=p)
                except FileNotFoundError:
                    result.notes.append(f"{rel} disappeared during the backup; not in this snapshot")
                    continue
                # the mtime from before the read: a file changed while being read is rehashed next time
                record(rel, sha, size, st.st_mtime_ns, new)
        finally:
            progress.close()
            if db_tmp is not None:
                db_tmp.unlink(missing_ok=True)

        # 4. the manifest, last and atomically; then the `latest` pointer
        manifest = {
            "format": FORMAT, "id": sid, "created": created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "darkroom": darkroom.__version__, "home": str(home_root), "scope": scope,
            "options": {"models": models, "outputs": outputs}, "files": files,
        }
        snap_dir = repo.snapshots_dir / sid
        snap_dir.mkdir()
        _write_atomic(snap_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(repo.snapshots_dir)
        _write_atomic(repo.latest_file, f"{sid}\n".encode())
    result.notes.append("hash cache (cache.sqlite3) not backed up: it is rebuilt on demand")
    if not models:
        result.notes.append("models not backed up (add --models to include models/)")
    result.seconds = time.monotonic() - t0
    return result


# --- restore ---------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    snapshot_id: str
    restored: int = 0
    restored_bytes: int = 0
    unchanged: int = 0
    replaced: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # in the home, not in the snapshot
    removed: list[str] = field(default_factory=list)  # extras moved away with exact=True
    safety_dir: Path | None = None
    history_rows: int | None = None
    history: str = "absent"  # absent | unchanged | restored | replaced
    seconds: float = 0.0


def _preview(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


@_os_errors
def restore_home(home: Home, src: Path, *, snapshot_id: str | None = None, force: bool = False,
                 exact: bool = False, progress: Progress | None = None) -> RestoreResult:
    """Bring `home` back to a snapshot's state; what it replaces is kept in <home>/restore-saved/<time>/."""
    progress = progress or _NoProgress()
    t0 = time.monotonic()
    repo = Repository(src).require()
    if snapshot_id is not None and not _ID.fullmatch(snapshot_id):
        raise InvalidRequest(f"malformed snapshot id {snapshot_id!r}")
    snap = repo.snapshot(snapshot_id)
    root = home.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    result = RestoreResult(snap.id)
    entries = {str(_safe_rel(rel)): e for rel, e in snap.files.items()}
    for rel, e in entries.items():  # refuse a malformed manifest before touching anything
        repo.object_path(str(e.get("sha256", "")))
        if not all(isinstance(e.get(k), int) and e[k] >= 0 for k in ("size", "mtime_ns")):
            raise BackupError(f"snapshot {snap.id} has a malformed entry for {rel}")
    scope = snap.manifest.get("scope") or [SETTINGS, HISTORY, "outputs"]

    # 1. plan: what is new, what is already right, what would be replaced
    plan: list[tuple[str, dict, bool]] = []  # (rel, entry, replaces an existing file)
    for rel, e in entries.items():
        if e.get("kind") == "sqlite":
            continue
        target = root / rel
        if not target.exists():
            plan.append((rel, e, False))
            continue
        if not target.is_file() or target.is_symlink():
            raise BackupError(f"{target} is in the way of a restored file (not a regular file)")
        st = target.stat()
        if st.st_size == e["size"] and (st.st_mtime_ns == e["mtime_ns"] or sha256_file(target) == e["sha256"]):
            result.unchanged += 1
            continue
        plan.append((rel, e, True))
        result.replaced.append(rel)
    for top in ("outputs", "models"):
        if top in scope:
            result.extra += [f"{top}/{p.relative_to(root / top).as_posix()}" for p in _walk_files(root / top)
                             if f"{top}/{p.relative_to(root / top).as_posix()}" not in entries]
    if SETTINGS in scope and SETTINGS not in entries and (root / SETTINGS).is_file():
        result.extra.append(SETTINGS)

    db_entry = entries.get(HISTORY)
    db = root / HISTORY
    db_check = root / f".{HISTORY}{_RESTORE_TMP}-current"  # a consistent copy of the home's database
    db_tmp = root / f".{HISTORY}{_RESTORE_TMP}"  # the snapshot's database, checked against its hash
    db_differs = False
    try:
        if db_entry is not None and db.is_file():
            # compared by content: the bytes of two copies of the same database differ in header counters
            _sqlite_snapshot(db, db_check)
            _extract(repo, HISTORY, db_entry, db_tmp, _NoProgress())
            if _content_digest(db_check) == _content_digest(db_tmp):
                result.history = "unchanged"
            else:
                db_differs = True
                if _row_count(db_check) != 0:  # an empty index loses nothing; anything else is replaced
                    result.replaced.append(HISTORY)

        at_risk = result.replaced + (result.extra if exact else [])
        if at_risk and not force:
            what = "replace" + (" or remove" if exact and result.extra else "")
            raise BackupError(f"restoring {snap.id} would {what} {len(at_risk)} file(s) in {root}: "
                              f"{_preview(at_risk)}; rerun with --force (the old versions are kept in "
                              f"{root / SAFETY_DIR})")
        if at_risk:
            base = root / SAFETY_DIR / time.strftime("%Y%m%d-%H%M%S")
            result.safety_dir, n = base, 1
            while result.safety_dir.exists():
                n += 1
                result.safety_dir = base.with_name(f"{base.name}-{n}")

        # 2. files: each streamed from its object into a temp beside the target, checked against its hash,
        # then renamed over the target (whose old version is first linked or copied into the safety folder)
        restore_db = db_entry is not None and (db_differs or not db.is_file())
        progress.start(sum(e["size"] for _, e, _ in plan) + (db_entry["size"] if restore_db and not db_differs else 0),
                       "Restoring")
        try:
            for rel, e, replaces in plan:
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}{_RESTORE_TMP}")
                _extract(repo, rel, e, tmp, progress)
                if replaces:
                    _save_aside(target, result.safety_dir / rel)
                os.replace(tmp, target)
                os.utime(target, ns=(e["mtime_ns"], e["mtime_ns"]))
                result.restored += 1
                result.restored_bytes += e["size"]
            if exact:
                for rel in result.extra:
                    dest = result.safety_dir / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(root / rel, dest)
                    result.removed.append(rel)

            # 3. the history database, last: through SQLite's backup API into a live one, else renamed in
            if restore_db:
                if db_differs:
                    if HISTORY in result.replaced:
                        dest = result.safety_dir / HISTORY
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(db_check, dest)
                    _sqlite_restore(db_tmp, db)
                    result.history = "replaced"
                else:
                    _extract(repo, HISTORY, db_entry, db_tmp, progress)
                    for suffix in ("-wal", "-shm", "-journal"):  # a stale log would be replayed onto it
                        Path(f"{db}{suffix}").unlink(missing_ok=True)
                    os.replace(db_tmp, db)
                    _fsync_dir(db.parent)
                    result.history = "restored"
        finally:
            progress.close()
    finally:
        db_check.unlink(missing_ok=True)
        db_tmp.unlink(missing_ok=True)
    if db.is_file():
        result.history_rows = _row_count(db)
    result.seconds = time.monotonic() - t0
    return result


def _extract(repo: Repository, rel: str, e: dict, tmp: Path, progress: Progress) -> None:
    """Copy an object to `tmp`, hashing while writing; a mismatch is an error and leaves nothing."""
    obj = repo.object_path(e["sha256"])
    h = hashlib.sha256()
    try:
        with open(obj, "rb") as fi, open(tmp, "wb") as fo:
            while block := fi.read(CHUNK):
                h.update(block)
                fo.write(block)
                progress.advance(len(block))
            if h.hexdigest() != e["sha256"]:
                raise BackupError(f"the backup copy of {rel} is corrupt (object {obj.relative_to(repo.root)})",
                                  hint=f"run `darkroom verify {repo.root}`")
            fo.flush()
            os.fsync(fo.fileno())
    except FileNotFoundError as e_:
        tmp.unlink(missing_ok=True)
        raise BackupError(f"the backup copy of {rel} is missing (object {obj.relative_to(repo.root)})",
                          hint=f"run `darkroom verify {repo.root}`") from e_
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _save_aside(target: Path, dest: Path) -> None:
    """Keep the file about to be replaced: a hard link when possible (no copy, no gap), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(target, dest)
    except OSError:
        shutil.copy2(target, dest)


def _sqlite_restore(snapshot: Path, db: Path) -> None:
    try:
        s = sqlite3.connect(f"file:{snapshot}?mode=ro", uri=True)
        try:
            d = sqlite3.connect(db, timeout=30)
            try:
                s.backup(d)
            finally:
                d.close()
        finally:
            s.close()
    except sqlite3.Error as e:
        raise BackupError(f"could not restore the history database into {db}: {e}",
                          hint="stop any running Darkroom server and retry") from e


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
    result.leftovers = sum(1 for f in repo.tmp.iterdir() if f.is_file()) if repo.tmp.is_dir() else 0
    latest = repo.latest_id()
    if result.snapshots and latest not in {s.id for s in result.snapshots}:
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
            if not obj.is_file():
                result.missing[sha] = users[sha]
                progress.advance(sizes[sha])
                continue
            h = hashlib.sha256()
            with open(obj, "rb") as fh:
                while block := fh.read(CHUNK):
                    h.update(block)
                    progress.advance(len(block))
            result.objects_checked += 1
            result.bytes_checked += obj.stat().st_size
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
