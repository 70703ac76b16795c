"""Accessibility of the web UI (issue 19): axe-core on every page and dialog, fails on any serious or
critical violation; modal dialogs trap focus and give it back; the tab bar works with arrow keys; the
page says what is wrong without JavaScript. axe-core is the copy bundled in axe-playwright-python (no
fetch at run time: the page's own recorder checks that nothing but the server was contacted).

Screenshots of every page at desktop and phone size go to $DARKROOM_UI_SHOTS (default: a tmp dir).
"""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from darkroom.home import Home
from darkroom.metadata.images import encode_png
from tests.server_util import FAST, live_server, studio_with, wait_job
from tests.test_ui_browser import TIMEOUT, Recorder, base_url, browser, expect, open_page  # noqa: F401

axe_sync = pytest.importorskip("axe_playwright_python.sync_playwright", reason="needs axe-playwright-python")
pytestmark = pytest.mark.slow
PHONE = {"width": 390, "height": 844}
STARTER_PROMPT = "a red circle above a blue square"


def axe_problems(page, what: str) -> list[str]:
    """axe-core on the page as it is now: its serious and critical violations, one line each."""
    results = axe_sync.Axe().run(page)
    bad = [v for v in results.response["violations"] if v["impact"] in ("serious", "critical")]
    return [f"{what}: {v['id']} ({v['impact']}): {v['help']}: " + "; ".join(str(n["target"]) for n in v["nodes"][:6])
            for v in bad]


def axe_check(page, what: str, found: list[str] | None = None) -> None:
    """Fail on serious or critical violations, or with `found`, collect them (to report all pages at once)."""
    problems = axe_problems(page, what)
    if found is None:
        assert not problems, "\n".join(problems)
    else:
        found.extend(problems)


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory) -> Path:
    d = Path(os.environ.get("DARKROOM_UI_SHOTS") or tmp_path_factory.mktemp("ui-shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def snap(page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), animations="disabled")


def _history_item(url: str, **fields) -> None:
    with httpx.Client(base_url=url, timeout=60) as c:
        job = c.post("/api/jobs", json={"prompt": "a red circle on a white background", **FAST, **fields}).json()["job"]
        assert wait_job(c, job["id"])["state"] == "done"


def test_axe_on_every_page_and_dialog(open_page, base_url, tmp_path, shots_dir):
    # the built-in starter draws something recognisable for the screenshots
    _history_item(base_url, prompt=STARTER_PROMPT, model="darkroom-starter", width=128, height=128, steps=20)
    found: list[str] = []
    # the dark theme on the desktop, the light one (the system's, followed) on the phone
    runs = (({"color_scheme": "dark"}, "desktop"), ({"viewport": PHONE, "color_scheme": "light"}, "phone"))
    for options, suffix in runs:
        page, rec = open_page(**options)
        page.fill("#prompt", STARTER_PROMPT)
        expect(page.locator("#prompt-tokens")).to_have_text("7/75")
        axe_check(page, f"Generate txt2img ({suffix})", found)
        snap(page, shots_dir, f"generate-{suffix}")

        page.check("#mode-img2img")
        src = tmp_path / "src.png"
        src.write_bytes(encode_png(Image.new("RGB", (64, 64), (200, 40, 40)), None))
        page.set_input_files("#img2img-file", str(src))
        expect(page.locator("#mask-brush")).to_be_visible()
        axe_check(page, f"Generate img2img ({suffix})", found)
        snap(page, shots_dir, f"img2img-{suffix}")
        page.check("#mode-txt2img")

        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("?")  # not while typing in a field
        expect(page.locator("#shortcuts")).to_be_visible()
        axe_check(page, f"the shortcut dialog ({suffix})", found)
        snap(page, shots_dir, f"shortcuts-{suffix}")
        page.keyboard.press("Escape")
        expect(page.locator("#shortcuts")).to_be_hidden()

        for name in ("extras", "pnginfo", "models"):
            page.click(f"#tab-{name}")
            expect(page.locator(f"#page-{name}")).to_be_visible()
            if name == "models":
                expect(page.locator("#models-table tbody tr").first).to_be_visible()
            axe_check(page, f"{name} ({suffix})", found)
            snap(page, shots_dir, f"{name}-{suffix}")

        page.click("#tab-history")
        expect(page.locator("#history-grid img").first).to_be_visible()
        axe_check(page, f"History ({suffix})", found)
        snap(page, shots_dir, f"history-{suffix}")
        page.locator("#history-grid img").first.click()
        expect(page.locator("#history-detail")).to_be_visible()
        axe_check(page, f"History detail ({suffix})", found)
        snap(page, shots_dir, f"history-detail-{suffix}")
        page.click("#history-detail-img")
        expect(page.locator("#lightbox")).to_be_visible()
        axe_check(page, f"the lightbox ({suffix})", found)
        snap(page, shots_dir, f"lightbox-{suffix}")
        rec.check()
    assert not found, "\n".join(found)


def test_axe_on_the_queue_panel(open_page, base_url):
    page, rec = open_page()
    with httpx.Client(base_url=base_url, timeout=60) as c:
        ids = [c.post("/api/jobs", json={"prompt": f"queued {i}", **FAST, "steps": 400}).json()["job"]["id"]
               for i in range(3)]
        try:
            expect(page.locator("#queue-panel")).to_be_visible()
            expect(page.locator("#queue-list li").first).to_be_visible()
            axe_check(page, "the queue panel")
        finally:
            for i in ids:
                c.post(f"/api/jobs/{i}/interrupt")
            for i in ids:
                wait_job(c, i)
    rec.check()


@pytest.fixture(scope="module")
def first_run_url(tmp_path_factory):
    """A server over an empty home: the welcome shows."""
    home = Home(tmp_path_factory.mktemp("a11y-first-run")).ensure()
    studio = studio_with(home)
    try:
        with live_server(studio) as url:
            yield url
    finally:
        studio.close()


def test_axe_on_the_welcome(browser, first_run_url, shots_dir):
    for viewport, suffix, scheme in (({"width": 1280, "height": 900}, "desktop", "dark"), (PHONE, "phone", "light")):
        ctx = browser.new_context(viewport=viewport, color_scheme=scheme)
        ctx.set_default_timeout(TIMEOUT)
        page = ctx.new_page()
        rec = Recorder(first_run_url)
        rec.attach(page)
        page.goto(first_run_url + "/")
        expect(page.locator("#welcome")).to_be_visible()
        axe_check(page, f"the welcome ({suffix})")
        snap(page, shots_dir, f"welcome-{suffix}")
        rec.check()
        ctx.close()


def _focused_id(page) -> str:
    return page.evaluate("document.activeElement && document.activeElement.id")


def test_dialogs_trap_focus_and_return_it(open_page, base_url):
    _history_item(base_url)
    page, rec = open_page()
    # the shortcut dialog, from its header button
    page.click("#shortcuts-open")
    expect(page.locator("#shortcuts")).to_be_visible()
    for _ in range(12):  # Tab never leaves the dialog
        page.keyboard.press("Tab")
        assert page.evaluate("document.getElementById('shortcuts').contains(document.activeElement)")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.getElementById('shortcuts').contains(document.activeElement)")
    page.keyboard.press("Escape")
    expect(page.locator("#shortcuts")).to_be_hidden()
    assert _focused_id(page) == "shortcuts-open"

    # History detail and the lightbox over it
    page.click("#tab-history")
    first = page.locator("#history-grid .history-cell").first
    expect(first).to_be_visible()
    first.focus()
    opener = page.evaluate("document.activeElement.outerHTML")
    page.keyboard.press("Enter")
    expect(page.locator("#history-detail")).to_be_visible()
    for _ in range(15):
        page.keyboard.press("Tab")
        assert page.evaluate("document.getElementById('history-detail').contains(document.activeElement)")
    page.focus("#history-detail-img")
    page.keyboard.press("Enter")
    expect(page.locator("#lightbox")).to_be_visible()
    for _ in range(25):
        page.keyboard.press("Shift+Tab")
        assert page.evaluate("document.getElementById('lightbox').contains(document.activeElement)")
    page.keyboard.press("Escape")
    expect(page.locator("#lightbox")).to_be_hidden()
    assert _focused_id(page) == "history-detail-img"  # back to the opener
    page.keyboard.press("Escape")
    expect(page.locator("#history-detail")).to_be_hidden()
    assert page.evaluate("document.activeElement.outerHTML") == opener
    rec.check()


def test_tab_bar_arrow_keys_and_roles(open_page):
    page, rec = open_page()
    tabs = page.locator(".tabs [role=tab]")  # the page tabs (the ControlNet section has its own unit tabs)
    assert tabs.count() == 5
    for i in range(5):
        tab = tabs.nth(i)
        panel = tab.get_attribute("aria-controls")
        assert panel and page.locator(f"#{panel}[role=tabpanel]").count() == 1
    gen = page.locator("#tab-generate")
    expect(gen).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-extras")).to_have_attribute("tabindex", "-1")  # roving tabindex
    gen.focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-extras")).to_be_focused()
    expect(page.locator("#tab-extras")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#page-extras")).to_be_visible()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")  # wraps around
    expect(page.locator("#tab-models")).to_be_focused()
    expect(page.locator("#page-models")).to_be_visible()
    page.keyboard.press("Home")
    expect(page.locator("#tab-generate")).to_have_attribute("aria-selected", "true")
    expect(page.locator("h1")).to_have_count(1)
    expect(page.locator("#mask-brush")).to_have_attribute("aria-label", "Brush size")  # the img2img mask slider
    rec.check()


def test_without_javascript_the_page_says_so(browser, base_url):
    ctx = browser.new_context(java_script_enabled=False)
    page = ctx.new_page()
    page.goto(base_url + "/")
    expect(page.locator(".noscript")).to_be_visible()
    expect(page.locator(".noscript")).to_contain_text("JavaScript")
    expect(page.locator("#server-status")).to_be_hidden()  # no "connecting…" forever
    ctx.close()
