"""img2img, inpainting, hires fix and variation seeds on tiny models (and against diffusers)."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from darkroom.engine.generate import encode_image, latents_to_images
from darkroom.engine.img2img import crop_region, expand_to_aspect, resize_image
from darkroom.errors import InvalidRequest
from darkroom.request import GenerationRequest

BASE = dict(prompt="a red circle", steps=10, cfg_scale=5.0, seed=7, sampler="Euler")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def pixels(result, i: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[i].png)).convert("RGB")).astype(np.int16)


def scene(size=64, colour=(200, 30, 30), bg=(240, 240, 240)) -> Image.Image:
    image = Image.new("RGB", (size, size), bg)
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return image


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_model, engine_factory):
    from darkroom.home import Home

    home = Home(tmp_path_factory.mktemp("img2img-home")).ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints)
    shutil.copy(tiny_model("sd1-inpainting")["path"], home.checkpoints)
    return engine_factory(home)


def run(engine, **kw):
    steps = []
    result = engine.generate(GenerationRequest(**{**BASE, "model": "tiny-sd1", **kw}), on_step=steps.append)
    return result, steps


def test_strength_zero_is_the_vae_round_trip(sd1):
    source = scene()
    result, steps = run(sd1, init_image=png(source), denoising_strength=0.0)
    assert steps == []  # nothing to sample
    model = sd1.load(GenerationRequest(model="tiny-sd1"))
    expected = np.asarray(latents_to_images(model, encode_image(model, source))[0]).astype(np.int16)
    assert np.array_equal(pixels(result), expected)
    assert "Denoising strength: 0," in result.images[0].infotext


def test_steps_run_is_steps_times_strength(sd1):
    for strength, expected in ((0.5, 5), (0.75, 7), (1.0, 10), (0.05, 0)):
        _, steps = run(sd1, init_image=png(scene()), denoising_strength=strength)
        assert len(steps) == expected, strength


def test_strength_one_nearly_ignores_the_source(sd1):
    a, b = png(scene(colour=(200, 30, 30))), png(scene(colour=(20, 30, 220), bg=(10, 10, 10)))
    strong = np.abs(pixels(run(sd1, init_image=a, denoising_strength=1.0)[0])
                    - pixels(run(sd1, init_image=b, denoising_strength=1.0)[0])).mean()
    half = np.abs(pixels(run(sd1, init_image=a, denoising_strength=0.5)[0])
                  - pixels(run(sd1, init_image=b, denoising_strength=0.5)[0])).mean()
    assert strong < half / 3


def test_size_defaults_to_the_source_and_resize_modes(sd1):
    wide = Image.new("RGB", (100, 60), (10, 200, 10))
    result, _ = run(sd1, init_image=png(wide), denoising_strength=0.3)
    assert Image.open(io.BytesIO(result.images[0].png)).size == (96, 56)
    for mode in (0, 1, 2):
        out = resize_image(wide, 64, 64, mode)
        assert out.size == (64, 64)
    filled = np.asarray(resize_image(Image.new("RGB", (64, 32), (9, 99, 199)), 64, 64, 2))
    assert (filled == (9, 99, 199)).all()  # the bands are filled from the edges, no black bars
    cropped = np.asarray(resize_image(wide, 64, 64, 1))
    assert (cropped == (10, 200, 10)).all()


def test_matches_diffusers_img2img(sd1, tiny_model, tmp_path):
    """Same init latents, seed and scheduler: diffusers' StableDiffusionImg2ImgPipeline lands on our latents."""
    import diffusers

    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config
    from tests.test_diffusers_parity import _config_folder

    source = scene()
    seen = []
    kw = dict(BASE, prompt="a small red circle", steps=8, denoising_strength=0.6)
    sd1.generate(GenerationRequest(**kw, model="tiny-sd1", init_image=png(source)), on_step=lambda e: seen.append(e))
    model = sd1.load(GenerationRequest(model="tiny-sd1"))
    init = encode_image(model, source)
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_single_file(
        str(tiny_model("sd1")["path"]), config=str(_config_folder(tmp_path, "sd1")), local_files_only=True,
        torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False)
    spec, schedule = samplers.resolve("Euler", "Automatic")
    pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False))
    theirs = pipe(prompt=kw["prompt"], image=init, strength=0.6, num_inference_steps=8, guidance_scale=5.0,
                  generator=[torch.Generator("cpu").manual_seed(7)], output_type="latent").images
    assert len(seen) == 4
    assert torch.allclose(seen[-1].latents, theirs, atol=1e-4), (seen[-1].latents - theirs).abs().max()


def corner_mask(size=64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, size // 2 - 1, size // 2 - 1), fill=255)
    return mask


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd1-inpainting"])
@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpainting_keeps_unmasked_pixels_exactly(sd1, model, fill):
    source = scene()
    result, _ = run(sd1, model=model, init_image=png(source), mask=png(corner_mask()), mask_blur=0,
                    denoising_strength=0.9, inpainting_fill=fill)
    out, src = pixels(result), np.asarray(source).astype(np.int16)
    assert np.array_equal(out[32:, :], src[32:, :]) and np.array_equal(out[:32, 32:], src[:32, 32:])
    assert np.abs(out[:32, :32] - src[:32, :32]).mean() > 5  # the masked corner was repainted
    text = result.images[0].infotext
    assert "Mask blur: 0" in text and "Masked content: " in text


def test_inverted_mask_and_blur(sd1):
    source = scene()
    result, _ = run(sd1, init_image=png(source), mask=png(corner_mask()), inpainting_mask_invert=True, mask_blur=4)
    out, src = pixels(result), np.asarray(source).astype(np.int16)
    assert np.array_equal(out[:20, :20], src[:20, :20])  # the corner is now the kept part
    assert np.abs(out[40:, 40:] - src[40:, 40:]).mean() > 5
    assert "Mask mode: Inpaint not masked" in result.images[0].infotext


def test_only_masked_works_at_full_resolution_and_pastes_back(sd1):
    source = scene(size=128)
    mask = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(mask).rectangle((90, 90, 110, 110), fill=255)
    result, _ = run(sd1, init_image=png(source), mask=png(mask), inpaint_full_res=True, inpaint_full_res_padding=8,
                    width=64, height=64, mask_blur=0)
    out, src = pixels(result), np.asarray(source).astype(np.int16)
    assert out.shape == (128, 128, 3)  # the source's size, not the sampling size
    assert np.array_equal(out[:80], src[:80])
    assert np.abs(out[90:111, 90:111] - src[90:111, 90:111]).mean() > 5
    assert crop_region(mask, 8) == (82, 82, 119, 119)
    assert expand_to_aspect((10, 10, 20, 40), 64, 64, 128, 128) == (0, 10, 30, 40)
    with pytest.raises(InvalidRequest, match="mask is empty"):
        run(sd1, init_image=png(source), mask=png(Image.new("L", (128, 128), 0)), inpaint_full_res=True)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_size_steps_and_infotext(sd1, upscaler):
    result, steps = run(sd1, width=64, height=48, enable_hr=True, hr_scale=2.0, hr_upscaler=upscaler,
                        hr_second_pass_steps=6, denoising_strength=0.5)
    assert Image.open(io.BytesIO(result.images[0].png)).size == (128, 96)
    assert [e.phase for e in steps].count("hires") == 3  # 6 x 0.5
    text = result.images[0].infotext
    assert "Hires upscale: 2," in text and f"Hires upscaler: {upscaler}" in text and "Hires steps: 6" in text
    assert "Size: 64x48" in text  # the first pass's size, as the webui records it
    resized, _ = run(sd1, width=64, height=64, enable_hr=True, hr_resize_x=96, hr_resize_y=0, steps=4)
    assert Image.open(io.BytesIO(resized.images[0].png)).size == (96, 96)
    assert "Hires resize: 96x96" in resized.images[0].infotext


def test_variation_seeds(sd1):
    plain, _ = run(sd1)
    zero, _ = run(sd1, subseed=99, subseed_strength=0.0)
    assert np.array_equal(pixels(plain), pixels(zero))
    full, _ = run(sd1, subseed=99, subseed_strength=1.0)
    other, _ = run(sd1, seed=99)
    assert np.abs(pixels(full) - pixels(other)).max() <= 2
    some, _ = run(sd1, subseed=99, subseed_strength=0.3)
    assert not np.array_equal(pixels(some), pixels(plain))
    assert "Variation seed: 99, Variation seed strength: 0.3" in some.images[0].infotext
    batch, _ = run(sd1, subseed=99, subseed_strength=0.3, batch_size=2)
    assert "Variation seed: 100" in batch.images[1].infotext


def test_bad_inputs_are_clear(sd1):
    with pytest.raises(InvalidRequest, match="init image: not a readable image"):
        run(sd1, init_image=b"not an image")
    with pytest.raises(InvalidRequest, match="mask needs an init image"):
        run(sd1, mask=png(corner_mask()))
    with pytest.raises(InvalidRequest, match="hires upscaler"):
        run(sd1, enable_hr=True, hr_upscaler="ESRGAN_4x")


def test_mask_formats(sd1):
    """An opaque RGBA black/white mask reads by brightness; a transparent layer's painted pixels repaint."""
    from darkroom.engine.img2img import decode_image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    rgba.paste((255, 255, 255, 255), (0, 0, 4, 4))
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (0, 0, 4, 4))
    for mask in (rgba, layer, rgba.convert("L")):
        m = np.asarray(decode_image(png(mask), "mask", mode="L"))
        assert m[0, 0] == 255 and m[7, 7] == 0, mask.mode
