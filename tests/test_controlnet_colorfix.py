"""tile_colorfix(+sharp) while sampling: the map's VAE latent made per pass, the colour fix on each UNet output
(both sampling paths, every step, hires), and the x0 <-> prediction conversion it rests on."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.control.annotators import tile
from darkroom.control_unit import ControlUnit
from darkroom.home import Home
from darkroom.testing.tiny_controlnet import write_tiny_controlnet
from tests.control_util import generate_with_units
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=4, cfg_scale=6.0, seed=77, width=64, height=64)
PATHS = {"diffusers": dict(sampler="DPM++ 2M"), "k-diffusion": dict(sampler="Euler a", randn_source="GPU")}
K = 3  # Variation: the blur radius in latent pixels (the slider's minimum)


def _picture(size=64) -> Image.Image:
    """Large areas of colour (what the fix is about) with some noise on top."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, 1 - y, 0.5 + 0.4 * np.sin(6 * x * y)], axis=-1) * 255
    return Image.fromarray(np.clip(rgb + rng.normal(0, 20, rgb.shape), 0, 255).astype(np.uint8))


PICTURE = _picture()


def _unit(module="tile_colorfix", **kw) -> ControlUnit:
    kw.setdefault("threshold_a", K)
    return ControlUnit(model="cn-sd1", module=module, image=_png(PICTURE), resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("colorfix")
    home = Home(root / "home").ensure()
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd1", "single")
    return {"engine": engine_factory(home), "sd1": tiny_model("sd1")["path"]}


def _run(setup, units, **kw):
    """(the last step's latents, the result)."""
    return generate_with_units(setup["engine"], setup["sd1"], units, **{**KW, **kw})


def _target(setup, size=64) -> torch.Tensor:
    """The map's latent as the engine encodes it."""
    from darkroom.engine.generate import encode_image

    model = setup["engine"].cache.get(setup["sd1"])
    return encode_image(model, PICTURE.resize((size, size), Image.LANCZOS) if size != 64 else PICTURE)


def _colour_distance(latents: torch.Tensor, target: torch.Tensor) -> float:
    """How far the latents' mean colour (per latent channel: the lowest frequency) is from the map's."""
    return float((latents.mean((2, 3)) - target.to(latents).mean((2, 3))).abs().mean())


def _blur_distance(latents: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """The same for the low frequencies the box blur keeps at radius k."""
    return float((tile.box_blur(latents, k) - tile.box_blur(target.to(latents), k)).abs().mean())


@pytest.mark.parametrize("path", PATHS)
def test_colorfix_pulls_the_colours_to_the_map(setup, path):
    target = _target(setup)
    fixed, _ = _run(setup, [_unit()], **PATHS[path])
    plain, _ = _run(setup, [_unit("tile_resample", threshold_a=-1)], **PATHS[path])
    # latents, not pixels: the tiny VAE is random, so decoded colours say nothing about the map's
    assert _colour_distance(fixed, target) < 0.2 * _colour_distance(plain, target)
    assert _blur_distance(fixed, target, 2 * K) < 0.6 * _blur_distance(plain, target, 2 * K)


@pytest.mark.parametrize("path", PATHS)
def test_colorfix_with_a_v_prediction_checkpoint(tmp_path_factory, tiny_model, engine_factory, path):
    home = Home(tmp_path_factory.mktemp("colorfix-v") / "home").ensure()
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd2", "single")  # the name the units use
    setup = {"engine": engine_factory(home), "sd1": tiny_model("sd2-v")["path"]}
    assert setup["engine"].cache.get(setup["sd1"]).v_prediction
    target = _target(setup)
    fixed, _ = _run(setup, [_unit()], **PATHS[path])
    plain, _ = _run(setup, [_unit("tile_resample", threshold_a=-1)], **PATHS[path])
    assert _colour_distance(fixed, target) < 0.2 * _colour_distance(plain, target)


@pytest.mark.parametrize("path", PATHS)
def test_sharp_differs_from_plain_and_is_plain_at_zero(setup, path):
    plain, _ = _run(setup, [_unit()], **PATHS[path])
    sharp, _ = _run(setup, [_unit("tile_colorfix+sharp", threshold_b=2.0)], **PATHS[path])
    zero, _ = _run(setup, [_unit("tile_colorfix+sharp", threshold_b=0.0)], **PATHS[path])
    assert (sharp - plain).abs().max() > 1e-3
    assert torch.allclose(zero, plain, atol=1e-5)  # no sharpness: the negative's rows are not blurred


def test_colorfix_acts_outside_the_units_window(setup):
    from darkroom.control.files import find_controlnets, resolve

    engine = setup["engine"]
    engine.cache.get(setup["sd1"])
    path = resolve(find_controlnets(engine.library.home), "cn-sd1").path
    controlnet = engine.controlnets.get(path, dtype=torch.float32, device="cpu").model
    calls = []
    handle = controlnet.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:  # a window no step of 4 reaches: the ControlNet never runs
        fixed, _ = _run(setup, [_unit(guidance_start=0.9, guidance_end=1.0)], **PATHS["diffusers"])
    finally:
        handle.remove()
    assert calls == []
    none, _ = _run(setup, [], **PATHS["diffusers"])
    target = _target(setup)
    assert _colour_distance(fixed, target) < 0.2 * _colour_distance(none, target)


def test_colorfix_batch_equals_single_runs(setup):
    both, _ = _run(setup, [_unit("tile_colorfix+sharp")], batch_size=2, **PATHS["k-diffusion"])
    one, _ = _run(setup, [_unit("tile_colorfix+sharp")], **PATHS["k-diffusion"])
    two, _ = _run(setup, [_unit("tile_colorfix+sharp")], **{**PATHS["k-diffusion"], "seed": KW["seed"] + 1})
    assert torch.allclose(both, torch.cat([one, two]), atol=1e-4)


def test_colorfix_in_the_hires_pass(setup):
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, **PATHS["k-diffusion"])
    fixed, result = _run(setup, [_unit()], **hires)
    plain, _ = _run(setup, [_unit("tile_resample", threshold_a=-1)], **hires)
    target = _target(setup, 96)  # the hires pass's own map, and the radius doubled there
    assert Image.open(io.BytesIO(result.images[0].png)).size == (96, 96)
    assert fixed.shape == plain.shape and fixed.shape[-2:] == target.shape[-2:]
    assert _colour_distance(fixed, target) < 0.2 * _colour_distance(plain, target)
    assert _blur_distance(fixed, target, 4 * K) < 0.6 * _blur_distance(plain, target, 4 * K)
    low, _ = _run(setup, [_unit(hr_option="Low res only")], **hires)  # fixed in the first pass only
    assert (fixed - low).abs().max() > 1e-2


# --- preparing: the latents and sliders per pass ------------------------------------------------------------

def _prepare(setup, units, hires_size=None):
    from darkroom.control.files import find_controlnets
    from darkroom.control.prepare import prepare_control
    from darkroom.engine.img2img import decode_image

    engine = setup["engine"]
    model = engine.cache.get(setup["sd1"])
    encoded = []

    def encode(pixels):
        encoded.append((float(pixels.min()), float(pixels.max()), tuple(pixels.shape)))
        return torch.zeros(1, 4, pixels.shape[2] // 8, pixels.shape[3] // 8)

    prepared = prepare_control(units, files=find_controlnets(engine.library.home), cache=engine.controlnets,
                               model_family=model.family.id, model_name=model.name, width=128, height=96,
                               hires_size=hires_size, decode=lambda d, n, m: decode_image(d, n, mode=m),
                               encode=encode)
    return prepared, encoded


def test_prepare_encodes_the_map_per_pass_with_the_resolved_sliders(setup):
    prepared, encoded = _prepare(setup, [_unit("tile_colorfix+sharp", threshold_a=-1, threshold_b=1.5),
                                         _unit("tile_resample"), _unit(threshold_b=1.5)], hires_size=(256, 192))
    sharp, resample, plain = prepared.control.units
    assert sharp.colour_latent.shape == (1, 4, 12, 16) and sharp.hr_colour_latent.shape == (1, 4, 24, 32)
    assert (sharp.variation, sharp.sharpness) == (8.0, 1.5)  # -1: the slider's default
    assert (plain.variation, plain.sharpness) == (K, None)  # plain colorfix has no Sharpness
    assert resample.colour_latent is None and resample.sharpness is None
    assert [e[2] for e in encoded] == [(1, 3, 96, 128), (1, 3, 192, 256)] * 2
    assert all(lo >= -1.0 and hi <= 1.0 and lo < 0 < hi for lo, hi, _ in encoded)  # [0, 1] -> [-1, 1]
    hires = prepared.hires_pass()
    assert hires.hires and hires.units[0].colour_latent is sharp.hr_colour_latent and hires.fixes_colours
    first = prepared.first_pass(True)
    assert not first.hires and first.units[0].colour_latent is sharp.colour_latent


def test_units_without_the_flag_leave_sampling_alone(setup):
    prepared, encoded = _prepare(setup, [_unit("tile_resample"), _unit("none")])
    assert encoded == [] and not prepared.control.fixes_colours


# --- the conversion --------------------------------------------------------------------------------------------

def _control(sharpness=None, weight=1.0, hires=False):
    from darkroom.control.apply import Control, ControlUnitRun

    gen = torch.Generator().manual_seed(5)
    unit = ControlUnitRun(None, torch.zeros(1, 3, 8, 8), weight=weight, colour_latent=torch.randn(1, 4, 10, 10,
                          generator=gen), variation=2, sharpness=sharpness)
    return Control([unit], hires=hires), unit.colour_latent


@pytest.mark.parametrize("v", [False, True])
def test_fix_prediction_moves_x0_exactly_to_the_fixed_one(v):
    control, latent = _control(sharpness=2.0)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(4, 4, 10, 10, generator=gen)
    eps = torch.randn(4, 4, 10, 10, generator=gen)
    sigma = torch.tensor(3.0)
    a, s = 1 / (sigma ** 2 + 1).sqrt(), sigma / (sigma ** 2 + 1).sqrt()
    x = a * x0 + s * eps  # the UNet's input
    pred = a * eps - s * x0 if v else eps

    def x0_of(new):
        return a * x - s * new if v else (x - s * new) / a

    got = x0_of(control.fix_prediction(pred, x, sigma, v_prediction=v, n=2, uncond=True))
    want = tile.fix_colours(x0, latent, 2, sharpness=2.0, prompt_rows=torch.tensor([False, False, True, True]))
    assert torch.allclose(got, want, atol=1e-4)
    hires, _ = _control(hires=True)  # the hires pass doubles the radius
    got = x0_of(hires.fix_prediction(pred, x, sigma, v_prediction=v, n=2, uncond=False))
    assert torch.allclose(got, tile.fix_colours(x0, latent, 4), atol=1e-4)
    off, _ = _control(weight=0.0)
    assert torch.allclose(off.fix_prediction(pred, x, sigma, v_prediction=v, n=2, uncond=True), pred, atol=1e-6)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler", "Heun", "DDIM", "LCM", "DPM++ SDE", "UniPC"])
def test_model_sigma_is_the_schedulers_own(sampler):
    """The x0 that fix_prediction reads from an eps is the one the diffusers scheduler makes of it."""
    from darkroom.engine import samplers
    from darkroom.engine.sampling import _model_sigma
    from darkroom.models.configs import scheduler_config

    spec, schedule = samplers.resolve(sampler, "Automatic")
    scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=0)
    scheduler.set_timesteps(5)
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 4, 6, 6, generator=gen) * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:4]:
        eps = torch.randn(1, 4, 6, 6, generator=gen)
        x = scheduler.scale_model_input(latents, t)
        sigma = _model_sigma(scheduler, t)
        mine = (x - sigma / (sigma ** 2 + 1).sqrt() * eps) * (sigma ** 2 + 1).sqrt()
        out = scheduler.step(eps, t, latents)
        theirs = getattr(out, "pred_original_sample", getattr(out, "denoised", None))  # LCM: denoised, c_skip ~ 0
        if theirs is None:
            theirs = scheduler.model_outputs[-1]  # DPM-Solver/UniPC keep their converted x0
        assert torch.allclose(mine, theirs, atol=1e-4), t
        latents = out.prev_sample
