"""Token merging (the webui's token_merging_ratio options, darkroom/engine/token_merging.py): the same
pictures as diffusers with tomesd applied as the webui applies it, per pass, recorded in the infotext,
and honoured from every interface."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from darkroom.engine import generate as generate_module
from darkroom.metadata.infotext import request_from_infotext
from darkroom.request import GenerationRequest
from tests.test_diffusers_parity import _config_folder, _ours, _theirs

REQ = dict(prompt="a small red circle above a blue square", negative_prompt="ugly", steps=4, cfg_scale=6.0,
           seed=1234, width=64, height=64, sampler="Euler")


def _tome_blocks(unet) -> int:
    return sum(type(m).__name__ == "ToMeBlock" for m in unet.modules())


def test_matches_diffusers_with_tomesd_and_changes_the_picture(engine, tiny_model, tmp_path):
    import diffusers
    import tomesd

    info = tiny_model("sd1")
    config = _config_folder(tmp_path, info["family"])
    merged_latents, merged = _ours(engine, info["path"], {**REQ, "token_merging_ratio": 0.5})
    assert _tome_blocks(engine.cache.current.unet) == 0  # the classes are back after the pass
    their_latents, theirs = _theirs(
        diffusers.StableDiffusionPipeline, info["path"], config, REQ,
        prepare=lambda pipe: tomesd.apply_patch(pipe, ratio=0.5, use_rand=False, merge_attn=True,
                                                merge_crossattn=False, merge_mlp=False))
    diff = (merged_latents - their_latents).abs().max().item()
    assert diff < 1e-4 * max(1.0, their_latents.abs().max().item()), f"latents differ by {diff}"
    assert np.abs(merged - theirs).max() <= 1.5
    plain_latents, _ = _ours(engine, info["path"], REQ)
    assert (plain_latents - merged_latents).abs().max().item() > 1e-3  # it does merge tokens
    off_latents, _ = _ours(engine, info["path"], {**REQ, "token_merging_ratio": 0.0})
    assert (off_latents - plain_latents).abs().max().item() == 0


@pytest.fixture
def passes(monkeypatch):
    """The ratio each sampling pass ran with (and whether the UNet was patched inside it)."""
    seen = []
    real = generate_module.token_merging

    @contextlib.contextmanager
    def spy(unet, ratio):
        with real(unet, ratio) as patched:
            seen.append((ratio, patched))
            yield patched

    monkeypatch.setattr(generate_module, "token_merging", spy)
    return seen


def test_each_pass_takes_its_ratio_and_the_infotext_records_them(engine, tiny_model, passes):
    path = str(tiny_model("sd1")["path"])
    hires = dict(REQ, model=path, steps=2, enable_hr=True, hr_scale=1.5, denoising_strength=0.5)
    result = engine.generate(GenerationRequest(**hires, token_merging_ratio=0.3))
    assert passes == [(0.3, True), (0.3, True)]  # the hires pass takes the first pass's ratio when its own is 0
    text = result.images[0].infotext
    assert "Token merging ratio: 0.3" in text and "Token merging ratio hr: 0.3" in text
    back = request_from_infotext(text)
    assert back.token_merging_ratio == 0.3 and back.token_merging_ratio_hr == 0.3
    passes.clear()
    result = engine.generate(GenerationRequest(**hires, token_merging_ratio=0.3, token_merging_ratio_hr=0.6))
    assert [r for r, _ in passes] == [0.3, 0.6]
    assert "Token merging ratio hr: 0.6" in result.images[0].infotext
    passes.clear()
    plain = engine.generate(GenerationRequest(**{**hires, "enable_hr": False}))
    assert [r for r, _ in passes] == [0.0] and "Token merging" not in plain.images[0].infotext


def test_the_webui_options_and_override_settings(api, studio, passes):
    from tests.test_api_a1111 import FAST, ok

    _, info, _ = ok(api, seed=3, override_settings={"token_merging_ratio": 0.4})
    assert passes[-1][0] == 0.4 and "Token merging ratio: 0.4" in info["infotexts"][0]
    # stored options (POST /options) apply to later requests, img2img's own option to img2img only
    r = api.post("/sdapi/v1/options", json={"token_merging_ratio": 0.2, "token_merging_ratio_img2img": 0.5})
    assert r.status_code == 200, r.text
    assert api.get("/sdapi/v1/options").json()["token_merging_ratio_img2img"] == 0.5
    ok(api, seed=3)
    assert passes[-1][0] == 0.2
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "gray").save(buffer, format="PNG")
    import base64

    r = api.post("/sdapi/v1/img2img", json={"prompt": "a red circle", **FAST, "denoising_strength": 0.5,
                                            "init_images": [base64.b64encode(buffer.getvalue()).decode()]})
    assert r.status_code == 200, r.text
    assert passes[-1][0] == 0.5
    assert "Token merging ratio: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
    # a native request that leaves it unset takes the setting; 0 turns it off
    assert studio.prepare(GenerationRequest(prompt="x")).token_merging_ratio == 0.2
    assert studio.prepare(GenerationRequest(prompt="x", token_merging_ratio=0)).token_merging_ratio == 0
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **FAST, "override_settings": {"token_merging_ratio": 2}})
    assert r.status_code == 422 and "token_merging_ratio" in r.json()["detail"]
