"""Small filesystem helpers shared by the library, imports and backups, the one rule for files that
come from outside (regular files only, links not followed out of where they came from), and the one
way writes fail: a full disk, a read-only folder or a drive pulled out is a `StorageError` naming the
folder and what to do, never a traceback, and a file is replaced all at once or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from darkroom.errors import DarkroomError, InvalidRequest, StorageError

CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def discard(path: Path) -> None:
    """Remove a temp file if possible: on a read-only or vanished folder it stays (hidden) for the next run."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def unique_dirs(dirs: Iterable[Path]) -> list[Path]:
    """`dirs` in order without repeats (two spellings of one existing folder count once)."""
    out: list[Path] = []
    seen: set[Path] = set()
    for d in dirs:
        key = d.resolve() if d.exists() else d
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def case_collisions(paths: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of relative paths that differ only in letter case (`A.png`, `a.png`).

    FAT and exFAT (what USB drives are formatted with), and Windows' and macOS's default file
    systems, keep such names as one file: writing both there silently keeps one. Callers that
    write a set of names to such a drive refuse the set, naming both, instead.
    """
    seen: dict[str, str] = {}
    pairs = []
    for path in paths:
        key = path.casefold()
        if key in seen and seen[key] != path:
            pairs.append((seen[key], path))
        seen.setdefault(key, path)
    return pairs


def folds_case(folder: Path) -> bool:
    """Whether the file system holding `folder` treats names that differ only in case as one file.

    Probed, not guessed from the platform: a name is made in `folder` and looked up in the other
    case. A folder that cannot be written (or does not exist) answers False, and the write that
    follows reports its own error."""
    probe = folder / f".darkroom-case-probe-{os.getpid()}"
    try:
        probe.touch(exist_ok=True)
    except OSError:
        return False
    try:
        return (folder / probe.name.upper()).exists()
    finally:
        discard(probe)


# --- files that come from outside (a USB drive, a backup, a download, a client) ----------------

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


class NotARegularFile(InvalidRequest):
    """A path that is a FIFO, a device, a socket or a folder where a file was expected: reading it
    would block for ever or never end, so it is refused before anything is read."""

    code = "DR-NOT-REGULAR-FILE"


def kind_of(mode: int) -> str:
    """'a named pipe (FIFO)', 'a folder', ... for an `st_mode` that is not a regular file."""
    return next((word for test, word in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, *, what: str = "a regular file", follow_links: bool = True,
                 within: str | os.PathLike | None = None) -> BinaryIO:
    """Open a file from outside for reading, refusing anything but a regular file. `what` names
    what it should be in messages ("a model file").

    The open itself cannot block (O_NONBLOCK: a FIFO with no writer would hang a plain open), and
    the check is made on the open descriptor, so nothing can be swapped in between. With
    `follow_links=False` a symbolic link is refused (O_NOFOLLOW); with `within`, a file whose real
    location is outside that folder is refused (a link pointing out of a USB drive or a backup).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow_links:
            raise NotARegularFile(f"{path} is a symbolic link, not {what}; links are not followed here") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{path} is {kind_of(st.st_mode)}, not {what}")
        if within is not None and not is_inside(os.path.realpath(path), within):
            raise NotARegularFile(f"{path} leads outside {within}: {what} must be inside it, not linked from"
                                  " elsewhere")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, *, what: str = "a regular file", limit: int | None = None) -> bytes:
    """The bytes of a regular file (see `open_regular`); more than `limit` bytes is refused."""
    with open_regular(path, what=what) as fh:
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise InvalidRequest(f"{path} is too large for {what} (at most {limit >> 20} MiB)")
    return data


def is_inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or below it, comparing real locations (links resolved)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    try:
        return os.path.commonpath([real, root]) == root
    except ValueError:  # different drives on Windows
        return False


# --- writes that fail: a full disk, a read-only folder, a drive pulled out ---------------------

_GONE = "{folder} stopped answering (a drive removed?): reconnect it and try again"
_FAULTS = {
    errno.ENOSPC: "no space left on {folder}: free some space there or {instead}",
    errno.EDQUOT: "the disk quota of {folder} is used up: free some space there or {instead}",
    errno.EROFS: "{folder} is on a read-only file system: make it writable or {instead}",
    errno.EACCES: "{folder} is not writable (permission denied): fix its permissions or {instead}",
    errno.EPERM: "{folder} is not writable (operation not permitted): fix its permissions or {instead}",
    errno.EFBIG: "the file system of {folder} cannot hold a file this large (FAT32 stops at 4 GB): use a drive"
                 " formatted exFAT, NTFS or ext4, or {instead}",
    errno.EIO: _GONE, errno.ENOENT: _GONE, errno.ENODEV: _GONE, errno.ENXIO: _GONE, errno.ESTALE: _GONE,
    errno.ENOTCONN: _GONE,
}
ANOTHER_FOLDER = "choose another folder"


def storage_error(error: OSError, folder: str | os.PathLike, doing: str, *,
                  instead: str = ANOTHER_FOLDER) -> StorageError:
    """The one line for a write into `folder` that failed while `doing` it ("save settings"): what is
    wrong with the folder and what to do (`instead`: the way around it, "choose another folder")."""
    why = _FAULTS.get(error.errno, "{reason} in {folder}")
    return StorageError(f"cannot {doing}: " + why.format(folder=folder, instead=instead,
                                                          reason=(error.strerror or str(error)).lower()),
                        code=StorageError.code_for(error.errno))


def read_error(error: OSError, path: str | os.PathLike) -> DarkroomError:
    """The one line for a read of `path` that failed mid-way (its drive removed, a bad sector)."""
    folder = Path(path).parent
    if _FAULTS.get(error.errno) is _GONE:
        return StorageError(f"cannot read {path}: " + _GONE.format(folder=folder), code="DR-STORAGE-GONE")
    return DarkroomError(f"cannot read {path}: {(error.strerror or str(error)).lower()}")


@contextlib.contextmanager
def writes_to(folder: str | os.PathLike, doing: str, *, instead: str = ANOTHER_FOLDER) -> Iterator[None]:
    """Inside it, an OSError is a write into `folder` that failed: raised as `storage_error`."""
    try:
        yield
    except OSError as e:
        raise storage_error(e, folder, doing, instead=instead) from e


_SQLITE_READ_ONLY = "{folder} is read-only (a read-only drive, or no permission to write): make it writable or" \
                    " {instead}"
_SQLITE_FAULTS = {sqlite3.SQLITE_FULL: _FAULTS[errno.ENOSPC], sqlite3.SQLITE_IOERR: _GONE,
                  sqlite3.SQLITE_READONLY: _SQLITE_READ_ONLY, sqlite3.SQLITE_PERM: _SQLITE_READ_ONLY,
                  sqlite3.SQLITE_CANTOPEN: _SQLITE_READ_ONLY}


def sqlite_storage_error(error: sqlite3.Error, folder: str | os.PathLike, doing: str, *,
                         instead: str = ANOTHER_FOLDER) -> StorageError | None:
    """`storage_error` for an SQLite write into `folder` that failed for the folder's sake (full,
    read-only, gone); None for anything else (a damaged database, a busy lock), which the caller explains.
    SQLite does not say which errno it met, so "read-only" covers a read-only drive and a permission."""
    kind = (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF
    why = _SQLITE_FAULTS.get(kind)
    code = {sqlite3.SQLITE_FULL: "DR-STORAGE-FULL", sqlite3.SQLITE_IOERR: "DR-STORAGE-GONE"}.get(kind,
                                                                                            "DR-STORAGE-READ-ONLY")
    return None if why is None else StorageError(f"cannot {doing}: " + why.format(folder=folder, instead=instead),
                                                 code=code)


def copy_stream(fin: BinaryIO, fout: BinaryIO, source: str | os.PathLike,
                on_block: Callable[[bytes], None] | None = None, *, chunk: int = CHUNK) -> int:
    """Copy `fin` (the file at `source`) into `fout`; returns the bytes copied. A read that fails is
    `read_error` naming the source (its drive pulled out), so `writes_to` around it only sees writes."""
    size = 0
    while True:
        try:
            block = fin.read(chunk)
        except OSError as e:
            raise read_error(e, source) from e
        if not block:
            return size
        if on_block is not None:
            on_block(block)
        fout.write(block)
        size += len(block)


def write_atomic(path: Path, data: bytes, *, doing: str | None = None, folder: Path | None = None,
                 instead: str = ANOTHER_FOLDER) -> None:
    """Replace `path` with `data` all at once: written to a hidden temp beside it, synced, renamed over
    it. A failure leaves the old file as it was (the temp is removed, or overwritten by the next write
    where the folder no longer takes changes) and is a `storage_error` naming `folder` (default: path's)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        discard(tmp)
        raise storage_error(e, folder or path.parent, doing or f"write {path}", instead=instead) from e
    fsync_dir(path.parent)
