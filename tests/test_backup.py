"""Backup, restore and verify: round trips, incremental snapshots, live databases, damage, interruption."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from darkroom.carry import backup as bk
from darkroom.cli import cli
from darkroom.cli.backup import backup, restore, verify
from darkroom.home import Home
from darkroom.metadata.images import encode_png
from darkroom.services.history import History
from darkroom.settings import Settings

INFOTEXT = "a lighthouse at dusk\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: {seed}, " \
           "Size: 8x8, Model: tiny-sd1"


@pytest.fixture(autouse=True)
def commands():
    """The backup commands on the real `darkroom` group, as darkroom.cli registers them."""
    added = [c for c in (backup, restore, verify) if c.name not in cli.commands]
    for c in added:
        cli.add_command(c)
    yield
    for c in added:
        cli.commands.pop(c.name, None)


def run(home: Home, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home.root), *args], catch_exceptions=False)


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code != 0, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in last, last
    return last


def add_output(home: Home, history: History | None, name: str, seed: int) -> Path:
    path = home.outputs / "txt2img" / "2024-05-01" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = INFOTEXT.format(seed=seed)
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), (seed % 256, 40, 90)), text))
    if history is not None:
        history.add(path, text)
    return path


@pytest.fixture
def full_home(home):
    """Three outputs indexed in the history, settings.json, a small model file."""
    Settings(home.root / "settings.json").update(clip_skip=2, current_model="tiny-sd1")
    history = History(home.root / "history.sqlite3", home.outputs)
    for i in range(3):
        add_output(home, history, f"0000{i}-{100 + i}.png", 100 + i)
    history.close()
    (home.checkpoints / "tiny-sd1.safetensors").write_bytes(os.urandom(20_000))
    (home.loras / "style.safetensors").write_bytes(os.urandom(5_000))
    return home


def state(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every backed-up file of a home: path -> (bytes, mtime_ns)."""
    out = {}
    for top in ("outputs", "models"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file():
                out[p.relative_to(root).as_posix()] = (p.read_bytes(), p.stat().st_mtime_ns)
    if (root / "settings.json").is_file():
        out["settings.json"] = ((root / "settings.json").read_bytes(), (root / "settings.json").stat().st_mtime_ns)
    return out


def rows(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT * FROM images ORDER BY id").fetchall()
    finally:
        con.close()


def objects(dest: Path) -> set[str]:
    return {p.parent.name + p.name for p in (dest / "objects").glob("*/*")}


def manifests(dest: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((dest / "snapshots").glob("*/manifest.json"))]


def object_of(dest: Path, rel: str, snapshot: int = -1) -> Path:
    sha = manifests(dest)[snapshot]["files"][rel]["sha256"]
    return dest / "objects" / sha[:2] / sha[2:]


def test_backup_then_restore_into_a_fresh_home(full_home, tmp_path):
    dest = tmp_path / "bk"
    r = run(full_home, "backup", str(dest), "--models")
    assert r.exit_code == 0, r.output
    assert "copied 7" in r.output and "unchanged 0" in r.output  # 3 PNGs, 2 models, settings, history
    assert "History: 3 images" in r.output and "hash cache" in r.output
    [m] = manifests(dest)
    assert (dest / "latest").read_text().strip() == m["id"]
    assert m["files"]["history.sqlite3"]["kind"] == "sqlite"
    assert set(m["files"]) == set(state(full_home.root)) | {"history.sqlite3"}
    assert not list((dest / "tmp").iterdir())

    fresh = Home(tmp_path / "fresh").ensure()
    r = run(fresh, "restore", str(dest))
    assert r.exit_code == 0, r.output
    assert "7 files" not in r.output and "6 files written" in r.output  # the history goes through SQLite
    assert "History database: restored (3 images)" in r.output
    assert state(fresh.root) == state(full_home.root)  # same bytes, same mtimes
    assert rows(fresh.root / "history.sqlite3") == rows(full_home.root / "history.sqlite3")
    assert History(fresh.root / "history.sqlite3", fresh.outputs).count() == 3  # opens and works in WAL again
    assert Settings(fresh.root / "settings.json").get("clip_skip") == 2
    assert not [p for p in fresh.root.rglob("*restore-tmp*")]

    r = run(fresh, "verify", str(dest))
    assert r.exit_code == 0, r.output
    assert "OK" in r.output and "Checked 7 objects" in r.output

    # restoring again onto the same state changes nothing and needs no --force
    r = run(fresh, "restore", str(dest))
    assert r.exit_code == 0, r.output
    assert "0 files written" in r.output and "6 already identical" in r.output
    assert "History database: already identical" in r.output


def test_second_backup_copies_only_the_new_file(full_home, tmp_path, monkeypatch):
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    before = objects(dest)
    assert len(before) == 5  # 3 PNGs, settings, history (no models by default)
    add_output(full_home, None, "00003-103.png", 103)  # not indexed yet: the history is unchanged

    r = run(full_home, "backup", str(dest))
    assert r.exit_code == 0, r.output
    assert "copied 1 " in r.output and "unchanged 5" in r.output
    new = objects(dest) - before
    assert len(new) == 1
    first, second = manifests(dest)
    assert first["id"] != second["id"]
    assert (dest / "latest").read_text().strip() == second["id"]
    added = set(second["files"]) - set(first["files"])
    assert added == {"outputs/txt2img/2024-05-01/00003-103.png"}
    sha = second["files"][added.pop()]["sha256"]
    assert new == {sha}

    # a third backup with nothing changed reads no file (size + mtime unchanged) and copies nothing
    streamed = []
    adopt = bk.Repository.adopt

    def spy(self, tmp, progress, *, source=None):
        streamed.append(source)
        return adopt(self, tmp, progress, source=source)

    monkeypatch.setattr(bk.Repository, "adopt", spy)
    r = run(full_home, "backup", str(dest))
    assert r.exit_code == 0, r.output
    assert "copied 0 " in r.output
    assert streamed == [None]  # only the history snapshot, which is always taken (and deduplicated)
    assert len(manifests(dest)) == 3

    # the first snapshot is still restorable on its own, without the later file
    fresh = Home(tmp_path / "fresh").ensure()
    r = run(fresh, "restore", str(dest), "--snapshot", first["id"])
    assert r.exit_code == 0, r.output
    assert not (fresh.outputs / "txt2img" / "2024-05-01" / "00003-103.png").exists()
    assert len(list(fresh.outputs.rglob("*.png"))) == 3


def test_backup_of_a_live_wal_database_is_consistent(home, tmp_path):
    db = home.root / "history.sqlite3"
    history = History(db, home.outputs)
    for i in range(5):
        add_output(home, history, f"{i:05d}.png", i)
    # committed rows that live only in the WAL so far, and a writer in the middle of a transaction
    assert Path(f"{db}-wal").stat().st_size > 0
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO images (path, created) VALUES ('uncommitted.png', 0)")
    raw = tmp_path / "raw.sqlite3"
    raw.write_bytes(db.read_bytes())  # what a plain file copy would capture

    try:
        result = bk.backup_home(home, tmp_path / "bk")
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert result.history_rows == 5

    snap = tmp_path / "snap.sqlite3"
    snap.write_bytes(object_of(tmp_path / "bk", "history.sqlite3").read_bytes())
    con = sqlite3.connect(snap)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert con.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one self-contained file
        paths = [p for (p,) in con.execute("SELECT path FROM images ORDER BY id")]
    finally:
        con.close()
    assert paths == [f"txt2img/2024-05-01/{i:05d}.png" for i in range(5)]
    assert "uncommitted.png" not in paths
    con = sqlite3.connect(raw)
    try:
        raw_rows = con.execute("SELECT COUNT(*) FROM images").fetchone()[0]
    except sqlite3.Error:
        raw_rows = None
    finally:
        con.close()
    assert raw_rows != 5  # the raw copy misses what is still in the WAL
    history.close()


def test_verify_names_corrupt_and_missing_files(full_home, tmp_path):
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest), "--models").exit_code == 0
    png = "outputs/txt2img/2024-05-01/00001-101.png"
    corrupt = object_of(dest, png)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt.write_bytes(bytes(data))
    object_of(dest, "models/loras/style.safetensors").unlink()

    r = run(full_home, "verify", str(dest))
    one_line_error(r, "2 problem(s)", "1 missing", "1 corrupt")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert any(line.startswith("corrupt: " + png) for line in lines), r.stdout
    assert any(line.startswith("missing: models/loras/style.safetensors") for line in lines), r.stdout

    # a restore from the damaged backup stops at the bad file, names it and leaves no temp behind
    fresh = Home(tmp_path / "fresh").ensure()
    r = run(fresh, "restore", str(dest))
    last = one_line_error(r, "darkroom verify")
    assert "models/loras/style.safetensors is missing" in last or f"{png} is corrupt" in last
    assert not [p for p in fresh.root.rglob("*restore-tmp*")]
    assert not (fresh.root / png).exists()


def test_restore_refuses_to_replace_without_force(full_home, tmp_path):
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    original = state(full_home.root)
    Settings(full_home.root / "settings.json").update(clip_skip=5)
    changed = full_home.outputs / "txt2img" / "2024-05-01" / "00000-100.png"
    changed.write_bytes(b"not the original")
    extra = add_output(full_home, None, "99999-1.png", 1)
    modified = state(full_home.root)

    r = run(full_home, "restore", str(dest))
    one_line_error(r, "would replace 2 file(s)", "settings.json", "00000-100.png", "--force")
    assert state(full_home.root) == modified  # nothing touched

    r = run(full_home, "restore", str(dest), "--force")
    assert r.exit_code == 0, r.output
    assert "Replaced 2" in r.output and "Left alone 1 file(s) not in the snapshot" in r.output
    after = state(full_home.root)
    assert {k: v for k, v in after.items() if k != "outputs/txt2img/2024-05-01/99999-1.png"} == original
    assert extra.exists()
    [saved] = (full_home.root / "restore-saved").iterdir()
    assert json.loads((saved / "settings.json").read_text())["clip_skip"] == 5
    assert (saved / "outputs/txt2img/2024-05-01/00000-100.png").read_bytes() == b"not the original"

    # --exact also moves files the snapshot lacks, and asks for --force first
    r = run(full_home, "restore", str(dest), "--exact")
    one_line_error(r, "would replace or remove 1 file(s)", "99999-1.png")
    r = run(full_home, "restore", str(dest), "--exact", "--force")
    assert r.exit_code == 0, r.output
    assert not extra.exists()
    assert state(full_home.root) == original
    assert len(list((full_home.root / "restore-saved").rglob("99999-1.png"))) == 1


def test_restore_replaces_a_history_with_other_rows_only_with_force(full_home, tmp_path):
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    expected = rows(full_home.root / "history.sqlite3")
    other = Home(tmp_path / "other").ensure()
    h = History(other.root / "history.sqlite3", other.outputs)
    add_output(other, h, "x.png", 7)  # the history and this file are new here; the file stays
    h.close()
    r = run(other, "restore", str(dest))
    one_line_error(r, "would replace 1 file(s)", "history.sqlite3")
    r = run(other, "restore", str(dest), "--force")
    assert r.exit_code == 0, r.output
    assert "History database: restored over the existing one (3 images)" in r.output
    assert rows(other.root / "history.sqlite3") == expected
    [saved] = (other.root / "restore-saved").iterdir()
    assert [row[1] for row in rows(saved / "history.sqlite3")] == ["txt2img/2024-05-01/x.png"]


def test_user_errors_are_one_line(full_home, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    one_line_error(run(full_home, "backup", str(junk)), "not empty and not a Darkroom backup folder")
    one_line_error(run(full_home, "backup", str(full_home.outputs / "bk")), "inside")
    one_line_error(run(full_home, "restore", str(tmp_path / "nowhere")), "no backup folder")
    one_line_error(run(full_home, "verify", str(junk)), "not a Darkroom backup folder")
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    [m] = manifests(dest)
    one_line_error(run(full_home, "restore", str(dest), "--snapshot", "20000101-000000"), "available: " + m["id"])


def test_restore_refuses_a_manifest_path_outside_the_home(full_home, tmp_path):
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    mf = next((dest / "snapshots").glob("*/manifest.json"))
    m = json.loads(mf.read_text())
    m["files"]["outputs/../../escaped.txt"] = m["files"]["settings.json"]
    mf.write_text(json.dumps(m))
    fresh = Home(tmp_path / "fresh" / "home").ensure()
    one_line_error(run(fresh, "restore", str(dest)), "outside the home")
    assert not (tmp_path / "fresh" / "escaped.txt").exists()
    assert not (fresh.root / "settings.json").exists()
    r = run(fresh, "verify", str(dest))
    assert r.exit_code == 1 and "outside the home" in r.stdout


_BACKUP_CHILD = """
import sys
from darkroom.cli import cli
from darkroom.cli.backup import backup
cli.add_command(backup)
cli(["--home", sys.argv[1], "backup", sys.argv[2], "--models"])
"""


@pytest.mark.slow
def test_interrupted_backup_leaves_the_previous_snapshot_intact(full_home, tmp_path):
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest), "--models").exit_code == 0
    [first] = manifests(dest)
    big = full_home.checkpoints / "big.safetensors"
    with open(big, "wb") as fh:
        for _ in range(100):
            fh.write(os.urandom(1 << 20))

    child = subprocess.Popen([sys.executable, "-c", _BACKUP_CHILD, str(full_home.root), str(dest)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = None
    deadline = time.monotonic() + 600  # only a hang gets near this
    try:
        while partial is None and child.poll() is None and time.monotonic() < deadline:
            for f in (dest / "tmp").iterdir():
                try:
                    if f.suffix == ".part" and f.stat().st_size > (1 << 20):
                        partial = f
                except FileNotFoundError:
                    pass
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=600)
    assert partial is not None, "the backup finished before a temp object was seen"
    assert child.returncode == -signal.SIGKILL

    # killed mid-copy: a partial temp object is left, the first snapshot is still the latest and complete
    assert partial.exists() and partial.stat().st_size < big.stat().st_size
    assert manifests(dest) == [first]
    assert (dest / "latest").read_text().strip() == first["id"]
    r = run(full_home, "verify", str(dest))
    assert r.exit_code == 0, r.output
    assert "temp file(s) of an interrupted backup" in r.output
    fresh = Home(tmp_path / "fresh").ensure()
    r = run(fresh, "restore", str(dest))
    assert r.exit_code == 0, r.output
    assert not (fresh.checkpoints / "big.safetensors").exists()

    # a rerun completes, cleans up and includes the big file
    r = run(full_home, "backup", str(dest), "--models")
    assert r.exit_code == 0, r.output
    assert "leftover temp file" in r.output
    assert not list((dest / "tmp").iterdir())
    assert len(manifests(dest)) == 2
    assert object_of(dest, "models/checkpoints/big.safetensors").stat().st_size == 100 << 20
    r = run(full_home, "verify", str(dest))
    assert r.exit_code == 0, r.output
    r = run(fresh, "restore", str(dest))
    assert r.exit_code == 0, r.output
    assert state(fresh.root) == state(full_home.root)


def test_names_that_differ_only_in_case_are_refused_on_a_home_that_folds_case(full_home, tmp_path, monkeypatch):
    """A FAT/exFAT home (a USB drive) keeps `A.png` and `a.png` as one file: restoring both there would silently
    lose one, so the restore is refused naming both, before anything is written. A home that tells them apart
    takes both."""
    add_output(full_home, None, "Sunset-1.png", 1)
    add_output(full_home, None, "sunset-1.png", 2)
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    fresh = Home(tmp_path / "fat-home").ensure()
    monkeypatch.setattr(bk, "folds_case", lambda folder: True)  # no FAT driver here: the probe's answer is faked
    r = run(fresh, "restore", str(dest))
    one_line_error(r, "Sunset-1.png", "sunset-1.png", "differ only in letter case", "FAT")
    assert state(fresh.root) == {}
    monkeypatch.undo()
    assert run(fresh, "restore", str(dest)).exit_code == 0
    both = {"outputs/txt2img/2024-05-01/Sunset-1.png", "outputs/txt2img/2024-05-01/sunset-1.png"}
    assert both <= set(state(fresh.root))


def test_case_helpers(tmp_path):
    from darkroom.fsutil import case_collisions, folds_case

    assert case_collisions(["a/B.png", "a/b.png", "c.png", "a/B.png"]) == [("a/B.png", "a/b.png")]
    assert case_collisions(["x.png", "y.png"]) == []
    assert folds_case(tmp_path) is False  # ext4/tmpfs tell names apart by case
    assert not list(tmp_path.iterdir())  # the probe is removed
    assert folds_case(tmp_path / "missing") is False


def png_of(colour: tuple[int, int, int]) -> bytes:
    return encode_png(Image.new("RGB", (8, 8), colour), "")


def add_img2img(home: Home, history: History, name: str, seed: int, source: bytes, mask: bytes | None) -> int:
    """An img2img output indexed with the source image (and mask) History keeps under history-sources/."""
    path = home.outputs / "img2img" / "2024-05-02" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = INFOTEXT.format(seed=seed)
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), (seed % 256, 9, 9)), text))
    return history.add(path, text, source=source, mask=mask)


def test_img2img_sources_are_backed_up_verified_and_restored(full_home, tmp_path):
    """An img2img item's source and mask travel with the history: backed up (only those the database snapshot
    refers to, incrementally), checked by verify, and restored byte for byte so the item serves them again."""
    source, mask = png_of((200, 10, 10)), png_of((255, 255, 255))
    h = History(full_home.root / "history.sqlite3", full_home.outputs)
    item_id = add_img2img(full_home, h, "00003-7.png", 7, source, mask)
    names = {h.get(item_id).source, h.get(item_id).mask}
    h.close()
    (h.sources / ("0" * 64 + ".png")).write_bytes(b"no row refers to me")  # left by a crash: History drops it
    (h.sources / ".tmp.part").write_bytes(b"half")
    dest = tmp_path / "bk"
    r = run(full_home, "backup", str(dest))
    assert r.exit_code == 0, r.output
    [m] = manifests(dest)
    assert {rel for rel in m["files"] if rel.startswith("history-sources/")} == {f"history-sources/{n}" for n in names}
    assert "history-sources" in m["scope"]

    r = run(full_home, "backup", str(dest))  # incremental: nothing changed, nothing copied
    assert r.exit_code == 0 and "copied 0" in r.output, r.output

    fresh = Home(tmp_path / "fresh").ensure()
    r = run(fresh, "restore", str(dest))
    assert r.exit_code == 0, r.output
    restored = History(fresh.root / "history.sqlite3", fresh.outputs)
    restored.reconcile()  # what a server start does: sources no row refers to would go here
    item = restored.get(item_id)
    assert restored.source_file(item).read_bytes() == source
    assert restored.source_file(item, "mask").read_bytes() == mask
    assert {p.name for p in restored.sources.iterdir()} == names
    restored.close()

    bad = object_of(dest, f"history-sources/{item.mask}")
    bad.write_bytes(bad.read_bytes()[:-1] + b"\x00")
    r = run(fresh, "verify", str(dest))
    one_line_error(r, "1 corrupt")
    assert f"corrupt: history-sources/{item.mask}" in r.stdout


def test_restoring_over_another_history_keeps_its_sources_with_it(full_home, tmp_path):
    """A restore that replaces a history whose items have sources moves those sources into the safety folder
    beside the old database (the restored rows do not refer to them), and writes the snapshot's own."""
    h = History(full_home.root / "history.sqlite3", full_home.outputs)
    kept = h.get(add_img2img(full_home, h, "00003-7.png", 7, png_of((1, 2, 3)), None)).source
    h.close()
    dest = tmp_path / "bk"
    assert run(full_home, "backup", str(dest)).exit_code == 0
    other = Home(tmp_path / "other").ensure()
    h = History(other.root / "history.sqlite3", other.outputs)
    theirs = h.get(add_img2img(other, h, "x.png", 8, png_of((4, 5, 6)), png_of((7, 8, 9))))
    h.close()
    r = run(other, "restore", str(dest))
    one_line_error(r, "history.sqlite3")
    assert (other.root / "history-sources" / theirs.source).is_file()  # a refused restore moves nothing
    r = run(other, "restore", str(dest), "--force")
    assert r.exit_code == 0, r.output
    assert {p.name for p in (other.root / "history-sources").iterdir()} == {kept}
    [saved] = (other.root / "restore-saved").iterdir()
    assert {p.name for p in (saved / "history-sources").iterdir()} == {theirs.source, theirs.mask}
    assert (saved / "history.sqlite3").is_file()


def test_a_manifest_may_name_history_sources_but_not_the_folder_itself():
    from darkroom.carry.backup_store import _safe_rel

    assert str(_safe_rel("history-sources/" + "a" * 64 + ".png")) == "history-sources/" + "a" * 64 + ".png"
    for bad in ("history-sources", "history-sources/../settings.json", "cache/x"):
        with pytest.raises(bk.BackupError):
            _safe_rel(bad)
