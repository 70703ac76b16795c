"""History for many images (issue 19): small cached thumbnails, search over every field, favourites,
bulk delete, and an older database (no favourite column) that still opens."""

from __future__ import annotations

import os
import sqlite3

import pytest
from PIL import Image, ImageDraw

from darkroom.home import Home
from darkroom.metadata.images import encode_png
from darkroom.services.history import History
from tests.server_util import client, studio_with

SAMPLERS = ("Euler a", "DPM++ 2M", "DDIM")


def infotext(n: int) -> str:
    return (f"a red circle number {n}\nNegative prompt: blurry {n}\nSteps: 20, Sampler: {SAMPLERS[n % 3]},"
            f" CFG scale: 7, Seed: {1000 + n}, Size: 1024x1024, Model: model-{n % 2}")


def write_image(home: Home, n: int, side: int = 1024) -> os.PathLike:
    """A 1024x1024 PNG with detail in it (gradient, shapes, noise): not a trivially small thumbnail."""
    noise = Image.effect_noise((side, side), 40).convert("RGB")
    im = Image.linear_gradient("L").resize((side, side)).convert("RGB")
    im = Image.blend(im, noise, 0.35)
    draw = ImageDraw.Draw(im)
    k = n % 24
    draw.ellipse((100 + k * 10, 200, 700, 800 - k * 5), fill=(200, 40 + k * 5, 30))
    path = home.outputs / "txt2img" / f"{n:05d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(im, infotext(n)))
    return path


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """An in-process client over a home with 24 1024x1024 images in its history."""
    home = Home(tmp_path_factory.mktemp("history-home")).ensure()
    studio = studio_with(home, start=False)
    for n in range(24):
        studio.history.add(write_image(home, n), infotext(n), created=1_000_000 + n)
    with client(studio) as c:
        yield c, studio
    studio.close()


def test_a_page_of_24_thumbnails_is_under_2_mb(api):
    c, studio = api
    page = c.get("/api/history", params={"per_page": 24}).json()
    assert len(page["items"]) == 24
    total = 0
    for item in page["items"]:
        r = c.get(item["thumb_url"])
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"
        assert "no-cache" in r.headers["cache-control"] and r.headers["etag"]
        with Image.open(studio.history.thumbnail(studio.history.get(item["id"]))) as im:
            assert max(im.size) == 256
        total += len(r.content)
        full = len(c.get(item["url"]).content)
        assert len(r.content) * 20 < full, "a thumbnail should be a small fraction of its image"
    assert total < 2_000_000, f"24 thumbnails took {total} bytes"
    # the browser revalidates with the ETag: nothing is sent again
    again = c.get(page["items"][0]["thumb_url"], headers={"if-none-match": r.headers["etag"]})
    assert again.status_code in (200, 304)
    last = page["items"][-1]
    etag = c.get(last["thumb_url"]).headers["etag"]
    assert c.get(last["thumb_url"], headers={"if-none-match": etag}).status_code == 304


def test_thumbnails_are_made_once_and_remade_when_the_image_changes(api):
    c, studio = api
    item = studio.history.search("number 3")[1][0]
    thumb = studio.history.thumbnail(item)
    assert thumb.parent == studio.home.root / "cache" / "thumbs"
    made = thumb.stat().st_ino, thumb.read_bytes()
    assert (studio.history.thumbnail(item).stat().st_ino, thumb.read_bytes()) == made  # cached, not rewritten
    source = studio.history.file_of(item)
    Image.new("RGB", (1024, 1024), "blue").save(source)
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    r = c.get(f"/api/history/{item.id}/thumb")
    with Image.open(thumb) as im:
        assert im.convert("RGB").getpixel((128, 128)) == pytest.approx((0, 0, 255), abs=8)
    assert r.content == thumb.read_bytes() != made[1]


def test_search_by_seed_sampler_model_and_negative_prompt(api):
    c, _ = api
    def ids(q, **kw):
        return [i["seed"] for i in c.get("/api/history", params={"q": q, "per_page": 100, **kw}).json()["items"]]

    assert ids("1007") == [1007]  # the seed, exactly (not 10070 or a prompt containing it)
    assert sorted(ids("DPM++ 2M")) == [1000 + n for n in range(24) if n % 3 == 1]
    assert sorted(ids("ddim model-0")) == [1000 + n for n in range(24) if n % 3 == 2 and n % 2 == 0]
    assert ids("blurry 11") == [1011]
    assert ids("nothing-like-this") == []


def test_favourite_and_filter(api):
    c, studio = api
    items = c.get("/api/history", params={"q": "number 5"}).json()["items"]
    assert items and not items[0]["favourite"]
    r = c.put(f"/api/history/{items[0]['id']}/favourite", json={"favourite": True})
    assert r.status_code == 200 and r.json()["favourite"] is True
    fav = c.get("/api/history", params={"favourites": "true"}).json()
    assert fav["total"] == 1 and fav["items"][0]["id"] == items[0]["id"]
    other = next(s for s in SAMPLERS if s != items[0]["sampler"])
    assert c.get("/api/history", params={"favourites": "true", "q": items[0]["sampler"]}).json()["total"] == 1
    assert c.get("/api/history", params={"favourites": "true", "q": other}).json()["total"] == 0
    c.put(f"/api/history/{items[0]['id']}/favourite", json={"favourite": False})
    assert c.get("/api/history", params={"favourites": "true"}).json()["total"] == 0
    r = c.put("/api/history/999999/favourite", json={"favourite": True})
    assert r.status_code == 404 and "no image 999999" in r.json()["error"]


def test_bulk_delete_in_one_request_keeps_link_targets(api, tmp_path):
    c, studio = api
    outside = tmp_path / "precious.png"
    Image.new("RGB", (32, 32), "green").save(outside)
    link = write_image(studio.home, 99)
    link_id = studio.history.add(link, infotext(99))
    link.unlink()
    link.symlink_to(outside)  # an entry whose file became a link (a restored backup, a hand edit)
    victims = [i["id"] for i in c.get("/api/history", params={"q": "number 2"}).json()["items"]][:2]
    thumbs = [studio.history.thumbnail(studio.history.get(i)) for i in victims]
    files = [studio.history.file_of(studio.history.get(i)) for i in victims]
    before = studio.history.count()
    r = c.post("/api/history/delete", json={"ids": [*victims, link_id, 424242]})
    assert r.status_code == 200
    assert r.json() == {"deleted": [*victims, link_id], "missing": [424242]}
    assert studio.history.count() == before - 3
    assert not any(p.exists() for p in files + thumbs)
    assert not link.is_symlink() and outside.read_bytes()  # the link went, its target stayed
    assert c.post("/api/history/delete", json={"ids": []}).status_code == 422


def test_an_old_database_without_favourites_opens_and_keeps_its_rows(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    db_path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(db_path)
    db.executescript("""CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, created REAL NOT NULL,
        prompt TEXT NOT NULL DEFAULT '', negative_prompt TEXT NOT NULL DEFAULT '', seed INTEGER, width INTEGER,
        height INTEGER, model TEXT, sampler TEXT, steps INTEGER, cfg_scale REAL, infotext TEXT NOT NULL DEFAULT '',
        job_id TEXT);
        INSERT INTO images (path, created, prompt, seed, sampler) VALUES ('a.png', 1, 'an old cat', 5, 'Euler');""")
    db.commit()
    db.close()
    Image.new("RGB", (8, 8)).save(outputs / "a.png")
    history = History(db_path, outputs)
    total, items = history.search("cat")
    assert total == 1 and items[0].prompt == "an old cat" and items[0].favourite is False
    assert history.set_favourite(items[0].id, True).favourite is True
    assert history.search("", favourites=True)[0] == 1
    history.close()
    assert not list(tmp_path.glob("history.sqlite3.corrupt-*")), "the old database was migrated, not set aside"
