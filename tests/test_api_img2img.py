"""img2img, inpainting, the hires fix and variation seeds through the webui and OpenAI APIs.

In process first (shapes, pixels, refusals), then with the real `webuiapi` and `openai` clients
over a socket. Tiny model, 64x64, Euler, a few steps: pixels are compared exactly where the API
promises they are kept (outside an inpainting mask), not where sampling decides them.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image, ImageDraw

from darkroom.request import GenerationRequest
from tests.server_util import live_server

FAST = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler", "seed": 5}


def scene(width: int = 64, height: int = 64) -> Image.Image:
    image = Image.new("RGB", (width, height), (235, 235, 235))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(200, 30, 30))
    return image


def square_mask(width: int = 64, height: int = 64, box=(16, 16, 47, 47)) -> Image.Image:
    """White (repaint) square on black (keep), the webui's mask convention."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode("ascii")


def decode(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def post(api, route: str, **fields):
    return api.post(f"/sdapi/v1/{route}", json={"prompt": "a red circle", **FAST, **fields})


def ok(api, route: str, **fields) -> tuple[list[Image.Image], dict, dict]:
    r = post(api, route, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    return [decode(im) for im in body["images"]], json.loads(body["info"]), body


def error_of(r, status: int = 422) -> str:
    assert r.status_code == status, r.text
    return r.json()["error"]


# --- txt2img: hires fix and variation seeds ------------------------------------------------------------------


@pytest.mark.slow
def test_txt2img_hires_fix(api):
    (image,), info, body = ok(api, "txt2img", enable_hr=True, hr_scale=2, hr_second_pass_steps=2, steps=2)
    assert image.size == (128, 128)
    text = info["infotexts"][0]
    assert "Hires upscale: 2" in text and "Hires upscaler: Latent" in text and "Hires steps: 2" in text
    assert "Denoising strength: 0.7" in text and "Size: 64x64" in text  # webuiapi's default strength
    assert info["denoising_strength"] == 0.7 and (info["width"], info["height"]) == (64, 64)  # the first pass
    assert body["parameters"]["enable_hr"] is True and body["parameters"]["denoising_strength"] is None
    # hr_resize_x alone keeps the aspect; the webui's "None" upscaler is a plain Lanczos resize
    (image,), info, _ = ok(api, "txt2img", enable_hr=True, hr_resize_x=96, hr_upscaler="None",
                           denoising_strength=0.5, hr_sampler_name="Euler", hr_prompt="a red circle", steps=2)
    assert image.size == (96, 96)
    text = info["infotexts"][0]
    assert "Hires resize: 96x96" in text and "Hires upscaler: Lanczos" in text and "Denoising strength: 0.5" in text


def test_txt2img_variation_seeds(api):
    (plain,), _, _ = ok(api, "txt2img", steps=2)
    (varied, _), info, _ = ok(api, "txt2img", subseed=11, subseed_strength=0.3, batch_size=2, steps=2)
    assert info["subseed"] == 11 and info["all_subseeds"] == [11, 12] and info["subseed_strength"] == 0.3
    assert "Variation seed: 11, Variation seed strength: 0.3" in info["infotexts"][0]
    assert not np.array_equal(arr(varied), arr(plain))
    _, info, _ = ok(api, "txt2img", subseed_strength=0.5, steps=2)  # subseed -1: picked here, so info can report it
    assert info["subseed"] >= 0 and f"Variation seed: {info['subseed']}," in info["infotexts"][0]


def test_refusals_before_queueing(api, studio):
    cases = [
        ("txt2img", {"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "Latent (nearest), Lanczos, Nearest"),
        ("txt2img", {"enable_hr": True, "hr_upscaler": "Latent (bicubic)"}, "hr_upscaler"),
        ("txt2img", {"enable_hr": True, "hr_sampler_name": "DDIM"}, "hr_sampler_name"),
        ("txt2img", {"enable_hr": True, "hr_scheduler": "Karras"}, "hr_scheduler"),
        ("txt2img", {"enable_hr": True, "hr_prompt": "a blue square"}, "hr_prompt"),
        ("txt2img", {"enable_hr": True, "hr_checkpoint_name": "darkroom-starter"}, "hr_checkpoint_name"),
        ("txt2img", {"enable_hr": True, "firstphase_width": 32, "firstphase_height": 32}, "firstphase_width"),
        ("txt2img", {"enable_hr": True, "hr_resize_x": 100}, "hr_resize_x 100 is not a multiple of 8"),
        ("txt2img", {"enable_hr": True, "hr_scale": 9}, "hr_scale"),
        ("txt2img", {"subseed_strength": 2}, "subseed_strength"),
        ("img2img", {}, "init_images"),
        ("img2img", {"init_images": ["%%%"]}, "init_images[0]"),
        ("img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images[0]: not a readable"),
        ("img2img", {"init_images": [b64(scene()), b64(square_mask())]}, "one image per request"),
        ("img2img", {"init_images": [b64(scene())], "mask": "bm9wZQ=="}, "mask: not a readable image"),
        ("img2img", {"init_images": [b64(scene())], "denoising_strength": 1.5}, "denoising_strength"),
        ("img2img", {"init_images": [b64(scene())], "initial_noise_multiplier": 1.1}, "initial_noise_multiplier"),
        ("img2img", {"init_images": [b64(scene())], "styles": ["nope"]}, "unknown style 'nope'"),
        ("img2img", {"init_images": [b64(scene())], "width": 60}, "width 60 is not a multiple of 8"),
    ]
    for route, fields, needle in cases:
        r = post(api, route, **fields)
        assert needle in error_of(r), (route, fields, r.text)
    assert studio.queue.jobs() == []


def test_unknown_upscaler_from_the_engine_is_422(api, monkeypatch):
    from darkroom.server import a1111_requests

    monkeypatch.setattr(a1111_requests, "hires_upscaler", lambda value: value)  # let it through to the engine
    r = post(api, "txt2img", enable_hr=True, hr_upscaler="SwinIR 4x")
    assert "unknown hires upscaler 'SwinIR 4x'" in error_of(r) and "Lanczos" in error_of(r)


# --- img2img and inpainting -----------------------------------------------------------------------------------


def test_img2img_strength_zero_is_the_vae_round_trip(api, studio):
    source = scene()
    (first,), info, body = ok(api, "img2img", init_images=[b64(source)], denoising_strength=0)
    (again,), _, _ = ok(api, "img2img", init_images=["data:image/png;base64," + b64(source)], denoising_strength=0,
                        include_init_images=True, seed=99)
    assert first.size == source.size == again.size
    assert np.array_equal(arr(first), arr(again))  # strength 0: neither seed nor sampling matters
    from darkroom.engine.generate import encode_image, latents_to_images

    model = studio.engine.load(GenerationRequest(model="tiny-sd1"))
    expected = latents_to_images(model, encode_image(model, source))[0]
    assert np.array_equal(arr(first), arr(expected))
    assert info["denoising_strength"] == 0 and "Denoising strength: 0," in info["infotexts"][0]
    assert body["parameters"]["init_images"] is None and body["parameters"]["mask"] is None  # not echoed unasked
    assert studio.queue.jobs()[-1].private and api.get("/api/history").json()["total"] == 0
    # include_init_images echoes them, as the webui does
    _, _, body = ok(api, "img2img", init_images=[b64(source)], denoising_strength=0, include_init_images=True)
    assert body["parameters"]["init_images"] == [b64(source)]


def test_img2img_changes_the_picture_and_takes_its_size(api):
    source = scene(80, 48)
    (image,), info, _ = ok(api, "img2img", init_images=[b64(source)], denoising_strength=0.6, width=80, height=48,
                           save_images=True)
    assert image.size == (80, 48) and (info["width"], info["height"]) == (80, 48)
    assert info["seed"] == 5 and "Denoising strength: 0.6" in info["infotexts"][0]
    assert np.abs(arr(image) - arr(source)).mean() > 1
    assert api.get("/api/history").json()["total"] == 1  # save_images: kept in the history


def test_inpainting_keeps_unmasked_pixels(api):
    source = scene()
    mask = square_mask()
    (image,), info, _ = ok(api, "img2img", init_images=[b64(source)], mask=b64(mask), mask_blur=0,
                           inpainting_fill=1, inpaint_full_res=False, denoising_strength=0.9)
    out, src, keep = arr(image), arr(source), np.asarray(mask) == 0
    assert image.size == (64, 64)
    assert np.array_equal(out[keep], src[keep])
    assert np.abs(out[~keep] - src[~keep]).mean() > 1  # the square was repainted
    text = info["infotexts"][0]
    assert "Mask blur: 0" in text and "Masked content: original" in text and "Inpaint area" not in text
    # the webui's defaults: "only masked" (at 64x64 here) and masked content "fill"; the output has the source's size
    wide = scene(96, 64)
    wide_mask = square_mask(96, 64, (60, 20, 80, 40))
    (image,), info, _ = ok(api, "img2img", init_images=[b64(wide)], mask=b64(wide_mask), mask_blur_x=0,
                           mask_blur_y=0, denoising_strength=0.9)
    out, src, keep = arr(image), arr(wide), np.asarray(wide_mask) == 0
    assert image.size == (96, 64)
    assert np.array_equal(out[keep], src[keep])
    text = info["infotexts"][0]
    assert "Inpaint area: Only masked" in text and "Masked content: fill" in text


# --- the real webuiapi client ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_webuiapi_hires_img2img_and_inpainting(studio):
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
        result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, enable_hr=True, hr_scale=2,
                             hr_second_pass_steps=2)
        assert result.image.size == (128, 128) and "Hires upscale: 2" in result.info["infotexts"][0]
        source = scene()
        result = api.img2img(images=[source], prompt="a blue circle", seed=7, width=64, height=64,
                             denoising_strength=0.5)
        assert result.image.size == (64, 64) and result.info["seed"] == 7 and result.info["all_seeds"] == [7]
        assert "Denoising strength: 0.5" in result.info["infotexts"][0]
        mask = square_mask()
        result = api.img2img(images=[source], mask_image=mask, inpainting_fill=1, mask_blur=0, seed=8, width=64,
                             height=64, denoising_strength=0.9)
        keep = np.asarray(mask) == 0
        assert result.image.size == (64, 64)
        assert np.array_equal(arr(result.image)[keep], arr(source)[keep])
        assert "Masked content: original" in result.info["infotexts"][0]


# --- OpenAI images.edit --------------------------------------------------------------------------------------------


def openai_mask(width: int = 64, height: int = 64, box=(16, 16, 47, 47)) -> Image.Image:
    """OpenAI's convention: opaque = keep, fully transparent = edit."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle(box, fill=(0, 0, 0, 0))
    return mask


def edit(api, files: dict, **fields):
    data = {"prompt": "a blue square", "response_format": "b64_json", "steps": "3", "sampler": "Euler", **fields}
    return api.post("/v1/images/edits", data=data, files=files)


def openai_error(r, param: str | None) -> str:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error["message"]


def test_openai_edits_in_process(api, studio):
    source = scene(72, 56)
    r = edit(api, {"image": ("in.png", png(source), "image/png")}, seed="3", strength="0.5")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "72x56" and len(body["data"]) == 1  # no size: the image's own
    image = decode(body["data"][0]["b64_json"])
    assert image.size == (72, 56) and "Denoising strength: 0.5" in image.info["parameters"]
    assert studio.queue.jobs()[-1].source == "openai" and studio.queue.jobs()[-1].private
    # no mask: the image's fully transparent pixels are the area to edit (OpenAI's dall-e-2 rule)
    holed = scene().convert("RGBA")
    ImageDraw.Draw(holed).rectangle((0, 0, 23, 23), fill=(0, 0, 0, 0))
    r = edit(api, {"image[]": ("holed.png", png(holed), "image/png")}, mask_blur="0", size="64x64")
    assert r.status_code == 200, r.text
    out = arr(decode(r.json()["data"][0]["b64_json"]))
    assert np.array_equal(out[24:, :], arr(holed)[24:, :]) and np.array_equal(out[:24, 24:], arr(holed)[:24, 24:])
    infotext = decode(r.json()["data"][0]["b64_json"]).info["parameters"]
    assert "Masked content: fill" in infotext and "Denoising strength: 0.75" in infotext
    # errors, in OpenAI's shape, before anything is queued
    jobs = len(studio.queue.jobs())
    assert "image" in openai_error(edit(api, {"mask": ("m.png", png(openai_mask()), "image/png")}), "image")
    r = edit(api, {"image": ("x.png", b"not a png", "image/png")})
    assert "not a readable image" in openai_error(r, "image")
    opaque = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    r = edit(api, {"image": ("in.png", png(scene()), "image/png"), "mask": ("m.png", png(opaque), "image/png")})
    assert "nothing to edit" in openai_error(r, "mask")
    r = edit(api, {"image": ("in.png", png(scene()), "image/png")}, prompt="")
    assert "prompt" in openai_error(r, "prompt")
    r = edit(api, {"image": ("in.png", png(scene()), "image/png")}, strength="2")
    assert "strength" in openai_error(r, "strength")
    r = api.post("/v1/images/edits", json={"prompt": "x", "image": "http://example.com/a.png"})
    assert "multipart" in openai_error(r, "image")
    r = api.post("/v1/images/edits", content=b"--zz\r\nnonsense", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    two = [("image[]", ("a.png", png(scene()), "image/png")), ("image[]", ("b.png", png(scene()), "image/png"))]
    r = api.post("/v1/images/edits", data={"prompt": "x"}, files=two)
    assert "one image per edit" in openai_error(r, "image")
    assert len(studio.queue.jobs()) == jobs


@pytest.mark.slow
def test_openai_client_edit(studio, tmp_path):
    source, mask = scene(), openai_mask()
    (tmp_path / "in.png").write_bytes(png(source))
    (tmp_path / "mask.png").write_bytes(png(mask))
    with live_server(studio) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-local", max_retries=0)
        with open(tmp_path / "in.png", "rb") as image, open(tmp_path / "mask.png", "rb") as mask_file:
            result = client.images.edit(image=image, mask=mask_file, prompt="a blue square", n=1, size="64x64",
                                        response_format="b64_json",
                                        extra_body={"steps": 4, "sampler": "Euler", "seed": 2})
        (item,) = result.data
        out, src = arr(decode(item.b64_json)), arr(source)
        assert out.shape == (64, 64, 3)
        # opaque in the mask = kept: exact away from the edit square's blurred edge (mask blur 4)
        far = np.ones((64, 64), bool)
        far[4:60, 4:60] = False
        assert np.array_equal(out[far], src[far])
        assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 1  # the transparent square was edited
        with pytest.raises(openai.BadRequestError) as bad, open(tmp_path / "in.png", "rb") as image:
            client.images.edit(image=image, prompt="x", size="100x100", response_format="b64_json")
        assert bad.value.param == "size" and "multiple of 8" in bad.value.message


def test_pasted_infotext_fills_hires_and_variation_fields():
    from darkroom.server.a1111_requests import Txt2ImgRequest, _with_infotext

    pasted = ("a cat\nSteps: 9, Sampler: Euler, CFG scale: 5, Seed: 42, Size: 64x48, Denoising strength: 0.45, "
              "Variation seed: 7, Variation seed strength: 0.2, Hires upscale: 1.5, Hires steps: 4, "
              "Hires upscaler: Latent (nearest)")
    body = _with_infotext(Txt2ImgRequest(infotext=pasted, steps=3))
    assert (body.prompt, body.steps, body.seed, body.width, body.height) == ("a cat", 3, 42, 64, 48)
    assert (body.enable_hr, body.hr_scale, body.hr_second_pass_steps, body.hr_upscaler) == (
        True, 1.5, 4, "Latent (nearest)")
    assert (body.denoising_strength, body.subseed, body.subseed_strength) == (0.45, 7, 0.2)
