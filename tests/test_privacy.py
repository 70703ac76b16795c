"""Private files stay private: nothing outside Darkroom's folders is read, served or told about,
and a private job is seen in full only by the client that sent it (issue 16's privacy holes)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from tests.server_util import FAST, live_server, wait_job

SECRET = b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot really a key\n-----END OPENSSH PRIVATE KEY-----\n"


@pytest.fixture
def outside(tmp_path, tiny_model):
    """A checkpoint and a private file outside every models folder."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    model = folder / "stray.safetensors"
    shutil.copy(tiny_model("sd1")["path"], model)
    (folder / "id_ed25519").write_bytes(SECRET)
    return folder


# --- model references on the native API ------------------------------------------------------


def test_native_job_cannot_load_a_checkpoint_outside_the_library(api, studio, outside):
    r = api.post("/api/jobs", json={"prompt": "x", **FAST, "model": str(outside / "stray.safetensors")})
    assert r.status_code == 404, r.text
    assert "no model" in r.json()["error"] and "in the library" in r.json()["error"]
    assert studio.engine.cache.current is None or "stray" not in str(studio.engine.cache.current.path)
    # relative escapes from the models folder are the same
    rel = f"../../{outside.name}/stray.safetensors"
    assert api.post("/api/jobs", json={"prompt": "x", **FAST, "model": rel}).status_code == 404


def test_a_bare_name_is_never_opened_relative_to_the_servers_folder(api, outside, monkeypatch):
    monkeypatch.chdir(outside)  # "stray.safetensors" exists here, but is not in the library
    r = api.post("/api/jobs", json={"prompt": "x", **FAST, "model": "stray.safetensors"})
    assert r.status_code == 404 and "in the library" in r.json()["error"]


def test_native_errors_do_not_tell_which_files_exist(api, outside):
    there = api.post("/api/jobs", json={"prompt": "x", **FAST, "model": str(outside / "id_ed25519")})
    absent = api.post("/api/jobs", json={"prompt": "x", **FAST, "model": str(outside / "no-such-file")})
    assert there.status_code == absent.status_code == 404
    strip = lambda r, name: r.json()["error"].replace(str(outside / name), "PATH")  # noqa: E731
    assert strip(there, "id_ed25519") == strip(absent, "no-such-file")
    sel_there = api.post("/api/models/select", json={"model": str(outside / "id_ed25519")})
    sel_absent = api.post("/api/models/select", json={"model": str(outside / "no-such-file")})
    assert sel_there.status_code == sel_absent.status_code == 404


def test_select_refuses_outside_paths_and_keeps_working(api, studio, outside):
    r = api.post("/api/models/select", json={"model": str(outside / "stray.safetensors")})
    assert r.status_code == 404 and "in the library" in r.json()["error"]
    assert studio.settings.get("current_model") in (None, "tiny-sd1")
    done = wait_job(api, api.post("/api/jobs", json={"prompt": "x", **FAST}).json()["job"]["id"])
    assert done["state"] == "done", done["error"]
    assert done["model_name"] == "tiny-sd1"


def test_library_names_and_paths_inside_the_models_folder_still_work(api, studio):
    inside = studio.home.checkpoints / "tiny-sd1.safetensors"
    for ref in ("tiny-sd1", "tiny-sd1.safetensors", str(inside)):
        done = wait_job(api, api.post("/api/jobs", json={"prompt": "x", **FAST, "model": ref}).json()["job"]["id"])
        assert done["state"] == "done", (ref, done["error"])
    assert api.post("/api/models/select", json={"model": str(inside)}).status_code == 200


def test_vae_outside_the_library_is_refused(api, outside):
    r = api.post("/api/jobs", json={"prompt": "x", **FAST, "vae": str(outside / "id_ed25519")})
    assert r.status_code == 404 and "no VAE" in r.json()["error"]


def test_xy_axis_cannot_name_a_checkpoint_outside_the_library(api, outside):
    r = api.post("/api/jobs", json={"prompt": "x", **FAST,
                                    "xy": {"x": f"model=tiny-sd1,{outside / 'stray.safetensors'}"}})
    assert r.status_code in (404, 422) and "in the library" in r.json()["error"]


# --- private jobs in the live stream ---------------------------------------------------------


def _listen(url: str, client: str | None, seen: list[dict], stop_when_done: int = 1) -> threading.Thread:
    def run():
        params = {"client": client} if client else {}
        with httpx.stream("GET", f"{url}/api/events", params=params, timeout=600) as r:
            event = None
            done = 0
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "job":
                    seen.append(json.loads(line[6:]))
                    if seen[-1]["state"] in ("done", "error", "interrupted"):
                        done += 1
                        if done >= stop_when_done:
                            return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_event_stream_shows_a_private_job_only_to_its_owner(studio):
    with live_server(studio) as url:
        mine: list[dict] = []
        theirs: list[dict] = []
        listeners = [_listen(url, "tab-1", mine), _listen(url, "tab-2", theirs)]
        r = httpx.post(f"{url}/api/jobs", json={"prompt": "my secret prompt", **FAST, "private": True},
                       headers={"X-Darkroom-Client": "tab-1"}, timeout=60)
        job_id = r.json()["job"]["id"]
        for t in listeners:
            t.join(600)
        wait_job(httpx.Client(base_url=url, timeout=60), job_id)
    assert mine and theirs
    assert mine[-1]["id"] == job_id and mine[-1]["request"]["prompt"] == "my secret prompt"
    assert mine[-1]["images"]
    text = json.dumps(theirs)
    assert "my secret prompt" not in text and job_id not in text
    assert theirs[-1]["private"] and theirs[-1]["state"] == "done" and theirs[-1]["images"] == []
    assert theirs[-1]["preview_url"] is None and theirs[-1]["request"] is None


def test_a1111_progress_hides_a_private_jobs_picture(api, studio):
    job = api.post("/api/jobs", json={"prompt": "secret", **FAST, "steps": 400, "private": True}).json()["job"]
    try:
        state = api.get(f"/api/jobs/{job['id']}").json()
        while not state["preview_url"] and state["state"] in ("queued", "running"):  # until there is one to leak
            time.sleep(0.05)
            state = api.get(f"/api/jobs/{job['id']}").json()
        assert state["preview_url"]
        progress = api.get("/sdapi/v1/progress").json()
        assert progress["current_image"] is None
        assert "secret" not in json.dumps(progress)
    finally:
        api.post(f"/api/jobs/{job['id']}/interrupt")
        wait_job(api, job["id"])


# --- files arriving on a USB drive ------------------------------------------------------------


def _import(home, *args):
    from click.testing import CliRunner

    from darkroom.cli import cli

    return CliRunner().invoke(cli, ["--home", str(home.root), "models", "import", *args], catch_exceptions=False)


@pytest.fixture
def usb_with_links(tmp_path, tiny_model, outside):
    """A USB folder whose model's preview and .yaml are links to a private file elsewhere."""
    usb = tmp_path / "usb"
    usb.mkdir()
    shutil.copy(tiny_model("sd1")["path"], usb / "dream.safetensors")
    (usb / "dream.preview.png").symlink_to(outside / "id_ed25519")
    (usb / "dream.yaml").symlink_to(outside / "id_ed25519")
    (usb / "dream.civitai.info").write_text('{"ok": true}')  # a real sidecar still travels
    return usb


def test_import_skips_sidecars_that_link_out_of_the_source(home, usb_with_links, api_for):
    r = _import(home, str(usb_with_links))
    assert r.exit_code == 0, r.output
    assert (home.checkpoints / "dream.safetensors").is_file()
    assert (home.checkpoints / "dream.civitai.info").read_text() == '{"ok": true}'
    assert not (home.checkpoints / "dream.preview.png").exists()
    assert not (home.checkpoints / "dream.yaml").exists()
    for f in home.root.rglob("*"):
        assert not f.is_file() or SECRET not in f.read_bytes(), f
    api = api_for(home)
    rows = {m["name"]: m for m in api.get("/api/models").json()}
    assert rows["dream"]["preview_url"] is None
    assert api.get("/api/models/dream/preview").status_code == 404


def test_import_refuses_a_model_that_links_out_of_the_folder(home, tmp_path, outside):
    usb = tmp_path / "usb2"
    usb.mkdir()
    (usb / "stray.safetensors").symlink_to(outside / "stray.safetensors")
    r = _import(home, str(usb))
    assert "a link to a file outside" in r.output
    assert not list(home.checkpoints.iterdir())


def test_import_refuses_a_fifo_at_once(home, tmp_path):
    import os

    usb = tmp_path / "usb3"
    usb.mkdir()
    os.mkfifo(usb / "pipe.safetensors")
    for target in (usb, usb / "pipe.safetensors"):  # found in a folder, or named
        r = _import(home, str(target))  # a plain open() would block here for ever
        assert "a named pipe (FIFO), not a model file" in r.output, r.output
    assert not list(home.checkpoints.iterdir())


@pytest.fixture
def api_for(tmp_path):
    """api_for(home) -> an in-process client of a studio over that home (closed after the test)."""
    from tests.server_util import client, studio_with

    opened = []

    def make(home):
        studio = studio_with(home, start=False)
        c = client(studio).__enter__()
        opened.append((studio, c))
        return c

    yield make
    for studio, c in opened:
        c.__exit__(None, None, None)
        studio.close()


# --- backups arriving from outside ------------------------------------------------------------


@pytest.fixture
def backed_up(home, tmp_path):
    """A home with one settings file and one output, backed up to tmp/bk; -> (home, dest, object of the PNG)."""
    from tests import test_backup as tb

    tb.add_output(home, None, "00000-1.png", 1)
    assert tb.run(home, "backup", str(tmp_path / "bk")).exit_code == 0
    return home, tmp_path / "bk", tb.object_of(tmp_path / "bk", "outputs/txt2img/2024-05-01/00000-1.png")


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_restore_refuses_an_object_that_is_a_link_or_a_fifo(backed_up, tmp_path, outside, plant):
    import os

    from darkroom.home import Home
    from tests import test_backup as tb

    home, dest, obj = backed_up
    obj.unlink()
    if plant == "symlink":
        obj.symlink_to(outside / "id_ed25519")
    else:
        os.mkfifo(obj)
    fresh = Home(tmp_path / "fresh").ensure()
    r = tb.run(fresh, "restore", str(dest))  # a FIFO must not block, a link must not be followed
    last = tb.one_line_error(r, "damaged", "darkroom verify")
    assert "outputs/txt2img/2024-05-01/00000-1.png" in last
    for f in fresh.root.rglob("*"):
        assert not f.is_file() or SECRET not in f.read_bytes(), f
    assert not list(fresh.outputs.rglob("*.png"))
    v = tb.run(home, "verify", str(dest))
    assert v.exit_code == 1 and "corrupt: outputs/txt2img/2024-05-01/00000-1.png" in v.stdout

