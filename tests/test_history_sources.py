"""History keeps an img2img image's source and mask (issue 19): stored once per content under the home,
removed with the last image that refers to them, never for a private job, and a failed write loses nothing."""

from __future__ import annotations

import base64
import hashlib
import io
import logging

import pytest
from PIL import Image

from darkroom.errors import DarkroomError
from darkroom.home import Home
from darkroom.metadata.images import encode_png
from darkroom.services.history import History, NotFound
from tests.server_util import client, studio_with, wait_job
from tests.test_write_faults import FaultyDb

INFOTEXT = "a red circle\nSteps: 3, Sampler: Euler a, CFG scale: 7, Seed: {seed}, Size: 8x8, Denoising strength: 0.6"


def png_bytes(colour, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


SOURCE, MASK, OTHER = png_bytes((200, 10, 10)), png_bytes((255, 255, 255)), png_bytes((0, 90, 200))


def name_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() + ".png"


@pytest.fixture
def hist(tmp_path):
    home = Home(tmp_path / "home").ensure()
    h = History(home.root / "history.sqlite3", home.outputs)
    yield h
    h.close()


def result(h: History, n: int):
    path = h.outputs / "img2img" / f"{n:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(Image.new("RGB", (8, 8), (n, n, n)), INFOTEXT.format(seed=n)))
    return path


def stored(h: History) -> set[str]:
    return {p.name for p in h.sources.iterdir()} if h.sources.is_dir() else set()


def test_a_source_used_by_many_images_is_stored_once_and_removed_with_the_last(hist):
    ids = [hist.add(result(hist, n), INFOTEXT.format(seed=n), source=SOURCE, mask=MASK) for n in range(20)]
    other = hist.add(result(hist, 20), INFOTEXT.format(seed=20), source=OTHER)
    plain = hist.add(result(hist, 21), INFOTEXT.format(seed=21))
    assert hist.sources == hist.db_path.parent / "history-sources"
    assert stored(hist) == {name_of(SOURCE), name_of(MASK), name_of(OTHER)}
    item = hist.get(ids[3])
    assert (item.source, item.mask) == (name_of(SOURCE), name_of(MASK))
    assert hist.source_file(item).read_bytes() == SOURCE
    assert hist.source_file(item, "mask").read_bytes() == MASK
    assert (hist.get(other).source, hist.get(other).mask) == (name_of(OTHER), None)
    with pytest.raises(NotFound):
        hist.source_file(hist.get(plain))  # a txt2img image has none
    with pytest.raises(NotFound):
        hist.source_file(hist.get(other), "mask")
    assert {i.source for i in hist.search(per_page=500)[1]} == {name_of(SOURCE), name_of(OTHER), None}

    for item_id in ids[:-1]:
        hist.delete(item_id)
        assert name_of(SOURCE) in stored(hist)  # still used by the others
    hist.delete_many([ids[-1], other])
    assert stored(hist) == set()  # the last image that used them is gone: so are they
    assert hist.get(plain).source is None


def test_reconcile_forgets_the_sources_of_vanished_images_and_leftovers(hist):
    a = hist.add(result(hist, 1), INFOTEXT.format(seed=1), source=SOURCE, mask=MASK)
    hist.add(result(hist, 2), INFOTEXT.format(seed=2), source=SOURCE)
    (hist.sources / name_of(OTHER)).write_bytes(OTHER)  # written by a crash before its row came
    (hist.sources / f".{name_of(OTHER)}.1.2.part").write_bytes(b"half")
    (hist.sources / "notes.txt").write_text("the user's own")  # not ours: left alone
    hist.file_of(hist.get(a)).unlink()  # the user removed the image file
    assert hist.reconcile() == (0, 1)
    assert stored(hist) == {name_of(SOURCE), "notes.txt"}


def test_a_source_that_cannot_be_written_costs_only_the_source(tmp_path, caplog):
    home = Home(tmp_path / "home").ensure()
    blocked = home.root / "blocked"
    blocked.write_text("a file where the folder should be")  # mkdir fails: as a read-only or full disk would
    h = History(home.root / "history.sqlite3", home.outputs, sources=blocked / "sources")
    with caplog.at_level(logging.WARNING, logger="darkroom.history"):
        item_id = h.add(result(h, 1), INFOTEXT.format(seed=1), source=SOURCE, mask=MASK)
    item = h.get(item_id)
    assert item.prompt == "a red circle" and item.source is None and item.mask is None  # indexed, no source
    assert any("indexed without it" in r.getMessage() for r in caplog.records)
    h.close()


def test_a_failed_database_write_leaves_no_stored_source_behind(hist):
    keep = hist.add(result(hist, 1), INFOTEXT.format(seed=1), source=SOURCE)
    before = hist.search(per_page=500)
    real = hist._db
    for at in (1, 2, 3):  # BEGIN, the image row, the sources row
        hist._db = FaultyDb(real, at, "full")
        try:
            with pytest.raises(DarkroomError):
                hist.add(result(hist, 2), INFOTEXT.format(seed=2), source=SOURCE, mask=MASK)
        finally:
            hist._db = real
        assert hist.search(per_page=500) == before  # rows as they were
        assert stored(hist) == {name_of(SOURCE)}  # the mask written for the failed row is gone; the shared source stays
    assert hist.get(keep).source == name_of(SOURCE)
    new = hist.add(result(hist, 2), INFOTEXT.format(seed=2), source=SOURCE, mask=MASK)  # the next try works
    assert hist.get(new).mask == name_of(MASK)


def test_sources_survive_reopening_and_an_older_database_gains_the_table(tmp_path):
    home = Home(tmp_path / "home").ensure()
    h = History(home.root / "history.sqlite3", home.outputs)
    item_id = h.add(result(h, 1), INFOTEXT.format(seed=1), source=SOURCE, mask=MASK)
    h._db.execute("DROP TRIGGER images_forget_sources")
    h._db.execute("DROP TABLE image_sources")  # as a database from before this change
    h.close()
    h = History(home.root / "history.sqlite3", home.outputs)
    assert h.get(item_id).source is None  # opens; the old item simply has no source
    again = h.add(result(h, 2), INFOTEXT.format(seed=2), source=SOURCE)
    h.close()
    h = History(home.root / "history.sqlite3", home.outputs)
    assert h.get(again).source == name_of(SOURCE)
    h.close()


# ---------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model):
    home = Home(tmp_path_factory.mktemp("sources-home")).ensure()
    studio = studio_with(home, tiny_model("sd1")["path"])
    with client(studio) as c:
        yield c, studio
    studio.close()


def job(c, **extra) -> dict:
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 7, "sampler": "Euler",
            "model": "tiny-sd1", "denoising_strength": 0.5, **extra}
    r = c.post("/api/jobs", json=body)
    assert r.status_code == 202, r.text
    state = wait_job(c, (r.json().get("job") or r.json())["id"])
    assert state["state"] == "done", state
    return state


def test_an_img2img_jobs_history_item_serves_its_source_and_mask(api):
    c, studio = api
    source, mask = png_bytes((10, 200, 10), (64, 64)), png_bytes((255, 255, 255), (64, 64))
    state = job(c, init_image=base64.b64encode(source).decode(),
                mask="data:image/png;base64," + base64.b64encode(mask).decode())
    item = c.get(f"/api/history/{state['images'][0]['history_id']}").json()
    assert item["source_url"] == f"/api/history/{item['id']}/source"
    r = c.get(item["source_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == source
    r = c.get(item["mask_url"])
    assert r.status_code == 200 and r.content == mask
    assert any(i["id"] == item["id"] and i["mask_url"] for i in c.get("/api/history").json()["items"])
    assert item["request"]["denoising_strength"] == 0.5  # settings come back with the images

    txt = job(c)  # a txt2img image has neither: a clear 404, never a 500
    item = c.get(f"/api/history/{txt['images'][0]['history_id']}").json()
    assert item["source_url"] is None and item["mask_url"] is None
    r = c.get(f"/api/history/{item['id']}/source")
    assert r.status_code == 404 and "no stored source image" in r.text
    assert c.get("/api/history/99999999/mask").status_code == 404
    assert c.get("/api/history/abc/source").status_code == 422


def test_a_private_img2img_job_stores_nothing(api):
    c, studio = api
    before = stored(studio.history)
    source = png_bytes((1, 2, 250), (64, 64))
    state = job(c, init_image=base64.b64encode(source).decode(), private=True)
    assert state["images"] and state["images"][0]["history_id"] is None
    assert stored(studio.history) == before and name_of(source) not in before
