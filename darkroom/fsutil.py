"""Small filesystem helpers shared by the library, imports and backups, and the one rule for files
that come from outside: regular files only, links not followed out of where they came from."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from darkroom.errors import InvalidRequest


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


# --- files that come from outside (a USB drive, a backup, a download, a client) ----------------

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


class NotARegularFile(InvalidRequest):
    """A path that is a FIFO, a device, a socket or a folder where a file was expected: reading it
    would block for ever or never end, so it is refused before anything is read."""


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
