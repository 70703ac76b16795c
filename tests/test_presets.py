"""Few-step presets (LCM, Turbo, Lightning, Hyper-SD, DMD2, TCD): settings, detection, CFG 1, interfaces."""

from __future__ import annotations

import io
import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.engine import presets, samplers
from darkroom.errors import InvalidRequest
from darkroom.models.configs import scheduler_config
from darkroom.request import GenerationRequest

SIZE = dict(width=64, height=64, seed=7)


@contextmanager
def unet_batches(engine, req):
    """The batch size of every UNet call while generating (a forward pre-hook on the loaded UNet)."""
    seen: list[int] = []
    unet = engine.load(req).unet
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        yield seen
    finally:
        handle.remove()


def _pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB")).astype(np.float64)


def _infotext_value(infotext: str, key: str) -> str:
    m = re.search(rf"(?:^|, ){re.escape(key)}: ([^,]+)", infotext.splitlines()[-1])
    assert m, infotext
    return m.group(1)


# --------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DDIM"])
@pytest.mark.parametrize("steps", range(1, 9))
def test_sgm_uniform_is_diffusers_trailing(sampler, steps):
    import diffusers

    spec, label = samplers.resolve(sampler, "SGM Uniform")
    ours = samplers.make_scheduler(spec, label, scheduler_config(False))
    ours.set_timesteps(steps)
    config = {**scheduler_config(False), **spec.options, "timestep_spacing": "trailing"}
    theirs = getattr(diffusers, spec.scheduler).from_config(config)
    theirs.set_timesteps(steps)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()
    assert ours.timesteps[0] == 999 and len(ours.timesteps) == steps


@pytest.mark.parametrize("sampler", ["LCM", "TCD"])
def test_consistency_samplers_trailing_and_own_schedule(sampler):
    import diffusers

    spec, _ = samplers.resolve(sampler, "SGM Uniform")
    for steps in range(1, 9):
        trailing = samplers.make_scheduler(spec, "SGM Uniform", scheduler_config(False))
        trailing.set_timesteps(steps)
        assert trailing.timesteps.tolist() == samplers.trailing_timesteps(steps)
        own = samplers.make_scheduler(spec, "Uniform", scheduler_config(False))
        own.set_timesteps(steps)
        plain = getattr(diffusers, spec.scheduler).from_config(scheduler_config(False))
        plain.set_timesteps(steps)
        assert own.timesteps.tolist() == plain.timesteps.tolist()
    # DMD2's published timesteps are trailing spacing at 4 steps; diffusers' default LCM schedule is not
    assert samplers.trailing_timesteps(4) == [999, 749, 499, 249]
    assert plain.timesteps.tolist() != samplers.trailing_timesteps(8)
    too_many = samplers.make_scheduler(spec, "Uniform", scheduler_config(False))
    with pytest.raises(InvalidRequest, match="SGM Uniform"):
        too_many.set_timesteps(60)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("name", presets.preset_names())
def test_each_preset_runs(engine, tiny_model, name):
    path = tiny_model("sd1")["path"]
    preset = presets.get_preset(name)
    req = GenerationRequest(prompt="a red circle", negative_prompt="blurry", model=str(path), preset=name, **SIZE)
    with unet_batches(engine, req) as seen:
        result = engine.generate(req)
    assert len(seen) == preset.steps
    # CFG <= 1 (every few-step preset but hyper-cfg) runs the conditional pass only
    assert set(seen) == ({1} if preset.cfg_scale <= 1 else {2})
    pixels = _pixels(result.images[0])
    assert np.isfinite(pixels).all() and pixels.std() > 0
    info = result.images[0].infotext
    assert _infotext_value(info, "Sampler") == preset.sampler
    assert _infotext_value(info, "Steps") == str(preset.steps)
    assert float(_infotext_value(info, "CFG scale")) == preset.cfg_scale
    if preset.schedule != "Automatic":
        assert _infotext_value(info, "Schedule type") == preset.schedule
    assert result.request.preset == name and result.request.steps == preset.steps


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_one_skips_the_unconditional_pass(engine, tiny_model, batch):
    path = tiny_model("sd1")["path"]
    base = dict(prompt="a red circle", negative_prompt="blurry", model=str(path), sampler="Euler", steps=2,
                batch_size=batch, **SIZE)
    for cfg, per_call in ((1.0, batch), (0.0, batch), (1.5, 2 * batch)):
        req = GenerationRequest(cfg_scale=cfg, **base)
        with unet_batches(engine, req) as seen:
            engine.generate(req)
        assert seen == [per_call, per_call], (cfg, seen)


def test_explicit_fields_beat_the_preset(engine, tiny_model):
    path = tiny_model("sd1")["path"]
    req = GenerationRequest(prompt="a red circle", model=str(path), preset="lightning", steps=3, cfg_scale=1.0,
                            **SIZE)
    applied = presets.apply_preset(req)
    assert (applied.sampler, applied.schedule, applied.steps, applied.cfg_scale) == ("Euler", "SGM Uniform", 3, 1.0)
    assert presets.apply_preset(applied) == applied  # idempotent
    with unet_batches(engine, req) as seen:
        result = engine.generate(req)
    assert len(seen) == 3 and _infotext_value(result.images[0].infotext, "Sampler") == "Euler"
    # no preset, or one whose fields are all given: nothing changes
    plain = GenerationRequest(prompt="x")
    assert presets.apply_preset(plain) is plain
    full = GenerationRequest(prompt="x", preset="turbo", sampler="DDIM", schedule="Uniform", steps=9, cfg_scale=3)
    assert presets.apply_preset(full).model_dump() == full.model_dump()


def test_unknown_preset_is_refused():
    with pytest.raises(InvalidRequest, match=r"unknown preset 'lightnin'; choose one of: standard, lcm, .*auto"):
        presets.apply_preset(GenerationRequest(prompt="x", preset="lightnin"))
    presets.check_preset_name(None)
    presets.check_preset_name("AUTO")
    presets.check_preset_name(" Lightning ")


# --------------------------------------------------------------------------- detection

POSITIVE = [
    ("lcm-lora-sdv1-5", "lcm", None),
    ("LCM_Dreamshaper_v7", "lcm", None),
    ("dreamshaperLCM", "lcm", None),
    ("sd_xl_turbo_1.0_fp16", "turbo", None),
    ("dreamshaperXL_turboDpmppSDE", "turbo", None),
    ("sdxl_lightning_4step_lora", "lightning", 4),
    ("sdxl_lightning_2step", "lightning", 2),
    ("juggernautXL_v9Rdphoto2Lightning", "lightning", None),
    ("Hyper-SDXL-8steps-lora", "hyper", 8),
    ("Hyper-SD15-1step-lora", "hyper", 1),
    ("HyperSD15_2steps", "hyper", 2),
    ("Hyper-SDXL-8steps-CFG-lora", "hyper-cfg", 8),
    ("Hyper-SD15-12steps-CFG-lora", "hyper-cfg", 12),
    ("dmd2_sdxl_4step_lora_fp16", "dmd2", 4),
    ("TCD-SDXL-LoRA", "tcd", None),
]
NEGATIVE = ["calcium", "blcm", "lcmx", "Hyper_Realistic_XL", "hyperrealism_v2", "turbot_fish", "lightningbolt",
            "dmdx", "htcdx", "v1-5-pruned-emaonly", "tiny-sd1", "sd_xl_base_1.0", "realisticVisionV60B1_v51HyperVAE"]


@pytest.mark.parametrize("name,preset,steps", POSITIVE)
def test_detects_names(name, preset, steps):
    assert presets.detect_name(name) == (preset, steps)


@pytest.mark.parametrize("name", NEGATIVE)
def test_no_false_positives(name):
    assert presets.detect_name(name) is None


def test_detects_from_metadata_and_lora_names(tmp_path):
    from safetensors.torch import save_file

    tensors = {"x": torch.zeros(1)}
    titled = tmp_path / "my-model.safetensors"
    save_file(tensors, str(titled), metadata={"modelspec.title": "SDXL Lightning 2-step",
                                              "modelspec.architecture": "stable-diffusion-xl-v1-base"})
    assert presets.detect_preset(titled) == "lightning"
    trained = tmp_path / "merge.safetensors"
    save_file(tensors, str(trained), metadata={"ss_output_name": "dmd2_sdxl_4step"})
    assert presets.detect_preset(trained) == "dmd2"
    # metadata that says nothing: the file name decides; a misleading word inside another one does not
    plain = tmp_path / "calcium-turbo.safetensors"
    save_file(tensors, str(plain), metadata={"modelspec.title": "calcium"})
    assert presets.detect_preset(plain) == "turbo"
    none = tmp_path / "calcium.safetensors"
    save_file(tensors, str(none), metadata={"modelspec.description": "not an lcm model"})
    assert presets.detect_preset(none) is None
    # LoRAs named in the prompt come first; a LoRA at weight 0 does not count
    assert presets.detect_preset(none, prompt="a cat <lora:sdxl_lightning_4step_lora:1>") == "lightning"
    assert presets.detect_preset(titled, prompt="a cat <lora:Hyper-SD15-8steps-lora:0.8>") == "hyper"
    assert presets.detect_preset(none, prompt="a cat <lora:lcm-lora-sdv1-5:0>") is None
    assert presets.detect_preset(filename="LCM_Dreamshaper_v7.safetensors") == "lcm"


def test_auto_from_checkpoint_metadata(engine_factory, home, tiny_model):
    from safetensors.torch import load_file, save_file

    src = tiny_model("sd1")["path"]
    target = home.checkpoints / "my-merge.safetensors"
    save_file(load_file(str(src)), str(target), metadata={"modelspec.title": "My Merge (Hyper-SD 2 steps)"})
    engine = engine_factory(home)
    req = GenerationRequest(prompt="a red circle", model=str(target), preset="auto", **SIZE)
    with unet_batches(engine, req) as seen:
        result = engine.generate(req)
    assert seen == [1, 1]  # "2 steps" from the title, CFG 1
    assert result.request.preset == "hyper"
    info = result.images[0].infotext
    assert _infotext_value(info, "Sampler") == "DDIM" and _infotext_value(info, "Steps") == "2"
    # auto with nothing recognised: the request stays as it is
    plain = GenerationRequest(prompt="a red circle", model=str(src), preset="auto", **SIZE)
    assert engine.apply_preset(plain) == plain


def test_auto_from_lora_metadata(engine_factory, home, tiny_model):
    from darkroom.testing.tiny_lora import write_tiny_lora

    info = tiny_model("sd1")
    write_tiny_lora(home.loras / "style.safetensors", info, metadata={"modelspec.title": "TCD-SD15-LoRA"})
    engine = engine_factory(home)
    req = GenerationRequest(prompt="a red circle <lora:style:1>", model=str(info["path"]), preset="auto", **SIZE)
    found = engine.detect_preset(req)
    assert (found.preset, found.source) == ("tcd", "LoRA 'style'")
    with unet_batches(engine, req) as seen:
        result = engine.generate(req)
    assert seen == [1] * 4 and _infotext_value(result.images[0].infotext, "Sampler") == "TCD"
    # a LoRA that is not there: no detection here, the usual error when it is applied
    missing = req.model_copy(update={"prompt": "x <lora:nowhere:1>"})
    assert engine.detect_preset(missing) is None


def test_tcd_eta_is_its_gamma(engine, tiny_model):
    path = tiny_model("sd1")["path"]
    base = dict(prompt="a red circle", model=str(path), preset="tcd", **SIZE)
    default = _pixels(engine.generate(GenerationRequest(**base)).images[0])
    explicit = _pixels(engine.generate(GenerationRequest(eta=0.3, **base)).images[0])
    other = engine.generate(GenerationRequest(eta=0.0, **base)).images[0]
    assert np.array_equal(default, explicit)  # 0.3 is the default
    assert not np.array_equal(default, _pixels(other))
    assert ", Eta: 0," in other.infotext


# --------------------------------------------------------------------------- parity with diffusers


def test_dmd2_preset_matches_diffusers_lcm_with_dmd2_timesteps(engine, tiny_model, tmp_path):
    """DMD2's model card: LCMScheduler, timesteps=[999, 749, 499, 249], guidance_scale=0."""
    import diffusers

    from tests.test_diffusers_parity import _config_folder

    info = tiny_model("sd1")
    config = _config_folder(tmp_path, "sd1")
    seen = []
    req = GenerationRequest(prompt="a small red circle", model=str(info["path"]), preset="dmd2", **SIZE)
    result = engine.generate(req, on_step=lambda e: seen.append(e.latents))
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(info["path"]), config=str(config),
                                                              local_files_only=True, torch_dtype=torch.float32)
    pipe.scheduler = diffusers.LCMScheduler.from_config(scheduler_config(False))
    theirs = pipe(prompt="a small red circle", height=64, width=64, timesteps=[999, 749, 499, 249], guidance_scale=0.0,
                  generator=[torch.Generator("cpu").manual_seed(7)], output_type="latent").images
    assert len(seen) == 4
    diff = (seen[-1] - theirs).abs().max().item()
    assert diff < 1e-4 * max(1.0, theirs.abs().max().item()), f"latents differ by {diff}"
    assert _pixels(result.images[0]).std() > 0


# --------------------------------------------------------------------------- interfaces


def test_native_api_presets_and_unknown_name(api):
    listed = {p["name"]: p for p in api.get("/api/presets").json()}
    assert listed["lightning"]["sampler"] == "Euler" and listed["dmd2"]["schedule"] == "SGM Uniform"
    assert "huggingface.co" in listed["turbo"]["source"]
    r = api.post("/api/jobs", json={"prompt": "a red circle", "width": 64, "height": 64, "preset": "lightnin"})
    assert r.status_code == 422, r.text
    assert "unknown preset 'lightnin'" in r.text and "lightning" in r.text


def test_native_job_takes_preset_for_unset_fields(api):
    from tests.server_util import wait_job

    r = api.post("/api/jobs", json={"prompt": "a red circle", "width": 64, "height": 64, "seed": 3,
                                    "preset": "turbo", "steps": 2})
    assert r.status_code == 202, r.text
    job = wait_job(api, r.json()["job"]["id"])
    assert job["state"] == "done", job
    assert job["steps"] == 2
    info = job["images"][0]["infotext"]
    assert job["request"]["preset"] == "turbo"
    assert "Sampler: Euler a" in info and "Steps: 2" in info and "CFG scale: 1," in info


def test_cli_preset(home, tiny_model, tmp_path):
    from click.testing import CliRunner

    from darkroom.cli import cli

    path = tiny_model("sd1")["path"]
    args = ["--home", str(home.root), "generate", "a red circle", "--model", str(path), "-W", "64", "-H", "64"]
    r = CliRunner().invoke(cli, [*args, "--preset", "lightnin"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "unknown preset 'lightnin'; choose one of:" in r.output
    r = CliRunner().invoke(cli, [*args, "--preset", "lightning", "--steps", "2", "-o", str(tmp_path / "out")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "Preset lightning: Euler, SGM Uniform, 2 steps, CFG 1" in r.output
    png = sorted((tmp_path / "out").glob("*.png"))[0]
    text = Image.open(png).info["parameters"]
    assert "Steps: 2, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 1," in text
    listing = CliRunner().invoke(cli, ["--home", str(home.root), "presets"], catch_exceptions=False)
    assert listing.exit_code == 0 and re.search(r"^dmd2 +LCM +SGM Uniform +4 steps", listing.output, re.M)
