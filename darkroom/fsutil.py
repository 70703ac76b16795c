"""Small filesystem helpers shared by the library, imports and backups."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


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
