"""Reference units (reference_only, reference_adain, reference_adain+attn: darkroom/control/reference.py): no
ControlNet model, the extension's rules, the UNet left as it was, the numbers against direct computations, and
every way in (engine, A1111 API over a socket, CLI). No parity test: diffusers ships its reference pipeline
only as a community file fetched from the Hub, not in the installed package."""

from __future__ import annotations

import io
import json
import shutil
import threading
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from darkroom.control_unit import ControlUnit
from darkroom.home import Home
from darkroom.metadata.infotext import parse_infotext
from darkroom.request import GenerationRequest
from tests.control_util import generate_with_units
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")


def red_circle(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size * 3 // 16, size * 3 // 16, size * 13 // 16, size * 13 // 16),
                                  fill=(220, 20, 20))
    return image


REF = _png(red_circle())


def _unit(module="reference_only", **kw) -> ControlUnit:
    kw.setdefault("image", REF)
    return ControlUnit(module=module, resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    home = Home(tmp_path_factory.mktemp("ref") / "home").ensure()  # no ControlNet files at all
    engine = engine_factory(home)
    return {"engine": engine, "sd1": tiny_model("sd1")["path"]}


def _run(setup, units=(), *, cancel=None, **kw):
    request = {"model": setup["sd1"], **KW, **kw}
    return generate_with_units(setup["engine"], request.pop("model"), units, cancel=cancel, **request)


def _unet(setup):
    return setup["engine"].cache.get(setup["sd1"]).unet


def _state(unet) -> tuple[dict, int]:
    """Every attention processor (by identity) and the number of hooks on the UNet's modules."""
    processors = {name: id(p) for name, p in unet.attn_processors.items()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())
    return processors, hooks


# --- the unit flow ------------------------------------------------------------------------------------------


def test_model_none_is_active_for_reference_modules_only():
    assert ControlUnit(module="reference_only", image=REF).active
    assert ControlUnit(module="reference_adain+attn", model="None", image=REF).active
    assert not ControlUnit(module="reference_only", image=REF, weight=0).active
    assert not ControlUnit(module="canny", model="None", image=REF).active  # still dropped, as the extension does


def test_module_list_has_them_with_the_style_fidelity_slider():
    from darkroom.control.preprocess import module_list

    listed = module_list()
    for name in ("reference_only", "reference_adain", "reference_adain+attn"):
        assert name in listed["module_list"]
        detail = listed["module_detail"][name]
        assert detail["model_free"] is True
        assert [s["name"] for s in detail["sliders"]] == ["Style Fidelity (only for Balanced mode)"]
        assert detail["sliders"][0]["value"] == 0.5
    assert listed["module_detail"]["canny"]["model_free"] is False


@pytest.mark.parametrize("module", ["reference_only", "reference_adain", "reference_adain+attn"])
def test_a_reference_unit_steers_deterministically_and_leaves_the_unet_as_it_was(setup, module):
    base, _ = _run(setup)
    unet_before = _state(_unet(setup))
    first, result = _run(setup, [_unit(module)])
    again, _ = _run(setup, [_unit(module)])
    assert not torch.equal(first, base)
    assert torch.equal(first, again)
    assert _state(_unet(setup)) == unet_before
    after, _ = _run(setup)
    assert torch.equal(after, base)  # nothing left behind in the cached UNet
    line = parse_infotext(result.infotexts[0])["ControlNet 0"]
    assert line.startswith(f"Module: {module}, Model: None, Weight: 1.0, ")
    assert "Threshold A: 0.5" in line


def test_weight_0_and_a_window_outside_the_steps_equal_no_unit(setup):
    base, _ = _run(setup)
    assert torch.equal(_run(setup, [_unit(weight=0.0)])[0], base)
    assert torch.equal(_run(setup, [_unit(guidance_start=0.9, guidance_end=1.0)])[0], base)  # steps 0, 1/3, 2/3


def test_style_fidelity_and_control_modes_act_on_the_negative_half(setup):
    """Fidelity mixes the negative's rows only: without a negative (CFG 1) it changes nothing; "ControlNet is
    more important" is fidelity 1 and "My prompt is more important" fidelity 0, whatever the slider."""
    f0, _ = _run(setup, [_unit(threshold_a=0.0)])
    f1, _ = _run(setup, [_unit(threshold_a=1.0)])
    assert not torch.equal(f0, f1)
    assert torch.equal(_run(setup, [_unit(threshold_a=0.3, control_mode="ControlNet is more important")])[0], f1)
    assert torch.equal(_run(setup, [_unit(threshold_a=0.7, control_mode="My prompt is more important")])[0], f0)
    no_cfg = [_run(setup, [_unit(threshold_a=a)], cfg_scale=1.0)[0] for a in (0.0, 1.0)]
    assert torch.equal(no_cfg[0], no_cfg[1])


def test_a_batch_of_two_equals_two_single_runs(setup):
    batch, result = _run(setup, [_unit()], batch_size=2)
    assert len(result.images) == 2
    for i in range(2):
        single, _ = _run(setup, [_unit()], seed=KW["seed"] + i)
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-4, rtol=1e-4)


def test_works_in_the_k_diffusion_loop(setup):
    """The webui's NV noise source runs our k-diffusion samplers (KDenoiser), not a diffusers scheduler."""
    from darkroom.engine import samplers

    spec, schedule = samplers.resolve("Euler a", "Automatic")
    assert samplers.runner(spec, schedule, "NV") == "own" and samplers.runner(spec, schedule, "CPU") != "own"
    base, _ = _run(setup, randn_source="NV")
    steered, _ = _run(setup, [_unit("reference_adain+attn")], randn_source="NV")
    again, _ = _run(setup, [_unit("reference_adain+attn")], randn_source="NV")
    assert not torch.equal(base, steered) and torch.equal(steered, again)


@pytest.mark.parametrize("variant", ["sdxl", "sd1-inpainting"])
def test_sdxl_and_a_9_channel_inpainting_unet(setup, tiny_model, variant):
    """SDXL's micro-conditioning reaches the write pass; a 9-channel UNet gets the extension's extra channels
    (no mask, the picture as the masked image)."""
    path = tiny_model(variant)["path"]
    unet = setup["engine"].cache.get(path).unet
    before = _state(unet)
    kw = dict(model=str(path), steps=2)
    base = _run(setup, **kw)[0]
    steered = _run(setup, [_unit("reference_adain+attn", weight=2.0)], **kw)[0]
    assert not torch.equal(base, steered) and torch.isfinite(steered).all()
    assert _state(unet) == before


def test_an_interrupted_pass_restores_the_unet(setup):
    """Cancel set inside the UNet's third call (the write pass of step 2): the interrupt checkpoints raise
    there, and the hooks still come off."""
    unet = _unet(setup)
    cancel = threading.Event()
    calls = []

    def count(module, args):
        calls.append(1)
        if len(calls) == 3:
            cancel.set()

    handle = unet.conv_in.register_forward_pre_hook(count)  # before the engine's checkpoint on conv_in
    before = _state(unet)
    try:
        _, result = _run(setup, [_unit("reference_adain+attn")], cancel=cancel)
        assert result.interrupted and len(calls) == 3
        assert _state(unet) == before
    finally:
        handle.remove()


# --- the numbers ----------------------------------------------------------------------------------------------


def _attend(attn, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention of `hidden` over `context` with attn's weights, written out."""
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    b, heads = hidden.shape[0], attn.heads
    d = q.shape[-1] // heads

    def split(t):
        return t.view(b, -1, heads, d).transpose(1, 2)

    weights = (split(q) @ split(k).transpose(-1, -2) / d ** 0.5).softmax(dim=-1)
    out = (weights @ split(v)).transpose(1, 2).reshape(b, -1, heads * d)
    return attn.to_out[1](attn.to_out[0](out))


def test_attention_concatenates_the_reference_tokens(setup):
    """The middle block's self-attention (the widest: used at any weight > 0): the write pass's input is the
    bank; the real call's output is attention over [own tokens, bank], and on the negative's row fidelity 0.4
    of the plain attention."""
    unet = _unet(setup)
    from darkroom.control.reference import attention_blocks

    attn = attention_blocks(unet)[0].attn1
    seen = []
    handle = attn.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        _run(setup, [_unit(threshold_a=0.4)], steps=1)
    finally:
        handle.remove()
    (bank, _), (hidden, out) = seen[:2]  # the write pass, then the real call
    assert hidden.shape[0] == 2 and bank.shape == hidden.shape  # [negative, prompt]
    with torch.no_grad():
        referenced = _attend(attn, hidden, torch.cat([hidden, bank], dim=1))
        plain = _attend(attn, hidden[:1], hidden[:1])
    torch.testing.assert_close(out[1:], referenced[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:1], 0.4 * plain + 0.6 * referenced[:1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[1:], _attend(attn, hidden[1:], hidden[1:]), atol=1e-4)


def test_adain_matches_each_channels_mean_and_std_to_the_reference(setup):
    """The middle block's output (level 0): renormalised per row and channel to the write pass's statistics;
    the negative's row keeps fidelity 0.25 of its own values."""
    unet = _unet(setup)
    raw, fed = [], []
    h1 = unet.mid_block.register_forward_hook(lambda m, args, out: raw.append(out.detach().clone()))
    h2 = unet.up_blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: fed.append(kwargs["hidden_states"].detach().clone()), with_kwargs=True)
    try:
        _run(setup, [_unit("reference_adain", threshold_a=0.25)], steps=1)
    finally:
        h1.remove()
        h2.remove()
    ref, x = raw[0], raw[1]  # the write pass, then the real call (before our hook changed it)
    assert torch.equal(fed[0], ref)  # the write pass's output is left as it is
    rv, rm = torch.var_mean(ref, dim=(2, 3), keepdim=True, unbiased=False)
    xv, xm = torch.var_mean(x, dim=(2, 3), keepdim=True, unbiased=False)
    matched = (x - xm) / xv.clamp_min(1e-6).sqrt() * rv.clamp_min(1e-6).sqrt() + rm
    expected = torch.cat([0.25 * x[:1] + 0.75 * matched[:1], matched[1:]])
    torch.testing.assert_close(fed[1], expected, atol=1e-5, rtol=1e-5)
    got_v, got_m = torch.var_mean(fed[1][1:], dim=(2, 3), unbiased=False)
    torch.testing.assert_close(got_m, rm[1:, :, 0, 0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_v.sqrt(), rv[1:, :, 0, 0].sqrt(), atol=1e-4, rtol=1e-4)


def test_weight_picks_the_layers_as_the_extension_does(setup):
    from darkroom.control.reference import adain_layers, attention_blocks

    unet = _unet(setup)
    blocks = attention_blocks(unet)
    widths = [b.attn1.to_q.in_features for b in blocks]
    assert widths == sorted(widths, reverse=True) and blocks[0] in list(unet.mid_block.modules())
    levels = [level for _, level in adain_layers(unet)]
    assert levels[0] == 0.0 and all(0.0 <= lv <= 2.0 for lv in levels)


# --- the ways in ------------------------------------------------------------------------------------------


def test_webuiapi_sends_a_reference_unit_with_model_none_over_a_socket(studio):
    import webuiapi

    from tests.server_util import live_server

    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
        assert "reference_only" in api.controlnet_module_list()
        with urllib.request.urlopen(f"{url}/controlnet/module_list") as r:  # noqa: S310 (loopback)
            detail = json.loads(r.read())["module_detail"]["reference_only"]
        assert detail["model_free"] is True
        common = {"prompt": "a circle", "seed": 21, "width": 64, "height": 64, "cfg_scale": 7}
        plain = api.txt2img(**common)
        unit = webuiapi.ControlNetUnit(image=red_circle(), module="reference_only", model="None")
        # a fresh alwayson_scripts: webuiapi writes units into its shared default dict
        steered = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})
        assert steered.image.tobytes() != plain.image.tobytes()
        line = steered.info["extra_generation_params"]["ControlNet 0"]
        assert line.startswith("Module: reference_only, Model: None, ")


def test_cli_runs_a_reference_unit_without_a_model_and_reruns_it_from_the_png(home, tiny_model, tmp_path):
    from click.testing import CliRunner

    from darkroom.cli import cli
    from darkroom.metadata.images import read_image_metadata

    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    ref = tmp_path / "ref.png"
    red_circle().save(ref)

    def run(*args):
        return CliRunner().invoke(cli, ["--home", str(home.root), *args])

    common = ["--model", "tiny-sd1", "--steps", "3", "--seed", "5", "-W", "64", "-H", "64", "--precision", "fp32"]
    r = run("generate", "a circle", *common, "-o", str(tmp_path / "plain"))
    assert r.exit_code == 0, r.output
    r = run("generate", "a circle", *common, "-o", str(tmp_path / "ref"), "--controlnet",
            f"module=reference_only,image={ref}")
    assert r.exit_code == 0, r.output
    [plain] = (tmp_path / "plain").glob("*.png")
    [steered] = (tmp_path / "ref").glob("*.png")
    assert Image.open(plain).tobytes() != Image.open(steered).tobytes()
    line = parse_infotext(read_image_metadata(steered).parameters)["ControlNet 0"]
    assert line.startswith("Module: reference_only, Model: None, ")
    r = run("generate", "--from-png", str(steered), "-o", str(tmp_path / "again"), "--precision", "fp32")
    assert r.exit_code == 0, r.output
    [again] = (tmp_path / "again").glob("*.png")
    assert Image.open(again).tobytes() == Image.open(steered).tobytes()
    # another module with no model is still no unit: the same picture as without
    r = run("generate", "a circle", *common, "-o", str(tmp_path / "canny"), "--controlnet",
            f"module=canny,image={ref}")
    assert r.exit_code == 0, r.output
    [canny] = (tmp_path / "canny").glob("*.png")
    assert Image.open(canny).tobytes() == Image.open(plain).tobytes()


# --- the starter model: a real, visible effect -----------------------------------------------------------------


def test_a_red_circle_reference_makes_the_starter_models_picture_redder(tmp_path):
    """The built-in starter model (trained on drawn shapes) with "a circle on a white background": without a
    unit no pixel is clearly red; with a red circle as reference_only's picture some are, for every seed."""
    from darkroom.api import build_engine
    from darkroom.models.starter import STARTER_FILE

    if not STARTER_FILE.exists():
        pytest.skip("the starter model is not shipped in this checkout")
    engine = build_engine(Home(tmp_path / "home").ensure())
    reference = _png(red_circle(128))

    def red_fraction(seed: int, units) -> float:
        req = GenerationRequest(prompt="a circle on a white background", seed=seed, steps=12, controlnet=units)
        pixels = np.asarray(Image.open(io.BytesIO(engine.generate(req).images[0].png)).convert("RGB")).astype(int)
        return float(((pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)).mean())

    for seed in (1, 2):
        plain = red_fraction(seed, [])
        steered = red_fraction(seed, [ControlUnit(module="reference_only", image=reference)])
        assert steered > plain + 0.01, (seed, plain, steered)
