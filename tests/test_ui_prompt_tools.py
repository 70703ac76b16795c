"""Prompt tools and help in the web UI (issue 19): the token counter, Ctrl+Up/Down weighting, Esc to
interrupt this tab's job, the help buttons, the light theme and the phone's sticky Generate bar."""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import pytest

from tests.test_ui_browser import base_url, browser, expect, open_page  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

HELP_IDS = ["cfg", "sampler", "schedule", "steps", "seed", "subseed", "subseed-strength", "denoise", "hr-scale",
            "hr-upscaler", "hr-steps", "masked-content", "mask-blur", "only-masked", "only-masked-padding",
            "resize-mode", "clip-skip", "eta", "ensd", "rng", "tiling", "styles-search", "batch-count", "batch-size"]


def test_token_counter_counts_as_the_webui_and_is_debounced(open_page):
    page, rec = open_page()
    calls: list[str] = []
    page.on("request", lambda r: r.url.endswith("/api/tokens") and calls.append(r.post_data))
    counter = page.locator("#prompt-tokens")
    page.fill("#prompt", "")
    expect(counter).to_have_text("0/75")
    calls.clear()
    page.locator("#prompt").press_sequentially("a cat BREAK a dog", delay=20)  # one request after typing stops
    expect(counter).to_have_text("77/150 · 2 chunks")  # BREAK: 75 for the first chunk
    assert len(calls) <= 2, calls
    page.fill("#negative", "blurry, " * 40)
    expect(page.locator("#negative-tokens")).to_have_text("80/150 · 2 chunks")  # comma backtrack
    expect(page.locator("#prompt")).to_have_attribute("aria-describedby", "prompt-tokens")
    rec.check()


def test_ctrl_up_down_weights_the_selection_or_the_word(open_page):
    page, rec = open_page()
    box = page.locator("#prompt")
    page.fill("#prompt", "a red circle, white background")
    box.evaluate("t => t.setSelectionRange(4, 4)")  # caret inside "red"
    box.press("Control+ArrowUp")
    expect(box).to_have_value("a (red:1.1) circle, white background")
    box.press("Control+ArrowUp")
    expect(box).to_have_value("a (red:1.2) circle, white background")
    box.press("Control+ArrowDown")
    box.press("Control+ArrowDown")
    expect(box).to_have_value("a red circle, white background")  # back to 1.0: plain text
    box.evaluate("t => t.setSelectionRange(14, 30)")  # "white background"
    box.press("Control+ArrowDown")
    expect(box).to_have_value("a red circle, (white background:0.9)")
    assert box.evaluate("t => t.value.slice(t.selectionStart, t.selectionEnd)") == "white background"
    rec.check()


def test_escape_interrupts_this_tabs_job(open_page):
    page, rec = open_page()
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "400")
    page.fill("#batch-count", "8")  # long enough to be running when Esc comes
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.click("#generate")
    expect(page.locator("#progress-text")).to_contain_text("Step", timeout=60_000)
    page.locator("#prompt").press("Escape")
    expect(page.locator("#progress-text")).to_contain_text("Interrupted", timeout=60_000)
    rec.check()


def test_help_buttons_toggle_a_description_tied_to_the_control(open_page):
    page, rec = open_page()
    page.check("#mode-img2img")  # the inpainting settings are shown
    for hid in HELP_IDS:
        help_id = f"help-{hid}"
        btn = page.locator(f"button[aria-controls='{help_id}']")
        expect(btn).to_have_count(1)
        assert help_id in (page.locator(f"#{hid}").get_attribute("aria-describedby") or "").split()
        text = page.locator(f"#{help_id}")
        expect(text).to_be_hidden()
        assert "http" not in (text.text_content() or "")  # no links out
    expect(page.locator("button[aria-controls='help-styles-search']")).to_have_attribute("aria-label", "Help: Styles")
    expect(page.locator("button[aria-controls='help-eta']")).to_have_attribute("aria-label", "Help: Eta")
    page.check("#mode-txt2img")
    cfg_btn = page.locator("button[aria-controls='help-cfg']")
    cfg_btn.focus()  # keyboard reachable
    page.keyboard.press("Enter")
    expect(page.locator("#help-cfg")).to_be_visible()
    expect(page.locator("#help-cfg")).to_contain_text("follows the prompt")
    expect(cfg_btn).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#cfg")).to_have_accessible_name("CFG scale")  # the button is not part of the name
    expect(page.locator("#cfg")).to_have_accessible_description(page.locator("#help-cfg").text_content())
    page.keyboard.press("Space")
    expect(page.locator("#help-cfg")).to_be_hidden()
    rec.check()


def test_light_theme_switch_and_follow_system(open_page):
    page, rec = open_page(color_scheme="light")
    html = page.locator("html")
    expect(html).to_have_attribute("data-theme", "light")  # "system" follows prefers-color-scheme
    page.emulate_media(color_scheme="dark")
    expect(html).to_have_attribute("data-theme", "dark")
    page.select_option("#theme", "light")
    expect(html).to_have_attribute("data-theme", "light")
    bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg == "rgb(243, 243, 241)", bg
    page.reload()  # remembered
    expect(html).to_have_attribute("data-theme", "light")
    expect(page.locator("#theme")).to_have_value("light")
    page.select_option("#theme", "system")
    expect(html).to_have_attribute("data-theme", "dark")
    rec.check()


def test_generate_stays_reachable_on_a_phone(open_page):
    page, rec = open_page(viewport={"width": 390, "height": 844})
    page.locator("#batch-size").scroll_into_view_if_needed()  # far down the form
    assert page.evaluate("window.scrollY") > 500
    bar = page.evaluate("""() => [document.querySelector('.topbar').offsetHeight,
        parseFloat(getComputedStyle(document.documentElement).getPropertyValue('--topbar-h'))]""")
    assert bar[0] <= bar[1] + 1, bar  # the top bar is no taller than the offset the Generate row sticks at
    box = page.locator("#generate").bounding_box()
    assert box and 0 <= box["y"] and box["y"] + box["height"] <= 844, box
    assert page.evaluate("""() => { const b = document.getElementById('generate').getBoundingClientRect();
        return document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2).closest('#generate') !== null; }""")
    rec.check()
