"""The webui's options over /sdapi/v1 (GET/POST /options, override_settings) and saving as JPEG/WebP.

Payload shapes: webuiapi's `get_options()` / `set_options(dict)` (a plain JSON object of option
names, .venv/lib/python3.11/site-packages/webuiapi/webuiapi.py) and its `txt2img(...,
override_settings={...}, save_images=True)`; option names and defaults from the webui's
modules/shared_options.py (darkroom/webui_options.py records the version). JPEG/WebP metadata as
the webui writes it (modules/images.py and api.py: EXIF UserComment, piexif "unicode" encoding).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import webuiapi
from PIL import Image

from darkroom.metadata.images import encode_file, read_image_metadata
from darkroom.settings import Settings
from darkroom.webui_options import DEFAULTS, PICTURE
from tests.server_util import live_server

SMALL = {"width": 64, "height": 64, "steps": 2}


def _client(url: str) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)


def _refused(call, *words: str) -> str:
    """webuiapi raises RuntimeError(status, text) on a non-200 answer: a 422 whose message has `words`."""
    with pytest.raises(RuntimeError) as caught:
        call()
    status, text = caught.value.args
    message = json.loads(text)["detail"]
    assert status == 422 and all(w in message for w in words), (status, text)
    return message


def test_get_options_has_the_webuis_keys_and_posting_them_back_changes_nothing(studio):
    with live_server(studio) as url:
        api = _client(url)
        options = api.get_options()
        assert set(DEFAULTS) <= set(options)  # every webui option, ~250 of them
        assert options["send_seed"] is True and options["outdir_txt2img_samples"] == "outputs/txt2img-images"
        assert options["s_churn"] == 0.0 and options["samples_format"] == "png" and options["jpeg_quality"] == 80
        assert options["sd_model_checkpoint"].startswith("tiny-sd1 [")
        assert options["enable_prompt_comments"] is False  # what Darkroom does, not the webui's default
        api.set_options(options)  # a client echoing everything back (the Photoshop plugin's settings page)
        assert api.get_options() == options


def test_set_options_round_trip_of_ui_keys_persists(studio):
    with live_server(studio) as url:
        api = _client(url)
        api.set_options({"send_seed": False, "live_previews_image_format": "jpeg",
                         "quicksettings_list": ["sd_model_checkpoint", "sd_vae"], "n_rows": 2.0})
        options = api.get_options()
        assert options["send_seed"] is False and options["live_previews_image_format"] == "jpeg"
        assert options["quicksettings_list"] == ["sd_model_checkpoint", "sd_vae"] and options["n_rows"] == 2
    reread = Settings(studio.home.root / "settings.json")  # kept in settings.json, as the webui keeps config.json
    assert reread.get("webui_options")["send_seed"] is False and not reread.problems


def _options_refused(url: str, body: dict, *words: str) -> None:
    """POST /options answering 422 with `words` (webuiapi's set_options returns the error JSON, so raw httpx)."""
    r = httpx.post(f"{url}/sdapi/v1/options", json=body, timeout=60)
    assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), r.text


def test_bad_option_values_are_refused_naming_the_key_and_change_nothing(studio):
    with live_server(studio) as url:
        api = _client(url)
        assert "detail" in api.set_options({"send_size": False, "send_seed": "yes"})  # what webuiapi users see
        _options_refused(url, {"send_size": False, "send_seed": "yes"}, "send_seed", "true or false")
        _options_refused(url, {"s_churn": 0.5}, "s_churn", "changes the picture")
        _options_refused(url, {"always_discard_next_to_last_sigma": True}, "always_discard_next_to_last_sigma")
        _options_refused(url, {"samples_format": "gif"}, "samples_format", "webp")
        options = api.get_options()
        assert options["send_size"] is True and options["send_seed"] is True  # nothing half-applied
        api.set_options({"s_churn": 0, "sd_unet": "None", "ghost_extension_option": 1})  # Darkroom's values; unknown
        assert "ghost_extension_option" not in api.get_options()


def test_override_settings_refuses_picture_keys_and_ignores_the_others(studio):
    with live_server(studio) as url:
        api = _client(url)
        _refused(lambda: api.txt2img(prompt="a cat", seed=1, **SMALL, override_settings={"sgm_noise_multiplier": True}),
                 "override_settings.sgm_noise_multiplier")
        _refused(lambda: api.txt2img(prompt="a cat", seed=1, **SMALL, override_settings={"eta_ddim": 0.3}),
                 "override_settings.eta_ddim")
        # UI and saving-path options cannot change the picture: accepted (webuiapi users pass whole dicts)
        result = api.txt2img(prompt="a cat", seed=1, **SMALL,
                             override_settings={"send_seed": False, "outdir_samples": "x", "s_churn": 0.0})
        assert result.image.size == (64, 64) and result.image.format == "PNG"


def test_samples_format_jpg_saves_a_jpeg_whose_infotext_png_info_reads(studio):
    with live_server(studio) as url:
        api = _client(url)
        api.set_options({"samples_format": "jpg", "jpeg_quality": 90})
        assert api.get_options()["samples_format"] == "jpg"
        result = api.txt2img(prompt="a red circle, ünïcode ✓", seed=7, save_images=True, **SMALL)
        assert result.image.format == "JPEG"  # the API answers in the samples_format, as the webui does
        saved = sorted(studio.home.outputs.rglob("*.jpg"))
        assert len(saved) == 1 and not list(studio.home.outputs.rglob("*-7.png"))
        meta = read_image_metadata(saved[0])
        assert meta.image_format == "JPEG" and meta.parameters.startswith("a red circle, ünïcode ✓\n")
        assert "Seed: 7" in meta.parameters
        info = httpx.post(f"{url}/sdapi/v1/png-info", timeout=60,
                          json={"image": base64.b64encode(saved[0].read_bytes()).decode()}).json()
        assert info["parameters"]["Seed"] == "7" and info["info"] == meta.parameters
        # the history serves the file as what it is
        [item] = [i for i in httpx.get(f"{url}/api/history", timeout=60).json()["items"] if i["seed"] == 7]
        got = httpx.get(f"{url}/api/images/{item['id']}", timeout=60)
        assert got.headers["content-type"] == "image/jpeg" and got.content == saved[0].read_bytes()
        # per request: WebP, with the infotext in its EXIF too
        result = api.txt2img(prompt="a blue square", seed=8, **SMALL, override_settings={"samples_format": "webp"})
        assert result.image.format == "WEBP"
        buf = io.BytesIO()
        result.image.save(buf, format="WEBP", exif=result.image.getexif())
        assert "Seed: 8" in read_image_metadata(buf.getvalue()).parameters
    assert studio.history.reconcile() == (0, 0)  # the JPEG was indexed when written, and is found on disk


@pytest.mark.parametrize("fmt", ["png", "jpg", "jpeg", "webp"])
def test_encoders_write_the_infotext_where_readers_find_it(fmt):
    text = "a cat ✓ with a 🐈\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 3"
    data = encode_file(Image.new("RGB", (16, 16), "red"), text, fmt, quality=70)
    meta = read_image_metadata(data)
    assert meta.parameters == text
    assert meta.image_format == {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WebP"}[fmt]


def test_a_damaged_store_in_settings_json_falls_back_to_defaults(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"clip_skip": 2, "webui_options": {"send_seed": "maybe"}}))
    settings = Settings(path)
    assert settings.get("webui_options") == {} and settings.get("clip_skip") == 2
    assert any("webui_options" in p for p in settings.problems)
    assert "s_churn" in PICTURE and "send_seed" not in PICTURE
