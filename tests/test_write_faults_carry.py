"""Writes under faults when a setup is carried: a model import, a backup and a restore, a bundle
(same method as tests/test_write_faults.py, with the injector of tests/faults.py)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file

from darkroom.carry import backup as bk
from darkroom.carry import bundle
from darkroom.home import Home
from darkroom.services.history import History
from darkroom.settings import Settings
from tests.faults import (
    INFOTEXT,
    Faults,
    attempt,
    clear,
    files_of,
    hidden_leftovers,
    invoke,
    one_line_error,
    png,
    said,
    sha,
    sweep,
)
from tests.test_models_manage import _fake_checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fault injector names files through /proc")

# ---------------------------------------------------------------------------------------------- model import


def fake_checkpoint(path: Path, data_bytes: int) -> Path:
    return _fake_checkpoint(path, data_bytes, random=True)


@pytest.fixture(scope="module")
def usb(tmp_path_factory) -> Path:
    """Two checkpoints to import, the first with a preview beside it; the second spans several copy blocks."""
    folder = tmp_path_factory.mktemp("usb")
    fake_checkpoint(folder / "a.safetensors", 1000)
    (folder / "a.preview.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    fake_checkpoint(folder / "b.safetensors", 9 << 20)
    return folder


def import_case(folder: Path, usb: Path):
    home = Home(folder).ensure()
    shutil.copy(usb / "a.safetensors", home.checkpoints / "old.safetensors")  # imported before
    return SimpleNamespace(root=home.root, home=home, before=files_of(home.checkpoints))


def test_an_import_is_whole_at_every_write(tmp_path, monkeypatch, usb):
    def operate(case):
        return invoke(case.root, "models", "import", str(usb))

    skip = lambda case: (case.home.logs,)  # noqa: E731
    for case, run in sweep(monkeypatch, lambda name: import_case(tmp_path / name, usb), operate, skip=skip):
        result, folder = run.value, case.home.checkpoints
        now = files_of(folder, hidden=False)
        for name, data in now.items():  # whatever has a name is complete
            source = "a.safetensors" if name == "old.safetensors" else name
            assert data == (usb / source).read_bytes(), (name, run.what)
        assert all(Path(p).name.endswith(".part") for p in hidden_leftovers(folder)), run.what
        if result.exit_code == 0:
            assert {"a.safetensors", "b.safetensors"} <= set(now), run.what
        else:
            one_line_error(result, str(folder), "cannot import ", *said(run.faults.mode, "--models-dir"))
            assert now.items() >= case.before.items(), run.what  # the model imported before: untouched
        # the next run finishes it; a .part left where the folder took no changes goes once stale
        for part in folder.glob(".*.part"):
            os.utime(part, (0, 0))
        again = invoke(case.root, "models", "import", str(usb))
        assert again.exit_code == 0, again.output
        assert set(files_of(folder)) >= {"old.safetensors", "a.safetensors", "b.safetensors"}
        assert not hidden_leftovers(folder), run.what


class PulledOut:
    """A source file whose drive is pulled out after its first block."""

    def __init__(self, fh):
        self.fh, self.reads = fh, 0

    def read(self, n=-1):
        self.reads += 1
        if self.reads > 1:
            raise OSError(errno.EIO, "Input/output error")
        return self.fh.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_a_source_drive_pulled_out_mid_copy_names_the_source(tmp_path, monkeypatch, usb):
    from darkroom.services import model_manager

    case = import_case(tmp_path / "h", usb)
    real = model_manager.open_regular
    monkeypatch.setattr(model_manager, "open_regular", lambda path, **kw: PulledOut(real(path, **kw)))
    result = invoke(case.root, "models", "import", str(usb / "b.safetensors"))
    one_line_error(result, f"cannot read {usb / 'b.safetensors'}: {usb} stopped answering (a drive removed?)")
    assert files_of(case.home.checkpoints) == case.before  # nothing of it, not even its .part


# ---------------------------------------------------------------------------------------------- backup and restore


@dataclass
class BackupCase:
    root: Path  # the backup folder (watched)
    home: Home
    first: dict = field(default_factory=dict)  # the backup folder after the first backup


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory) -> Path:
    """A home with settings, history, outputs and models, its first backup, then changes to back up next."""
    base = tmp_path_factory.mktemp("backed-up")
    home = Home(base / "home").ensure()
    Settings(home.root / "settings.json").update(clip_skip=2)
    history = History(home.root / "history.sqlite3", home.outputs)
    for i in range(2):
        history.add(png(home.outputs / "txt2img" / f"0000{i}.png", i), INFOTEXT.format(seed=i))
    (home.checkpoints / "m.safetensors").write_bytes(os.urandom(3 << 20))
    assert invoke(home.root, "backup", str(base / "bk"), "--models").exit_code == 0
    Settings(home.root / "settings.json").update(clip_skip=4)
    history.add(png(home.outputs / "txt2img" / "00002.png", 2), INFOTEXT.format(seed=2))
    history.close()
    (home.loras / "new.safetensors").write_bytes(os.urandom(2 << 20))
    return base


def backup_case(folder: Path, base: Path) -> BackupCase:
    shutil.copytree(base, folder)
    case = BackupCase(folder / "bk", Home(folder / "home"))
    case.first = files_of(case.root)
    return case


def objects_whole(repo: Path) -> None:
    """Every object under its final name holds the bytes its name says."""
    for obj in (repo / "objects").rglob("*"):
        if obj.is_file():
            assert sha(obj) == obj.parent.name + obj.name, obj


def test_a_backup_is_whole_at_every_write(tmp_path, monkeypatch, backed_up):
    def operate(case):
        return invoke(case.home.root, "backup", str(case.root), "--models")

    for case, run in sweep(monkeypatch, lambda name: backup_case(tmp_path / name, backed_up), operate):
        result, repo = run.value, case.root
        objects_whole(repo)
        latest = (repo / "latest").read_text().strip()
        if result.exit_code == 0:
            assert latest != case.first["latest"].decode().strip(), run.what
        else:
            one_line_error(result, "cannot back up: ", str(repo), *said(run.faults.mode, "another backup folder"))
            assert (repo / "latest").read_bytes() == case.first["latest"], run.what  # the previous snapshot
            for rel, data in case.first.items():  # ... and all it holds are as they were
                assert (repo / rel).read_bytes() == data, (rel, run.what)
            done = [d.name for d in (repo / "snapshots").iterdir() if (d / "manifest.json").is_file()]
            assert done == [latest] or run.faults.mode == "read-only", (done, run.what)  # left only if it cannot go
            assert invoke(case.home.root, "verify", str(repo)).exit_code == 0, run.what
        again = invoke(case.home.root, "backup", str(repo), "--models")  # the next run works and cleans up
        assert again.exit_code == 0, again.output
        assert not list((repo / "tmp").iterdir()) and not hidden_leftovers(repo), run.what
        assert all((d / "manifest.json").is_file() for d in (repo / "snapshots").iterdir()), run.what
        assert invoke(case.home.root, "verify", str(repo)).exit_code == 0, run.what


def home_state(home: Home) -> dict[str, bytes]:
    """What a restore may change (the home without its log, hash cache and the safety folder); the
    history by its rows (SQLite's backup API writes the same rows in other bytes)."""
    state = {k: v for k, v in files_of(home.root).items()
             if not k.startswith(("logs/", "cache.sqlite3", bk.SAFETY_DIR + "/", bk.HISTORY))}
    if (home.root / bk.HISTORY).is_file():
        db = sqlite3.connect(home.root / bk.HISTORY)
        try:
            state["history rows"] = json.dumps(db.execute("SELECT path FROM images ORDER BY path").fetchall()).encode()
        finally:
            db.close()
    return state


def visible(state: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in state.items() if not Path(k).name.startswith(".")}


def restore_case(folder: Path, base: Path):
    case = backup_case(folder, base)
    (case.home.outputs / "txt2img" / "00000.png").write_bytes(b"changed by hand")  # to be replaced
    case.root = case.home.root
    case.repo = folder / "bk"
    case.before = home_state(case.home)
    return case


def test_a_restore_is_whole_at_every_write(tmp_path, monkeypatch, backed_up):
    snapshot = Home(tmp_path / "snapshot")
    assert invoke(snapshot.root, "restore", str(backed_up / "bk")).exit_code == 0
    wanted = visible(home_state(snapshot))

    def operate(case):
        return invoke(case.root, "restore", str(case.repo), "--force", "--exact")

    skip = lambda case: (case.home.logs,)  # noqa: E731
    for case, run in sweep(monkeypatch, lambda name: restore_case(tmp_path / name, backed_up), operate, skip=skip):
        result, now = run.value, visible(home_state(case.home))
        if result.exit_code == 0:
            assert now == wanted, run.what
        elif "could not be undone" not in result.stderr:
            one_line_error(result, "cannot restore: ", str(case.root), *said(run.faults.mode, "another home"))
            assert now == visible(case.before), run.what  # all put back
            assert not [p for p in (case.root / bk.SAFETY_DIR).rglob("*") if p.is_file()], run.what
        else:  # read-only half-way: nothing can be put back, but each file is whole, old or new, the old kept
            assert run.faults.mode == "read-only", result.stderr
            one_line_error(result, "the restore stopped half-way", str(case.root / bk.SAFETY_DIR))
            saved = files_of(case.root / bk.SAFETY_DIR).values()
            for rel, data in visible(case.before).items():
                assert now.get(rel) == data or data in saved, (rel, run.what)
            for rel, data in now.items():
                assert data in (case.before.get(rel), wanted.get(rel)), (rel, run.what)
        again = invoke(case.root, "restore", str(case.repo), "--force", "--exact")
        assert again.exit_code == 0, again.output
        assert visible(home_state(case.home)) == wanted, run.what
        assert not [k for k in hidden_leftovers(case.root) if "restore-tmp" in k], run.what


def test_pulled_out_drives_are_named(tmp_path, monkeypatch, backed_up):
    case = backup_case(tmp_path / "b", backed_up)
    run = attempt(monkeypatch, Faults(case.root, 1, "pulled"), invoke, case.home.root, "backup", str(case.root),
                  "--models")
    one_line_error(run.value, f"cannot back up: {case.root} stopped answering (a drive removed?): reconnect it")
    case = restore_case(tmp_path / "r", backed_up)
    run = attempt(monkeypatch, Faults(case.root, 1, "pulled", skip=(case.home.logs,)), invoke, case.root, "restore",
                  str(case.repo), "--force")
    one_line_error(run.value, f"cannot restore: {case.root} stopped answering (a drive removed?)")
    assert visible(home_state(case.home)) == visible(case.before)


# ---------------------------------------------------------------------------------------------- bundle


def tensor_file(path: Path, key: str, shape=(2, 2)) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: torch.zeros(*shape)}, str(path))
    return path


@pytest.fixture(scope="module")
def bundle_home(tmp_path_factory) -> Home:
    """A home with a LoRA of a few copy blocks to carry."""
    home = Home(tmp_path_factory.mktemp("bundle-home")).ensure()
    tensor_file(home.loras / "inkwash.safetensors", "lora_unet_a.lora_down.weight", (3, 1 << 18))
    return home


def test_a_bundle_is_whole_at_every_write(tmp_path, monkeypatch, bundle_home):
    from tests.test_bundle import FakePip, _fake_source

    source = _fake_source(tmp_path)

    def operate(case):
        def pip(args):
            with case.faults.pause():  # pip is another process, with its own messages
                FakePip()(args)

        return bundle.create_bundle(case.root, home=bundle_home, models=["inkwash"], source=source, pip=pip,
                                    echo=lambda line: None)

    def prepare(name):
        return SimpleNamespace(root=tmp_path / name, faults=Faults(tmp_path / name))

    operate(prepare("reference"))
    reference = files_of(tmp_path / "reference")
    written = {k: v for k, v in reference.items() if not k.startswith("wheels/") and k != "SHA256SUMS"}
    for case, run in sweep(monkeypatch, prepare, operate):
        dest = case.root
        if run.error is None:
            assert bundle.verify_bundle(dest).problems == [], run.what
            continue
        clear(run.error, dest, run.faults.mode)
        left = files_of(dest) if dest.exists() else {}
        assert (f"{dest} is incomplete: delete it before trying again" in str(run.error)) == bool(left), run.error
        assert "manifest.json" not in left, run.what  # no installer takes it
        for rel, data in files_of(dest, hidden=False).items() if left else ():  # what has a name is whole
            assert rel not in written or data == written[rel], (rel, run.what)
        shutil.rmtree(dest, ignore_errors=True)  # as the message says; then the next run works
        assert operate(case)["files"] and bundle.verify_bundle(dest).problems == []


def test_bundle_create_on_a_full_drive_is_one_line(tmp_path, monkeypatch, bundle_home):
    from tests.test_bundle import FakePip, _fake_source

    monkeypatch.setattr(bundle, "run_pip", lambda args, echo: FakePip()(args))
    dest = tmp_path / "usb" / "bundle"
    faults = Faults(dest / "models", 1, "full")  # the wheels fit; the model does not
    run = attempt(monkeypatch, faults, invoke, bundle_home.root, "bundle", "create", str(dest), "--models",
                  "inkwash", "--source", str(_fake_source(tmp_path)))
    one_line_error(run.value, f"cannot write the bundle: no space left on {dest}: free some space there",
                   f"({dest} is incomplete: delete it before trying again)")
    assert not (dest / "manifest.json").exists()
