"""ControlNet-LLLite (kohya's SDXL models): the file layout, where each module hooks the diffusers UNet, the
extension's rule for the added term, and units in a generation (window, weight, hires, infotext, errors)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.control import lllite
from darkroom.control.apply import Control, ControlUnitRun
from darkroom.control.config import classify
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_lllite import lllite_state, write_tiny_lllite
from tests.control_util import generate_with_units, noise_image, png_bytes

KW = dict(prompt="a red circle", negative_prompt="", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
HINT = noise_image()


def _unit(model="lllite-tiny", **kw) -> ControlUnit:
    kw.setdefault("image", png_bytes(HINT))
    kw.setdefault("module", "none")
    return ControlUnit(model=model, resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("lllite")
    home = Home(root / "home").ensure()
    engine = engine_factory(home)
    sdxl = tiny_model("sdxl")["path"]
    unet = engine.cache.get(sdxl).unet
    write_tiny_lllite(home.controlnets, "lllite-tiny", unet, seed=3)
    return {"home": home, "engine": engine, "sdxl": sdxl, "sd1": tiny_model("sd1")["path"], "unet": unet}


def _pixels(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.int16)


def _run(setup, units=(), family="sdxl", **kw):
    return generate_with_units(setup["engine"], setup[family], units, **{**KW, **kw})[1]


# --- the layout -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "path"), [
    ("lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("lllite_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_q",
     "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_q"),
    ("lllite_unet_middle_block_1_transformer_blocks_3_attn1_to_v",
     "mid_block.attentions.0.transformer_blocks.3.attn1.to_v"),
    ("lllite_unet_output_blocks_5_1_transformer_blocks_1_attn1_to_k",
     "up_blocks.1.attentions.2.transformer_blocks.1.attn1.to_k"),
])
def test_module_names_map_onto_the_sdxl_unet(name, path):
    """Real SDXL files number the original UNet's blocks with 2 layers per level."""
    assert lllite.target_path(name) == path
    with pytest.raises(ValueError, match="no transformer"):
        lllite.target_path("lllite_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q")  # a downsampler


def test_files_are_classified_listed_and_refused_when_not_sdxl(setup):
    from darkroom.control.files import find_controlnets

    entry = next(f for f in find_controlnets(setup["home"]) if f.name == "lllite-tiny")
    assert entry.supported and entry.family == "sdxl" and entry.noun == "ControlNet-LLLite"
    sd1 = {"lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.down.0.weight": (8, 320)}
    kind = classify(sd1)
    assert not kind.supported and "SD1/SD2 ControlNet-LLLite" in kind.detail
    with pytest.raises(InvalidRequest) as err:
        _run(setup, [_unit()], family="sd1")
    assert "lllite-tiny is an SDXL ControlNet-LLLite" in str(err.value) and "is SD1" in str(err.value)


def test_the_module_is_the_extensions():
    """Values computed with the extension's own LLLiteModule (scripts/controlnet_lllite.py, kohya's ComfyUI
    node) on the same weights and inputs; a depth-2 module on tokens (a map 4 x 4 tokens at x16)."""
    g = torch.Generator().manual_seed(0)
    module = lllite.LLLiteModule(16, 8, 8, depth=2)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
    cond = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    x = torch.randn(2, 16, 16, generator=g)
    with torch.no_grad():
        out = module(x, module.embed(cond, (4, 4)))
    assert out.shape == (2, 16, 16)
    assert [round(v, 5) for v in out[0, 0, :4].tolist()] == PINNED_MODULE
    assert [round(v, 5) for v in out[1, 5, :2].tolist()] == PINNED_MODULE_B


PINNED_MODULE = [0.31762, -1.42359, 0.83753, 1.47236]  # the extension's module gave these (difference 0)
PINNED_MODULE_B = [3.33591, 6.87306]


def _by_hand(unet, state, hint, weight):
    """The extension's rule, written out: each hooked projection's forward replaced by one that adds
    sum(module(x, map) x weight) to its input (returns the undo)."""
    per_level = unet.config.layers_per_block
    loaded = lllite.load_tensors(state, Path("x.safetensors"), dtype=torch.float32,
                                 device="cpu")
    undo = []
    modules = dict(unet.named_modules())
    for name, module in loaded.model.items():
        path = lllite.target_path(name, per_level)
        middle_level = path.startswith(("down_blocks.1.", "up_blocks.1."))  # 8 x 8 latents: 4 x 4 there, else 2 x 2
        embedding = module.embed(hint * 2 - 1, (4, 4) if middle_level else (2, 2))
        layer = modules[path]
        original = layer.forward

        def forward(x, _original=original, _module=module, _embedding=embedding):
            return _original(x + _module(x, _embedding) * weight)

        layer.forward = forward
        undo.append(lambda layer=layer: delattr(layer, "forward"))
    return undo


def test_hooks_add_the_term_in_the_window_and_leave_no_trace(setup):
    unet = setup["unet"]
    state = lllite_state(unet, seed=3)
    loaded = lllite.load_tensors(state, Path("x.safetensors"), dtype=torch.float32,
                                 device="cpu")
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    extra = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, extra, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    t = torch.tensor([500, 500])

    def call():
        with torch.no_grad():
            return unet(x, t, ctx, added_cond_kwargs=added).sample

    base = call()
    control = Control([ControlUnitRun(loaded, hint, weight=0.7, start=0.2, end=0.6)])
    with lllite.hooked(control, unet):
        control.at = (3, 10)  # in the window
        hooked = call()
        control.at = (1, 10)  # before it
        before = call()
        control.at = (7, 10)  # after it
        after = call()
    assert torch.equal(before, base) and torch.equal(after, base)
    assert (hooked - base).abs().max() > 1e-2
    assert all(not m._forward_pre_hooks for m in unet.modules())  # removed on exit
    undo = _by_hand(unet, state, hint, 0.7)
    try:
        expected = call()
    finally:
        for u in undo:
            u()
    assert torch.allclose(hooked, expected, atol=1e-6, rtol=0)
    assert torch.equal(call(), base)
    with lllite.hooked(Control([ControlUnitRun(loaded, hint)], hires=True), unet):  # the hires pass: no hooks
        assert all(not m._forward_pre_hooks for m in unet.modules())


# --- in a generation ------------------------------------------------------------------------------------------


def test_a_unit_steers_by_its_weight_and_is_recorded(setup):
    plain = _pixels(_run(setup))
    zero = _pixels(_run(setup, [_unit(weight=0.0)]))
    steered = _run(setup, [_unit(weight=1.0)])
    assert np.array_equal(zero, plain)
    assert np.abs(_pixels(steered) - plain).max() > 8
    assert 'Model: lllite-tiny [' in steered.images[0].infotext
    assert all(not m._forward_pre_hooks for m in setup["unet"].modules())
    odd = _run(setup, [_unit()], width=80, height=48)  # not multiples of 32: the map's edge is repeated
    assert _pixels(odd).shape == (48, 80, 3)


def test_the_hires_pass_runs_without_it(setup):
    """As the extension: an LLLite unit never acts in the hires fix's second pass."""
    kw = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, steps=2)
    plain = _pixels(_run(setup, **kw))
    second_only = _pixels(_run(setup, [_unit(hr_option="High res only")], **kw))
    assert np.array_equal(second_only, plain)
