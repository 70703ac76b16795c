"""inpaint_only and inpaint_only+lama beyond the map (darkroom.control.inpaint_only): the clean-latent restore
outside the mask at every UNet call, the paste-back after decoding, LaMa's fill and the noise leaning on it,
and the fallback to inpaint_global_harmonious under img2img's own inpainting."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import inpaint_only as io_
from darkroom.control.annotators import lama
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.metadata.infotext import parse_infotext
from darkroom.testing.tiny_annotators import lama_state, save
from darkroom.testing.tiny_controlnet import write_tiny_controlnet
from tests.control_util import generate_with_units
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=4, cfg_scale=6.0, seed=5, width=64, height=64,
          sampler="Euler a")
PICTURE = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
MASK = np.zeros((64, 64), np.uint8)
MASK[16:48, 24:56] = 255  # repaint a 32 x 32 square


def _unit(module="inpaint_only", **kw) -> ControlUnit:
    return ControlUnit(model="cn-sd1", module=module, image=_png(PICTURE), mask=_png(Image.fromarray(MASK)),
                       resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("inpaint-only")
    home = Home(root / "home").ensure()
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd1", "single")
    save(lama_state(seed=1), home.root / "models" / "annotators" / "lama" / "ControlNetLama.pth")
    return {"engine": engine_factory(home), "sd1": tiny_model("sd1")["path"], "home": home}


def _run(setup, units, **kw):
    return generate_with_units(setup["engine"], setup["sd1"], units, **{**KW, **kw})


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int16)


# --- the steps --------------------------------------------------------------------------------------------

def test_latent_mask_and_blend_mask():
    mask = np.zeros((64, 64), bool)
    mask[16:24, 16:24] = True
    lm = io_.latent_mask(mask)
    assert lm.shape == (1, 1, 8, 8)
    # 10 x 10 windows at stride 8, padding 1: latent cells 1-3 touch pixels 16-23 (cell 3 reaches pixel 24-1)
    assert lm[0, 0].nonzero().tolist() == [[r, c] for r in (1, 2, 3) for c in (1, 2, 3)]
    w = io_.blend_mask(mask)
    assert w[16:24, 16:24].min() == 1.0 and w[0, 0] == 0.0
    assert 0 < w[13, 20] < 1 and w[9, 20] == 0.0  # dilated by 3, blurred over 7: a ramp reaching 6 pixels out


def test_restore_x0_keeps_the_picture_outside_the_mask():
    gen = torch.Generator().manual_seed(1)
    x0, picture = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:5] = 1
    out = io_.restore_x0(x0, picture, mask, 1.0)
    assert torch.equal(out[:, :, 2:5, 2:5], x0[:, :, 2:5, 2:5])
    assert torch.equal(out[:, :, 0], picture.expand(2, -1, -1, -1)[:, :, 0])
    assert torch.allclose(io_.restore_x0(x0, picture, mask, 0.25), 0.25 * out + 0.75 * x0)
    assert torch.equal(io_.restore_x0(x0, picture, mask, 3.0), out)  # the weight is clamped to 1


def test_lama_noise_is_q_sample_at_the_last_timestep():
    from darkroom.engine.samplers import webui_train_sigmas
    from darkroom.models.configs import scheduler_config

    abar = 1.0 / (1.0 + webui_train_sigmas(scheduler_config(False)).double() ** 2)
    assert float(abar[-1]) == pytest.approx(0.0047, abs=1e-4)  # SD's alphas_cumprod[999]
    noise, fill = torch.randn(2, 4, 8, 8), torch.randn(1, 4, 8, 8)
    got = io_.lama_noise(noise, fill, abar)
    assert torch.allclose(got, abar[-1].sqrt().float() * fill + (1 - abar[-1]).sqrt().float() * noise, atol=1e-6)
    assert torch.equal(io_.lama_noise(torch.ones(1, 4, 12, 12), fill, abar), torch.ones(1, 4, 12, 12))


# --- LaMa ---------------------------------------------------------------------------------------------------

def test_lama_generator_matches_the_authors_network():
    """Values from the authors' FFCResNetGenerator (sd-webui-controlnet's annotator/lama, big-lama's config
    at width 8 with 2 blocks) on the same random weights and input, computed once when this module was written;
    the released layout (51 M weights) has the same keys."""
    net = lama.LamaGenerator(8, 2).eval()
    net.load_state_dict(lama_state(seed=1), strict=True)
    assert sum(p.numel() for p in lama.LamaGenerator().parameters()) == 50_975_875
    x = torch.zeros(1, 4, 64, 128)
    x[:, :3] = torch.from_numpy(np.random.RandomState(3).rand(3, 64, 128).astype(np.float32))
    x[:, 3, 16:48, 32:96] = 1
    x[:, :3] *= 1 - x[:, 3:4]
    with torch.no_grad():
        out = net(x)[0]
    assert out.shape == (3, 64, 128) and float(out.mean()) == pytest.approx(0.5015009642, abs=1e-6)
    for (c, y, xx), want in {(0, 20, 40): 0.4979651868, (1, 30, 60): 0.5106475949, (2, 40, 100): 0.4966878593}.items():
        assert float(out[c, y, xx]) == pytest.approx(want, abs=1e-6)


def test_lama_fills_only_the_mask(tmp_path):
    path = save({f"generator.{k}": v for k, v in lama_state().items()}, tmp_path / "ControlNetLama.pth")
    net = lama.load(path)  # the trainer's `generator.` prefix is accepted
    img = np.asarray(PICTURE)
    mask = (MASK > 0).astype(np.float32)
    filled = lama.fill(net, img, mask)
    assert filled.shape == img.shape
    assert np.array_equal(filled[MASK == 0], img[MASK == 0])
    assert np.abs(filled[MASK > 0].astype(int) - img[MASK > 0]).mean() > 20  # noise replaced by the net's grey


# --- while generating ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])  # both sampling paths (own and diffusers)
def test_inpaint_only_keeps_the_picture_outside_the_mask(setup, sampler):
    only_latents, only = _run(setup, [_unit()], sampler=sampler, randn_source="GPU" if sampler == "Euler a" else "CPU")
    harmonious_latents, harmonious = _run(setup, [_unit("inpaint")], sampler=sampler,
                                          randn_source="GPU" if sampler == "Euler a" else "CPU")
    picture = np.asarray(PICTURE).astype(np.int16)
    outside = io_.blend_mask(MASK > 0) == 0
    # pasted back exactly where the blended mask is 0; inpaint_global_harmonious only steers there
    assert np.abs(_pixels(only) - picture)[outside].max() <= 1
    assert np.abs(_pixels(harmonious) - picture)[outside].mean() > 10
    assert np.abs(_pixels(only) - _pixels(harmonious))[MASK > 0].mean() > 1  # the mask is made anew
    # the latents keep the picture's encoding outside the mask at every step: their last x0 is near it
    model = setup["engine"].cache.get(setup["sd1"])
    from darkroom.engine.generate import encode_image

    target = encode_image(model, PICTURE)
    lm = io_.latent_mask(MASK > 0, 64 // target.shape[-2])
    far = lambda lat: float(((lat - target).abs() * (1 - lm)).mean())  # noqa: E731
    assert far(only_latents) < 0.5 * far(harmonious_latents)


def test_img2img_inpainting_falls_back_to_harmonious(setup):
    kw = dict(init_image=_png(PICTURE), mask=_png(Image.fromarray(MASK)), denoising_strength=0.75)
    unit = ControlUnit(model="cn-sd1", module="inpaint_only", resize_mode="Just Resize")
    _, result = _run(setup, [unit], **kw)
    _, harmonious = _run(setup, [ControlUnit(model="cn-sd1", module="inpaint", resize_mode="Just Resize")], **kw)
    assert np.array_equal(_pixels(result), _pixels(harmonious))
    info = parse_infotext(result.images[0].infotext)
    assert "Module: inpaint," in info["ControlNet 0"]


def test_lama_unit_leans_the_noise_on_the_fill(setup):
    from darkroom.control.files import find_controlnets
    from darkroom.control.prepare import prepare_control
    from darkroom.control.preprocess import annotator_dirs
    from darkroom.engine.img2img import decode_image

    engine = setup["engine"]
    model = engine.cache.get(setup["sd1"])
    encoded = []

    def encode(pixels):
        encoded.append(pixels)
        return torch.full((1, 4, pixels.shape[2] // 8, pixels.shape[3] // 8), float(len(encoded)))

    prepared = prepare_control([_unit("inpaint_only+lama")], files=find_controlnets(setup["home"]),
                               cache=engine.controlnets, model_family=model.family.id, model_name=model.name,
                               width=64, height=64, hires_size=None, decode=lambda d, n, m: decode_image(d, n, mode=m),
                               annotator_dirs=annotator_dirs(setup["home"]), encode=encode)
    first = prepared.first_pass(False)
    assert torch.equal(first.noise_latent, first.units[0].inpaint_latent) and len(prepared.restores) == 1
    fed = (encoded[0][0].permute(1, 2, 0).numpy() + 1) * 127.5  # what was encoded: the picture with LaMa's fill
    picture = np.asarray(PICTURE).astype(np.float32)
    assert np.abs(fed - picture)[MASK == 0].max() < 1.0 and np.abs(fed - picture)[MASK > 0].mean() > 20
    assert prepared.hires_pass().noise_latent is None
    plain = prepare_control([_unit()], files=find_controlnets(setup["home"]), cache=engine.controlnets,
                            model_family=model.family.id, model_name=model.name, width=64, height=64,
                            hires_size=None, decode=lambda d, n, m: decode_image(d, n, mode=m), encode=encode)
    assert plain.first_pass(False).noise_latent is None
    lama_latents, lama_result = _run(setup, [_unit("inpaint_only+lama")])
    only_latents, _ = _run(setup, [_unit()])
    assert (lama_latents - only_latents).abs().max() > 1e-3  # another start (a small lean: sqrt(abar) is 0.07)
    outside = io_.blend_mask(MASK > 0) == 0
    assert np.abs(_pixels(lama_result) - np.asarray(PICTURE).astype(np.int16))[outside].max() <= 1


def test_lama_needs_its_file(tmp_path_factory, tiny_model, engine_factory):
    home = Home(tmp_path_factory.mktemp("no-lama") / "home").ensure()
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd1", "single")
    engine = engine_factory(home)
    with pytest.raises(InvalidRequest, match="inpaint_only\\+lama needs ControlNetLama.pth.*downloads/lama"):
        generate_with_units(engine, tiny_model("sd1")["path"], [_unit("inpaint_only+lama")], **KW)
