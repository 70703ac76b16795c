"""Control-LoRAs (darkroom/control/control_lora.py): classified and listed as SDXL ControlNets, built on the
checkpoint in use exactly as the full ControlNet they stand for, generating as that ControlNet and as
diffusers' SDXL ControlNet pipeline, cached per base checkpoint, and refused clearly on another family."""

from __future__ import annotations

import shutil

import pytest
import torch
from click.testing import CliRunner

from darkroom.control.control_lora import BaseUNet, base_of
from darkroom.control.files import find_controlnets, resolve
from darkroom.control.load import ControlNetCache, header_kind, load_controlnet, parameter_count
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_control_lora import write_full_controlnet, write_tiny_control_lora
from tests.control_util import generate_with_units, noise_image
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
HINT = noise_image()


def _unit(model: str, **kw) -> ControlUnit:
    return ControlUnit(model=model, image=_png(HINT), module="none", resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("control-lora")
    home = Home(root / "home").ensure()
    sdxl = tiny_model("sdxl")
    base_unet = sdxl["state_dicts"]["unet"]
    path, full = write_tiny_control_lora(home.controlnets, "control-lora-tiny-rank4", base_unet)
    write_full_controlnet(home.controlnets, "full-equivalent", full)
    plain, _ = write_tiny_control_lora(home.controlnets, "no-deltas", base_unet, deltas=False)
    return {"root": root, "home": home, "engine": engine_factory(home), "sdxl": sdxl["path"], "info": sdxl,
            "sd1": tiny_model("sd1")["path"], "path": path, "full": full, "plain": plain}


def _base(setup, family="sdxl") -> BaseUNet:
    return base_of(setup["engine"].cache.get(setup[family]))


def _run(setup, units, family="sdxl", **kw):
    return generate_with_units(setup["engine"], setup[family], units, **{**KW, **kw})


# --- what the file is ---------------------------------------------------------------------------------------


def test_classified_and_listed_as_a_usable_sdxl_control_lora(setup):
    kind = header_kind(setup["path"])
    assert kind.supported and kind.family == "sdxl" and kind.layout == "control-lora"
    listed = {f.name: f for f in find_controlnets(setup["home"])}
    entry = listed["control-lora-tiny-rank4"]
    assert entry.supported and entry.family == "sdxl"
    # admission counts the ControlNet it builds, not the file's low-rank factors
    assert parameter_count(setup["path"]) == sum(p.numel() for p in setup["full"].parameters())
    from darkroom.cli import cli

    out = CliRunner().invoke(cli, ["--home", str(setup["home"].root), "controlnet", "list"]).output
    line = next(row for row in out.splitlines() if "control-lora-tiny-rank4" in row)
    assert "\tsdxl\t" in line and "not usable" not in line


def test_unmarked_or_damaged_files_are_still_refused(tmp_path):
    from darkroom.control.config import classify

    unmarked = classify({"input_blocks.1.0.in_layers.2.up": (4, 2), "input_blocks.1.0.in_layers.2.down": (2, 4)})
    assert not unmarked.supported and "'lora_controlnet' marker" in unmarked.detail
    damaged = classify({"lora_controlnet": (0,), "input_blocks.1.0.in_layers.2.up": (4,)})
    assert not damaged.supported and "Control-LoRA" in damaged.detail


# --- the ControlNet it builds ----------------------------------------------------------------------------------


def test_built_controlnet_equals_the_full_one_tensor_by_tensor(setup):
    cn = load_controlnet(setup["path"], dtype=torch.float32, base=_base(setup))
    built, full = cn.model.state_dict(), setup["full"].state_dict()
    assert set(built) == set(full)
    for name, value in full.items():
        assert torch.equal(built[name], value), name
    assert cn.family == "sdxl" and cn.base_key is not None


def test_ignoring_the_deltas_would_be_caught(setup):
    """The same file without its up/down pairs builds the base UNet's encoder: it differs from the full
    ControlNet in every weight that had a delta, and the image it gives differs."""
    base = _base(setup)
    plain = load_controlnet(setup["plain"], dtype=torch.float32, base=base).model.state_dict()
    full = setup["full"].state_dict()
    unet = base.unet.state_dict()
    differ = [k for k, v in full.items() if v.dim() >= 2 and k in unet and not torch.equal(plain[k], v)]
    assert differ and all(torch.equal(plain[k], unet[k]) for k in differ)
    assert (plain["conv_in.weight"] - full["conv_in.weight"]).abs().max() > 1e-3
    with_deltas, _ = _run(setup, [_unit("control-lora-tiny-rank4")])
    without, _ = _run(setup, [_unit("no-deltas")])
    assert (with_deltas - without).abs().max() > 1e-3


def test_built_in_the_compute_dtype_without_sharing_the_unets_tensors(setup):
    """fp16: each weight is the float32 sum rounded once; no tensor is the UNet's own (a LoRA merged into the
    UNet later must not change a cached ControlNet)."""
    base = _base(setup)
    cn = load_controlnet(setup["path"], dtype=torch.float16, base=base)
    full = setup["full"].state_dict()
    for name, value in cn.model.state_dict().items():
        assert value.dtype == torch.float16 and torch.equal(value, full[name].half()), name
    fp32 = load_controlnet(setup["path"], dtype=torch.float32, base=base).model
    pointers = {p.data_ptr() for p in base.unet.parameters()}
    assert not pointers & {p.data_ptr() for p in fp32.parameters()}


def test_cached_per_base_checkpoint(setup, tmp_path):
    """Built on checkpoint A, a Control-LoRA is not reused for checkpoint B, nor with other LoRAs merged."""
    from darkroom.models.loader import LoadOptions, load_checkpoint
    from darkroom.testing.tiny import build_tiny_checkpoint

    other = build_tiny_checkpoint(tmp_path / "other-sdxl.safetensors", "sdxl", seed=2)["path"]
    model_b = load_checkpoint(other, LoadOptions())
    base_a, base_b = _base(setup), base_of(model_b)
    assert base_a.key != base_b.key
    cache = ControlNetCache()
    on_a = cache.get(setup["path"], dtype=torch.float32, base=base_a)
    on_b = cache.get(setup["path"], dtype=torch.float32, base=base_b)
    assert cache.loads == 2 and on_a is not on_b
    assert not torch.equal(on_a.model.conv_in.weight, on_b.model.conv_in.weight)
    assert cache.get(setup["path"], dtype=torch.float32, base=base_a) is on_a and cache.loads == 2
    # a plain ControlNet does not depend on the base: one entry whatever the checkpoint
    full = resolve(find_controlnets(setup["home"]), "full-equivalent").path
    first = cache.get(full, dtype=torch.float32, base=base_a)
    assert cache.get(full, dtype=torch.float32, base=base_b) is first

    class Use:  # what base_of reads of a merged LoRA (darkroom.engine.lora.LoraUse)
        unet = 0.8

        class lora:  # noqa: N801
            path = setup["path"]

    model_a = setup["engine"].cache.get(setup["sdxl"])
    assert base_of(model_a, [Use()]).key != base_a.key == base_of(model_a, []).key


def test_built_on_the_unet_with_the_prompts_loras_merged(setup):
    """As ComfyUI builds on its patched model: a LoRA in the prompt is part of the base, and the ControlNet
    built with it is kept apart from the one built without."""
    from darkroom.testing.tiny_lora import write_tiny_lora

    write_tiny_lora(setup["home"].loras / "style.safetensors", setup["info"], strength=0.2)
    engine = setup["engine"]
    engine.controlnets.clear()
    _run(setup, [_unit("control-lora-tiny-rank4")], prompt="a red circle <lora:style:1>")
    _run(setup, [_unit("control-lora-tiny-rank4")])
    with_lora, without = [v for v in engine.controlnets._items.values() if v.path == setup["path"]]
    assert with_lora.base_key != without.base_key
    full = setup["full"].state_dict()
    built = without.model.state_dict()
    assert all(torch.equal(built[k], v) for k, v in full.items())
    merged = with_lora.model.state_dict()
    assert any(not torch.equal(merged[k], v) for k, v in full.items() if k.endswith("attn1.to_q.weight"))


def test_misfit_checkpoint_and_missing_base_are_clear_errors(setup):
    from darkroom.testing.tiny import build_tiny_modules

    inpainting = build_tiny_modules("sdxl", seed=1, inpainting=True)["unet"]  # a 9-channel conv_in
    with pytest.raises(InvalidRequest, match="does not fit the checkpoint inpaint") as err:
        load_controlnet(setup["path"], dtype=torch.float32, base=BaseUNet(inpainting, ("x",), "inpaint", "sdxl"))
    assert "conv_in" in str(err.value)
    with pytest.raises(InvalidRequest, match="Control-LoRA"):
        load_controlnet(setup["path"], dtype=torch.float32)


# --- generating -----------------------------------------------------------------------------------------------


def _diffusers_latents(setup, controlnet_folder, **kw):
    import diffusers

    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config
    from darkroom.testing.tiny import save_diffusers_folder

    config = save_diffusers_folder(setup["root"] / "cfg-sdxl", "sdxl", seed=1)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    controlnet = diffusers.ControlNetModel.from_pretrained(str(controlnet_folder), local_files_only=True)
    pipe = diffusers.StableDiffusionXLControlNetPipeline.from_single_file(
        str(setup["sdxl"]), config=str(config), controlnet=controlnet, local_files_only=True,
        torch_dtype=torch.float32)
    spec, schedule = samplers.resolve(kw["sampler"], "Automatic")
    pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=kw["seed"])
    out = pipe(prompt=kw["prompt"], negative_prompt=kw["negative_prompt"] or None, image=HINT, height=kw["height"],
               width=kw["width"], num_inference_steps=kw["steps"], guidance_scale=kw["cfg_scale"],
               controlnet_conditioning_scale=1.0, generator=[torch.Generator("cpu").manual_seed(kw["seed"])],
               output_type="latent").images
    shutil.rmtree(config)
    return out


def test_generates_as_the_full_controlnet_and_as_diffusers(setup):
    ours, result = _run(setup, [_unit("control-lora-tiny-rank4")])
    full, _ = _run(setup, [_unit("full-equivalent")])
    assert torch.equal(ours, full)
    folder = write_full_controlnet(setup["root"], "ref-folder", setup["full"], layout="diffusers")
    theirs = _diffusers_latents(setup, folder, **KW)
    tolerance = 1e-4 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < tolerance
    plain, _ = _run(setup, [])
    assert (ours - plain).abs().max().item() > 100 * tolerance
    assert "control-lora-tiny-rank4 [" in result.images[0].infotext


def test_sd1_checkpoint_gives_the_family_error(setup):
    with pytest.raises(InvalidRequest) as err:
        _run(setup, [_unit("control-lora-tiny-rank4")], family="sd1")
    assert "control-lora-tiny-rank4 is an SDXL ControlNet" in str(err.value) and "is SD1" in str(err.value)


def test_through_the_api_listed_and_refused_on_sd1_without_a_500(api, studio, tiny_model):
    """The studio runs the tiny SD1 checkpoint: the Control-LoRA is listed as SDXL, and a unit using it is a 422
    naming both families, never a traceback."""
    import base64

    write_tiny_control_lora(studio.home.controlnets, "cl-sdxl", tiny_model("sdxl")["state_dicts"]["unet"])
    titles = api.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    title = next(t for t in titles if t.startswith("cl-sdxl ["))
    rows = {m["name"]: m for m in api.get("/api/controlnet").json()["models"]}
    assert rows["cl-sdxl"]["family"] == "sdxl"
    unit = {"image": base64.b64encode(_png(HINT)).decode(), "model": title, "module": "none"}
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2, "width": 64, "height": 64,
                                            "alwayson_scripts": {"ControlNet": {"args": [unit]}}})
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert "cl-sdxl is an SDXL ControlNet" in message and "is SD1" in message and "Traceback" not in r.text
