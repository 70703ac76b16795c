"""The request bodies real webui clients send, replayed over a real socket.

Each payload is written from the client's own source (as read in December 2026), at a small size:
- SillyTavern: public/scripts/extensions/stable-diffusion/index.js (`defaultSettings`: sampler "DDIM",
  scheduler "normal", hr_upscaler "Latent"; `generateAutoImage` builds the body) forwarded unchanged
  by src/endpoints/stable-diffusion.js to /sdapi/v1/txt2img; it lists /samplers, /schedulers,
  /upscalers, /sd-models, /sd-vae and reads /options for the current model.
- Open WebUI: backend/open_webui/routers/images.py (AUTOMATIC1111 engine): a txt2img body of prompt,
  batch_size, width, height, optional negative_prompt, steps, cfg_scale, sampler_name and scheduler;
  the model is chosen by POST /options {"sd_model_checkpoint": ...} and read back from GET /options.
- Auto-Photoshop-StableDiffusion-Plugin: utility/sdapi/python_replacement.js posts its whole settings
  object (webui fields plus its own keys such as uniqueDocumentId and use_prompt_shortcut) to txt2img,
  img2img and extra-single-image, then reads each image's parameters from /png-info, sending the
  image as a `data:image/png;base64,` URL.
"""

from __future__ import annotations

import base64
import io

import httpx
from PIL import Image

from tests.server_util import live_server

TIMEOUT = 600  # guards against a hang only


def _png(size=(64, 64), colour=(200, 40, 40)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1])))


def test_sillytavern_defaults_generate(studio):
    with live_server(studio) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        for route in ("samplers", "schedulers", "upscalers", "sd-models", "sd-vae", "options", "prompt-styles"):
            got = http.get(f"/sdapi/v1/{route}")
            assert got.status_code == 200 and isinstance(got.json(), (list, dict)), route
        schedulers = {s["name"] for s in http.get("/sdapi/v1/schedulers").json()}
        assert {"normal", "karras", "simple", "align_your_steps", "beta"} <= schedulers
        body = {
            "prompt": "best quality, absurdres, aesthetic, a red circle",
            "negative_prompt": "lowres, bad anatomy, bad hands, text, error",
            "sampler_name": "DDIM", "scheduler": "normal", "steps": 3, "cfg_scale": 7, "width": 64, "height": 64,
            "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2.0,
            "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0, "seed": -1,
            "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": True,
            "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
            "do_not_save_samples": False,
        }
        got = http.post("/sdapi/v1/txt2img", json=body)
        assert got.status_code == 200, got.text
        assert _image(got.json()["images"][0]).size == (64, 64)
        # the webui ignores the schedule type for DDIM, and so does Darkroom for a client that sends one
        assert "Sampler: DDIM" in got.json()["info"] and "Normal" not in got.json()["info"]
        # Euler a with the Normal schedule is honoured, and the infotext says so
        got = http.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler a", "seed": 3})
        assert got.status_code == 200, got.text
        assert "Schedule type: Normal" in got.json()["info"]


def test_open_webui_sets_the_model_by_options_then_generates(studio):
    with live_server(studio) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        current = http.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
        model = next(m for m in http.get("/sdapi/v1/sd-models").json() if m["title"] != current)
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": model["title"]}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model["title"]
        body = {"prompt": "a blue square", "batch_size": 2, "width": 64, "height": 64,
                "negative_prompt": "blurry", "steps": 2, "cfg_scale": 7.0, "sampler_name": "Euler a",
                "scheduler": "Karras"}
        got = http.post("/sdapi/v1/txt2img", json=body)
        assert got.status_code == 200, got.text
        assert len(got.json()["images"]) == 2
        assert "Schedule type: Karras" in got.json()["info"] and f"Model: {model['model_name']}" in got.json()["info"]


def test_photoshop_plugin_bodies_with_its_own_keys(studio):
    plugin_keys = {"uniqueDocumentId": "a24a6ea4-ce75-4665-a070-57453082c256", "use_prompt_shortcut": False,
                   "prompt_shortcut_ui_dict": {}, "mode": "txt2img"}
    with live_server(studio) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        txt = {"prompt": "a green triangle", "negative_prompt": "", "sampler_index": "Euler a", "steps": 2,
               "cfg_scale": 7, "width": 64, "height": 64, "batch_size": 1, "n_iter": 1, "seed": 11,
               "restore_faces": False, "enable_hr": False, "denoising_strength": 0.7, "mask_blur": 4,
               "alwayson_scripts": {}, **plugin_keys}
        got = http.post("/sdapi/v1/txt2img", json=txt)
        assert got.status_code == 200, got.text
        image = got.json()["images"][0]
        # the plugin reads each image's parameters back, sending a data URL
        info = http.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image})
        assert info.status_code == 200 and "Seed: 11" in info.json()["info"]
        img = {**txt, "init_images": [_png()], "denoising_strength": 0.5, "mode": "img2img", "seed": 12}
        got = http.post("/sdapi/v1/img2img", json=img)
        assert got.status_code == 200, got.text
        assert _image(got.json()["images"][0]).size == (64, 64)
        extra = {"image": _png(), "upscaler_1": "Lanczos", "upscaling_resize": 2, "resize_mode": 0,
                 "gfpgan_visibility": 0, "codeformer_visibility": 0, "codeformer_weight": 0,
                 "extras_upscaler_2_visibility": 0, "uniqueDocumentId": plugin_keys["uniqueDocumentId"]}
        got = http.post("/sdapi/v1/extra-single-image", json=extra)
        assert got.status_code == 200, got.text
        assert _image(got.json()["image"]).size == (128, 128)
