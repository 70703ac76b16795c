"""The webui's Extras routes (/sdapi/v1/extra-single-image, /extra-batch-images), the upscaler listings and the
hires fix with an upscaler model: in process, and with the real `webuiapi` client over a socket."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import webuiapi
from PIL import Image

from darkroom.testing import tiny_upscalers
from tests.server_util import live_server


def _b64(image: Image.Image, parameters: str | None = None) -> str:
    from darkroom.metadata.images import encode_png

    return base64.b64encode(encode_png(image, parameters)).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.fixture
def upscalers(studio):
    """A tiny ESRGAN (as "R-ESRGAN 4x+") and a tiny Compact model in the studio's home."""
    folder = studio.home.upscalers
    tiny_upscalers.save("esrgan", folder / "RealESRGAN_x4plus.safetensors")
    tiny_upscalers.save("compact", folder / "4x-TinyCompact.safetensors")
    return folder


def test_listings_show_the_files(api, upscalers):
    rows = api.get("/sdapi/v1/upscalers").json()
    assert [r["name"] for r in rows] == ["None", "Lanczos", "Nearest", "4x-TinyCompact", "R-ESRGAN 4x+"]
    esrgan = rows[-1]
    assert esrgan == {"name": "R-ESRGAN 4x+", "model_name": "upscalers",
                      "model_path": str(upscalers / "RealESRGAN_x4plus.safetensors"), "model_url": None, "scale": 4}
    assert api.get("/sdapi/v1/realesrgan-models").json() == [
        {"name": "R-ESRGAN 4x+", "path": str(upscalers / "RealESRGAN_x4plus.safetensors"), "scale": 4}]


def test_single_image_keeps_parameters_and_adds_postprocessing(api, upscalers):
    source = Image.new("RGB", (24, 16), (200, 30, 30))
    r = api.post("/sdapi/v1/extra-single-image", json={
        "image": _b64(source, "a red square\nSteps: 3, Seed: 7"), "upscaler_1": "r-esrgan 4x+", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    out = _image(r.json()["image"])
    assert out.size == (48, 32)
    assert out.text["parameters"] == "a red square\nSteps: 3, Seed: 7"
    assert out.text["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+"
    assert r.json()["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: R-ESRGAN 4x+</p>"


@pytest.mark.parametrize(("fields", "needle"), [
    ({"upscaler_1": "4x-Missing"}, "no upscaler named '4x-Missing'; available: None, Lanczos, Nearest, 4x-TinyCompact"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "face restoration"),
    ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 16, "image": None}, "needs about"),
    ({"image": "%%%"}, "image"),
])
def test_bad_extras_requests_are_422(api, upscalers, fields, needle, monkeypatch):
    from darkroom.engine import memory

    monkeypatch.setattr(memory, "available_memory", lambda device, reclaimable=0: 50 * 2**20)  # 50 MB free
    body = {"image": _b64(Image.new("RGB", (512, 512))), **fields}
    if body["image"] is None:
        body["image"] = _b64(Image.new("RGB", (1024, 1024)))
    r = api.post("/sdapi/v1/extra-single-image", json=body)
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_webuiapi_extras_single_and_batch(studio, upscalers):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port))
        assert "R-ESRGAN 4x+" in [u["name"] for u in client.get_upscalers()]
        one = client.extra_single_image(source, upscaler_1="R-ESRGAN 4x+", upscaling_resize=4)
        assert one.image.size == (96, 64)
        crop = client.extra_single_image(source, upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=40,
                                         upscaling_resize_h=40, upscaling_crop=True)
        assert crop.image.size == (40, 40)
        batch = client.extra_batch_images([source, source.transpose(Image.FLIP_LEFT_RIGHT)],
                                          upscaler_1="4x-TinyCompact", upscaling_resize=2, upscaler_2="Nearest",
                                          extras_upscaler_2_visibility=0.5)
        assert [im.size for im in batch.images] == [(48, 32), (48, 32)]
        assert batch.info == "<p>Postprocess upscale by: 2, Postprocess upscaler: 4x-TinyCompact,"\
                             " Postprocess upscaler 2: Nearest</p>"
        with pytest.raises(RuntimeError, match="422"):
            client.extra_single_image(source, upscaler_1="4x-Missing")


def test_hires_fix_with_an_upscaler_model(api, upscalers):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "width": 64, "height": 64,
                                            "seed": 5, "enable_hr": True, "hr_scale": 2,
                                            "hr_upscaler": "R-ESRGAN 4x+", "denoising_strength": 0.5})
    assert r.status_code == 200, r.text
    image = _image(r.json()["images"][0])
    assert image.size == (128, 128) and "Hires upscaler: R-ESRGAN 4x+" in image.text["parameters"]
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "enable_hr": True, "hr_upscaler": "4x-Nope"})
    assert r.status_code == 422 and "4x-TinyCompact, R-ESRGAN 4x+" in r.json()["detail"], r.text
