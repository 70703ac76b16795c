"""Issue 19's last two gaps in the browser: the prompt history (recorded on generate, most recent first,
no repeats, never a private job's, kept across reloads, keyboard-driven, clearable, axe clean), and History
bringing back an img2img image's source and mask after the page that made it is gone."""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from tests.test_ui_browser import _data_url_image, _paint, base_url, browser, expect, open_page, shot  # noqa: F401

pytestmark = pytest.mark.slow


def _generate(page, prompt: str, negative: str = "", *, private: bool = False) -> None:
    page.fill("#prompt", prompt)
    page.fill("#negative", negative)
    page.set_checked("#private", private)
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))


def _small_job(page) -> None:
    page.select_option("#model", "tiny-sd1")
    expect(page.locator(".toast", has_text="Model ready: tiny-sd1")).to_be_visible()
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "2")
    page.select_option("#sampler", "Euler")


def _options(page) -> list[str]:
    return page.locator("#ph-list [role=option] .ph-prompt").all_text_contents()


def test_prompt_history_is_recorded_kept_and_used_from_the_keyboard(open_page, tmp_path):
    from tests.test_ui_accessibility import axe_check

    page, rec = open_page()
    _small_job(page)
    _generate(page, "a red circle", "blurry")
    _generate(page, "a blue square")
    _generate(page, "a red circle", "blurry")  # again: moves to the top, not listed twice
    _generate(page, "my secret prompt", private=True)  # a private job is never recorded
    stored = page.evaluate("JSON.parse(localStorage.getItem('darkroom.promptHistory'))")
    assert [(e["prompt"], e["negative_prompt"]) for e in stored] == [("a red circle", "blurry"), ("a blue square", "")]

    page.reload()  # kept across reloads
    expect(page.locator("#prompt-history-open")).to_be_visible()
    expect(page.locator("#prompt")).to_have_accessible_name(re.compile(r"^Prompt"))  # the button is not in its name
    page.set_checked("#private", False)
    page.fill("#prompt", "")
    page.locator("#prompt").press("Alt+ArrowDown")  # the shortcut from the prompt box
    dialog = page.locator("#prompt-history")
    expect(dialog).to_be_visible()
    expect(page.locator("#ph-filter")).to_be_focused()
    assert _options(page) == ["a red circle", "a blue square"]
    expect(page.locator("#ph-list .ph-negative").first).to_have_text("Negative: blurry")
    expect(page.locator("#ph-filter")).to_have_attribute("aria-activedescendant", "ph-opt-0")
    axe_check(page, "prompt history dialog")
    shot(page, tmp_path, "prompt-history-desktop.png")
    page.keyboard.press("ArrowDown")
    expect(page.locator("#ph-opt-1")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#ph-opt-0")).to_have_attribute("aria-selected", "false")
    page.keyboard.press("ArrowDown")  # wraps around
    expect(page.locator("#ph-filter")).to_have_attribute("aria-activedescendant", "ph-opt-0")
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Enter")  # uses "a blue square"
    expect(dialog).to_be_hidden()
    expect(page.locator("#prompt")).to_have_value("a blue square")
    expect(page.locator("#negative")).to_have_value("")
    expect(page.locator("#prompt")).to_be_focused()

    # the filter, Esc (closes, gives the focus back, interrupts nothing), the button, forgetting one
    page.locator("#prompt").press("Alt+ArrowDown")
    page.keyboard.type("circle")
    assert _options(page) == ["a red circle"]
    page.keyboard.press("Enter")
    expect(page.locator("#negative")).to_have_value("blurry")
    page.click("#prompt-history-open")
    expect(page.locator("#ph-filter")).to_be_focused()
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    expect(page.locator("#prompt-history-open")).to_be_focused()
    page.click("#prompt-history-open")
    page.keyboard.press("Shift+Delete")  # forgets the active (first) one
    assert _options(page) == ["a blue square"]
    page.click("#ph-clear")
    expect(page.locator("#ph-list [role=option]")).to_have_count(0)
    expect(page.locator("#ph-empty")).to_contain_text("No prompts yet")
    assert page.evaluate("JSON.parse(localStorage.getItem('darkroom.promptHistory'))") == []
    page.keyboard.press("Escape")

    page.click("#shortcuts-open")  # listed with the other shortcuts
    expect(page.locator("#shortcuts")).to_contain_text("Prompt history")
    rec.check()


def test_prompt_history_is_bounded_and_survives_a_damaged_value(open_page):
    page, rec = open_page()
    page.evaluate("localStorage.setItem('darkroom.promptHistory', '{not json')")
    page.reload()
    page.click("#prompt-history-open")
    expect(page.locator("#ph-empty")).to_contain_text("No prompts yet")
    page.keyboard.press("Escape")
    page.evaluate("""() => { for (let i = 0; i < 130; i++)
        Darkroom.rememberPrompt({prompt: `prompt ${i}`, negative_prompt: '', private: false}); }""")
    stored = page.evaluate("JSON.parse(localStorage.getItem('darkroom.promptHistory'))")
    assert len(stored) == 100 and stored[0]["prompt"] == "prompt 129" and stored[-1]["prompt"] == "prompt 30"
    rec.check()


def test_history_brings_back_an_img2img_source_and_mask_after_a_reload(open_page, tmp_path):
    page, rec = open_page()
    bodies: list[dict] = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/api/jobs")
            and bodies.append(json.loads(r.post_data)))
    _small_job(page)
    page.fill("#width", "")
    page.fill("#height", "")
    src = tmp_path / "source.png"
    Image.new("RGB", (64, 64), (30, 160, 60)).save(src)
    page.check("#mode-img2img")
    page.set_input_files("#img2img-file", str(src))
    canvas = page.locator("#mask-canvas")
    expect(canvas).to_be_visible()
    _paint(page, canvas.bounding_box(), 0.1, 0.1, 0.45, 0.3)
    page.fill("#denoise", "0.7")
    _generate(page, "a green field")
    first = bodies[-1]
    assert first["init_image"] and first["mask"]

    page.reload()  # this page's own copy of the source is gone: only History has it now
    expect(page.locator("#mode-txt2img")).to_be_checked()
    page.click("#tab-history")
    page.locator("#history-grid img.history-item").first.click()
    expect(page.locator("#history-detail")).to_be_visible()
    page.click("#history-use")
    expect(page.locator("#page-generate")).to_be_visible()
    expect(page.locator("#mode-img2img")).to_be_checked()
    page.wait_for_function("() => Darkroom.maskState().painted && Darkroom.maskState().width === 64")
    expect(page.locator("#prompt")).to_have_value("a green field")
    expect(page.locator("#denoise-value")).to_have_value("0.70")

    page.click("#generate")  # what is sent again is what was sent the first time
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done · 1 image"))
    again = bodies[-1]
    assert base64.b64decode(again["init_image"].partition(",")[2]) == src.read_bytes()
    mask_then, mask_now = (_data_url_image(b["mask"]).convert("L") for b in (first, again))
    assert mask_now.size == (64, 64) and mask_now.tobytes() == mask_then.tobytes()
    assert max(mask_now.tobytes()) == 255 and min(mask_now.tobytes()) == 0

    # the lightbox's "Use settings" on a History item restores them too
    page.click("#img2img-remove")
    page.click("#tab-history")
    page.locator("#history-grid img.history-item").first.click()
    page.click("#history-detail-img")
    page.locator("#lightbox .lightbox-use").click()
    page.wait_for_function("() => Darkroom.maskState().painted && Darkroom.maskState().width === 64")
    shown = page.evaluate("document.getElementById('img2img-image').src")
    assert Image.open(io.BytesIO(base64.b64decode(shown.partition(",")[2]))).getpixel((5, 5)) == (30, 160, 60)
    rec.check()
