"""Backup, restore and verify of a Darkroom home: incremental, content-addressed, crash-safe.

This module is what a backup and a restore do with a Home; the backup folder itself (its layout,
objects, snapshots, locking and verify) is darkroom.carry.backup_store, whose public names are re-exported here.

What is backed up: settings.json, the history database (a consistent snapshot taken with
SQLite's backup API, never a raw copy of the live WAL files), the img2img sources and masks under
history-sources/ that this snapshot of the database refers to (so a restored history brings them
back), every file under outputs/ and, on request, every file under models/. Not backed up: the
hash cache (cache.sqlite3 is keyed by absolute path and rebuilt on demand), logs/ and builtin/
(made again).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import darkroom
from darkroom.carry.backup_store import (
    _ID,
    _SHA,
    CHUNK,
    FORMAT,
    HISTORY,
    MARKER,
    OTHER_BACKUP_FOLDER,
    SETTINGS,
    SOURCES,
    BackupError,
    Progress,
    Repository,
    Snapshot,
    VerifyResult,
    _extract,
    _fsync_dir,
    _NoProgress,
    _os_errors,
    _safe_rel,
    _write_atomic,
    human_bytes,
    verify_backup,
)
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.fsutil import case_collisions, discard, folds_case, sqlite_storage_error, writes_to
from darkroom.home import Home
from darkroom.models.hashing import sha256_file

__all__ = [
    "CHUNK", "FORMAT", "HISTORY", "MARKER", "SAFETY_DIR", "SETTINGS",
    "BackupError", "BackupResult", "Progress", "Repository", "RestoreResult", "Snapshot", "VerifyResult",
    "backup_home", "human_bytes", "restore_home", "verify_backup",
]

SAFETY_DIR = "restore-saved"
_RESTORE_TMP = ".restore-tmp"


# --- small helpers ---------------------------------------------------------------------------


def _sqlite_snapshot(src: Path, dst: Path, *, folder: Path, doing: str, instead: str) -> None:
    """A consistent copy of a (possibly live, WAL-mode) database via SQLite's backup API, into `dst` in
    `folder` (a full, read-only or vanished one is named in the error)."""
    discard(dst)
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
        discard(dst)
        raise (sqlite_storage_error(e, folder, doing, instead=instead)
               or BackupError(f"could not snapshot the database {src}: {e}")) from e


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


def _used_sources(db: Path) -> set[str] | None:
    """The stored source and mask names a (snapshot of the) history database refers to; an empty set for
    a database from before sources were kept, None for one whose table cannot be read."""
    try:
        con = sqlite3.connect(db, timeout=30)  # the backup's own temp copy
        try:
            if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='image_sources'").fetchone():
                return set()
            return {n for row in con.execute("SELECT source, mask FROM image_sources") for n in row
                    if isinstance(n, str) and n and "/" not in n and "\\" not in n and not n.startswith(".")}
        finally:
            con.close()
    except sqlite3.Error:
        return None


def _source_files(root: Path) -> list[tuple[str, Path]]:
    """(manifest path, file) of the stored img2img sources of the home at `root`: plain files directly in
    history-sources/, its hidden temp files left out."""
    return [(f"{SOURCES}/{p.name}", p) for p in _walk_files(root / SOURCES)
            if p.parent == root / SOURCES and not p.name.startswith(".")]


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
    for inside in [home.outputs, home.root / "models", home.root / SOURCES]:
        with contextlib.suppress(ValueError):
            repo.root.relative_to(inside.resolve())
            raise InvalidRequest(f"the backup folder {repo.root} is inside {inside}, which it would back up")
    repo.init()
    with repo.lock():
        leftovers = repo.clear_tmp()
        done, _ = repo.snapshots()
        previous = repo.snapshot(strict=False) if done else None  # only to skip unchanged files
        prev_files = previous.files if previous else {}
        created = time.time() if now is None else now
        sid = repo.new_snapshot_id(created)
        result = BackupResult(sid, repo.root, leftovers_removed=leftovers)
        files: dict[str, dict] = {}
        scope = [SETTINGS, HISTORY, SOURCES] + (["outputs"] if outputs else []) + (["models"] if models else [])

        # 1. the history database: a consistent snapshot, into tmp/ (never a raw copy of the live files)
        db_tmp = None
        history = home_root / HISTORY
        if history.is_file():
            db_tmp = repo.tmp / f"history-{os.getpid()}.sqlite3"
            _sqlite_snapshot(history, db_tmp, folder=repo.root, doing="back up", instead=OTHER_BACKUP_FOLDER)
            result.history_rows = max(_row_count(db_tmp), 0)

        # 2. the file list: the img2img sources first, those this database snapshot refers to (an image added
        # since has its row after the snapshot, and History removes sources no row refers to)
        sources: list[tuple[str, Path]] = []
        used = _used_sources(db_tmp) if db_tmp is not None else set()
        held = dict(_source_files(home_root))
        if used is None:  # a database whose table cannot be read: keep every source rather than guess
            sources += sorted(held.items())
        else:
            sources += [(f"{SOURCES}/{n}", held[f"{SOURCES}/{n}"]) for n in sorted(used) if f"{SOURCES}/{n}" in held]
        lost = [n for n in used or () if f"{SOURCES}/{n}" not in held]
        if lost:
            result.notes.append(f"{len(lost)} img2img source image(s) or mask(s) the history refers to are missing"
                                f" from {home_root / SOURCES}; those images are backed up without them")
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
                discard(db_tmp)

        # 4. the manifest, last and atomically; then the `latest` pointer
        manifest = {
            "format": FORMAT, "id": sid, "created": created,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created)),
            "darkroom": darkroom.__version__, "home": str(home_root), "scope": scope,
            "options": {"models": models, "outputs": outputs}, "files": files,
        }
        _publish_snapshot(repo, sid, manifest)
    result.notes.append("hash cache (cache.sqlite3) not backed up: it is rebuilt on demand")
    if not models:
        result.notes.append("models not backed up (add --models to include models/)")
    result.seconds = time.monotonic() - t0
    return result


def _publish_snapshot(repo: Repository, sid: str, manifest: dict) -> None:
    """Write the snapshot's manifest, then point `latest` at it. Both or neither: a failure removes
    the new snapshot (or leaves it manifest-less, which the next backup removes), so the previous
    snapshot stays the latest and complete."""
    snap_dir = repo.snapshots_dir / sid
    try:
        with repo.writing():
            snap_dir.mkdir()
        _write_atomic(snap_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode(),
                      root=repo.root)
        _fsync_dir(repo.snapshots_dir)
        _write_atomic(repo.latest_file, f"{sid}\n".encode(), root=repo.root)
    except BaseException:
        repo.drop_snapshot(sid)
        raise


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
    """Bring `home` back to a snapshot's state; what it replaces is kept in <home>/restore-saved/<time>/.

    All or nothing: a restore that cannot finish (a full or read-only home, the backup drive pulled
    out) puts back what it had changed, so the home is as it was before."""
    progress = progress or _NoProgress()
    t0 = time.monotonic()
    repo = Repository(src).require()
    if snapshot_id is not None and not _ID.fullmatch(snapshot_id):
        raise InvalidRequest(f"malformed snapshot id {snapshot_id!r}")
    snap = repo.snapshot(snapshot_id)
    root = home.root.resolve()
    with _writing_home(root):
        root.mkdir(parents=True, exist_ok=True)
    result = RestoreResult(snap.id)
    entries = {str(_safe_rel(rel)): e for rel, e in snap.files.items()}
    for rel, e in entries.items():  # refuse a malformed manifest before touching anything
        repo.object_path(str(e.get("sha256", "")))
        if not all(isinstance(e.get(k), int) and e[k] >= 0 for k in ("size", "mtime_ns")):
            raise BackupError(f"snapshot {snap.id} has a malformed entry for {rel}")
    scope = snap.manifest.get("scope") or [SETTINGS, HISTORY, "outputs"]
    clashes = case_collisions(entries) if folds_case(root) else []
    if clashes:  # a home on FAT/exFAT (a USB drive) would keep one of each pair, silently
        a, b = clashes[0]
        raise BackupError(f"snapshot {snap.id} holds {a} and {b}, whose names differ only in letter case, and the"
                          f" file system of {root} stores them as one file (FAT/exFAT, or a Windows/macOS default):"
                          f" restore into a home on a drive that tells them apart (ext4, NTFS, APFS"
                          f" case-sensitive), or rename one of them in the backed-up home and back up again")

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
    other_sources = [rel for rel, _ in _source_files(root) if rel not in entries] if SOURCES in scope else []
    result.extra += other_sources
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
            with _writing_home(root):
                _sqlite_snapshot(db, db_check, folder=root, doing="restore", instead=OTHER_HOME)
                _extract(repo, HISTORY, db_entry, db_tmp, _NoProgress())
            if _content_digest(db_check) == _content_digest(db_tmp):
                result.history = "unchanged"
            else:
                db_differs = True
                if _row_count(db_check) != 0:  # an empty index loses nothing; anything else is replaced
                    result.replaced.append(HISTORY)

        at_risk = result.replaced + (result.extra if exact else [])
        # the sources of a history being replaced go with it into the safety folder (History would remove
        # them, as no restored row refers to them), so that the old database there keeps its sources
        aside = result.extra if exact else other_sources if HISTORY in result.replaced else []
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

        restore_db = db_entry is not None and (db_differs or not db.is_file())
        progress.start(sum(e["size"] for _, e, _ in plan) + (db_entry["size"] if restore_db and not db_differs else 0),
                       "Restoring")
        undo = _Undo()
        try:
            with _writing_home(root):
                _write_home(repo, root, plan, result, undo, aside, progress)
                if restore_db:
                    _restore_history(repo, db, db_entry, db_check, db_tmp, db_differs, result, undo, progress)
        except BaseException as e:
            _put_back(undo, e, result.safety_dir)
            raise
        finally:
            progress.close()
    finally:
        discard(db_check)
        discard(db_tmp)
    if db.is_file():
        result.history_rows = _row_count(db)
    result.seconds = time.monotonic() - t0
    return result


OTHER_HOME = "restore into another home (--home)"


def _writing_home(root: Path):
    """Around a restore's writes into the home: a full, read-only or vanished one is one line naming it."""
    return writes_to(root, "restore", instead=OTHER_HOME)


class _Undo:
    """What a restore changed in the home so far, last change last, so that one that cannot finish
    puts it all back: the files it made removed, those it replaced or moved away back in place."""

    def __init__(self) -> None:
        self.steps: list[tuple[Path, Path | None]] = []  # (path made or replaced, where its old version is)

    def made(self, path: Path, old: Path | None = None) -> None:
        self.steps.append((path, old))

    def mkdirs(self, folder: Path) -> None:
        """Make `folder` and its missing parents, each remembered."""
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            d.mkdir()
            self.made(d)

    def undo(self) -> list[Path]:
        """Put everything back, last change first; returns the paths that could not be (their drive gone)."""
        stuck = []
        for path, old in reversed(self.steps):
            try:
                if old is not None:
                    os.replace(old, path)
                elif path.is_dir() and not path.is_symlink():
                    os.rmdir(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError:
                stuck.append(path)
        return stuck


def _put_back(undo: _Undo, error: BaseException, safety_dir: Path | None) -> None:
    """Undo a restore that failed; where something cannot be put back, the error says where the old versions are."""
    stuck = undo.undo()
    if stuck and isinstance(error, DarkroomError):
        kept = f" (the old versions are in {safety_dir})" if safety_dir else ""
        raise type(error)(f"{error}; the restore stopped half-way and {len(stuck)} change(s) could not be undone,"
                          f" e.g. {stuck[0]}{kept}") from error


def _write_home(repo: Repository, root: Path, plan: list[tuple[str, dict, bool]], result: RestoreResult,
                undo: _Undo, aside: list[str], progress: Progress) -> None:
    """Each file streamed from its object into a temp beside its target, checked against its hash, then
    renamed over the target (whose old version is first linked or copied into the safety folder); then
    the files of `aside` moved into the safety folder."""
    for rel, e, replaces in plan:
        target = root / rel
        undo.mkdirs(target.parent)
        tmp = target.with_name(f".{target.name}{_RESTORE_TMP}")
        _extract(repo, rel, e, tmp, progress)
        saved = result.safety_dir / rel if replaces else None
        try:
            if saved is not None:
                undo.mkdirs(saved.parent)
                _save_aside(target, saved)
                undo.made(saved)
            os.replace(tmp, target)
        except BaseException:
            discard(tmp)
            raise
        undo.made(target, saved)
        os.utime(target, ns=(e["mtime_ns"], e["mtime_ns"]))
        result.restored += 1
        result.restored_bytes += e["size"]
    for rel in aside:
        dest = result.safety_dir / rel
        undo.mkdirs(dest.parent)
        os.replace(root / rel, dest)
        undo.made(root / rel, dest)
        result.removed.append(rel)


def _restore_history(repo: Repository, db: Path, entry: dict, db_check: Path, db_tmp: Path, differs: bool,
                     result: RestoreResult, undo: _Undo, progress: Progress) -> None:
    """The history database, last: through SQLite's backup API into a live one, else renamed in."""
    if differs:
        if HISTORY in result.replaced:
            dest = result.safety_dir / HISTORY
            undo.mkdirs(dest.parent)
            os.replace(db_check, dest)
            undo.made(dest)
        _sqlite_restore(db_tmp, db)
        result.history = "replaced"
        return
    _extract(repo, HISTORY, entry, db_tmp, progress)
    for suffix in ("-wal", "-shm", "-journal"):  # a stale log would be replayed onto it
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    os.replace(db_tmp, db)
    undo.made(db)
    _fsync_dir(db.parent)
    result.history = "restored"


def _save_aside(target: Path, dest: Path) -> None:
    """Keep the file about to be replaced: a hard link when possible (no copy, no gap), else a copy."""
    try:
        os.link(target, dest)
    except OSError:
        try:
            shutil.copy2(target, dest)
        except BaseException:
            discard(dest)
            raise


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
        raise (sqlite_storage_error(e, db.parent, "restore", instead=OTHER_HOME)
               or BackupError(f"could not restore the history database into {db}: {e}",
                              hint="stop any running Darkroom server and retry")) from e
