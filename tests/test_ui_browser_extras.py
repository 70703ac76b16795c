"""The web UI's newer features in a real headless browser (issue 18): schedules per sampler, the
Extras page (upscaling), prompt styles and seamless tiling.

Same fixtures as tests/test_ui_browser.py (a live server over a test home, Playwright with Debian's
chromium); this module gets its own server, so the home's styles.csv here is this module's.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import tests.test_ui_browser as ui
from tests.test_ui_browser import TIMEOUT, base_url, browser, expect, open_page, shot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

BUSY_JS = """() => {
    window.__busy = [];
    const out = document.getElementById('extras-output'), btn = document.getElementById('extras-run');
    new MutationObserver(() => window.__busy.push([out.getAttribute('aria-busy'), btn.disabled]))
        .observe(out, {attributes: true, attributeFilter: ['aria-busy']});
}"""


def _options(page, selector: str) -> list[str]:
    return page.locator(f"{selector} option").evaluate_all("os => os.map(o => o.value)")


def _source_png(path: Path, size=(128, 128)) -> Path:
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).ellipse((size[0] // 5, size[1] // 5, size[0] * 4 // 5, size[1] * 4 // 5), fill=(220, 30, 30))
    im.save(path)
    return path


def _posted_jobs(page) -> list[dict]:
    bodies: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/api/jobs")
            and bodies.append(json.loads(r.post_data)))
    return bodies


def _use_starter(page) -> None:
    page.select_option("#model", "darkroom-starter")
    expect(page.locator(".toast", has_text="Model ready: darkroom-starter")).to_be_visible()


# ------------------------------------------------------------------------------- schedules per sampler


def test_schedule_list_follows_the_sampler(open_page):
    page, rec = open_page()
    page.select_option("#sampler", "DDIM")
    assert _options(page, "#schedule") == ["Automatic", "Uniform", "SGM Uniform"]
    page.select_option("#sampler", "Euler a")
    assert "Karras" in _options(page, "#schedule") and len(_options(page, "#schedule")) == 12

    # a schedule the new sampler accepts is kept; one it does not becomes Automatic
    page.select_option("#sampler", "Euler")
    page.select_option("#schedule", "Exponential")
    page.select_option("#sampler", "UniPC")
    assert _options(page, "#schedule") == ["Automatic", "Uniform", "Karras", "Exponential", "SGM Uniform"]
    expect(page.locator("#schedule")).to_have_value("Exponential")
    page.select_option("#sampler", "DDIM")
    expect(page.locator("#schedule")).to_have_value("Automatic")
    page.select_option("#sampler", "Euler a")
    expect(page.locator("#schedule")).to_have_value("Automatic")

    # the few-step preset's pair, and a reload, keep a schedule the sampler accepts
    page.select_option("#fewstep", "lightning")
    expect(page.locator("#sampler")).to_have_value("Euler")
    expect(page.locator("#schedule")).to_have_value("SGM Uniform")
    page.select_option("#sampler", "LCM")
    expect(page.locator("#schedule")).to_have_value("SGM Uniform")
    page.wait_for_function("() => (JSON.parse(localStorage.getItem('darkroom.form.v1')) || {}).sampler === 'LCM'")
    page.reload()
    expect(page.locator("#sampler")).to_have_value("LCM")
    expect(page.locator("#schedule")).to_have_value("SGM Uniform")
    assert _options(page, "#schedule") == ["Automatic", "Uniform", "SGM Uniform"]
    rec.check()


def test_a_change_made_while_the_page_loads_survives_the_restore(open_page):
    """The form is restored twice on load (text fields at once, again once the selects have options):
    what the user changes in between is theirs and must not be put back to the saved value."""
    page, rec = open_page()
    page.select_option("#sampler", "Euler")
    page.check("#private")
    page.fill("#steps", "7")
    page.wait_for_function("() => { const v = JSON.parse(localStorage.getItem('darkroom.form.v1')) || {};"
                           " return v.sampler === 'Euler' && v.private === true && v.steps === 7; }")
    held = []
    page.route("**/api/samplers", lambda route: held.append(route))  # the list is answered when we say
    page.reload(wait_until="domcontentloaded")
    page.wait_for_function("() => document.getElementById('steps').value === '7'")  # the first restore
    expect(page.locator("#private")).to_be_checked()
    page.uncheck("#private")
    page.fill("#steps", "9")
    while not held:  # the request is on its way once the first restore has run; wait for it to be held
        page.wait_for_timeout(50)
    held[0].continue_()
    page.unroute("**/api/samplers")
    expect(page.locator("#sampler option[value='Euler a']")).to_have_count(1)
    expect(page.locator("#sampler")).to_have_value("Euler")  # the second restore has run
    expect(page.locator("#private")).not_to_be_checked()
    expect(page.locator("#steps")).to_have_value("9")
    page.wait_for_function("() => { const v = JSON.parse(localStorage.getItem('darkroom.form.v1')) || {};"
                           " return v.private === false && v.steps === 9; }")
    rec.check()


# ------------------------------------------------------------------------------------------ extras


def test_extras_upscale_lanczos_x2_and_to_a_size(open_page, tmp_path):
    page, rec = open_page()
    page.click("#tab-extras")
    expect(page.locator("#page-extras")).to_be_visible()
    expect(page.locator("#tab-extras")).to_have_attribute("aria-selected", "true")
    # upscalers from GET /sdapi/v1/upscalers
    expect(page.locator("#extras-upscaler-1 option[value='Nearest']")).to_have_count(1)
    assert {"None", "Lanczos", "Nearest"} <= set(_options(page, "#extras-upscaler-1"))
    assert _options(page, "#extras-upscaler-2")[0] == "None"
    expect(page.locator("#extras-visibility")).to_be_disabled()  # no second upscaler yet

    # with no image: a message, nothing sent
    page.click("#extras-run")
    expect(page.locator(".toast-error", has_text="choose an image to upscale")).to_be_visible()
    page.locator(".toast-error .toast-close").click()

    page.set_input_files("#extras-file", str(_source_png(tmp_path / "circle.png")))
    expect(page.locator("#extras-source-info")).to_have_text("circle.png · 128×128")
    page.select_option("#extras-upscaler-1", "Lanczos")
    page.fill("#extras-scale", "2")
    expect(page.locator("#extras-target")).to_have_text("(128×128 → 256×256)")
    page.evaluate(BUSY_JS)
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/sdapi/v1/extra-single-image")) as req:
        page.click("#extras-run")
    body = json.loads(req.value.post_data)
    assert body["upscaler_1"] == "Lanczos" and body["upscaling_resize"] == 2 and body["resize_mode"] == 0
    assert body["upscaler_2"] == "None" and body["image"].startswith("data:image/png;base64,")
    expect(page.locator("#extras-status")).to_have_text(re.compile(r"^Done · 256×256"))
    assert ["true", True] in page.evaluate("window.__busy"), "no busy state while it ran"
    expect(page.locator("#extras-run")).to_be_enabled()
    expect(page.locator("#extras-output")).to_have_attribute("aria-busy", "false")
    img = page.locator("#extras-image")
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [256, 256]
    expect(page.locator("#extras-info")).to_contain_text("Lanczos")
    link = page.locator("#extras-download")
    expect(link).to_have_attribute("href", re.compile(r"^blob:"))
    expect(link).to_have_attribute("download", "circle-upscaled.png")
    with page.expect_download() as dl:
        link.click()
    assert Image.open(dl.value.path()).size == (256, 256)
    shot(page, tmp_path, "extras-desktop.png")

    # scale to a size, cropped, with a second upscaler blended in
    page.check("#extras-mode-to")
    expect(page.locator("#extras-scale")).to_be_hidden()
    page.fill("#extras-width", "200")
    page.fill("#extras-height", "100")
    page.select_option("#extras-upscaler-2", "Nearest")
    expect(page.locator("#extras-visibility")).to_be_enabled()
    page.fill("#extras-visibility-value", "0.5")
    expect(page.locator("#extras-visibility")).to_have_value("0.5")
    with page.expect_request(lambda r: r.method == "POST" and r.url.endswith("/sdapi/v1/extra-single-image")) as req:
        page.click("#extras-run")
    body = json.loads(req.value.post_data)
    assert (body["resize_mode"], body["upscaling_resize_w"], body["upscaling_resize_h"], body["upscaling_crop"]) \
        == (1, 200, 100, True)
    assert body["upscaler_2"] == "Nearest" and body["extras_upscaler_2_visibility"] == 0.5
    expect(page.locator("#extras-status")).to_have_text(re.compile(r"^Done · 200×100"))
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [200, 100]

    # the server's 422 message is shown
    page.check("#extras-mode-by")
    page.fill("#extras-scale", "0")
    page.click("#extras-run")
    expect(page.locator("#extras-status")).to_have_text(re.compile(r"^Error: .*upscaling_resize"))
    expect(page.locator(".toast-error", has_text="upscaling_resize")).to_be_visible()
    expect(page.locator("#extras-run")).to_be_enabled()

    # every control on the page has a name, and the page works from the keyboard
    unnamed = page.evaluate("""() => [...document.querySelectorAll('#page-extras input, #page-extras select')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)""")
    assert not unnamed, unnamed
    page.fill("#extras-scale", "2")
    page.focus("#extras-scale")
    page.keyboard.press("Enter")  # submits the form
    expect(page.locator("#extras-status")).to_have_text(re.compile(r"^Done · 256×256"))
    rec.check(allowed_errors=("choose an image to upscale", "upscaling_resize", "422"), allowed_status=(422,))


# ------------------------------------------------------------------------------- styles and tiling

STYLES_CSV = ('name,prompt,negative_prompt\r\n'
              '"Film look","{prompt}, film grain",digital\r\n'
              'Vivid,vivid colors,\r\n')


def test_styles_picker_tiling_and_token_merging(open_page, tmp_path):
    styles_file = ui.UI_HOME.styles_file
    styles_file.unlink(missing_ok=True)
    page, rec = open_page()
    bodies = _posted_jobs(page)
    # no styles: the picker is hidden, a hint says where styles.csv goes
    expect(page.locator("#styles-hint")).to_be_visible()
    expect(page.locator("#styles-hint")).to_contain_text(str(ui.UI_HOME.root))
    expect(page.locator("#styles-section")).to_be_hidden()

    styles_file.write_text(STYLES_CSV, encoding="utf-8")
    page.click("#styles-recheck")
    expect(page.locator("#styles-section")).to_be_visible()
    expect(page.locator("#styles-hint")).to_be_hidden()
    expect(page.locator("#styles-section")).to_have_attribute("open", "")
    chips = page.locator("#style-list .style-chip")
    expect(chips).to_have_count(2)
    page.get_by_label("Vivid").check()
    page.get_by_label("Film look").check()
    expect(page.locator("#styles-info")).to_have_text("Vivid, Film look")  # the order they were checked

    expect(page.locator("#tiling")).not_to_be_checked()
    page.check("#tiling")
    expect(page.locator("#token-merging")).to_have_value("0")
    page.fill("#token-merging", "0.5")
    _use_starter(page)
    page.fill("#prompt", "a red circle")
    page.fill("#negative", "")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"), timeout=TIMEOUT)
    body = bodies[-1]
    assert body["styles"] == ["Vivid", "Film look"]
    assert body["tiling"] is True and body["token_merging_ratio"] == 0.5
    assert body["prompt"] == "a red circle"  # the server applies the styles
    info = page.locator("#results pre.infotext")
    expect(info).to_contain_text("a red circle, vivid colors, film grain")
    expect(info).to_contain_text("Negative prompt: digital")
    expect(info).to_contain_text("Token merging ratio: 0.5")
    page.locator("#styles-section").scroll_into_view_if_needed()
    shot(page, tmp_path, "styles-desktop.png")

    # "Use these settings" brings styles and tiling back
    page.get_by_label("Vivid").uncheck()
    page.uncheck("#tiling")
    page.fill("#token-merging", "0")
    expect(page.locator("#styles-info")).to_have_text("Film look")
    page.locator("#results button", has_text="Use these settings").click()
    expect(page.locator("#styles-info")).to_have_text("Vivid, Film look")
    expect(page.locator("#tiling")).to_be_checked()
    expect(page.locator("#token-merging")).to_have_value("0.5")

    # a form without styles or tiling sends them off
    page.get_by_label("Vivid").uncheck()
    page.get_by_label("Film look").uncheck()
    page.uncheck("#tiling")
    page.fill("#token-merging", "0")
    page.fill("#steps", "2")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"), timeout=TIMEOUT)
    assert bodies[-1]["styles"] == [] and bodies[-1]["tiling"] is False
    assert bodies[-1]["token_merging_ratio"] is None  # the setting's (0 here)
    expect(info).to_have_text(re.compile(r"^a red circle\n"))

    # "Send to extras" from a result
    page.locator("#results .send-extras").first.click()
    expect(page.locator("#page-extras")).to_be_visible()
    expect(page.locator("#extras-source-info")).to_contain_text("128×128")
    # ... and from the history's detail view
    page.click("#extras-remove")
    expect(page.locator("#extras-source-info")).to_be_hidden()
    page.click("#tab-history")
    page.locator("#history-grid img.history-item").first.click()
    page.click("#history-send-extras")
    expect(page.locator("#history-detail")).to_be_hidden()
    expect(page.locator("#page-extras")).to_be_visible()
    expect(page.locator("#extras-source-info")).to_contain_text("128×128")
    rec.check()


def test_five_tabs_fit_a_phone(open_page, tmp_path):
    page, rec = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                          device_scale_factor=2)
    for tab in ("generate", "extras", "history", "pnginfo", "models"):
        tb = page.locator(f"#tab-{tab}").bounding_box()
        assert tb and tb["x"] >= 0 and tb["x"] + tb["width"] <= 390, (tab, tb)
    page.click("#tab-extras")
    expect(page.locator("#extras-drop")).to_be_visible()
    assert ui.no_horizontal_overflow(page)
    shot(page, tmp_path, "extras-phone.png")
    rec.check()
