"""The queue panel, the result viewer and moving images between tools (issue 19).

The server side (GET /api/queue, cancelling a waiting job, the job's stage and ETA) in-process; the
web UI in a real headless browser with the fixtures of tests/test_ui_browser.py (this module gets its
own live server). Long jobs are 500 steps on the tiny model, ended by the test as soon as it has seen
what it waits for; every wait is on a state, with minutes-long guards only against a hang.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from darkroom.request import GenerationRequest
from darkroom.services.jobs import Job
from tests.server_util import HANG_GUARD, wait_job

LONG = {"steps": 500, "width": 64, "height": 64, "sampler": "Euler", "n_iter": 20, "model": "tiny-sd1"}


# ------------------------------------------------------------------------------------------ server


def _wait_state(api, job_id: str, *states: str) -> dict:
    deadline = time.monotonic() + HANG_GUARD
    while time.monotonic() < deadline:
        s = api.get(f"/api/jobs/{job_id}").json()
        if s["state"] in states or s.get("stage") in states:
            return s
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}")


def test_queue_lists_every_job_and_cancels_a_waiting_one(api, studio):
    body = {**LONG, "model": None}
    running = api.post("/api/jobs", json={"prompt": "the long one", **body}, headers={"X-Darkroom-Client": "tab-1"})
    waiting = api.post("/api/jobs", json={"prompt": "my secret prompt", **body, "private": True},
                       headers={"X-Darkroom-Client": "tab-1"})
    run_id, wait_id = running.json()["job"]["id"], waiting.json()["job"]["id"]
    _wait_state(api, run_id, "sampling")

    mine = api.get("/api/queue", params={"client": "tab-1"}).json()
    assert [j["id"] for j in mine["jobs"]] == [run_id, wait_id]
    assert mine["pending"] == 1 and mine["running"] is True
    first, second = mine["jobs"]
    assert first["stage"] == "sampling" and first["mine"] and first["source"] == "ui" and first["position"] == 0
    assert second["stage"] == "queued" and second["position"] == 1 and second["request"]["prompt"] == "my secret prompt"

    # another tab sees the private job as the event stream shows it: no prompt, no id, an alias
    theirs = api.get("/api/queue", params={"client": "tab-2"}).json()["jobs"]
    assert "my secret prompt" not in str(theirs) and wait_id not in str(theirs)
    alias = theirs[1]["id"]
    assert alias.startswith("private-") and theirs[1]["stage"] == "queued" and not theirs[1]["mine"]

    # the alias cancels the waiting job (and opens nothing of it); the running one goes on
    r = api.post(f"/api/queue/{alias}/cancel", headers={"X-Darkroom-Client": "tab-2"})
    assert r.status_code == 200 and r.json()["stage"] == "stopped" and r.json()["request"] is None
    assert api.get(f"/api/jobs/{wait_id}").json()["state"] == "interrupted"
    assert api.get(f"/api/jobs/{run_id}").json()["state"] == "running"
    again = api.post(f"/api/queue/{alias}/cancel")
    assert again.status_code == 404 and "waiting or running" in again.json()["error"]

    # the running job: cancel by its id stops it
    r = api.post(f"/api/queue/{run_id}/cancel")
    assert r.json()["stage"] in ("stopping", "stopped")
    assert wait_job(api, run_id)["state"] == "interrupted"
    ended = api.get("/api/queue").json()["jobs"]
    assert {j["stage"] for j in ended} == {"stopped"}


def test_skip_route_answers_without_an_id(api):
    assert api.post("/api/skip").json() == {"skipped": False}


def test_stage_and_a_steady_eta():
    job = Job(request=GenerationRequest(steps=10, n_iter=2, batch_size=2))
    assert job.stage == "queued" and job.images_total == 4 and job.eta is None
    job.state = "running"
    assert job.stage == "loading"
    job.steps, job.step, job.steps_done = 10, 3, 3
    now = time.time()
    job.sampling_started, job.last_step_at = now - 2.0, now  # 2 s for steps 1 -> 3: 1 s a step
    assert job.stage == "sampling"
    assert 15.0 < job.eta <= 17.0  # 17 steps left at the mean step time, not the last step's
    job.last_step_at = now - 1.0  # a second after that step, the ETA has counted down by a second
    job.sampling_started = now - 3.0
    assert 15.0 < job.eta <= 16.0
    job.step = 10
    assert job.stage == "decoding"
    job.cancel.set()
    assert job.stage == "stopping"
    for state, stage in (("done", "done"), ("error", "failed"), ("interrupted", "stopped")):
        job.state = state
        assert job.stage == stage


# ------------------------------------------------------------------------------------------ browser

sync_api = pytest.importorskip("playwright.sync_api", reason="headless browser tests need the playwright package")
import tests.test_ui_browser as ui  # noqa: E402
from tests.test_ui_browser import base_url, browser, expect, open_page, shot  # noqa: E402,F401

TEXTS_JS = """() => {
    window.__texts = [];
    const t = document.getElementById('progress-text');
    new MutationObserver(() => window.__texts.push(t.textContent))
        .observe(t, {childList: true, characterData: true, subtree: true});
}"""

PREVIEW_JS = """() => {
    window.__previewSizes = [];
    const pv = document.getElementById('preview');
    new MutationObserver(() => {
        if (pv.hidden || !pv.getAttribute('src') || !pv.closest('#results')) return;
        const r = pv.getBoundingClientRect();
        if (r.width) window.__previewSizes.push([Math.round(r.width), Math.round(r.height)]);
    }).observe(pv, {attributes: true, attributeFilter: ['src', 'hidden', 'width', 'height']});
}"""


def _stop_all(base: str) -> None:
    """End whatever a test left running or waiting, so the next test starts on an empty queue."""
    for j in httpx.get(f"{base}/api/queue", timeout=60).json()["jobs"]:
        if j["state"] in ("queued", "running"):
            httpx.post(f"{base}/api/queue/{j['id']}/cancel", timeout=60)
    deadline = time.monotonic() + HANG_GUARD
    while httpx.get(f"{base}/api/queue", timeout=60).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)


def _generate(page, prompt: str, *, steps: int = 3, batch: int = 1) -> None:
    page.select_option("#model", "tiny-sd1")
    expect(page.locator(".toast", has_text="Model ready: tiny-sd1")).to_be_visible()
    page.fill("#prompt", prompt)
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", str(steps))
    page.fill("#batch-size", str(batch))
    page.select_option("#sampler", "Euler")
    page.click("#generate")


def test_api_clients_job_in_the_panel_and_interrupt_from_another_page(open_page, base_url, tmp_path):
    page, rec = open_page()
    other, rec2 = open_page()
    out: dict = {}
    body = {"prompt": "an api client's picture", **LONG, "save_images": True}
    blocker = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
        f"{base_url}/sdapi/v1/txt2img", json=body, timeout=HANG_GUARD)))
    blocker.start()
    try:
        row = page.locator("#queue-list .queue-row", has_text="an api client's picture")
        expect(row.locator(".queue-source")).to_have_text("A1111 API")
        expect(row.locator(".queue-stage")).to_have_text(re.compile(r"^Step \d+ / 500"))
        expect(page.locator("#interrupt")).to_be_enabled()  # any tab may stop the running job
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^A1111 API: Step \d+ / 500"))
        shot(page, tmp_path, "queue-panel-desktop.png")
        # the other page interrupts it from its panel
        other.locator("#queue-list .queue-row", has_text="an api client's picture").locator(".queue-interrupt").click()
        blocker.join(HANG_GUARD)
        assert out["r"].status_code == 200
        expect(row.locator(".queue-stage")).to_have_text(re.compile(r"^Stopped"))
        expect(page.locator("#interrupt")).to_be_disabled()

        # a job of this page, interrupted from the other one: this page says so
        page.evaluate(TEXTS_JS)
        _generate(page, "stopped from elsewhere", steps=500)
        mine = page.locator("#queue-list .queue-row", has_text="stopped from elsewhere")
        expect(mine.locator(".queue-source")).to_have_text("this tab")
        theirs = other.locator("#queue-list .queue-row", has_text="stopped from elsewhere")
        expect(theirs.locator(".queue-source")).to_have_text("another tab")
        expect(other.locator("#progress-text")).to_have_text(re.compile(r"^Another tab: Step \d+ / 500"))
        expect(other.locator("#interrupt")).to_be_enabled()
        other.click("#interrupt")
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Interrupted · \d+ images? kept"))
        expect(mine.locator(".queue-stage")).to_have_text(re.compile(r"^Stopped"))
    finally:
        _stop_all(base_url)
        blocker.join(HANG_GUARD)
    rec.check()
    rec2.check()


def test_cancel_a_waiting_job_from_the_panel(open_page, base_url, tmp_path):
    page, rec = open_page()
    try:
        first = httpx.post(f"{base_url}/api/jobs", json={"prompt": "runs first", **LONG}, timeout=60).json()["job"]
        second = httpx.post(f"{base_url}/api/jobs", json={"prompt": "waits its turn", **LONG}, timeout=60).json()["job"]
        waiting = page.locator("#queue-list .queue-row", has_text="waits its turn")
        expect(waiting.locator(".queue-stage")).to_have_text("Queued · position 1")
        expect(page.locator("#queue-list .queue-row", has_text="runs first").locator(".queue-stage")).to_have_text(
            re.compile(r"^Step \d+ / 500"))
        expect(page.locator("#queue-summary")).to_have_text("Queue · 1 running · 1 waiting")
        shot(page, tmp_path, "queue-panel-desktop.png")
        waiting.locator(".queue-cancel").click()
        expect(waiting.locator(".queue-stage")).to_have_text("Stopped · 0 images kept")
        assert httpx.get(f"{base_url}/api/jobs/{second['id']}", timeout=60).json()["state"] == "interrupted"
        assert httpx.get(f"{base_url}/api/jobs/{first['id']}", timeout=60).json()["state"] == "running"

        # the same panel on a phone
        phone, rec2 = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
        row = phone.locator("#queue-list .queue-row", has_text="runs first")
        expect(row.locator(".queue-interrupt")).to_be_visible()
        phone.locator("#queue-panel").scroll_into_view_if_needed()
        shot(phone, tmp_path, "queue-panel-phone.png")
        assert ui.no_horizontal_overflow(phone)
        rec2.check()
    finally:
        _stop_all(base_url)
    rec.check()


def test_stopping_then_stopped(open_page, base_url):
    page, rec = open_page()
    try:
        page.evaluate(TEXTS_JS)
        _generate(page, "a job to stop", steps=500)
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Step \d+ / 500"))
        page.click("#interrupt")
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Interrupted · \d+ images? kept"))
        texts = page.evaluate("window.__texts")
        stop = texts.index("Stopping…")
        assert stop < next(i for i, t in enumerate(texts) if t.startswith("Interrupted")), texts
    finally:
        _stop_all(base_url)
    rec.check()


def test_preview_grows_into_the_result_at_the_same_size(open_page):
    page, rec = open_page()
    page.evaluate(PREVIEW_JS)
    _generate(page, "a red circle", steps=12)
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    sizes = page.evaluate("window.__previewSizes")
    assert sizes, "the preview was never shown in the viewer"
    ui._wait_images(page, "#results img.result-image")
    result = page.locator("#results img.result-image").bounding_box()
    assert {tuple(s) for s in sizes} == {(round(result["width"]), round(result["height"]))}
    assert result["width"] == 256  # 64 px at a whole-number scale (4x), not the old 128 px preview
    expect(page.locator("#preview")).to_be_hidden()
    expect(page.locator("#progress #preview")).to_have_count(1)  # back in the progress panel
    # a second job: the first one stays in this session's strip
    _generate(page, "a blue square", steps=2)
    expect(page.locator("#result-strip .strip-item")).to_have_count(2)
    expect(page.locator("#results pre.infotext")).to_contain_text("a blue square")
    page.locator("#result-strip .strip-item").nth(1).click()
    expect(page.locator("#results pre.infotext")).to_contain_text("a red circle")
    rec.check()


def test_lightbox_keys_counter_zoom_and_caption(open_page, tmp_path):
    page, rec = open_page()
    _generate(page, "three of a kind", steps=2, batch=3)
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 3 images"))
    expect(page.locator("#results pre.infotext")).to_have_count(1)  # once per result, not per image
    expect(page.locator("#results .use-settings")).to_have_count(1)
    seeds = page.locator("#results .result-seed").all_inner_texts()
    assert len(seeds) == 3
    page.locator("#results .result-seed").nth(1).click()
    expect(page.locator("#results pre.infotext")).to_contain_text(f"Seed: {seeds[1].split()[1]}")

    page.locator("#results img.result-image").first.click()
    box = page.locator("#lightbox")
    expect(box).to_be_visible()
    expect(box.locator(".lightbox-counter")).to_have_text("1 / 3")
    expect(box.locator(".lightbox-caption")).to_have_text(f"three of a kind · {seeds[0]}")
    page.keyboard.press("ArrowRight")
    expect(box.locator(".lightbox-counter")).to_have_text("2 / 3")
    expect(box.locator(".lightbox-caption")).to_contain_text(seeds[1])
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    expect(box.locator(".lightbox-counter")).to_have_text("3 / 3")
    box.locator(".lightbox-prev").click()
    expect(box.locator(".lightbox-counter")).to_have_text("2 / 3")
    page.keyboard.press("1")
    expect(box.locator(".lightbox-zoom")).to_have_text("100%")
    assert page.locator("#lightbox-img").bounding_box()["width"] == 64
    box.locator(".lightbox-in").click()
    expect(box.locator(".lightbox-zoom")).to_have_text("125%")
    box.locator(".lightbox-fit").click()
    expect(box.locator(".lightbox-zoom")).to_have_text("fit")
    expect(box.locator(".lightbox-download")).to_have_attribute("href", re.compile(r"/api/"))
    shot(page, tmp_path, "lightbox-desktop.png")
    page.keyboard.press("Escape")
    expect(box).to_be_hidden()

    phone, rec2 = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.click("#tab-history")
    phone.locator("#history-grid img.history-item").first.click()
    phone.click("#history-detail-img")
    expect(phone.locator("#lightbox .lightbox-counter")).to_have_text(re.compile(r"^1 / \d+$"))
    expect(phone.locator("#lightbox .lightbox-delete")).to_be_visible()  # a History item can be deleted
    phone.locator("#lightbox .lightbox-next").click()
    expect(phone.locator("#lightbox .lightbox-counter")).to_have_text(re.compile(r"^2 / \d+$"))
    shot(phone, tmp_path, "lightbox-phone.png")
    assert ui.no_horizontal_overflow(phone)
    rec.check()
    rec2.check()


def test_drag_a_result_onto_img2img(open_page):
    page, rec = open_page()
    _generate(page, "drag me", steps=2)
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    page.check("#mode-img2img", force=True)
    expect(page.locator("#img2img-drop")).to_be_visible()
    assert page.evaluate("Darkroom.maskState().width") == 0
    page.drag_and_drop("#results img.result-image", "#img2img-drop")
    expect(page.locator("#mask-frame")).to_be_visible()
    page.wait_for_function("() => Darkroom.maskState().width === 64")
    expect(page.locator(".toast", has_text="Image sent to img2img")).to_be_visible()
    rec.check()


def test_png_info_to_img2img_and_settings_with_clip_skip_and_eta(open_page, tmp_path):
    from PIL import Image

    from darkroom.metadata.images import encode_png

    page, rec = open_page()
    info = ("a blue square\nNegative prompt: blurry\nSteps: 13, Sampler: Euler a, CFG scale: 5.5, Seed: 1234, "
            "Size: 64x64, Clip skip: 2, ENSD: 31337, Eta: 0.5")
    path = tmp_path / "params.png"
    path.write_bytes(encode_png(Image.new("RGB", (64, 64), (20, 40, 200)), info))
    page.click("#tab-pnginfo")
    page.set_input_files("#png-file", str(path))
    expect(page.locator("#png-params")).to_contain_text("Clip skip: 2")
    page.click("#png-send-img2img")
    expect(page.locator("#page-generate")).to_be_visible()
    expect(page.locator("#mode-img2img")).to_be_checked()
    page.wait_for_function("() => Darkroom.maskState().width === 64")
    expect(page.locator("#prompt")).to_have_value("a blue square")
    expect(page.locator("#steps")).to_have_value("13")
    expect(page.locator("#clip-skip")).to_have_value("2")
    expect(page.locator("#eta")).to_have_value("0.5")
    expect(page.locator("#ensd")).to_have_value("31337")

    # a result's "Use these settings" brings clip skip and eta back (and the img2img source)
    page.fill("#denoise-value", "0.5")
    page.fill("#steps", "2")
    page.fill("#eta", "0.3")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    expect(page.locator("#results pre.infotext")).to_contain_text("Clip skip: 2")
    page.fill("#clip-skip", "1")
    page.fill("#eta", "")
    page.click("#img2img-remove")
    page.locator("#results .use-settings").click()
    expect(page.locator("#clip-skip")).to_have_value("2")
    expect(page.locator("#eta")).to_have_value("0.3")
    page.wait_for_function("() => Darkroom.maskState().width === 64")  # the source image is back
    rec.check()
