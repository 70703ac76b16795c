"""The web UI in a real headless browser (Playwright + Debian's chromium) against a live server.

Each test records every request the page makes, every console message and every page error,
and ends by checking that the page talked to nobody but our server and logged no error it
was not meant to. Screenshots go to the test's tmp_path (and are copied to /tmp/ui-shots/).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("headless browser tests need Debian's chromium at /usr/bin/chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="headless browser tests need the playwright package")
expect = sync_api.expect

from darkroom.home import Home  # noqa: E402
from darkroom.metadata.images import encode_png  # noqa: E402
from tests.server_util import HANG_GUARD, get_json, live_server, studio_with  # noqa: E402

pytestmark = pytest.mark.slow

SHOTS = Path("/tmp/ui-shots")
TIMEOUT = 120_000  # ms, for every wait: a guard against a hang, never a speed test
PROMPT = "a red circle on a white background"
A1111_INFOTEXT = ("a blue square\nNegative prompt: blurry\n"
                  "Steps: 13, Sampler: Euler a, CFG scale: 5.5, Seed: 1234, Size: 64x64")


WATCH_JS = """() => {
    window.__texts = []; window.__previews = []; window.__interrupt = [];
    const $ = (id) => document.getElementById(id);
    new MutationObserver(() => window.__texts.push($('progress-text').textContent))
        .observe($('progress-text'), {childList: true, characterData: true, subtree: true});
    const pv = $('preview');
    new MutationObserver(() => { if (pv.getAttribute('src') && !pv.hidden) window.__previews.push(pv.src); })
        .observe(pv, {attributes: true, attributeFilter: ['src', 'hidden']});
    new MutationObserver(() => window.__interrupt.push($('interrupt').disabled))
        .observe($('interrupt'), {attributes: true, attributeFilter: ['disabled']});
}"""


# ------------------------------------------------------------------------------------------ fixtures


LORA = "tiny-lora"  # written into the home's loras folder by base_url (None if that failed)
LORA_WORD = "shinyword"
UI_HOME: Home | None = None  # the live server's home (set by base_url)
UI_STUDIO = None  # and its Studio


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_model):
    """A live server over a home holding the tiny random SD1 model (plus the built-in starter) and a LoRA."""
    global LORA, UI_HOME, UI_STUDIO
    home = UI_HOME = Home(tmp_path_factory.mktemp("ui-home")).ensure()
    try:  # a tiny LoRA for the tiny SD1 model, with a trigger word in its kohya metadata
        from darkroom.testing.tiny_lora import write_tiny_lora

        write_tiny_lora(home.loras / f"{LORA}.safetensors", tiny_model("sd1"), family="sd1",
                        tag_frequency={"10_set": {LORA_WORD: 5, "red circle": 2}})
    except Exception:  # noqa: BLE001  (the LoRA part of the test is skipped then)
        LORA = None
    studio = UI_STUDIO = studio_with(home, tiny_model("sd1")["path"])
    try:
        with live_server(studio) as url:
            yield url
    finally:
        studio.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Recorder:
    """What one page did: requests, responses with an error status, console output, page errors."""

    base: str
    requests: list[str] = field(default_factory=list)
    bad_responses: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def attach(self, page) -> None:
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("response", lambda r: r.status >= 400 and self.bad_responses.append(f"{r.status} {r.url}"))
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def check(self, allowed_errors: tuple[str, ...] = (), allowed_status: tuple[int, ...] = ()) -> None:
        """Nothing outside the server was contacted; no unexpected console error, bad status or page error."""
        assert self.requests, "no request was recorded"
        outside = [u for u in self.requests
                   if not (u.startswith(self.base + "/") or u == self.base or u.startswith(("data:", "blob:")))]
        assert not outside, f"the page contacted something other than {self.base}: {outside}"
        errors = [text for kind, text in self.console
                  if kind == "error" and not any(a in text for a in allowed_errors)]
        assert not errors, f"unexpected console errors: {errors}"
        bad = [r for r in self.bad_responses if int(r.split()[0]) not in allowed_status]
        assert not bad, f"unexpected error responses: {bad}"
        assert not self.page_errors, f"uncaught page errors: {self.page_errors}"


@pytest.fixture
def open_page(browser, base_url):
    """open_page(**context_options) -> (page, recorder), the UI loaded in a fresh browser context."""
    contexts = []

    def open_(**options):
        options.setdefault("viewport", {"width": 1280, "height": 900})
        ctx = browser.new_context(**options)
        ctx.set_default_timeout(TIMEOUT)
        contexts.append(ctx)
        page = ctx.new_page()
        rec = Recorder(base_url)
        rec.attach(page)
        page.goto(base_url + "/")
        # the selects fill from /api/models and /api/samplers
        expect(page.locator("#model option[value='darkroom-starter']")).to_have_count(1, timeout=TIMEOUT)
        expect(page.locator("#sampler option[value='Euler a']")).to_have_count(1, timeout=TIMEOUT)
        expect(page.locator("#server-status")).not_to_have_text("connecting…", timeout=TIMEOUT)
        return page, rec

    yield open_
    for ctx in contexts:
        ctx.close()


def shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True, animations="disabled")
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, SHOTS / name)
    except OSError:
        pass
    return path


def image_widths(locator) -> list[int]:
    """naturalWidth of each image (0 = broken or not loaded)."""
    return locator.evaluate_all("imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")


def no_horizontal_overflow(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")


# ------------------------------------------------------------------------------------------ tests


def test_generate_with_the_starter_model_then_history(open_page, tmp_path):
    page, rec = open_page()
    expect(page.locator("#page-generate")).to_be_visible()
    expect(page.locator("#tab-generate")).to_have_attribute("aria-selected", "true")

    # switch the server's model from the tiny random one to the starter model
    page.select_option("#model", "darkroom-starter")
    expect(page.locator(".toast", has_text="Model ready: darkroom-starter")).to_be_visible()
    expect(page.locator("#model")).to_have_value("darkroom-starter")
    expect(page.locator("#width")).to_have_attribute("placeholder", "128")

    page.fill("#prompt", PROMPT)
    page.fill("#steps", "20")
    page.fill("#batch-size", "2")
    page.fill("#seed", "7")

    # watch the progress line, the preview and the Interrupt button from inside the page: on a fast
    # machine a state may last less than one of expect()'s polls
    page.evaluate(WATCH_JS)
    page.locator("#prompt").press("Control+Enter")  # the keyboard shortcut submits

    page.wait_for_function("() => window.__texts.some(t => /Step \\d+ \\/ 20/.test(t))", timeout=TIMEOUT)
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 2 images in [\d.]+ s"), timeout=TIMEOUT)
    texts = page.evaluate("window.__texts")
    previews = page.evaluate("window.__previews")
    assert any(re.search(r"^Step \d+ / 20\b", t) for t in texts), texts
    assert previews and all(re.search(r"/api/jobs/[^/]+/preview\?rev=\d+$", u) for u in previews), previews
    # each time the page sets the button's state is recorded (a status poll may set "disabled" again before the
    # job starts, so the first record can be True): what matters is that it was enabled at some point
    assert False in page.evaluate("window.__interrupt"), "Interrupt was never enabled while the job ran"
    expect(page.locator("#preview")).to_be_hidden()  # the preview goes away when the job ends
    expect(page.locator("#interrupt")).to_be_disabled()

    results = page.locator("#results img.result-image")
    expect(results).to_have_count(2)
    expect(page.locator("#results pre.infotext")).to_have_count(1)  # once per job, for the selected image
    for info in page.locator("#results pre.infotext").all():
        expect(info).to_contain_text(PROMPT)
        expect(info).to_contain_text("Seed:")
        expect(info).to_contain_text("Steps: 20")
        expect(info).to_contain_text("Model: darkroom-starter")
    page.wait_for_function("() => [...document.querySelectorAll('#results img.result-image')].every(i => i.complete)")
    assert image_widths(results) == [128, 128]
    seeds = []
    for chip in page.locator("#results .result-seed").all():  # each image's seed; a click shows its infotext
        chip.click()
        seeds.append(re.search(r"Seed: (\d+)", page.locator("#results pre.infotext").inner_text()).group(1))
    assert seeds == ["7", "8"]
    shot(page, tmp_path, "generate-desktop.png")

    # the lightbox opens on a click and closes on Escape
    results.first.click()
    expect(page.locator("#lightbox")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#lightbox")).to_be_hidden()

    # change the prompt, so that "use these settings" visibly brings it back
    page.fill("#prompt", "something else")

    page.click("#tab-history")
    expect(page.locator("#page-history")).to_be_visible()
    expect(page.locator("#page-generate")).to_be_hidden()
    items = page.locator("#history-grid img.history-item")
    expect(items).to_have_count(2)
    page.wait_for_function(
        "() => [...document.querySelectorAll('img.history-item')].every(i => i.complete && i.naturalWidth > 0)")
    assert image_widths(items) == [128, 128]

    # search (debounced): no match, then a word of the prompt brings both images back
    page.fill("#history-search", "zebra")
    expect(page.locator("#history-grid")).to_contain_text("No images match “zebra”")
    expect(items).to_have_count(0)
    page.fill("#history-search", "circle")
    expect(items).to_have_count(2)
    expect(page.locator("#history-grid")).not_to_have_attribute("aria-busy", "true")
    assert any("/api/history?" in u and "q=zebra" in u for u in rec.requests)
    assert any("/api/history?" in u and "q=circle" in u for u in rec.requests)

    items.first.click()
    detail = page.locator("#history-detail")
    expect(detail).to_be_visible()
    expect(page.locator("#history-detail-title")).to_have_text(PROMPT)
    expect(page.locator("#history-detail-info")).to_contain_text("Seed:")
    expect(page.locator("#history-detail-info")).to_contain_text(PROMPT)
    expect(page.locator("#history-detail-meta")).to_contain_text("128×128")
    shot(page, tmp_path, "history-detail-desktop.png")

    page.click("#history-use")
    expect(detail).to_be_hidden()
    expect(page.locator("#page-generate")).to_be_visible()
    expect(page).to_have_url(re.compile(r"#generate$"))
    expect(page.locator("#prompt")).to_have_value(PROMPT)
    expect(page.locator("#steps")).to_have_value("20")
    expect(page.locator("#seed")).to_have_value(re.compile(r"^[78]$"))
    expect(page.locator("#model")).to_have_value("darkroom-starter")
    expect(page.locator(".toast", has_text="Settings loaded")).to_be_visible()

    # "Reuse" puts the last image's seed back
    page.click("#seed-random")
    expect(page.locator("#seed")).to_have_value("-1")
    page.click("#seed-reuse")
    expect(page.locator("#seed")).to_have_value("8")

    # a reload keeps the form (localStorage) and shows the tab's last job again (sessionStorage)
    page.wait_for_function("() => (JSON.parse(localStorage.getItem('darkroom.form.v1')) || {}).seed === 8")  # saved
    page.reload()
    expect(page.locator("#prompt")).to_have_value(PROMPT)
    expect(page.locator("#seed")).to_have_value("8")
    expect(page.locator("#results img.result-image")).to_have_count(2)

    # a private job, interrupted: nothing kept, nothing added to history
    page.check("#private")
    page.fill("#steps", "400")
    page.fill("#batch-size", "1")
    page.evaluate(WATCH_JS)
    page.click("#generate")
    page.wait_for_function("() => window.__texts.some(t => /Step \\d+ \\/ 400/.test(t))", timeout=TIMEOUT)
    page.click("#interrupt")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Interrupted · 0 images kept"))
    expect(page.locator("#results")).to_contain_text("Interrupted before any image finished.")
    page.click("#tab-history")
    page.fill("#history-search", "")
    expect(page.locator("#history-page")).to_have_text("page 1 of 1")
    expect(items).to_have_count(2)
    assert get_json(rec.base + "/api/history")["total"] == 2

    rec.check()
    assert any("/api/events?client=" in u for u in rec.requests)  # the tab's id: it sees its private jobs in full
    assert any("/preview?rev=" in u for u in rec.requests)


def _drop_file(page, selector: str, name: str, data: bytes) -> None:
    """Drop a file onto `selector` as a user dragging it from the desktop would (dragenter, dragover, drop)."""
    dt = page.evaluate_handle("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        return dt;
    }""", [base64.b64encode(data).decode(), name])
    page.dispatch_event(selector, "dragenter", {"dataTransfer": dt})
    expect(page.locator(selector)).to_have_class(re.compile(r"\bover\b"))
    page.dispatch_event(selector, "dragover", {"dataTransfer": dt})
    page.dispatch_event(selector, "drop", {"dataTransfer": dt})
    expect(page.locator(selector)).not_to_have_class(re.compile(r"\bover\b"))


def test_png_info_by_file_input_and_by_drop(open_page, tmp_path):
    page, rec = open_page()
    path = tmp_path / "a1111.png"
    path.write_bytes(encode_png(Image.new("RGB", (64, 64)), A1111_INFOTEXT))

    page.click("#tab-pnginfo")
    expect(page.locator("#page-pnginfo")).to_be_visible()
    expect(page.locator("#png-send")).to_be_disabled()
    page.set_input_files("#png-file", str(path))
    result = page.locator("#png-result")
    expect(result).to_contain_text("Steps: 13")
    expect(result.locator(".png-format")).to_have_text("Source: AUTOMATIC1111")
    expect(page.locator("#png-thumb")).to_be_visible()
    expect(page.locator("#png-send")).to_be_enabled()
    shot(page, tmp_path, "pnginfo-desktop.png")

    page.click("#png-send")
    expect(page.locator("#page-generate")).to_be_visible()
    expect(page.locator("#prompt")).to_have_value("a blue square")
    expect(page.locator("#negative")).to_have_value("blurry")
    expect(page.locator("#steps")).to_have_value("13")
    expect(page.locator("#cfg")).to_have_value("5.5")
    expect(page.locator("#seed")).to_have_value("1234")
    expect(page.locator("#sampler")).to_have_value("Euler a")
    expect(page.locator("#width")).to_have_value("64")
    expect(page.locator("#height")).to_have_value("64")
    expect(page.locator("#form-note")).to_be_hidden()  # every value applied

    # a second, different image dropped onto the zone
    page.click("#tab-pnginfo")
    dropped = encode_png(Image.new("RGB", (32, 32), "green"),
                         "a green star\nSteps: 17, Sampler: DPM++ 2M, CFG scale: 4, Seed: 99, Size: 32x32")
    _drop_file(page, "#png-drop", "dropped.png", dropped)
    expect(result).to_contain_text("Steps: 17")
    expect(result).not_to_contain_text("Steps: 13")
    expect(result.locator(".png-format")).to_have_text("Source: AUTOMATIC1111")
    page.click("#png-send")
    expect(page.locator("#prompt")).to_have_value("a green star")
    expect(page.locator("#negative")).to_have_value("")
    expect(page.locator("#steps")).to_have_value("17")
    expect(page.locator("#sampler")).to_have_value("DPM++ 2M")

    # an image without parameters says so, and cannot be sent
    page.click("#tab-pnginfo")
    _drop_file(page, "#png-drop", "plain.png", encode_png(Image.new("RGB", (16, 16)), None))
    expect(result).to_contain_text("no generation parameters in this image")
    expect(page.locator("#png-send")).to_be_disabled()

    rec.check()
    assert sum("/api/png-info" in u for u in rec.requests) == 3


def test_errors_are_shown_in_the_page(open_page, tmp_path):
    page, rec = open_page()
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "2")
    page.fill("#width", "513")
    page.fill("#height", "512")
    expect(page.locator("#size-preset")).to_have_value("custom")
    page.click("#generate")

    toast = page.locator(".toast-error")
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("multiple of 8")
    expect(toast).to_have_attribute("role", "alert")
    box = toast.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 1280 and box["y"] + box["height"] <= 900
    expect(page.locator("#generate")).to_be_enabled()  # the form is usable again
    expect(page.locator("#results")).to_contain_text("Generated images appear here.")  # nothing blanked
    shot(page, tmp_path, "error-desktop.png")

    # the same message twice is one toast; it can be dismissed
    page.click("#generate")
    expect(toast).to_have_count(1)
    toast.locator(".toast-close").click()
    expect(toast).to_have_count(0)

    rec.check(allowed_errors=("422", "multiple of 8"), allowed_status=(422,))
    assert sum(1 for r in rec.bad_responses if r.startswith("422 ") and r.endswith("/api/jobs")) == 2


def test_phone_sized_viewport(open_page, tmp_path):
    page, rec = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                          device_scale_factor=2)
    gen = page.locator("#generate")
    expect(gen).to_be_visible()
    box = gen.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    assert no_horizontal_overflow(page)
    for tab in ("generate", "extras", "history", "pnginfo", "models"):
        tb = page.locator(f"#tab-{tab}").bounding_box()
        assert tb and tb["x"] >= 0 and tb["x"] + tb["width"] <= 390, (tab, tb)
    shot(page, tmp_path, "generate-phone.png")

    page.click("#tab-models")
    expect(page.locator("#models-table tbody tr")).to_have_count(2)
    expect(page.locator("#models-table")).to_contain_text("darkroom-starter")
    assert no_horizontal_overflow(page)
    shot(page, tmp_path, "models-phone.png")

    page.click("#tab-history")
    expect(page.locator("#history-grid")).not_to_have_attribute("aria-busy", "true")
    expect(page.locator("#history-page")).to_contain_text("page 1 of")
    # (the grid holds what the first test made, if it ran): wait for the thumbnails before the shot;
    # they load lazily, so bring them into view first
    # (the grid can be re-rendered meanwhile, so the check and the wait are one step in the page)
    for i in range(page.locator("img.history-item").count()):
        page.locator("img.history-item").nth(i).scroll_into_view_if_needed()
    page.wait_for_function("() => { const imgs = [...document.querySelectorAll('img.history-item')];"
                           " return imgs.every(i => i.complete && i.naturalWidth > 0); }")
    assert no_horizontal_overflow(page)
    shot(page, tmp_path, "history-phone.png")

    page.click("#tab-pnginfo")
    expect(page.locator("#png-drop")).to_be_visible()
    assert no_horizontal_overflow(page)

    rec.check()


# -------------------------------------------------------------------------------- img2img, hires, networks, X/Y


# the summed alpha of what the mask canvas shows (0 = nothing painted on screen)
CANVAS_INK = """() => {
    const c = document.getElementById('mask-canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) n += d[i];
    return n;
}"""


def _source_png(path: Path) -> Image.Image:
    """A 128x128 red circle on white, written to `path`."""
    im = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(im).ellipse((24, 24, 104, 104), fill=(220, 30, 30))
    im.save(path)
    return im


def _data_url_image(url: str) -> Image.Image:
    head, _, b64 = url.partition(",")
    assert head == "data:image/png;base64", head
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _paint(page, box, x0: float, y0: float, x1: float, y1: float) -> None:
    """A mouse stroke over the mask canvas, in fractions of its box."""
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=6)
    page.mouse.up()


def _fetch_image(base: str, url: str) -> Image.Image:
    import httpx

    r = httpx.get(base + url if url.startswith("/") else url, timeout=30)
    r.raise_for_status()
    return Image.open(io.BytesIO(r.content))


def _wait_images(page, selector: str) -> None:
    page.wait_for_function(
        f"() => [...document.querySelectorAll({selector!r})].every(i => i.complete && i.naturalWidth)")


def test_img2img_inpainting_with_mask_undo(open_page, tmp_path):
    page, rec = open_page()
    bodies: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/api/jobs")
            and bodies.append(json.loads(r.post_data)))
    page.select_option("#model", "darkroom-starter")
    expect(page.locator(".toast", has_text="Model ready: darkroom-starter")).to_be_visible()

    # without a source image img2img says so, and nothing is sent
    page.check("#mode-img2img")
    expect(page.locator("#img2img-panel")).to_be_visible()
    expect(page.locator("#hires-section")).to_be_hidden()  # no hires fix in img2img
    page.click("#generate")
    expect(page.locator(".toast-error", has_text="choose a source image")).to_be_visible()
    page.locator(".toast-error .toast-close").click()

    src = _source_png(tmp_path / "circle.png")
    page.set_input_files("#img2img-file", str(tmp_path / "circle.png"))
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    expect(page.locator("#width")).to_have_attribute("placeholder", "128")  # the source's size
    expect(page.locator("#width")).to_have_value("")
    expect(page.locator("#mask-undo")).to_be_disabled()
    box = canvas.bounding_box()
    assert box and box["width"] >= 256, box  # a 128 px image is shown large enough to paint on

    _paint(page, box, 0.08, 0.12, 0.38, 0.2)   # stroke 1: top-left quadrant
    _paint(page, box, 0.62, 0.12, 0.92, 0.2)   # stroke 2: top-right quadrant
    assert page.evaluate("Darkroom.maskState().strokes") == 2
    page.click("#mask-undo")                    # takes stroke 2 back
    assert page.evaluate("Darkroom.maskState()") == {"strokes": 1, "painted": True, "width": 128, "height": 128}
    expect(page.locator("#mask-info")).to_contain_text("Inpainting the painted area")
    assert page.evaluate(CANVAS_INK) > 0

    page.fill("#denoise", "0.9")
    expect(page.locator("#denoise-value")).to_have_value("0.90")
    page.fill("#mask-blur", "0")
    page.fill("#prompt", "a red circle on a white background")
    page.fill("#steps", "10")
    page.fill("#seed", "5")
    page.locator("#mask-stage").scroll_into_view_if_needed()
    shot(page, tmp_path, "img2img-mask-desktop.png")

    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"), timeout=TIMEOUT)
    body = bodies[-1]
    assert body["init_image"].startswith("data:image/")
    assert body["width"] is None and body["height"] is None  # the server uses the image's size
    assert body["denoising_strength"] == 0.9 and body["mask_blur"] == 0
    assert body["inpainting_fill"] == 1 and body["inpainting_mask_invert"] is False
    assert body["enable_hr"] is False and "xy" not in body
    sent = _data_url_image(body["mask"])
    mask = sent.convert("L")
    assert mask.size == (128, 128)
    assert set(mask.tobytes()) == {0, 255}  # black/white, no grey edge
    if sent.mode == "RGBA":  # white on transparent: its alpha says the same as its luminance
        assert sent.getchannel("A").tobytes() == mask.tobytes()
    assert mask.getpixel((30, 20)) == 255      # under stroke 1
    assert mask.getpixel((98, 20)) == 0        # stroke 2 was undone
    assert max(mask.crop((64, 64, 128, 128)).tobytes()) == 0

    results = page.locator("#results img.result-image")
    expect(results).to_have_count(1)
    _wait_images(page, "#results img.result-image")
    out = _fetch_image(rec.base, results.first.get_attribute("src")).convert("RGB")
    assert out.size == (128, 128)
    # far from the stroke the source is kept pixel for pixel
    assert out.crop((64, 64, 128, 128)).tobytes() == src.crop((64, 64, 128, 128)).tobytes()
    assert out.crop((0, 48, 128, 128)).tobytes() == src.crop((0, 48, 128, 128)).tobytes()
    expect(page.locator("#results pre.infotext")).to_contain_text("Denoising strength: 0.9")

    # "Send to img2img" makes the result the new source, with an empty mask
    page.locator("#results .send-img2img").first.click()
    expect(page.locator(".toast", has_text="Image sent to img2img")).to_be_visible()
    assert page.evaluate("Darkroom.maskState()") == {"strokes": 0, "painted": False, "width": 128, "height": 128}
    expect(page.locator("#mask-undo")).to_be_disabled()
    assert page.evaluate(CANVAS_INK) == 0  # the old strokes are gone from the screen too

    rec.check(allowed_errors=("choose a source image",))


def test_img2img_on_a_phone_paints_by_touch(open_page, tmp_path):
    page, rec = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                          device_scale_factor=2)
    _source_png(tmp_path / "circle.png")
    page.check("#mode-img2img")
    _drop_file(page, "#img2img-drop", "circle.png", (tmp_path / "circle.png").read_bytes())  # dropped this time
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["width"] >= 250, box
    assert no_horizontal_overflow(page)

    # a finger drawing over the canvas paints (and does not scroll the page)
    scroll = page.evaluate("window.scrollY")
    cdp = page.context.new_cdp_session(page)
    x, y = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
    for i in range(1, 8):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x + 12 * i, "y": y + 6 * i}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    page.wait_for_function("() => Darkroom.maskState().painted")
    assert page.evaluate("window.scrollY") == scroll
    mask = _data_url_image(page.evaluate("Darkroom.exportMask()")).convert("L")
    assert mask.size == (128, 128) and mask.getpixel((int(0.3 * 128) + 10, int(0.3 * 128) + 5)) == 255
    expect(page.locator("#mask-undo")).to_be_enabled()
    assert no_horizontal_overflow(page)
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, tmp_path, "img2img-mask-phone.png")
    rec.check()


def test_hires_fix_doubles_the_size(open_page, tmp_path, monkeypatch):
    page, rec = open_page()
    # the job waits at its first hires step until the page has shown it (a fast machine finishes the whole
    # job between two progress events otherwise)
    reached, go = threading.Event(), threading.Event()
    engine = UI_STUDIO.engine
    real_generate = engine.generate

    def generate(req, *, on_step=None, **kw):
        def step(event):
            if on_step is not None:
                on_step(event)
            if event.phase == "hires" and not reached.is_set():
                reached.set()
                go.wait(HANG_GUARD)
        return real_generate(req, on_step=step, **kw)

    monkeypatch.setattr(engine, "generate", generate)
    page.select_option("#model", "darkroom-starter")
    expect(page.locator(".toast", has_text="Model ready: darkroom-starter")).to_be_visible()
    page.fill("#prompt", "a blue square")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "6")
    page.check("#hires-enable")
    expect(page.locator("#hires-section")).to_have_attribute("open", "")
    page.fill("#hr-scale", "2")
    expect(page.locator("#hr-size")).to_have_text("64x64 → 128x128")
    page.select_option("#hr-upscaler", "Latent")
    page.click("#generate")
    try:
        expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Hires pass: step \d+ / \d+"),
                                                            timeout=TIMEOUT)
    finally:
        go.set()
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"), timeout=TIMEOUT)
    _wait_images(page, "#results img.result-image")
    assert image_widths(page.locator("#results img.result-image")) == [128]
    expect(page.locator("#results pre.infotext")).to_contain_text("Hires upscale: 2")
    page.locator("#variation-section > summary").click()
    page.locator("#hires-section").scroll_into_view_if_needed()
    shot(page, tmp_path, "hires-desktop.png")

    # "Use these settings" brings the hires fix back
    page.uncheck("#hires-enable")
    page.fill("#hr-scale", "3")
    page.locator("#results button", has_text="Use these settings").click()
    expect(page.locator("#hires-enable")).to_be_checked()
    expect(page.locator("#hr-scale")).to_have_value("2")
    rec.check()


def test_few_step_preset_fills_the_form(open_page):
    page, rec = open_page()
    expect(page.locator("#fewstep option[value=lightning]")).to_have_count(1)
    page.select_option("#fewstep", "lightning")
    expect(page.locator("#sampler")).to_have_value("Euler")
    expect(page.locator("#schedule")).to_have_value("SGM Uniform")
    expect(page.locator("#steps")).to_have_value("4")
    expect(page.locator("#cfg")).to_have_value("1")
    expect(page.locator("#fewstep")).to_have_value("")  # an action: the fields stay the user's to edit
    expect(page.locator(".toast", has_text="Preset lightning")).to_be_visible()
    rec.check()


def test_extra_networks_and_xy_grid(open_page, tmp_path):
    page, rec = open_page()
    page.locator("#networks > summary").click()
    if LORA is None:
        pytest.skip("could not write a tiny LoRA for the extra networks panel")
    card = page.locator(".lora-card", has_text=LORA)
    expect(card).to_have_count(1)
    page.fill("#prompt", "a red circle")
    card.click()
    expect(page.locator("#prompt")).to_have_value(f"a red circle <lora:{LORA}:1>")
    page.locator(".trigger-word", has_text=LORA_WORD).click()
    expect(page.locator("#prompt")).to_have_value(f"a red circle <lora:{LORA}:1>, {LORA_WORD}")
    page.fill("#networks-search", "no-such-network")
    expect(page.locator(".lora-card")).to_have_count(0)
    page.fill("#networks-search", "tiny")
    expect(page.locator(".lora-card")).to_have_count(1)

    # X/Y grid: Steps 2,3 on the tiny model, no Y axis
    page.fill("#prompt", "a red circle")
    page.select_option("#model", "tiny-sd1")
    expect(page.locator(".toast", has_text="Model ready: tiny-sd1")).to_be_visible()
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.select_option("#sampler", "Euler")
    page.check("#xy-enable")
    expect(page.locator("#xy-section")).to_have_attribute("open", "")
    page.select_option("#xy-x-axis", "Steps")
    expect(page.locator("#xy-x-values")).to_have_attribute("placeholder", re.compile(r"\d"))
    page.click("#generate")  # no values yet: a toast, no job
    expect(page.locator(".toast-error", has_text="X/Y grid")).to_be_visible()
    page.fill("#xy-x-values", "2,3")
    page.fill("#xy-y-values", "")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/api/jobs")) as req:
        page.click("#generate")
    assert json.loads(req.value.post_data)["xy"] == {"x": "steps=2,3"}
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"), timeout=TIMEOUT)
    expect(page.locator("#results img.grid-image")).to_have_count(1)
    expect(page.locator("#results img.result-image")).to_have_count(2)
    _wait_images(page, "#results img")
    first = page.locator("#results > figure").first.locator("img")
    expect(first).to_have_class(re.compile(r"\bgrid-image\b"))
    assert image_widths(page.locator("#results img.result-image")) == [64, 64]
    assert image_widths(page.locator("#results img.grid-image"))[0] > 64
    page.locator("#xy-section").scroll_into_view_if_needed()
    shot(page, tmp_path, "xy-result-desktop.png")
    rec.check(allowed_errors=("X/Y grid",))


@pytest.mark.slow
def test_models_page_search_and_preview(open_page):
    """The models page filters as you type and shows a model's preview image."""
    from PIL import Image as _Image

    page, rec = open_page()
    _Image.new("RGB", (16, 16), (200, 0, 0)).save(UI_HOME.checkpoints / "tiny-sd1.preview.png")
    page.click("#tab-models")
    page.click("#models-rescan")
    expect(page.locator("#models-table img.model-preview")).to_have_count(1)
    page.fill("#models-search", "starter")
    expect(page.locator("#models-table tbody tr")).to_have_count(1)
    expect(page.locator("#models-table tbody")).to_contain_text("darkroom-starter")
    page.fill("#models-search", "zzz")
    expect(page.locator("#models-table tbody")).to_contain_text("No model matches")
    rec.check()
