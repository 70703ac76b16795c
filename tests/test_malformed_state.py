"""Files and state that arrive from outside (a USB drive, a restored backup, a hand edit) are
refused or set aside with one clear line each, never a traceback, and leave earlier data intact."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sqlite3
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from darkroom.cli import cli
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.home import Home
from darkroom.metadata.images import encode_png
from darkroom.models import header, library
from darkroom.models.header import read_header
from darkroom.services.history import History, NotFound
from darkroom.settings import Settings
from tests.server_util import client, studio_with


def run(home: Home, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home.root), *args], catch_exceptions=False)


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output


def last_error(result) -> str:
    """The one line a failed command printed; asserts it is one `error:` line, not a traceback."""
    assert result.exit_code in (1, 2), result.output
    no_traceback(result)
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), result.stderr
    return line


def doctor_checks(home: Home, *args: str) -> list[dict]:
    r = run(home, *args, "doctor", "--json")
    no_traceback(r)
    return json.loads(r.stdout)["checks"]


def listed(home: Home, *args: str) -> dict[str, dict]:
    r = run(home, *args, "models", "list", "--json")
    assert r.exit_code == 0, r.output
    return {row["name"]: row for row in json.loads(r.stdout)}


@pytest.fixture
def sd1_home(home, tiny_model) -> Home:
    """A home that already holds a working checkpoint (the earlier data that must stay intact)."""
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    return home


def write_png(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"a cat {seed}\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 8x8, Model: m"
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), (seed, 0, 0)), text))
    return path


# --- 1. safetensors headers -----------------------------------------------------------------------


def write_header(path: Path, raw: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def test_a_deeply_nested_header_is_refused_naming_the_file(sd1_home, tmp_path):
    deep = write_header(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}")
    expected = "deep.safetensors: not a safetensors header (nested more than 8 levels deep)"

    assert expected in last_error(run(sd1_home, "generate", "x", "--model", str(deep)))
    r = run(sd1_home, "models", "import", str(deep))
    assert r.exit_code == 1 and expected in r.output and "1 refused" in r.output
    no_traceback(r)
    # shallower than the parser's own limit but deeper than any safetensors header: the same rule
    nine = write_header(tmp_path / "nine.safetensors", b'{"a":' + b"[" * 8 + b"]" * 8 + b"}")
    with pytest.raises(ModelLoadError, match="nine.safetensors: not a safetensors header"):
        read_header(nine)
    # earlier data intact: nothing imported, the model already there is listed and readable
    assert sorted(p.name for p in sd1_home.checkpoints.iterdir()) == ["tiny-sd1.safetensors"]
    assert listed(sd1_home)["tiny-sd1"]["error"] is None


def test_header_length_and_file_kind_are_checked_before_reading(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", header.MAX_HEADER + 1) + b"{}")
    with pytest.raises(ModelLoadError, match="huge.safetensors: not a valid .safetensors file"):
        read_header(huge)
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(ModelLoadError, match="pipe.safetensors: not a regular file"):
        read_header(fifo)
    bad = write_header(tmp_path / "neg.safetensors", b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[4,0]}}')
    with pytest.raises(ModelLoadError, match="corrupt .safetensors header entry for 'a'"):
        read_header(bad)


# --- 2. diffusers model_index.json ----------------------------------------------------------------


@pytest.mark.parametrize("index,needle", [
    ({"_class_name": "StableDiffusionPipeline", "text_encoder": 5}, "entry 'text_encoder' is 5"),
    ([["diffusers", "UNet2DConditionModel"]], "model_index.json holds a list of 1 item(s), not an object"),
    ({"unet": "diffusers"}, "entry 'unet' is \"diffusers\""),
    ({"text_encoder_2": [1, 2]}, "entry 'text_encoder_2' is a list of 2 item(s)"),
])
def test_a_malformed_model_index_names_the_folder_and_entry(sd1_home, index, needle):
    folder = sd1_home.checkpoints / "broken"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps(index))

    line = last_error(run(sd1_home, "generate", "x", "--model", str(folder)))
    assert line.startswith("error: broken: model_index.json") and needle in line
    checks = {c["name"]: c for c in doctor_checks(sd1_home)}
    assert checks["model broken"]["status"] == "FAIL" and needle in checks["model broken"]["reason"]
    assert checks["model tiny-sd1"]["status"] == "OK"  # earlier data intact
    assert {"broken", "tiny-sd1"} <= set(listed(sd1_home))


# --- 3. settings.json -----------------------------------------------------------------------------


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "settings.json is a JSON list, not an object: all settings ignored"),
    ("5", "settings.json is a JSON number, not an object: all settings ignored"),
    ('{"models_dirs": "x"}', "'models_dirs' should be a list of folder paths, not \"x\"; ignored"),
    ('{"models_dirs": [5]}', "'models_dirs' should be a list of folder paths, not [5]; ignored"),
    ('{"clip_skip": "2", "current_model": "tiny-sd1"}', "'clip_skip' should be a whole number from 1 to 12"),
])
def test_a_malformed_settings_file_falls_back_to_defaults(sd1_home, caplog, content, needle):
    path = sd1_home.root / "settings.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="darkroom.settings"):
        assert "tiny-sd1" in listed(sd1_home)  # every command still works
    assert needle in caplog.text
    warnings = [c for c in doctor_checks(sd1_home) if c["name"] == "settings"]
    assert warnings and all(c["status"] == "WARN" for c in warnings)
    assert any(needle in c["reason"] for c in warnings), warnings
    assert path.read_text() == content  # the user's file is never rewritten by reading it
    settings = Settings(path)
    assert settings.get("clip_skip") == 1 and settings.get("models_dirs") == []
    if "current_model" in content:
        assert settings.get("current_model") == "tiny-sd1"  # what is valid is kept


def test_saving_over_a_malformed_settings_file_keeps_it_aside(home):
    path = home.root / "settings.json"
    path.write_text('{"clip_skip": "two", "current_model": "mine"}')
    settings = Settings(path)
    with pytest.raises(InvalidRequest, match="clip_skip should be a whole number from 1 to 12, not 0"):
        settings.update(clip_skip=0)  # a bad value is refused, not saved
    settings.update(vae="clear")
    [aside] = home.root.glob("settings.json.invalid-*")
    assert aside.read_text() == '{"clip_skip": "two", "current_model": "mine"}'
    saved = json.loads(path.read_text())
    assert (saved["current_model"], saved["vae"], saved["clip_skip"]) == ("mine", "clear", 1)
    assert Settings(path).problems == []


def test_restore_repairs_a_broken_settings_file(home, tmp_path):
    Settings(home.root / "settings.json").update(clip_skip=2)
    dest = tmp_path / "bk"
    assert run(home, "backup", str(dest)).exit_code == 0
    (home.root / "settings.json").write_text("[]")
    r = run(home, "restore", str(dest), "--force")
    assert r.exit_code == 0, r.output
    assert Settings(home.root / "settings.json").get("clip_skip") == 2
    [saved] = (home.root / "restore-saved").iterdir()
    assert (saved / "settings.json").read_text() == "[]"  # the broken file is kept, not destroyed


# --- 4. models folders ----------------------------------------------------------------------------


def test_a_models_folder_of_root_gives_a_bounded_answer(sd1_home, monkeypatch):
    monkeypatch.setattr(library, "MAX_ENTRIES", 2000)  # keeps the test quick; the rule is the same
    (sd1_home.root / "settings.json").write_text(json.dumps({"models_dirs": ["/"]}))
    assert listed(sd1_home)["tiny-sd1"]["error"] is None
    assert listed(sd1_home, "--models-dir", "/")["tiny-sd1"]["error"] is None
    folders = [c for c in doctor_checks(sd1_home) if c["name"] == "models folders"]
    assert [c["status"] for c in folders] == ["WARN"]
    assert folders[0]["reason"].startswith("/: stopped looking for models after 2000 files and folders")


def test_special_files_and_loops_in_a_models_folder_are_skipped(sd1_home, tiny_model, tmp_path, monkeypatch):
    usb = tmp_path / "usb"
    deep = usb.joinpath(*[f"d{i}" for i in range(library.MAX_DEPTH + 1)])
    deep.mkdir(parents=True)
    shutil.copy(tiny_model("sd1")["path"], usb / "d0" / "good.safetensors")
    shutil.copy(tiny_model("sd1")["path"], deep / "too-deep.safetensors")
    os.mkfifo(usb / "pipe.safetensors")
    monkeypatch.chdir(usb)  # a socket's path must be short
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.safetensors")
    (usb / "loop").symlink_to(usb)  # a folder that contains itself
    (usb / "self.safetensors").symlink_to(usb / "self.safetensors")
    (usb / "locked").mkdir()
    (usb / "denied.safetensors").symlink_to(usb / "locked" / "x.safetensors")
    real_scandir, real_stat = os.scandir, os.stat

    def scandir(path="."):  # what a folder the user may not read does (root reads them all)
        if isinstance(path, (str, os.PathLike)) and Path(path) == usb / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):  # /proc/1/cwd: a link whose target may not be looked at
        denied = isinstance(path, (str, os.PathLike)) and Path(path) == usb / "denied.safetensors"
        if denied and kwargs.get("follow_symlinks", True):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    names = listed(sd1_home, "--models-dir", str(usb))
    assert {"good", "tiny-sd1"} <= set(names)
    assert not {"too-deep", "pipe", "sock", "self", "denied"} & set(names)
    assert names["good"]["error"] is None and names["tiny-sd1"]["error"] is None


# --- 5. history database --------------------------------------------------------------------------


@pytest.mark.parametrize("content", [os.urandom(8192), b"SQLite format 3\x00" + os.urandom(8192)])
def test_a_corrupt_history_database_is_moved_aside_and_rebuilt(tmp_path, caplog, content):
    home = Home(tmp_path / "h").ensure()
    for seed in (1, 2):
        write_png(home.outputs / "txt2img" / "2026-01-01" / f"0000{seed}-{seed}.png", seed)
    db = home.root / "history.sqlite3"
    db.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="darkroom.history"):
        studio = studio_with(home, start=False)
    try:
        with client(studio) as c:
            r = c.get("/api/history")
            assert r.status_code == 200 and r.json()["total"] == 2
            assert {i["seed"] for i in r.json()["items"]} == {1, 2}
    finally:
        studio.close()
    [aside] = home.root.glob("history.sqlite3.corrupt-*")
    assert aside.read_bytes() == content  # moved, never deleted
    assert str(aside) in caplog.text and "not a usable database" in caplog.text


def test_a_history_database_of_another_shape_is_moved_aside(tmp_path):
    outputs = tmp_path / "outputs"
    write_png(outputs / "a.png", 1)
    db = tmp_path / "history.sqlite3"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE images (id INTEGER PRIMARY KEY, name TEXT)")
    con.commit()
    con.close()
    history = History(db, outputs)
    try:
        assert history.count() == 1 and history.search()[1][0].path == "a.png"
    finally:
        history.close()
    [aside] = tmp_path.glob("history.sqlite3.corrupt-*")
    assert sqlite3.connect(aside).execute("SELECT name FROM sqlite_master").fetchall() == [("images",)]


# --- 6. history ids and files ---------------------------------------------------------------------


def test_ids_beyond_64_bits_are_not_found(tmp_path):
    outputs = tmp_path / "outputs"
    history = History(tmp_path / "history.sqlite3", outputs)
    keep = history.add(write_png(outputs / "a.png", 1), "")
    for call in (history.get, history.delete):
        with pytest.raises(NotFound, match="no image 100000000000000000000") as e:
            call(10**20)
        assert e.value.status == 404
    assert history.search(page=10**20) == (1, [])
    assert history.get(keep).path == "a.png" and (outputs / "a.png").is_file()
    history.close()


def test_ids_beyond_64_bits_are_404_over_http(studio):
    big = 10**20
    with client(studio) as c:
        assert c.get(f"/api/history/{big}").status_code == 404
        assert c.delete(f"/api/history/{big}").status_code == 404
        assert c.get(f"/api/images/{big}").status_code == 404
        assert c.get("/api/history", params={"page": big}).status_code == 200


def test_delete_removes_a_link_never_its_target(tmp_path):
    outputs, outside = tmp_path / "outputs", tmp_path / "elsewhere"
    target = write_png(outputs / "a.png", 1)
    victim = write_png(outside / "victim.png", 2)
    write_png(outside / "sub" / "x.png", 3)
    history = History(tmp_path / "history.sqlite3", outputs)
    keep = history.add(target, "")
    # entries whose files were replaced by links (as a restored backup or a hand edit can leave them)
    ids = {name: history.add(write_png(outputs / name, 4), "") for name in ("inside.png", "out.png")}
    (outputs / "inside.png").unlink()
    (outputs / "inside.png").symlink_to(target)
    (outputs / "out.png").unlink()
    (outputs / "out.png").symlink_to(victim)
    (outputs / "sub").symlink_to(outside / "sub")
    con = sqlite3.connect(tmp_path / "history.sqlite3")
    for rel in ("sub/x.png", "../elsewhere/victim.png", str(victim)):
        ids[rel] = con.execute("INSERT INTO images (path, created) VALUES (?, 0)", (rel,)).lastrowid
    con.commit()
    con.close()

    for rel in ("../elsewhere/victim.png", str(victim), "out.png", "sub/x.png"):
        with pytest.raises(NotFound):
            history.file_of(history.get(ids[rel]))  # nothing outside outputs is served
    for item_id in ids.values():
        history.delete(item_id)
    assert not (outputs / "inside.png").is_symlink() and not (outputs / "out.png").is_symlink()
    assert target.is_file() and victim.is_file() and (outside / "sub" / "x.png").is_file()
    assert history.count() == 1 and history.file_of(history.get(keep)) == target
    history.close()


def test_a_damaged_or_unwritable_hash_cache_only_means_hashing_again(tmp_path):
    """cache.sqlite3 is best effort: a damaged file or a home where it cannot be made never fails a listing."""
    from darkroom.models.hashing import HashCache, sha256_file

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x" * 1000)
    damaged = tmp_path / "damaged.sqlite3"
    damaged.write_bytes(b"not a database" * 100)
    for db in (damaged, tmp_path / "a-file" / "under-a-file.sqlite3"):
        if db.parent.name == "a-file":
            db.parent.write_text("a file where the folder should be")
        cache = HashCache(db)
        assert cache.sha256(model) == sha256_file(model)
        assert cache.records() == [] and cache.recorded(model) is None
        cache.record(model, "0" * 64, size=1000, mtime_ns=1)
        cache.forget(model)


@pytest.mark.parametrize("change", ["deleted", "truncated"])
def test_a_model_that_vanishes_or_changes_between_listing_and_loading(tmp_path, tiny_model, change):
    """Listed, then deleted or truncated before its job runs: the job fails with a line naming the
    file (never 'internal error'), and the next job works once the file is back."""
    from tests.server_util import FAST, client, studio_with, wait_job

    studio = studio_with(Home(tmp_path / "home"), tiny_model("sd1")["path"], start=False)  # the job waits
    model = studio.home.checkpoints / "tiny-sd1.safetensors"
    original = model.read_bytes()
    try:
        with client(studio) as api:
            job = api.post("/api/jobs", json={"prompt": "x", **FAST, "model": "tiny-sd1"}).json()["job"]
            if change == "deleted":
                model.unlink()
            else:
                model.write_bytes(original[:5000])
            studio.queue.start()
            done = wait_job(api, job["id"])
            assert done["state"] == "error" and "internal" not in done["error"]
            assert (f"not found: {model}" if change == "deleted" else "tiny-sd1.safetensors: not a valid") \
                in done["error"]
            model.write_bytes(original)
            again = api.post("/api/jobs", json={"prompt": "x", **FAST, "model": "tiny-sd1"}).json()["job"]
            assert wait_job(api, again["id"])["state"] == "done"
    finally:
        studio.close()
