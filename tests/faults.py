"""The write-fault injector the write-fault tests share: run an operation once to count its writes
under a folder, then again with the Nth write failing (a full disk, a read-only folder, a pulled
drive, a one-off I/O error), and helpers to compare what was on disk before and after."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from darkroom.cli import cli
from darkroom.cli.backup import backup, restore, verify
from darkroom.cli.bundle import bundle_group
from darkroom.cli.models import models_group
from darkroom.errors import DarkroomError, StorageError
from darkroom.metadata.images import encode_png

INFOTEXT = "a lighthouse at dusk\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: {seed}, " \
           "Size: 8x8, Model: tiny-sd1"




# ---------------------------------------------------------------------------------------------- the injector

_ALLOCATING = {"open", "write", "fsync", "mkdir", "link"}  # what a full disk refuses; removing, renaming still work
MODES = {  # name -> (errno, the kinds of write that fail once tripped, every later one too)
    "full": (errno.ENOSPC, _ALLOCATING, True),
    "read-only": (errno.EROFS, None, True),
    "pulled": (errno.EIO, None, True),
    "blip": (errno.EIO, None, False),
}
SWEEP = ("full", "read-only", "blip")  # "pulled" fails like "read-only", with another message: checked once
WORDS = {"full": "no space left on", "read-only": "read-only", "pulled": "stopped answering",
         "blip": "stopped answering"}


def said(mode: str, way_around: str) -> tuple[str, ...]:
    """What a message for `mode` must say: what is wrong, and the way around it (a drive that stopped
    answering is plugged back in instead)."""
    return (WORDS[mode],) if MODES[mode][0] == errno.EIO else (WORDS[mode], way_around)


class Faults:
    """Counts every write under `root` (open for writing, write, fsync, rename, link, mkdir, unlink, rmdir,
    utime, chmod); from the `at`-th on, the mode's fault is raised (see MODES). Folders in `skip` are not
    watched (the log file: logging's own business)."""

    def __init__(self, root: Path, at: int | None = None, mode: str = "full", skip: tuple[Path, ...] = ()):
        self.root = os.path.abspath(root)
        self.skip = [os.path.abspath(s) for s in skip]
        self.at, self.mode = at, mode
        self.log: list[tuple[str, str]] = []
        self.failed: list[tuple[str, str]] = []
        self.paused = False

    def hit(self, kind: str, *paths) -> None:
        where = next((p for p in map(_path, paths) if p and self._watched(p)), None)
        if where is None or self.paused:
            return
        self.log.append((kind, where))
        code, kinds, sticky = MODES[self.mode]
        if self.at is None or len(self.log) < self.at or (kinds is not None and kind not in kinds):
            return
        if self.failed and not sticky:
            return
        self.failed.append((kind, where))
        raise OSError(code, os.strerror(code), where)

    def _watched(self, path: str) -> bool:
        return _inside(path, self.root) and not any(_inside(path, s) for s in self.skip)

    @contextlib.contextmanager
    def pause(self):
        self.paused = True
        try:
            yield
        finally:
            self.paused = False

    def install(self, mp: pytest.MonkeyPatch) -> Faults:
        real_open = builtins.open

        def opener(file, mode="r", *args, **kwargs):
            if isinstance(file, int) or not any(c in mode for c in "wax+"):
                return real_open(file, mode, *args, **kwargs)
            self.hit("open", file)
            return _CountingFile(real_open(file, mode, *args, **kwargs), self, os.fspath(file))

        mp.setattr(builtins, "open", opener)
        mp.setattr(io, "open", opener)
        self._wrap(mp, "open", "open", lambda a, k: (_at(a[0], k),) if a[1] & _WRITE_FLAGS else ())
        for name in ("write", "fsync"):
            self._wrap(mp, name, name, lambda a, k: (_fd_path(a[0]),))
        self._wrap(mp, "sendfile", "write", lambda a, k: (_fd_path(a[0]),))
        for name in ("replace", "rename"):
            self._wrap(mp, name, "rename", lambda a, k: (a[1], a[0]) if os.path.lexists(a[0]) else ())
        self._wrap(mp, "link", "link", lambda a, k: (a[1],) if not os.path.lexists(a[1]) else ())
        self._wrap(mp, "mkdir", "mkdir", lambda a, k: (_at(a[0], k),) if not os.path.lexists(_at(a[0], k)) else ())
        for name in ("unlink", "remove", "rmdir"):
            self._wrap(mp, name, "rmdir" if name == "rmdir" else "unlink",
                       lambda a, k: (_at(a[0], k),) if os.path.lexists(_at(a[0], k)) else ())
        for name in ("utime", "chmod"):
            self._wrap(mp, name, name, lambda a, k: (_fd_path(a[0]) if isinstance(a[0], int) else a[0],))
        return self

    def _wrap(self, mp: pytest.MonkeyPatch, name: str, kind: str, paths) -> None:
        real = getattr(os, name)

        def wrapper(*args, **kwargs):
            self.hit(kind, *paths(args, kwargs))
            return real(*args, **kwargs)

        mp.setattr(os, name, wrapper)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


class _CountingFile:
    """A file opened for writing whose writes count as writes."""

    def __init__(self, fh, faults: Faults, path: str):
        self._fh, self._faults, self._path = fh, faults, path

    def write(self, data):
        self._faults.hit("write", self._path)
        return self._fh.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)

    def __iter__(self):
        return iter(self._fh)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _path(p) -> str | None:
    if p is None:
        return None
    return os.path.abspath(os.fsdecode(os.fspath(p)))


def _at(path, kwargs) -> str:
    dir_fd = kwargs.get("dir_fd")
    return os.path.join(_fd_path(dir_fd), os.fsdecode(path)) if dir_fd is not None else os.fsdecode(path)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


@dataclass
class Run:
    """One run of an operation under `faults`: what it returned or raised."""

    faults: Faults
    value: object = None
    error: BaseException | None = None

    @property
    def what(self) -> str:
        return f"fault at write {self.faults.at} ({self.faults.mode}): {self.faults.failed[:1]}"


def attempt(mp: pytest.MonkeyPatch, faults: Faults, operate, *args) -> Run:
    run = Run(faults)
    with mp.context() as m:
        faults.install(m)
        try:
            run.value = operate(*args)
        except DarkroomError as e:
            run.error = e
    return run


def sweep(mp: pytest.MonkeyPatch, prepare, operate, *, modes=SWEEP, skip=lambda case: ()):
    """Yield (case, run) for every write of `operate(case)` failing in each mode, each on a fresh case
    from `prepare(name)` (whose `.root` is the folder watched); the counting run comes first."""
    case = prepare("count")
    case.faults = Faults(case.root, skip=skip(case))
    counted = attempt(mp, case.faults, operate, case)
    assert counted.error is None and getattr(counted.value, "exit_code", 0) == 0, (counted.error, counted.value)
    total = len(counted.faults.log)
    assert total, "the injector saw no write"
    failed = 0
    for mode in modes:
        for at in range(1, total + 1):
            case = prepare(f"{mode}-{at}")
            case.faults = Faults(case.root, at, mode, skip=skip(case))
            run = attempt(mp, case.faults, operate, case)
            failed += run.error is not None or getattr(run.value, "exit_code", 0) != 0
            yield case, run
    assert failed, "no fault ever made the operation fail"


def files_of(root: Path, *, hidden: bool = True) -> dict[str, bytes]:
    """Every file under `root` with its bytes (folders named in `skip` and hidden names left out on request)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and (hidden or not any(part.startswith(".") for part in p.relative_to(root).parts)):
            out[rel] = p.read_bytes()
    return out


def hidden_leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob(".*") if p.is_file() and p.name != ".lock")


def one_line_error(result, *needles: str) -> str:
    """A CLI failure as users see it: non-zero, no traceback, the last stderr line `error: ...`."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    for n in needles:
        assert n in last, last
    return last


def clear(error: BaseException, folder: Path, mode: str) -> None:
    """One line naming `folder`, what is wrong and what to do; HTTP 507."""
    text = str(error)
    assert "\n" not in text and str(folder) in text, text
    assert isinstance(error, StorageError) and error.status == 507, (type(error), text)
    assert WORDS[mode] in text, text


def png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), (seed % 256, 40, 90)), INFOTEXT.format(seed=seed)))
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), *args], catch_exceptions=False)


@pytest.fixture(autouse=True)
def commands(monkeypatch):
    for command in (backup, restore, verify, models_group, bundle_group):
        monkeypatch.setitem(cli.commands, command.name, command)
