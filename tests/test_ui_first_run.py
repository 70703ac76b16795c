"""The web UI for a new user (issue 19), in headless Chromium against a live server over an empty home:
the first-run welcome and its prompt chips, importing a model from a path, per-file problems on the
Models page, private results and the Download button, History's thumbnails, stars, search and bulk delete.

The tests run in file order over one server: the welcome needs a home with no checkpoint of its own,
so the import test (which adds one) comes after it.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests/test_ui_browser.py, used as arguments)
from __future__ import annotations

import re

import pytest

import tests.test_ui_browser as ui
from darkroom.home import Home
from tests.server_util import live_server, studio_with
from tests.test_ui_browser import TIMEOUT, Recorder, browser, expect, shot  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
STATE: dict = {}


@pytest.fixture(scope="module")
def first_url(tmp_path_factory):
    """A live server over an empty home: the built-in starter is the only checkpoint."""
    home = Home(tmp_path_factory.mktemp("first-run-home")).ensure()
    STATE["home"] = home
    studio = STATE["studio"] = studio_with(home)
    try:
        with live_server(studio) as url:
            yield url
    finally:
        studio.close()


@pytest.fixture
def open_first(browser, first_url):
    contexts = []

    def open_(**options):
        options.setdefault("viewport", {"width": 1280, "height": 900})
        ctx = browser.new_context(**options)
        ctx.set_default_timeout(TIMEOUT)
        contexts.append(ctx)
        page = ctx.new_page()
        rec = Recorder(first_url)
        rec.attach(page)
        page.goto(first_url + "/")
        expect(page.locator("#model option[value='darkroom-starter']")).to_have_count(1)
        expect(page.locator("#server-status")).not_to_have_text("connecting…")
        return page, rec

    yield open_
    for ctx in contexts:
        ctx.close()


def test_first_run_welcome_explains_the_starter_and_a_chip_fills_the_prompt(open_first, tmp_path):
    page, rec = open_first()
    welcome = page.locator("#welcome")
    expect(welcome).to_be_visible()
    expect(welcome).to_contain_text("128 × 128 demo")
    expect(page.locator("#prompt")).to_have_attribute("placeholder", "a red circle on a white background")
    expect(page.locator("#welcome-folder-path")).to_have_text(str(STATE["home"].checkpoints))
    chips = welcome.locator(".chip")
    assert 4 <= chips.count() <= 6
    welcome.locator(".chip", has_text="a green triangle at the bottom").click()
    expect(page.locator("#prompt")).to_have_value("a green triangle at the bottom")
    expect(page.locator("#size-preset option[value='128x128']")).to_have_count(1)  # presets fit the starter
    expect(page.locator("#size-preset option[value='1024x1024']")).to_have_count(0)
    shot(page, tmp_path, "first-run-welcome-desktop.png")

    page.click("#welcome-dismiss")  # dismissed: remembered across reloads
    expect(welcome).to_be_hidden()
    page.reload()
    expect(page.locator("#model option[value='darkroom-starter']")).to_have_count(1)
    expect(page.locator("#server-status")).not_to_have_text("connecting…")
    expect(page.locator("#welcome")).to_be_hidden()
    rec.check()


def test_first_run_welcome_on_a_phone(open_first, tmp_path):
    page, rec = open_first(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    expect(page.locator("#welcome")).to_be_visible()
    assert ui.no_horizontal_overflow(page)
    shot(page, tmp_path, "first-run-welcome-390.png")
    rec.check()


def test_import_from_a_path_lists_the_model(open_first, tiny_model, tmp_path):
    usb = tmp_path / "usb"
    usb.mkdir()
    (usb / "my-model.safetensors").write_bytes(tiny_model("sd1")["path"].read_bytes())
    page, rec = open_first()
    page.fill("#welcome-import-path", "/no/such/drive")
    page.click("#welcome-import-go")
    expect(page.locator("#welcome-import-status")).to_contain_text("no such file or folder: /no/such/drive")
    page.fill("#welcome-import-path", str(usb))
    page.click("#welcome-import-go")
    expect(page.locator("#welcome-import-results")).to_contain_text("Imported: my-model.safetensors")
    expect(page.locator("#welcome-import-status")).to_contain_text("1 file imported")
    expect(page.locator("#model option[value='my-model']")).to_have_count(1)
    assert (STATE["home"].checkpoints / "my-model.safetensors").is_file()
    page.click("#tab-models")
    row = page.locator("#models-table tbody tr", has_text="my-model")
    expect(row).to_have_count(1)
    expect(row).to_contain_text(str(STATE["home"].checkpoints / "my-model.safetensors"))  # the folder path
    rec.check(allowed_errors=("no such file or folder", "404 (Not Found)"), allowed_status=(404,))


def test_models_page_shows_broken_files_and_files_in_the_wrong_folder(open_first, tiny_model, tmp_path):
    from darkroom.testing.tiny_lora import write_tiny_lora

    home = STATE["home"]
    (home.checkpoints / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    write_tiny_lora(home.checkpoints / "stray-lora.safetensors", tiny_model("sd1"), family="sd1")
    page, rec = open_first()
    page.click("#tab-models")
    page.click("#models-rescan")
    broken = page.locator("#models-table tbody tr", has_text="broken")
    expect(broken).to_have_count(1)
    expect(broken.locator(".model-error")).to_be_visible()
    assert broken.locator(".model-error").inner_text().strip()
    expect(broken.locator("button")).to_have_count(0)  # no Use button for a file that cannot load
    expect(broken).to_contain_text("Cannot be used")
    starter = page.locator("#models-table tbody tr", has_text="darkroom-starter")
    expect(starter.locator("button, .in-use")).to_have_count(1)
    misplaced = page.locator("#models-misplaced-list li", has_text="stray-lora.safetensors")
    expect(misplaced).to_contain_text(re.compile(r"LoRA, found in a checkpoint folder; move it to .*loras"))
    expect(page.locator("#models-folders")).to_contain_text(str(home.checkpoints))
    shot(page, tmp_path, "models-page-desktop.png")
    phone, rec2 = open_first(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.click("#tab-models")
    expect(phone.locator("#models-misplaced-list li")).to_have_count(1)
    expect(phone.locator("#models-table tbody tr", has_text="broken").locator(".model-error")).to_be_visible()
    assert ui.no_horizontal_overflow(phone)
    shot(phone, tmp_path, "models-page-390.png")
    rec.check()
    rec2.check()


def _generate(page, prompt: str, *, private: bool, batch: int = 1) -> None:
    page.select_option("#model", "darkroom-starter")
    expect(page.locator(".toast", has_text="Model ready: darkroom-starter")).to_be_visible()
    page.fill("#prompt", prompt)
    page.fill("#steps", "3")
    page.fill("#batch-size", str(batch))
    page.fill("#seed", "11")
    page.set_checked("#private", private)
    page.click("#generate")
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"))


def test_private_results_are_badged_and_every_result_downloads(open_first):
    page, rec = open_first()
    _generate(page, "a red circle on a white background", private=True)
    result = page.locator("#results .result").first
    expect(result.locator(".badge", has_text="Private · not saved")).to_be_visible()
    with page.expect_download() as dl:
        result.locator("button.download-image").click()
    assert dl.value.suggested_filename == "darkroom-11.png"
    assert dl.value.path().read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _generate(page, "a blue square in the top left", private=False)
    result = page.locator("#results .result").first
    expect(result.locator(".badge", has_text="Private")).to_have_count(0)
    with page.expect_download() as dl:
        result.locator("button.download-image").click()
    assert dl.value.suggested_filename.startswith("darkroom-11.")
    rec.check()


def test_history_thumbnails_stars_search_and_bulk_delete(open_first):
    page, rec = open_first()
    _generate(page, "a green triangle at the bottom", private=False, batch=2)
    page.click("#tab-history")
    cells = page.locator("#history-grid .history-tile")
    expect(cells).to_have_count(3)  # these two and the blue square of the test before
    srcs = page.locator("#history-grid img.history-item").evaluate_all("imgs => imgs.map(i => i.src)")
    assert all(re.search(r"/api/history/\d+/thumb$", s) for s in srcs), srcs
    page.wait_for_function("() => [...document.querySelectorAll('img.history-item')]"
                           ".every(i => i.complete && i.naturalWidth > 0)")

    page.fill("#history-search", "Euler")  # not the sampler these used
    expect(page.locator("#history-grid")).to_contain_text("No images match")
    page.fill("#history-search", "DPM++ 2M triangle")
    expect(cells).to_have_count(2)
    page.fill("#history-search", "")
    expect(cells).to_have_count(3)

    cells.first.locator(".star").click()
    expect(cells.first.locator(".star")).to_have_attribute("aria-pressed", "true")
    page.click("#history-favourites")
    expect(cells).to_have_count(1)
    page.click("#history-favourites")
    expect(cells).to_have_count(3)

    page.click("#history-select")
    cells.nth(0).locator(".history-cell").click()
    cells.nth(1).locator(".history-cell").click()
    expect(page.locator("#history-bulk-count")).to_have_text("2 selected")
    expect(page.locator("#history-detail")).to_be_hidden()  # selecting opens nothing
    page.once("dialog", lambda d: d.accept())
    with page.expect_request(lambda r: r.url.endswith("/api/history/delete") and r.method == "POST"):
        page.click("#history-bulk-delete")
    expect(page.locator(".toast", has_text="Deleted 2 images")).to_be_visible()
    expect(cells).to_have_count(1)
    assert STATE["studio"].history.count() == 1
    rec.check()


def test_server_paths_are_taken_only_from_the_servers_own_machine(studio):
    """With --listen, a phone holding the token must not copy server files into the library or point it at any
    folder: those two routes answer 403 to a client that is not on loopback."""
    from tests.server_util import client

    with client(studio) as http:  # the in-process client's address is "testclient", not loopback
        r = http.post("/api/library/import", json={"paths": ["/etc"]})
        assert r.status_code == 403 and "machine Darkroom runs on" in r.json()["detail"]
        r = http.put("/api/library/folders", json={"folders": ["/"]})
        assert r.status_code == 403
        assert studio.settings.get("models_dirs") in (None, [])
        assert http.get("/api/library").status_code == 200
