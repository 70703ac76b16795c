"""darkroom/engine/speed.py: the CPU speed-ups change no output, keep LoRAs working, survive reloads."""

from __future__ import annotations

import io
import shutil

import pytest
import torch
from PIL import Image

from darkroom.engine import conv_epilogue, speed
from darkroom.home import Home
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.request import GenerationRequest
from darkroom.testing.tiny_lora import write_tiny_lora

REQ = GenerationRequest(prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, seed=7,
                        sampler="Euler", cfg_scale=5.0)


def _pixels(image) -> bytes:
    return Image.open(io.BytesIO(image.png)).convert("RGB").tobytes()


def _load(path, dtype=torch.float32):
    model = load_checkpoint(path, LoadOptions(device=torch.device("cpu"), dtype=dtype, vae_dtype=dtype,
                                              channels_last=True))
    model.unet.to(memory_format=torch.channels_last)
    model.vae.to(memory_format=torch.channels_last)
    return model


def _run(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet_cfg = model.unet.config
    cross = unet_cfg.cross_attention_dim
    x = torch.randn(2, unet_cfg.in_channels, 8, 8, generator=g).to(model.dtype)
    ctx = torch.randn(2, 77, cross, generator=g).to(model.dtype)
    extra = None
    if unet_cfg.addition_embed_type == "text_time":
        text_embeds = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, text_embeds, generator=g).to(model.dtype),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2).to(model.dtype)}
    lat = torch.randn(1, model.vae.config.latent_channels, 8, 8, generator=g).to(model.vae_dtype)
    with torch.no_grad():
        eps = model.unet(x, torch.tensor(500.0), encoder_hidden_states=ctx, added_cond_kwargs=extra).sample
        img = model.vae.decode(lat).sample
    return eps, img


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sdxl"])  # sd2/sdxl: linear proj_in/proj_out
def test_unet_and_vae_outputs_are_unchanged(tiny_model, variant):
    path = tiny_model(variant)["path"]
    plain, fast = _load(path), _load(path)
    report = speed.optimize(fast)
    unet_counts = report["eager"]["unet"]
    assert unet_counts["transformer_layout"] > 0 and unet_counts["resnet_no_div"] > 0
    assert unet_counts["attention_lean"] > 0 and report["eager"]["vae"]["resnet_no_div"] > 0
    assert report["compiled"] == []
    assert speed.optimize(fast)["eager"]["unet"] == dict.fromkeys(unet_counts, 0)  # a second call changes nothing
    for (a, b) in zip(_run(plain), _run(fast), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_bf16_outputs_stay_within_rounding_and_as_close_to_fp32(tiny_model):
    """In bf16 the oneDNN epilogues (bias in the GEMM; GEGLU's GELU and gating product) round once
    where diffusers rounds three times: not the same bits, but no further from an fp32 run."""
    path = tiny_model("sd1")["path"]
    plain, fast, exact = _load(path, torch.bfloat16), _load(path, torch.bfloat16), _load(path)
    counts = speed.optimize(fast)["eager"]["unet"]
    if speed._fused_linear_available():
        assert counts["linear_fused_bias"] > 0 and counts["geglu_fused"] > 0
    for a, b, ref in zip(_run(plain), _run(fast), _run(exact), strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=0, atol=5e-2)
        err_plain = ((a.float() - ref).norm() / ref.norm()).item()
        err_fast = ((b.float() - ref).norm() / ref.norm()).item()
        assert err_fast <= 1.25 * err_plain + 1e-4, (err_fast, err_plain)


def _geglu(dim=16, hidden=32, seed=0):
    from diffusers.models.activations import GEGLU

    torch.manual_seed(seed)
    mod = GEGLU(dim, hidden).to(torch.bfloat16).eval()
    x = torch.randn(2, 24, dim, dtype=torch.bfloat16)
    return mod, x


@pytest.mark.skipif(not speed._fused_linear_available(), reason="this torch build has no oneDNN bf16 linear epilogues")
def test_fused_geglu_follows_weight_changes_and_hooks():
    plain, x = _geglu()
    fast, _ = _geglu()
    assert speed.optimize_module(fast, channels_last=False)["geglu_fused"] == 1
    assert fast.forward.__func__ is speed._geglu_fused
    with torch.no_grad():
        torch.testing.assert_close(fast(x).float(), plain(x).float(), rtol=0.02, atol=0.02)
        for mod in (plain, fast):  # what a LoRA merge does: the weight changed in place
            mod.proj.weight.add_(0.5)
        torch.testing.assert_close(fast(x).float(), plain(x).float(), rtol=0.02, atol=0.05)
        seen = []
        handle = fast.proj.register_forward_pre_hook(lambda m, args: seen.append(1) or (args[0] * 0,))
        try:  # a hook on the projection (an extension's) is honoured: diffusers' path runs
            assert torch.equal(fast(x), plain(x * 0))
            assert seen
        finally:
            handle.remove()
        assert not torch.equal(fast(x), plain(x * 0))
        fp32, _ = _geglu()  # other dtypes keep diffusers' forward
        speed.optimize_module(fp32.float(), channels_last=False)
        assert torch.equal(fp32(x.float()), type(fp32).forward(fp32, x.float()))


def _ops(fn) -> tuple[torch.Tensor, set[str]]:
    with torch.profiler.profile() as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


@pytest.mark.skipif(not conv_epilogue.available(), reason="this torch build has no oneDNN conv epilogues")
@pytest.mark.parametrize("channels", [(16, 16), (8, 16)])  # the residual is the input / a 1x1 shortcut's output
def test_fused_conv_add_matches_diffusers_follows_weights_and_honours_hooks(channels):
    """The resnet's residual is added in conv2's epilogue (into the fresh shortcut output, in place, where
    there is one): within bf16 rounding of diffusers' forward, no further from fp32, the input untouched."""
    import copy

    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    cin, cout = channels
    exact = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=None, groups=4,
                          time_embedding_norm="group").eval()  # a VAE resnet
    plain = copy.deepcopy(exact).to(torch.bfloat16, memory_format=torch.channels_last)
    fast = copy.deepcopy(plain)
    assert speed.optimize_module(fast, channels_last=True)["resnet_no_div"] == 1
    x = torch.randn(2, cin, 16, 16).to(torch.bfloat16, memory_format=torch.channels_last)
    before = x.clone()
    fused_op = "mkldnn::_convolution_pointwise_" if cin != cout else "mkldnn::_convolution_pointwise"
    with torch.no_grad():
        out, ops = _ops(lambda: fast(x, None))
        assert fused_op in ops and "aten::add_" not in ops
        assert torch.equal(x, before)
        ref, want = exact(x.float(), None), plain(x, None)
        torch.testing.assert_close(out.float(), want.float(), rtol=0.02, atol=0.05)
        err_fast = ((out.float() - ref).norm() / ref.norm()).item()
        err_plain = ((want.float() - ref).norm() / ref.norm()).item()
        assert err_fast <= 1.25 * err_plain + 1e-4, (err_fast, err_plain)
        for mod in (plain, fast):  # a LoRA merge changes the weight in place
            mod.conv2.weight.add_(0.25)
        torch.testing.assert_close(fast(x, None).float(), plain(x, None).float(), rtol=0.02, atol=0.05)
        handle = fast.conv2.register_forward_hook(lambda m, args, y: y * 0)
        try:  # a hook on conv2 (an extension's) is honoured: conv2 runs as a module, then the add
            out, ops = _ops(lambda: fast(x, None))
            assert fused_op not in ops
            shortcut = x if fast.conv_shortcut is None else fast.conv_shortcut(x)
            assert torch.equal(out, shortcut)
        finally:
            handle.remove()


@pytest.fixture(params=["fp32", "bf16"])
def two_homes(request, tmp_path, tiny_model, engine_factory):
    """Two engines over the same models: one with the speed-ups (the default), one without."""
    info = tiny_model("sd1")
    out = []
    for name in ("fast", "plain"):
        home = Home(tmp_path / name).ensure()
        shutil.copy(info["path"], home.checkpoints / "tiny-sd1.safetensors")
        write_tiny_lora(home.loras / "inked.safetensors", info, alpha=2.0)
        engine = engine_factory(home, precision=request.param)
        engine.cache.speedups = name == "fast"
        out.append(engine)
    return out


def _mean_diff(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_images_and_loras_are_the_same_with_the_speedups(two_homes, tmp_path, engine_factory):
    fast, plain = two_homes
    with_lora = REQ.model_copy(update={"prompt": "a red circle <lora:inked:0.8>"})
    images = {}
    for label, engine in (("fast", fast), ("plain", plain)):
        images[label] = [_pixels(engine.generate(r).images[0]) for r in (REQ, with_lora, REQ)]
    assert fast.cache.current.unet.down_blocks[0].resnets[0].forward.__func__ is speed._resnet_forward
    assert "forward" not in vars(plain.cache.current.unet.down_blocks[0].resnets[0])
    if fast.cache.current.dtype == torch.float32:
        # the same arithmetic up to float32 rounding (the VAE's upsamplers sum their taps first, see
        # upsample_conv): a pixel value may move by one level, never more
        for a, b in zip(images["fast"], images["plain"], strict=True):
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1
    else:  # bf16: the fused epilogues round differently (see the test above), no further from fp32's images
        exact = engine_factory(Home(tmp_path / "plain"), precision="fp32")
        exact.cache.speedups = False
        reference = [_pixels(exact.generate(r).images[0]) for r in (REQ, with_lora)]
        for ref, a, b in zip(reference, images["plain"], images["fast"], strict=False):
            assert _mean_diff(a, b) < 3
            assert _mean_diff(ref, b) <= 1.25 * _mean_diff(ref, a) + 0.5, (_mean_diff(ref, b), _mean_diff(ref, a))
    base, lora, again = images["fast"]
    assert lora != base  # the LoRA merged into the (patched) model's weights takes effect ...
    assert again == base  # ... and is gone afterwards


def test_a_second_model_load_is_optimized_too(tmp_path, tiny_model, engine_factory):
    home = Home(tmp_path / "home").ensure()
    for variant in ("sd1", "sd2"):
        shutil.copy(tiny_model(variant)["path"], home.checkpoints / f"tiny-{variant}.safetensors")
    engine = engine_factory(home)
    seen = []
    for name in ("tiny-sd1", "tiny-sd2", "tiny-sd1"):
        result = engine.generate(REQ.model_copy(update={"model": name}))
        model = engine.cache.current
        assert model.name.startswith(name)
        assert isinstance(model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.processor,
                          type(speed.lean_processor()))
        seen.append(_pixels(result.images[0]))
    assert seen[0] == seen[2]


def test_compile_settings_are_checked_and_never_freeze(tiny_model, tmp_path, monkeypatch):
    model = _load(tiny_model("sd1")["path"])
    with pytest.raises(ValueError, match="compile_mode"):
        speed.optimize(model, compile_mode="fast")
    assert speed.compile_cache_dir(Home(tmp_path)) == tmp_path / "cache" / "torch-compile"


@pytest.mark.slow
def test_compiled_unet_follows_lora_merges(tiny_model, tmp_path, monkeypatch):
    """torch.compile (inductor, no freezing): the weights stay graph inputs, so a LoRA merged in
    place after the compile (engine/lora.py) changes the output, and restoring it restores it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    plain, fast = _load(tiny_model("sd1")["path"]), _load(tiny_model("sd1")["path"])
    assert speed.optimize(fast, home=Home(tmp_path), compile_mode="unet")["compiled"] == ["unet"]
    try:
        ref, got = _run(plain)[0], _run(fast)[0]
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)
        for m in (plain, fast):  # a merge as engine/lora.py does it: in place
            m.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.data.mul_(3.0)
        ref2, got2 = _run(plain)[0], _run(fast)[0]
        assert (ref2 - ref).abs().max() > 1e-3
        torch.testing.assert_close(got2, ref2, rtol=0, atol=1e-3)
    finally:
        torch._dynamo.reset()


def test_compile_mode_comes_from_the_setting_the_variable_and_the_flag(tmp_path, monkeypatch):
    """`torch_compile` (settings.json) is the default; DARKROOM_COMPILE, which `--compile` sets, wins;
    a bad value in the variable is one clear error, not a crash at the first generation."""
    import json

    from click.testing import CliRunner

    from darkroom.api import build_engine, compile_mode
    from darkroom.cli import cli
    from darkroom.errors import InvalidRequest

    monkeypatch.delenv("DARKROOM_COMPILE", raising=False)
    home = Home(tmp_path / "home").ensure()
    assert compile_mode(home) == "off"
    (home.root / "settings.json").write_text(json.dumps({"torch_compile": "unet"}))
    engine = build_engine(home)
    assert (engine.cache.compile_mode, engine.cache.compile_home) == ("unet", home)
    monkeypatch.setenv("DARKROOM_COMPILE", "off")
    assert compile_mode(home) == "off"
    monkeypatch.setenv("DARKROOM_COMPILE", "fast")
    with pytest.raises(InvalidRequest, match="DARKROOM_COMPILE='fast' is not one of off, unet"):
        compile_mode(home)
    monkeypatch.delenv("DARKROOM_COMPILE")
    # the flag sets the variable for this process (the option is read before the command runs)
    result = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "--compile", "bogus", "x"])
    assert result.exit_code == 2 and "'bogus' is not one of 'off', 'unet'" in result.output
    seen = []
    import sys

    generate_module = sys.modules["darkroom.cli.generate"]  # the package's `generate` is the command
    monkeypatch.setattr(generate_module, "_engine", lambda home, *a, **k: seen.append(compile_mode(home)) or 1 / 0)
    CliRunner().invoke(cli, ["--home", str(home.root), "generate", "--compile", "off", "x"])
    assert seen == ["off"]  # the flag beat the setting's "unet"
