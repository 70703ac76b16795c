"""Writes under faults, at home: the shared error helper, settings, the history, and what HTTP
answers. Each writer runs once to count its writes, then again with the Nth write failing, for every
N and each kind of fault (tests/faults.py); every run finishes completely, or fails with one line
naming the folder and what to do and leaves the previous state byte-identical, and the next run works.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from darkroom.errors import DarkroomError, StorageError
from darkroom.fsutil import read_error, sqlite_storage_error, storage_error, write_atomic
from darkroom.home import Home
from darkroom.services.history import History
from darkroom.settings import Settings
from tests.faults import (
    INFOTEXT,
    MODES,
    SWEEP,
    Faults,
    attempt,
    clear,
    files_of,
    png,
    said,
    sweep,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fault injector names files through /proc")

# ---------------------------------------------------------------------------------------------- the shared helper


@pytest.mark.parametrize(("code", "words"), [
    (errno.ENOSPC, "no space left on /media/usb: free some space there or choose another folder"),
    (errno.EDQUOT, "the disk quota of /media/usb is used up"),
    (errno.EROFS, "/media/usb is on a read-only file system: make it writable or choose another folder"),
    (errno.EACCES, "/media/usb is not writable (permission denied): fix its permissions"),
    (errno.EPERM, "/media/usb is not writable"),
    (errno.EIO, "/media/usb stopped answering (a drive removed?): reconnect it and try again"),
    (errno.ENOENT, "/media/usb stopped answering"),
    (errno.ENODEV, "/media/usb stopped answering"),
    (errno.EFBIG, "the file system of /media/usb cannot hold a file this large (FAT32 stops at 4 GB): use a drive"
                  " formatted exFAT, NTFS or ext4"),
    (errno.ENAMETOOLONG, "file name too long in /media/usb"),
])
def test_each_fault_is_one_line_naming_the_folder_and_what_to_do(code, words):
    error = storage_error(OSError(code, os.strerror(code), "/media/usb/x.part"), Path("/media/usb"), "back up")
    assert str(error).startswith("cannot back up: ") and words in str(error)
    assert error.status == 507 and "\n" not in str(error)


def test_sqlite_and_read_faults_are_said_the_same_way():
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    assert "no space left on /h" in str(sqlite_storage_error(full, "/h", "save"))
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert sqlite_storage_error(busy, "/h", "save") is None  # not the folder's fault: the caller says it
    gone = read_error(OSError(errno.EIO, "Input/output error"), "/media/usb/a.safetensors")
    assert isinstance(gone, StorageError) and "/media/usb stopped answering" in str(gone)


def test_an_atomic_write_leaves_the_old_file_at_every_fault(tmp_path, monkeypatch):
    def prepare(name):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "state.json").write_bytes(b'{"old": true}')
        return SimpleNamespace(root=folder)

    for case, run in sweep(monkeypatch, prepare, lambda c: write_atomic(c.root / "state.json", b'{"new": 1}' * 999)):
        if run.error is None:
            assert (case.root / "state.json").read_bytes() == b'{"new": 1}' * 999, run.what
            continue
        clear(run.error, case.root, run.faults.mode)
        assert (case.root / "state.json").read_bytes() == b'{"old": true}', run.what
        write_atomic(case.root / "state.json", b"next")  # the next run works and takes any temp left with it
        assert files_of(case.root) == {"state.json": b"next"}, run.what


# ---------------------------------------------------------------------------------------------- settings


def test_settings_are_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    def prepare(name):
        root = tmp_path / name
        Settings(root / "settings.json").update(clip_skip=2, current_model="old")
        return SimpleNamespace(root=root, before=(root / "settings.json").read_bytes(),
                                 settings=Settings(root / "settings.json"))

    for case, run in sweep(monkeypatch, prepare, lambda c: c.settings.update(clip_skip=5, current_model="new")):
        if run.error is None:
            assert Settings(case.root / "settings.json").get("clip_skip") == 5, run.what
            continue
        clear(run.error, case.root, run.faults.mode)
        assert "cannot save the settings to" in str(run.error)
        assert all(words in str(run.error) for words in said(run.faults.mode, "--home"))
        assert (case.root / "settings.json").read_bytes() == case.before, run.what
        assert case.settings.get("clip_skip") == 2, run.what  # what it reads is what is saved
        assert set(files_of(case.root, hidden=False)) == {"settings.json"}, run.what
        case.settings.update(clip_skip=5)  # the next run works and leaves no temp behind
        assert Settings(case.root / "settings.json").as_dict()["clip_skip"] == 5
        assert set(files_of(case.root)) == {"settings.json"}, run.what


def test_a_settings_file_with_problems_is_kept_aside_whole_or_not_at_all(tmp_path, monkeypatch):
    def prepare(name):
        root = tmp_path / name
        root.mkdir()
        (root / "settings.json").write_text('{"clip_skip": "two"}')
        return SimpleNamespace(root=root, settings=Settings(root / "settings.json"))

    for case, run in sweep(monkeypatch, prepare, lambda c: c.settings.update(clip_skip=3)):
        kept = {k: v for k, v in files_of(case.root, hidden=False).items() if ".invalid-" in k}
        assert all(v == b'{"clip_skip": "two"}' for v in kept.values()), run.what  # never half a copy
        if run.error is None:
            assert len(kept) == 1 and json.loads((case.root / "settings.json").read_text())["clip_skip"] == 3
            continue
        clear(run.error, case.root, run.faults.mode)
        assert (case.root / "settings.json").read_text() == '{"clip_skip": "two"}', run.what
        case.settings.update(clip_skip=3)
        assert json.loads((case.root / "settings.json").read_text())["clip_skip"] == 3


# ---------------------------------------------------------------------------------------------- history


class FaultyDb:
    """The history's connection, with its `at`-th write statement (and, sticky, every one after) failing
    as SQLite fails on a full (SQLITE_FULL), read-only (SQLITE_READONLY) or pulled-out (SQLITE_IOERR) disk."""

    CODES = {"full": (sqlite3.SQLITE_FULL, "database or disk is full"),
             "read-only": (sqlite3.SQLITE_READONLY, "attempt to write a readonly database"),
             "pulled": (sqlite3.SQLITE_IOERR, "disk I/O error"), "blip": (sqlite3.SQLITE_IOERR, "disk I/O error")}
    WRITES = ("INSERT", "DELETE", "UPDATE", "BEGIN", "COMMIT")

    def __init__(self, db: sqlite3.Connection, at: int | None, mode: str = "full"):
        self.db, self.at, self.mode = db, at, mode
        self.writes = 0
        self.failed = 0

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith(self.WRITES):
            self.writes += 1
            if self.at is not None and self.writes >= self.at and (MODES[self.mode][2] or not self.failed):
                self.failed += 1
                code, message = self.CODES[self.mode]
                error = sqlite3.OperationalError(message)
                error.sqlite_errorcode = code
                raise error
        return self.db.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.db, name)


@dataclass
class HistoryCase:
    root: Path
    history: History
    items: list = field(default_factory=list)
    files: dict = field(default_factory=dict)

    def rows(self):
        return self.history.search(per_page=500)


def history_case(folder: Path) -> HistoryCase:
    home = Home(folder).ensure()
    history = History(home.root / "history.sqlite3", home.outputs)
    for i in range(3):
        history.add(png(home.outputs / "txt2img" / f"0000{i}.png", i), INFOTEXT.format(seed=i))
    case = HistoryCase(home.root, history)
    case.items = case.rows()
    case.files = files_of(home.outputs)
    return case


@pytest.mark.parametrize("mode", SWEEP)
def test_history_add_and_delete_are_whole_at_every_database_write(tmp_path, mode):
    for op in ("add", "delete"):
        at = 1
        while True:
            case = history_case(tmp_path / f"{op}-{at}")
            real = case.history._db
            case.history._db = FaultyDb(real, at, mode)
            new = png(case.history.outputs / "txt2img" / "00009.png", 9)
            try:
                if op == "add":
                    case.history.add(new, INFOTEXT.format(seed=9))
                else:
                    case.history.delete(case.items[1][0].id)
            except DarkroomError as e:
                clear(e, case.root, mode)
                assert case.rows() == case.items, (op, at)  # the rows as they were
                assert files_of(case.history.outputs) == {**case.files, "txt2img/00009.png": new.read_bytes()}
            else:
                break  # past the last write: it all succeeded
            finally:
                case.history._db = real
            # the next run works
            if op == "add":
                case.history.add(new, INFOTEXT.format(seed=9))
                assert case.rows()[1][0].path == "txt2img/00009.png"
            else:
                case.history.delete(case.items[1][0].id)
                assert case.rows()[0] == 2 and not (case.history.outputs / case.items[1][0].path).exists()
            case.history.close()
            at += 1
        assert at > 1, "no database write failed"


def test_history_delete_is_whole_at_every_file_write(tmp_path, monkeypatch):
    def prepare(name):
        return history_case(tmp_path / name)

    def operate(case):
        return case.history.delete(case.items[1][0].id)

    for case, run in sweep(monkeypatch, prepare, operate, modes=tuple(MODES)):
        gone = case.items[1][0]
        if run.error is None:
            assert case.rows()[0] == 2 and not (case.history.outputs / gone.path).exists(), run.what
        else:
            clear(run.error, case.history.outputs / "txt2img", run.faults.mode)
            assert case.rows() == case.items, run.what
            assert files_of(case.history.outputs) == case.files, run.what  # the image is back under its name
            case.history.delete(gone.id)
        # a file the delete could not remove is hidden, and removed at the next start
        case.history.reconcile()
        assert files_of(case.history.outputs) == {k: v for k, v in case.files.items() if k != gone.path}, run.what
        assert case.rows()[0] == 2
        case.history.close()


def test_history_on_a_really_full_or_read_only_database(tmp_path):
    case = history_case(tmp_path / "h")
    db = case.history._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite itself says "database or disk is full"
    with pytest.raises(StorageError) as e:
        for i in range(10, 400):
            case.history.add(png(case.history.outputs / "more" / f"{i}.png", i), INFOTEXT.format(seed=i) * 20)
    clear(e.value, case.root, "full")
    assert case.rows()[1][-3:] == case.items[1]  # the old rows untouched
    db.execute("PRAGMA max_page_count = 1073741823")
    case.history.add(png(case.history.outputs / "after.png", 1), INFOTEXT.format(seed=1))

    db.execute("PRAGMA query_only = 1")  # SQLITE_READONLY, as on a read-only home
    with pytest.raises(StorageError, match=f"{case.root} is read-only"):
        case.history.add(png(case.history.outputs / "ro.png", 2), "")
    with pytest.raises(StorageError, match="is read-only"):
        case.history.delete(case.items[1][0].id)
    assert (case.history.outputs / case.items[1][0].path).is_file()


def test_reconcile_on_a_full_disk_keeps_what_it_had(tmp_path, caplog):
    case = history_case(tmp_path / "h")
    png(case.history.outputs / "late" / "a.png", 5)
    case.history._db = FaultyDb(case.history._db, 1, "full")
    assert case.history.reconcile() == (0, 0)  # no traceback at start-up: the rest waits for the next start
    assert "indexed at the next start" in caplog.text
    case.history._db = case.history._db.db
    assert case.history.reconcile() == (1, 0)


# ---------------------------------------------------------------------------------------------- over HTTP


def test_http_answers_507_naming_the_folder_and_keeps_the_state(api, studio, monkeypatch):
    home = studio.home
    before = (home.root / "settings.json").read_bytes() if (home.root / "settings.json").exists() else None
    run = attempt(monkeypatch, Faults(home.root, 1, "full", skip=(home.logs,)),
                  lambda: api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}))
    assert run.value.status_code == 507, run.value.text
    assert f"no space left on {home.root}" in run.value.json()["detail"]
    assert ((home.root / "settings.json").read_bytes() if before is not None else None) == before
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] != 3

    image = png(home.outputs / "txt2img" / "x.png", 3)
    item = studio.history.add(image, INFOTEXT.format(seed=3))
    run = attempt(monkeypatch, Faults(home.outputs, 1, "read-only"), lambda: api.delete(f"/api/history/{item}"))
    assert run.value.status_code == 507, run.value.text
    assert f"{image.parent} is on a read-only file system" in run.value.json()["detail"]
    assert api.get(f"/api/history/{item}").status_code == 200 and image.is_file()
    assert api.delete(f"/api/history/{item}").status_code == 200 and not image.exists()
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
