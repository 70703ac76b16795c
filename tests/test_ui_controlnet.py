"""The ControlNet section of the web UI (issue 21): models and preprocessors listed from /api/controlnet
(unavailable ones greyed out with their problem), a drawn control image sent with the job and recorded
in its infotext, the detected-map preview, a result used as a control image, "Use these settings"
bringing units back from a result and from History, help on every control, and axe clean. The desktop
screenshot goes to docs/ui-controlnet.png."""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import tests.test_ui_browser as ui
from tests.test_ui_browser import base_url, browser, expect, open_page  # noqa: F401

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parent.parent / "docs"
CN = "cn-tiny"


@pytest.fixture(scope="module", autouse=True)
def controlnet_file(base_url):
    """A tiny SD1 ControlNet in the live server's home (found on each listing: no restart needed)."""
    from darkroom.testing.tiny_controlnet import write_tiny_controlnet

    write_tiny_controlnet(ui.UI_HOME.controlnets, CN, family="sd1")


def _decode(url: str) -> Image.Image:
    head, _, b64 = url.partition(",")
    assert head.startswith("data:image/"), head
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _pick_model(page, unit: int = 0) -> None:
    pick = "(s, n) => [...s.options].find(o => o.value.startsWith(n + ' [')).value"
    value = page.eval_on_selector(f"#cn{unit}-model", pick, CN)
    page.select_option(f"#cn{unit}-model", value)


def _job_bodies(page) -> list[dict]:
    """The JSON bodies of the jobs the page posts from now on, in order."""
    bodies: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/api/jobs")
            and bodies.append(json.loads(r.post_data)))
    return bodies


def _open_section(page):
    section = page.locator("#controlnet-section")
    section.locator("summary").click()
    expect(page.locator(f"#cn0-model option:has-text('{CN}')")).to_have_count(1)
    return section


def _small_job(page) -> None:
    page.select_option("#model", "tiny-sd1")
    expect(page.locator(".toast", has_text="Model ready: tiny-sd1")).to_be_visible()
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.select_option("#sampler", "Euler")


def _draw(page, canvas, x0, y0, x1, y1) -> None:
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=8)
    page.mouse.up()


def test_section_lists_models_and_modules_with_help_and_passes_axe(open_page):
    from tests.test_ui_accessibility import axe_check

    page, rec = open_page()
    expect(page.locator("#controlnet-section summary")).to_contain_text("ControlNet")
    expect(page.locator("#cn-info")).to_have_text("off")
    _open_section(page)
    expect(page.locator("#cn-tab-0")).to_have_attribute("aria-selected", "true")
    models = page.locator("#cn0-model option").all_text_contents()
    assert models[0] == "None" and f"{CN} (SD1)" in models, models
    modules = page.eval_on_selector_all("#cn0-module option", "os => os.map(o => [o.value, o.disabled, o.title])")
    names = {v for v, _, _ in modules}
    assert {"none", "canny", "invert"} <= names, names
    assert not dict((v, d) for v, d, _ in modules)["canny"]
    unavailable = [(v, t) for v, d, t in modules if d]
    assert unavailable and all("needs" in t for _, t in unavailable), unavailable  # greyed out, the problem as hint
    # two models here (this one and the built-in starter ControlNet): none is picked for the user
    expect(page.locator("#cn0-model")).to_have_value("")
    _pick_model(page)
    expect(page.locator("#cn0-model")).to_have_value(re.compile(rf"^{CN} \[[0-9a-f]+\]$"))

    # canny's sliders: resolution and two thresholds, with canny's defaults
    page.select_option("#cn0-module", "canny")
    expect(page.locator("#cn0-processor-res")).to_have_value("512")
    expect(page.locator("#cn0-threshold-a")).to_have_value("100")
    expect(page.locator("#cn0-threshold-b")).to_have_value("200")
    page.check("#cn0-pixel-perfect")
    expect(page.locator("#cn0-processor-res")).to_be_hidden()  # the picture's size decides
    page.uncheck("#cn0-pixel-perfect")

    # help on every control, tied to it
    for cid in ("enabled", "file", "module", "model", "weight", "start", "end", "control-mode", "resize-mode",
                "hr-option", "pixel-perfect", "preview", "threshold-a", "threshold-b", "processor-res"):
        help_id = f"help-cn0-{cid}"
        expect(page.locator(f"button[aria-controls='{help_id}']")).to_have_count(1)
        assert help_id in (page.locator(f"#cn0-{cid}").get_attribute("aria-describedby") or "").split(), cid
    page.locator("button[aria-controls='help-cn0-weight']").click()
    expect(page.locator("#help-cn0-weight")).to_contain_text("How strongly")
    expect(page.locator("#cn0-weight")).to_have_accessible_name("Control weight")

    # the unit tabs: arrow keys, one panel at a time
    page.locator("#cn-tab-0").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#cn-tab-1")).to_be_focused()
    expect(page.locator("#cn-panel-1")).to_be_visible()
    expect(page.locator("#cn-panel-0")).to_be_hidden()
    page.keyboard.press("ArrowLeft")
    page.click("#cn0-draw")
    expect(page.locator("#cn0-canvas")).to_be_visible()
    axe_check(page, "ControlNet section")
    rec.check()

    phone, rec2 = open_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    _open_section(phone)
    phone.click("#cn0-draw")
    phone.select_option("#cn0-module", "canny")
    expect(phone.locator("#cn0-canvas")).to_be_visible()
    assert ui.no_horizontal_overflow(phone)
    box = phone.locator("#cn0-canvas").bounding_box()
    assert box and box["width"] >= 250 and box["x"] + box["width"] <= 390, box  # big enough to draw on
    axe_check(phone, "ControlNet section (phone)")
    rec2.check()


def test_a_drawing_is_sent_with_the_job_and_comes_back_with_its_settings(open_page):
    page, rec = open_page(viewport={"width": 1280, "height": 1000})
    bodies = _job_bodies(page)
    _small_job(page)
    page.fill("#prompt", "a red circle")
    _open_section(page)
    page.click("#cn0-draw")
    expect(page.locator("#cn0-enabled")).to_be_checked()  # drawing turns the unit on
    canvas = page.locator("#cn0-canvas")
    expect(canvas).to_be_visible()
    _draw(page, canvas, 0.1, 0.1, 0.4, 0.1)   # a line across the top-left
    _draw(page, canvas, 0.1, 0.1, 0.1, 0.4)
    expect(page.locator("#cn0-pen")).to_have_value("#ffffff")  # white outlines by default
    page.fill("#cn0-pen", "#e6192e")  # then in a colour (segmentation and colour maps are drawn in colours)
    _draw(page, canvas, 0.6, 0.2, 0.8, 0.2)  # top right
    page.select_option("#cn0-module", "none")
    _pick_model(page)
    page.fill("#cn0-weight-value", "0.8")
    page.locator("#cn0-weight-value").dispatch_event("input")
    page.fill("#cn0-end-value", "0.7")
    page.locator("#cn0-end-value").dispatch_event("input")
    page.select_option("#cn0-control-mode", "My prompt is more important")
    expect(page.locator("#cn-info")).to_have_text("1 unit on")

    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    ui._wait_images(page, "#results img.result-image")
    page.evaluate("document.getElementById('controlnet-section').scrollIntoView({block: 'start'})")
    page.mouse.move(0, 0)
    page.evaluate("document.activeElement.blur()")
    page.screenshot(path=str(DOCS / "ui-controlnet.png"), animations="disabled")  # the desktop view, for the README
    ui.SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(DOCS / "ui-controlnet.png", ui.SHOTS / "ui-controlnet.png")
    units = bodies[-1]["controlnet"]
    assert len(units) == 1
    unit = units[0]
    assert unit["enabled"] is True and unit["module"] == "none" and unit["model"].startswith(CN)
    assert unit["weight"] == 0.8 and unit["guidance_end"] == 0.7
    assert unit["control_mode"] == "My prompt is more important" and unit["resize_mode"] == "Crop and Resize"
    drawn = _decode(unit["image"]).convert("L")
    assert drawn.size == (512, 512)
    assert drawn.getpixel((128, 51)) == 255 and drawn.getpixel((51, 128)) == 255  # on the strokes: white
    assert drawn.getpixel((400, 400)) == 0 and drawn.getpixel((256, 256)) == 0  # elsewhere: black
    assert _decode(unit["image"]).convert("RGB").getpixel((358, 102)) == (230, 25, 46)  # the coloured stroke
    info = page.locator("#results pre.infotext")
    expect(info).to_contain_text('ControlNet 0: "Module: none, Model: ' + CN)
    expect(info).to_contain_text("Weight: 0.8")

    # "Use these settings" on the result brings the unit back (its image is not kept in the infotext)
    page.fill("#cn0-weight-value", "1.5")
    page.locator("#cn0-weight-value").dispatch_event("input")
    page.select_option("#cn0-control-mode", "Balanced")
    page.uncheck("#cn0-enabled")
    page.locator("#results .use-settings").click()
    expect(page.locator("#cn0-enabled")).to_be_checked()
    expect(page.locator("#cn0-weight")).to_have_value("0.8")
    expect(page.locator("#cn0-end")).to_have_value("0.7")
    expect(page.locator("#cn0-control-mode")).to_have_value("My prompt is more important")

    # after a reload the unit has no image: it starts off, and turned on it gives a clear error, sending nothing
    page.reload()
    expect(page.locator("#cn0-enabled")).not_to_be_checked()
    _open_section(page)
    page.check("#cn0-enabled")
    sent = len(bodies)
    page.click("#generate")
    expect(page.locator(".toast-error", has_text="choose or draw a control image")).to_be_visible()
    assert len(bodies) == sent
    page.uncheck("#cn0-enabled")

    # from History: the infotext's ControlNet line, and the map Darkroom stored in the PNG as the unit's image
    page.click("#tab-history")
    page.locator("#history-grid img.history-item").first.click()
    page.click("#history-use")
    expect(page.locator("#controlnet-section")).to_have_attribute("open", "")
    expect(page.locator("#cn0-enabled")).to_be_checked()
    expect(page.locator("#cn0-weight-value")).to_have_value("0.8")
    expect(page.locator("#cn0-control-mode")).to_have_value("My prompt is more important")
    expect(page.locator("#cn0-model")).to_have_value(re.compile(rf"^{CN} \["))
    expect(page.locator(".toast", has_text="restored from the picture")).to_be_visible()
    expect(page.locator("#cn0-image")).to_be_visible()
    expect(page.locator("#cn0-module")).to_have_value("none")
    expect(page.locator("#form-note")).to_be_hidden()  # the "without their control images" note is gone
    stored = _decode(page.locator("#cn0-image").get_attribute("src")).convert("L")
    w, h = stored.size
    assert max(stored.crop((0, 0, w // 2, h // 2)).tobytes()) > 128  # the strokes, top-left
    assert max(stored.crop((w // 2, h // 2, w, h)).tobytes()) < 32  # nothing bottom-right
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    sent_unit = bodies[-1]["controlnet"][0]
    assert sent_unit["module"] == "none" and sent_unit["image"].startswith("data:")
    assert sent_unit["prepared"] is True  # the stored map is used as it is, its module kept for the infotext
    rec.check(allowed_errors=("choose or draw a control image",))  # the refused Generate is logged


def test_preview_map_and_a_result_as_control_image(open_page, tmp_path):
    page, rec = open_page()
    _small_job(page)
    src = tmp_path / "lines.png"
    im = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(im).rectangle((30, 30, 90, 90), outline="black", width=4)
    im.save(src)
    _open_section(page)
    page.set_input_files("#cn0-file", str(src))
    expect(page.locator("#cn0-image")).to_be_visible()
    page.select_option("#cn0-module", "invert")
    page.click("#cn0-preview")
    expect(page.locator("#cn0-map")).to_be_visible()
    got = _decode(page.locator("#cn0-map").get_attribute("src")).convert("L")
    k = got.size[0] / 128
    assert got.getpixel((int(31 * k), int(60 * k))) > 200  # the black outline is white in the map
    assert got.getpixel((int(60 * k), int(60 * k))) < 50 and got.getpixel((int(5 * k), int(5 * k))) < 50

    page.select_option("#cn0-module", "canny")
    page.click("#cn0-preview")
    page.wait_for_function("(old) => document.getElementById('cn0-map').src !== old",
                           arg=page.locator("#cn0-map").get_attribute("src"))
    edges = _decode(page.locator("#cn0-map").get_attribute("src")).convert("L")
    k = edges.size[0] / 128
    assert max(edges.crop((int(24 * k), int(24 * k), int(96 * k), int(96 * k))).tobytes()) == 255  # edges found
    assert max(edges.crop((int(45 * k), int(45 * k), int(75 * k), int(75 * k))).tobytes()) == 0  # inside: none
    page.click("#cn0-use-map")
    expect(page.locator("#cn0-module")).to_have_value("none")
    assert page.locator("#cn0-image").get_attribute("src") == page.locator("#cn0-map").get_attribute("src")

    # a result becomes the control image of the selected unit
    page.fill("#prompt", "a blue square")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    page.click("#cn-tab-2")
    page.locator("#results .use-control").first.click()
    expect(page.locator(".toast", has_text="Control image of ControlNet unit 3 set")).to_be_visible()
    expect(page.locator("#cn2-enabled")).to_be_checked()
    expect(page.locator("#cn2-image")).to_be_visible()
    assert _decode(page.locator("#cn2-image").get_attribute("src")).size == (64, 64)
    rec.check()


def test_a_union_model_shows_its_control_type_picker_and_sends_the_type(open_page):
    """A ControlNet Union model needs a control type per unit: the picker appears for it alone, offers the
    model's own types, and its choice goes out as the extension's `union_control_type`."""
    from darkroom.testing.tiny_union import write_tiny_union

    write_tiny_union(ui.UI_HOME.controlnets, "union-tiny", num_control_type=6)
    page, rec = open_page()
    bodies = _job_bodies(page)
    _small_job(page)
    _open_section(page)
    expect(page.locator("#cn0-model option:has-text('union-tiny')")).to_have_count(1)
    _pick_model(page)
    expect(page.locator("#cn0-union-type")).to_be_hidden()  # a plain ControlNet has no types
    union = page.eval_on_selector("#cn0-model",
                                  "s => [...s.options].find(o => o.value.startsWith('union-tiny [')).value")
    page.select_option("#cn0-model", union)
    expect(page.locator("#cn0-union-type")).to_be_visible()
    options = page.eval_on_selector_all("#cn0-union-type option", "os => os.map(o => o.value)")
    assert options == ["Unknown", "OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation"]
    page.locator("#help-cn0-union-type").wait_for(state="hidden")
    page.click("button[aria-controls='help-cn0-union-type']")
    expect(page.locator("#help-cn0-union-type")).to_contain_text("Union")
    page.select_option("#cn0-union-type", "Hard Edge")
    page.click("#cn0-draw")
    _draw(page, page.locator("#cn0-canvas"), 0.2, 0.2, 0.6, 0.6)
    page.select_option("#cn0-module", "none")
    page.click("#generate")
    # an SDXL union model with the SD1 test checkpoint: refused, but the request carried the type
    expect(page.locator(".toast-error", has_text="SDXL")).to_be_visible()
    unit = bodies[-1]["controlnet"][0]
    assert unit["model"] == union and unit["union_control_type"] == "Hard Edge"
    _pick_model(page)
    expect(page.locator("#cn0-union-type")).to_be_hidden()
    rec.check(allowed_errors=("SDXL", "422"), allowed_status=(422,))


def test_a_reference_unit_runs_without_a_model(open_page):
    """reference_only needs no ControlNet file: with the model left at None the job goes out (model "None")
    and finishes, and the infotext records the unit."""
    page, rec = open_page()
    bodies = _job_bodies(page)
    _small_job(page)
    _open_section(page)
    page.click("#cn0-draw")
    _draw(page, page.locator("#cn0-canvas"), 0.2, 0.2, 0.7, 0.7)
    page.select_option("#cn0-module", "reference_only")
    page.select_option("#cn0-model", "")
    expect(page.locator("#cn0-threshold-a")).to_be_attached()  # its Style Fidelity slider
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    unit = bodies[-1]["controlnet"][0]
    assert unit["module"] == "reference_only" and unit["model"] == "None"
    expect(page.locator("#results pre.infotext")).to_contain_text('ControlNet 0: "Module: reference_only, Model: None')
    rec.check()


def test_more_pictures_merge_into_a_unit_or_run_as_a_batch(open_page, tmp_path):
    """"More pictures" beside the control image: "Merge" sends them as the unit's merge_images (one job, one
    infotext entry per picture); "Batch" sends the control image and them as batch_images (one run each)."""
    files = []
    for k, colour in enumerate(("white", "gray")):
        picture = Image.new("RGB", (64, 64), "black")
        ImageDraw.Draw(picture).ellipse((10 + 8 * k, 10, 50, 50), outline=colour, width=3)
        files.append(tmp_path / f"frame{k}.png")
        picture.save(files[-1])
    page, rec = open_page()
    bodies = _job_bodies(page)
    _small_job(page)
    _open_section(page)
    page.click("#cn0-draw")
    _draw(page, page.locator("#cn0-canvas"), 0.2, 0.2, 0.7, 0.7)
    _pick_model(page)
    page.select_option("#cn0-module", "none")
    expect(page.locator("#cn0-more-mode")).to_be_hidden()  # nothing to merge or batch yet
    page.set_input_files("#cn0-more-file", [str(f) for f in files])
    expect(page.locator("#cn0-more-count")).to_have_text("2 more pictures")
    expect(page.locator("#cn0-more-list img")).to_have_count(2)
    page.select_option("#cn0-more-mode", "batch")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 3 images"))
    unit = bodies[-1]["controlnet"][0]
    assert len(unit["batch_images"]) == 3 and unit["batch_images"][0] == unit["image"] and "merge_images" not in unit
    assert [_decode(u).size for u in unit["batch_images"][1:]] == [(64, 64), (64, 64)]
    page.select_option("#cn0-more-mode", "merge")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    unit = bodies[-1]["controlnet"][0]
    assert len(unit["merge_images"]) == 2 and "batch_images" not in unit
    expect(page.locator("#results pre.infotext").first).to_contain_text("ControlNet 2:")  # unfolded: 3 entries
    page.click("#cn0-more-clear")
    expect(page.locator("#cn0-more-count")).to_have_text("none")
    expect(page.locator("#cn0-more-mode")).to_be_hidden()
    rec.check()
