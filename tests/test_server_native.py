"""The native /api the web UI speaks, in process (httpx-based TestClient over the ASGI app)."""

from __future__ import annotations

import io
import json
import re
import threading
import time

import httpx
import pytest
from PIL import Image

from darkroom.metadata.images import encode_png
from tests.server_util import FAST, HANG_GUARD, live_server, wait_job


def submit(api, **fields) -> dict:
    r = api.post("/api/jobs", json={"prompt": "a red circle", **FAST, **fields})
    assert r.status_code == 202, r.text
    return r.json()["job"]


def test_status_models_samplers(api):
    status = api.get("/api/status").json()
    assert status["device"] == "cpu" and status["current_model"] == "tiny-sd1"
    models = {m["name"]: m for m in api.get("/api/models").json()}
    assert set(models) == {"tiny-sd1", "darkroom-starter"}
    assert models["tiny-sd1"]["current"] and len(models["tiny-sd1"]["hash"]) == 10
    assert models["darkroom-starter"]["native_size"] == 128
    names = [s["name"] for s in api.get("/api/samplers").json()]
    assert "DPM++ 2M" in names and "Euler a" in names
    assert "Karras" in api.get("/api/schedules").json()


def test_job_runs_saves_and_indexes(api, studio):
    job = submit(api, seed=11, batch_size=2)
    assert job["state"] in ("queued", "running")
    done = wait_job(api, job["id"])
    assert done["state"] == "done" and done["error"] is None
    assert [im["seed"] for im in done["images"]] == [11, 12]
    assert done["progress"] == 1.0 and done["preview_url"]
    png = api.get(done["images"][0]["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (64, 64) and "Seed: 11" in image.info["parameters"]
    files = sorted(studio.home.outputs.rglob("*.png"))
    assert len(files) == 2 and files[0].parent.parent.name == "txt2img"  # outputs/txt2img/<date>/00000-11.png
    assert files[0].name == "00000-11.png"
    history = api.get("/api/history").json()
    assert history["total"] == 2
    assert history["items"][0]["seed"] == 12  # newest first
    assert history["items"][0]["request"]["prompt"] == "a red circle"
    preview = api.get(done["preview_url"])
    assert preview.status_code == 200 and Image.open(io.BytesIO(preview.content)).size[0] >= 64


def test_private_job_writes_nothing(api, studio):
    done = wait_job(api, submit(api, private=True, seed=3)["id"])
    assert done["state"] == "done" and len(done["images"]) == 1
    assert done["images"][0]["history_id"] is None
    assert api.get(done["images"][0]["url"]).status_code == 200  # served from memory
    assert not list(studio.home.outputs.rglob("*.png"))
    assert api.get("/api/history").json()["total"] == 0


def test_same_seed_same_image(api):
    a = wait_job(api, submit(api, seed=42, private=True)["id"])
    b = wait_job(api, submit(api, seed=42, private=True)["id"])
    assert api.get(a["images"][0]["url"]).content == api.get(b["images"][0]["url"]).content


@pytest.mark.parametrize("body, fragment", [
    ({"width": 513}, "width 513 is not a multiple of 8"),
    ({"sampler": "Euler z"}, "unknown sampler 'Euler z'"),
    ({"steps": 0}, "steps"),
    ({"model": "no-such-model"}, "no-such-model"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_requests_are_clear(api, body, fragment):
    r = api.post("/api/jobs", json={"prompt": "x", **body})
    assert r.status_code == (404 if "model" in body else 422), r.text  # a missing model: at once, not when it runs
    assert fragment in r.json()["error"] and "Traceback" not in r.text


def test_history_search_paging_delete(api, studio):
    for prompt in ("a blue square", "a red circle", "a red star"):
        wait_job(api, submit(api, prompt=prompt)["id"])
    assert api.get("/api/history", params={"q": "red"}).json()["total"] == 2
    assert api.get("/api/history", params={"q": "RED star"}).json()["total"] == 1
    assert api.get("/api/history", params={"q": "100%_"}).json()["total"] == 0  # LIKE wildcards are literal
    page = api.get("/api/history", params={"per_page": 2, "page": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 1 and page["items"][0]["prompt"] == "a blue square"
    item = page["items"][0]
    path = studio.history.file_of(studio.history.get(item["id"]))
    assert api.delete(f"/api/history/{item['id']}").json() == {"deleted": item["id"]}
    assert not path.exists()
    assert api.get(f"/api/images/{item['id']}").status_code == 404
    assert api.get("/api/history").json()["total"] == 2


def test_interrupt_keeps_finished_images(api):
    job = submit(api, steps=50, n_iter=100, seed=1)  # far more batches than a loaded machine makes meanwhile
    deadline = time.monotonic() + HANG_GUARD
    while True:  # wait until the first batch is finished
        state = api.get(f"/api/jobs/{job['id']}").json()
        if state["images"]:
            break
        assert time.monotonic() < deadline and state["state"] != "done"
        time.sleep(0.02)
    api.post(f"/api/jobs/{job['id']}/interrupt")
    done = wait_job(api, job["id"])
    assert done["state"] == "interrupted" and 1 <= len(done["images"]) < 100


def test_png_info_upload(api):
    png = encode_png(Image.new("RGB", (8, 8)), "a cat\nSteps: 9, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 64x64")
    r = api.post("/api/png-info", files={"file": ("x.png", png, "image/png")})
    body = r.json()
    assert body["format"] == "AUTOMATIC1111" and body["request"]["steps"] == 9 and body["request"]["seed"] == 7
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    r = api.post("/api/png-info", files={"file": ("plain.png", plain.getvalue(), "image/png")})
    assert r.status_code == 200 and r.json()["parameters"] is None
    r = api.post("/api/png-info", files={"file": ("bad.png", b"\x89PNG\r\n\x1a\nnot really", "image/png")})
    assert r.status_code == 400 and "bad.png" in r.json()["error"]


def test_ui_page_and_openapi(api):
    page = api.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    refs = re.findall(r"""(?:src|href|action)\s*=\s*["']([^"']*)""", page.text)
    assert refs and all(r.startswith(("/", "#", "data:")) for r in refs), refs  # nothing from outside
    schema = api.get("/api/openapi.json").json()
    assert "/api/jobs" in schema["paths"]
    docs = api.get("/docs")  # Darkroom's own offline help, not Swagger UI (which loads scripts from a CDN)
    assert docs.status_code == 200 and "swagger" not in docs.text.lower() and "<script" not in docs.text


def test_models_select_and_rescan(api, studio):
    rows = api.post("/api/models/select", json={"model": "darkroom-starter"}).json()
    assert [r["name"] for r in rows if r["current"]] == ["darkroom-starter"]
    assert studio.settings.get("current_model") == "darkroom-starter"
    r = api.post("/api/models/select", json={"model": "nope"})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    (studio.home.checkpoints / "broken.safetensors").write_bytes(b"\x00" * 20)
    rows = api.post("/api/models/rescan").json()
    assert any(r["name"] == "broken" and r["error"] for r in rows)


def test_events_stream_progress(studio):
    """Server-sent events over a real socket carry step progress and the finished images."""
    with live_server(studio) as url:
        seen: list[dict] = []
        connected = threading.Event()

        def listen():
            with httpx.stream("GET", f"{url}/api/events", timeout=HANG_GUARD) as r:
                event = None
                for line in r.iter_lines():
                    connected.set()
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "job":
                        seen.append(json.loads(line[6:]))
                        if seen[-1]["state"] == "done":
                            return

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        assert connected.wait(HANG_GUARD)  # the stream is open before the job starts
        httpx.post(f"{url}/api/jobs", json={"prompt": "x", **FAST, "steps": 150}, timeout=HANG_GUARD)
        t.join(HANG_GUARD)
    # events are snapshots (a slow reader sees the latest state), so steps rise but may skip
    steps = [s["step"] for s in seen if s["state"] == "running"]
    assert len(steps) >= 3 and steps == sorted(steps) and 0 < steps[-2] < 150
    assert seen[-1]["state"] == "done" and len(seen[-1]["images"]) == 1


def test_img2img_job_with_base64_images(api, studio):
    import base64

    src = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 160, 30)).save(src, format="PNG")
    mask = io.BytesIO()
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (0, 0, 32, 32))
    m.save(mask, format="PNG")
    b64 = base64.b64encode(src.getvalue()).decode()
    job = submit(api, width=None, height=None, init_image="data:image/png;base64," + b64,
                 mask=base64.b64encode(mask.getvalue()).decode(), mask_blur=0, denoising_strength=0.8)
    assert job["request"]["init_image"].startswith("<")  # not echoed back in full
    done = wait_job(api, job["id"])
    assert done["state"] == "done", done["error"]
    out = Image.open(io.BytesIO(api.get(done["images"][0]["url"]).content)).convert("RGB")
    assert out.getpixel((60, 60)) == (30, 160, 30)
    assert list((studio.home.outputs / "img2img").rglob("*.png"))
    r = api.post("/api/jobs", json={"prompt": "x", "init_image": "###"})
    assert r.status_code == 422 or wait_job(api, r.json()["job"]["id"])["state"] == "error"


def test_xy_grid_job(api, studio):
    axes = {a["name"]: a for a in api.get("/api/xy/axes").json()}
    assert "Steps" in axes and "Sampler" in axes and axes["Steps"]["field"] == "steps"
    job = submit(api, seed=4, xy={"x": "steps=2,3", "y": "cfg=1,5"})
    done = wait_job(api, job["id"])
    assert done["state"] == "done" and len(done["images"]) == 4, done["error"]
    assert {im["seed"] for im in done["images"]} == {4}
    grid = Image.open(io.BytesIO(api.get(done["grid_url"]).content))
    assert grid.width >= 128 and grid.height >= 128 and "X Type: Steps" in grid.info["parameters"]
    assert list((studio.home.outputs / "txt2img-grids").rglob("grid-*.png"))
    r = api.post("/api/jobs", json={"prompt": "x", **FAST, "xy": {"x": "sampler=Euler,Nope"}})
    assert r.status_code == 422 and "Nope" in r.json()["error"]


def test_extra_network_lists(api, studio, tiny_model):
    from darkroom.testing.tiny_lora import write_tiny_lora

    write_tiny_lora(studio.home.loras / "inked.safetensors", tiny_model("sd1"), tag_frequency={"set": {"ink": 5}})
    loras = api.get("/api/loras").json()
    assert [(lo["name"], lo["trigger_words"][:1]) for lo in loras] == [("inked", ["ink"])]
    assert api.get("/api/vaes").json() == []
    assert api.get("/api/embeddings").json() == {"loaded": [], "skipped": []}


def test_model_previews(api, studio):
    Image.new("RGB", (16, 16), (1, 2, 3)).save(studio.home.checkpoints / "tiny-sd1.preview.png")
    rows = {r["name"]: r for r in api.post("/api/models/rescan").json()}
    assert rows["tiny-sd1"]["preview_url"] == "/api/models/tiny-sd1/preview"
    assert rows["darkroom-starter"]["preview_url"] is None
    r = api.get(rows["tiny-sd1"]["preview_url"])
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).getpixel((0, 0)) == (1, 2, 3)
    for bad in ("darkroom-starter", "..%2F..%2Fetc%2Fpasswd", "nope"):
        assert api.get(f"/api/models/{bad}/preview").status_code == 404


def test_listing_never_hashes_and_background_hashing_fills_in(tmp_path, tiny_model, monkeypatch):
    """A new model shows without a hash at once; the background pass hashes it, with progress in /api/status."""
    import shutil

    from darkroom.home import Home
    from darkroom.services.studio import build_studio
    from tests.server_util import client

    home = Home(tmp_path / "h").ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "fresh.safetensors")
    studio = build_studio(home, device="cpu", precision="fp32", start=False)
    try:
        with client(studio) as c:
            rows = {r["name"]: r for r in c.get("/api/models").json()}
            assert rows["fresh"]["hash"] is None  # listed at once, not hashed on the spot
            studio.hash_missing().join(HANG_GUARD)
            rows = {r["name"]: r for r in c.get("/api/models").json()}
            assert len(rows["fresh"]["hash"]) == 10 and c.get("/api/status").json()["hashing"] is None
    finally:
        studio.close()
