"""T2I-Adapters as ControlNet units: every layout loads (and converts exactly), is classified and listed; the
output equals diffusers' adapter pipelines; the extension's rules (window, weight, modes, CFG halves, hires);
refusals (CoAdapter fuser, variants diffusers cannot hold) that name the file."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from darkroom.control.adapter import (
    FUSER,
    LoadedAdapter,
    adapter_config,
    adapter_kind,
    diffusers_to_original,
    original_to_diffusers,
)
from darkroom.control.config import classify
from darkroom.control.load import header_kind, load_controlnet
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_adapter import tiny_adapter_state, write_style_adapter, write_tiny_adapter
from darkroom.testing.tiny_controlnet import write_tiny_controlnet
from tests.control_util import generate_with_units
from tests.control_util import noise_image as _noise_image
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")


HINT = _noise_image()
GRAY = HINT.convert("L").convert("RGB")  # R = G = B: a 1-channel adapter's first channel is the gray value


def _unit(model="ad-sd1", **kw) -> ControlUnit:
    kw.setdefault("image", _png(HINT))
    kw.setdefault("module", "none")
    return ControlUnit(model=model, resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("t2i")
    home = Home(root / "home").ensure()
    write_tiny_adapter(home.controlnets, "ad-sd1", "full", "original")
    write_tiny_adapter(home.controlnets, "ad-sd1-b", "full", "original", seed=1)
    write_tiny_adapter(home.controlnets, "ad-light", "light", "original")
    write_tiny_adapter(home.controlnets, "ad-sketch", "full", "original", in_channels=1, seed=2)
    write_tiny_adapter(home.controlnets, "ad-sdxl", "xl", "diffusers-single")
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd1", "single")
    engine = engine_factory(home)
    return {"root": root, "home": home, "engine": engine, "sd1": tiny_model("sd1")["path"],
            "sdxl": tiny_model("sdxl")["path"]}


def _run(setup, family="sd1", units=(), *, latents=False, **kw):
    last, result = generate_with_units(setup["engine"], setup[family], units, **{**KW, **kw})
    return (last, result) if latents else result


def _adapter(setup, name, family="sd1"):
    """The engine's cached adapter (what it runs); the checkpoint is loaded first (loading one empties the cache)."""
    from darkroom.control.files import find_controlnets, resolve

    setup["engine"].cache.get(setup[family])
    path = resolve(find_controlnets(setup["home"]), name).path
    return setup["engine"].controlnets.get(path, dtype=torch.float32, device="cpu").model


class Calls:
    """Records the map shape of each forward of an adapter (a context manager)."""

    def __init__(self, module):
        self.module, self.shapes = module, []

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(lambda m, args: self.shapes.append(tuple(args[0].shape)))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- layouts, classification, conversion ----------------------------------------------------------------------


@pytest.mark.parametrize("kind,family", [("full", "sd1"), ("light", "sd1"), ("xl", "sdxl")])
@pytest.mark.parametrize("layout", ["original", "diffusers-single", "diffusers"])
def test_every_layout_loads_classified_and_converted_exactly(tmp_path, kind, family, layout):
    path = write_tiny_adapter(tmp_path, f"ad-{kind}", kind, layout)
    found = header_kind(path)
    assert found.supported and found.family == family and found.label.endswith("T2I-Adapter")
    loaded = load_controlnet(path, dtype=torch.float32)
    assert isinstance(loaded, LoadedAdapter) and loaded.family == family
    state, reference = loaded.model.state_dict(), tiny_adapter_state(kind)
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # the original keys map exactly


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_pth_and_fp16_variant_folders(tmp_path, dtype):
    """Weights-only .pth (no metadata: the real-width rule, unshuffle 8, names SD1), fp16 or fp32 files, and a
    diffusers folder holding only diffusion_pytorch_model.fp16.safetensors."""
    pth = write_tiny_adapter(tmp_path, "sketch", "full", "original", suffix=".pth", in_channels=1, downscale_factor=8,
                             dtype=dtype)
    assert header_kind(pth) is None  # a pickle: known once loaded
    loaded = load_controlnet(pth, dtype=torch.float32)
    assert (loaded.family, loaded.in_channels, loaded.downscale_factor) == ("sd1", 1, 8)
    reference = tiny_adapter_state("full", in_channels=1, downscale_factor=8, dtype=dtype)
    assert all(torch.equal(loaded.model.state_dict()[k], reference[k].float()) for k in reference)
    folder = write_tiny_adapter(tmp_path, "xl16", "xl", "diffusers", dtype=dtype, variant="fp16")
    assert header_kind(folder).family == "sdxl"
    assert load_controlnet(folder, dtype=torch.float32).family == "sdxl"


def test_original_and_diffusers_keys_round_trip():
    for kind in ("full", "light", "xl"):
        state = tiny_adapter_state(kind)
        config = {"adapter_type": {"light": "light_adapter"}.get(kind, "full_adapter"), "num_res_blocks": 2}
        original = diffusers_to_original(state, config)
        assert not any(k.startswith("adapter.") for k in original)
        assert original_to_diffusers(original).keys() == state.keys()


def _real_full(width: int) -> dict:
    """Shapes of a real full adapter (channels 320-1280, 2 blocks per level, 1x1 block2) with conv_in `width`."""
    shapes = {"conv_in.weight": (320, width, 3, 3), "conv_in.bias": (320,)}
    for k, c in enumerate([320, 320, 640, 640, 1280, 1280, 1280, 1280]):
        shapes |= {f"body.{k}.block1.weight": (c, c, 3, 3), f"body.{k}.block2.weight": (c, c, 1, 1)}
    shapes |= {"body.2.in_conv.weight": (640, 320, 1, 1), "body.4.in_conv.weight": (1280, 640, 1, 1)}
    return shapes


@pytest.mark.parametrize("width,family,channels,factor,kind", [
    (192, "sd1", 3, 8, "full_adapter"), (64, "sd1", 1, 8, "full_adapter"),  # depth/openpose/...; sketch/canny
    (768, "sdxl", 3, 16, "full_adapter_xl"), (256, "sdxl", 1, 16, "full_adapter_xl"),
])
def test_real_widths_name_the_family_without_metadata(width, family, channels, factor, kind):
    shapes = _real_full(width)
    assert classify(shapes).family == classify(original_to_diffusers(shapes)).family == family  # either keys
    config, found = adapter_config(original_to_diffusers(shapes))
    assert (found, config["in_channels"], config["downscale_factor"], config["adapter_type"]) == (
        family, channels, factor, kind)
    assert config["channels"] == [320, 640, 1280, 1280] and config["num_res_blocks"] == 2


def test_real_light_adapter_is_sd1():
    shapes = {}
    for i, (cin, c) in enumerate([(192, 320), (320, 640), (640, 1280), (1280, 1280)]):
        shapes |= {f"body.{i}.in_conv.weight": (c // 4, cin, 1, 1), f"body.{i}.out_conv.weight": (c, c // 4, 1, 1)}
        shapes |= {f"body.{i}.body.{j}.block1.weight": (c // 4, c // 4, 3, 3) for j in range(4)}
    config, family = adapter_config(original_to_diffusers(shapes))
    assert family == "sd1" and config["channels"] == [320, 640, 1280] and config["num_res_blocks"] == 4
    assert classify(shapes).label == "SD1 T2I-Adapter"


@pytest.mark.parametrize("change,needle", [
    ({"body.0.skep.weight": (320, 320, 1, 1)}, "skip convolutions"),
    ({"body.2.down_opt.op.weight": (320, 320, 3, 3)}, "strided convolutions"),
    ({"body.0.block2.weight": (320, 320, 3, 3)}, "ksize 3"),
    ({"conv_in.weight": (320, 100, 3, 3)}, "input width 100"),
])
def test_variants_diffusers_cannot_hold_are_refused_with_the_reason(change, needle):
    kind = classify({**_real_full(192), **change})
    assert not kind.supported and "T2I-Adapter" in kind.detail and needle in kind.detail


def test_an_upscaler_body_is_not_an_adapter():
    """ESRGAN's `body.N.rdb...` blocks share the name `body` only."""
    assert classify({"conv_first.weight": (64, 3, 3, 3), "body.0.rdb1.conv1.weight": (32, 64, 3, 3)}).detail == (
        "not a ControlNet")


def test_fuser_and_a_style_model_of_no_family_are_refused_naming_the_file(setup, tmp_path):
    """Style models run (test_controlnet_vision_prompt.py); one whose text width names no family cannot."""
    from darkroom.control.files import find_controlnets, resolve

    assert adapter_kind({"task_embedding": (16, 768), "spatial_feat_mapping.0.1.weight": (768, 320)}).detail == FUSER
    folder = setup["home"].controlnets / "style"
    write_style_adapter(folder, "t2iadapter_style_sd14v1", ".pth")
    write_style_adapter(folder, "coadapter-style-sd15v1", ".safetensors")
    try:
        files = find_controlnets(setup["home"])
        listed = {f.name: f for f in files}
        assert not listed["coadapter-style-sd15v1"].supported  # a header says it at once
        with pytest.raises(InvalidRequest, match="coadapter-style-sd15v1 is a T2I-Adapter style model"):
            resolve(files, "coadapter-style-sd15v1")
        with pytest.raises(InvalidRequest) as err:  # a pickle: known once loaded, refused before sampling
            _run(setup, units=[_unit("t2iadapter_style_sd14v1")])
        assert "t2iadapter_style_sd14v1.pth is a T2I-Adapter style model for a 32-wide text context" in str(err.value)
    finally:
        shutil.rmtree(folder)


# --- listing ------------------------------------------------------------------------------------------------


def test_listed_by_the_cli(setup):
    from darkroom.cli import cli

    out = CliRunner().invoke(cli, ["--home", str(setup["home"].root), "controlnet", "list"])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.output.splitlines() if line.startswith("  ad-")}
    assert "\tsd1\t" in lines["ad-sd1"] and "\tsdxl\t" in lines["ad-sdxl"] and "\tsd1\t" in lines["ad-light"]


def test_listed_and_run_by_the_apis(api, studio):
    import base64

    write_tiny_adapter(studio.home.controlnets, "ad-tiny", "full", "original")
    write_tiny_adapter(studio.home.controlnets, "ad-folder", "full", "diffusers", seed=3)
    titles = api.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    assert any(t.startswith("ad-tiny [") for t in titles) and any(t.startswith("ad-folder [") for t in titles)
    rows = {m["name"]: m for m in api.get("/api/controlnet").json()["models"]}
    assert rows["ad-tiny"]["family"] == rows["ad-folder"]["family"] == "sd1"
    write_tiny_adapter(studio.home.controlnets, "t2iadapter_canny_tiny", "full", "original", seed=4)
    types = api.get("/controlnet/control_types").json()["control_types"]
    assert [t.split(" [")[0] for t in types["T2I-Adapter"]["model_list"]] == ["None", "t2iadapter_canny_tiny"]
    body = {"prompt": "p", "seed": 3, "steps": 2, "width": 64, "height": 64}
    plain = api.post("/sdapi/v1/txt2img", json=body)
    unit = {"model": "ad-tiny", "module": "none", "image": base64.b64encode(_png(HINT)).decode()}
    steered = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert plain.status_code == steered.status_code == 200, steered.text
    assert plain.json()["images"] != steered.json()["images"]


# --- parity with diffusers -------------------------------------------------------------------------------------


def _diffusers_latents(setup, family, kind, weight, *, in_channels=3, adapter_seed=0, **kw):
    import diffusers

    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config
    from darkroom.testing.tiny import save_diffusers_folder

    config = save_diffusers_folder(setup["root"] / f"cfg-{family}", family, seed=1)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    folder = write_tiny_adapter(setup["root"], f"ref-{kind}", kind, "diffusers", in_channels=in_channels,
                                seed=adapter_seed)
    adapter = diffusers.T2IAdapter.from_pretrained(str(folder), local_files_only=True)
    cls = (diffusers.StableDiffusionXLAdapterPipeline if family == "sdxl"
           else diffusers.StableDiffusionAdapterPipeline)
    pipe = cls.from_single_file(str(setup[family]), config=str(config), adapter=adapter, local_files_only=True,
                                torch_dtype=torch.float32)
    spec, schedule = samplers.resolve(kw["sampler"], "Automatic")
    pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=kw["seed"])
    image = HINT if in_channels == 3 else HINT.convert("L")
    out = pipe(prompt=kw["prompt"], negative_prompt=kw["negative_prompt"] or None, image=image, height=kw["height"],
               width=kw["width"], num_inference_steps=kw["steps"], guidance_scale=kw["cfg_scale"],
               adapter_conditioning_scale=weight, generator=[torch.Generator("cpu").manual_seed(kw["seed"])],
               output_type="latent").images
    shutil.rmtree(config)
    shutil.rmtree(folder)
    return out


@pytest.mark.parametrize("family,model,kind,channels,seed", [
    ("sd1", "ad-sd1", "full", 3, 0),  # original layout
    ("sd1", "ad-light", "light", 3, 0),  # the color adapter's layout
    ("sd1", "ad-sketch", "full", 1, 2),  # 1-channel (sketch, canny)
    ("sdxl", "ad-sdxl", "xl", 3, 0),  # diffusers keys, FullAdapterXL
])
def test_matches_diffusers_adapter_pipeline(setup, family, model, kind, channels, seed):
    """Same checkpoint, adapter weights, seed and scheduler as diffusers' adapter pipelines: the final latents
    agree; at another adapter weight, or without the adapter, they do not (so the comparison can fail)."""
    kw = {**KW, "negative_prompt": "" if family == "sdxl" else "ugly"}
    image = _png(HINT if channels == 3 else GRAY)
    ours, _ = _run(setup, family, [_unit(model, image=image)], latents=True, **kw)
    theirs = _diffusers_latents(setup, family, kind, 1.0, in_channels=channels, adapter_seed=seed, **kw)
    tolerance = 1e-4 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < tolerance
    other = _diffusers_latents(setup, family, kind, 0.6, in_channels=channels, adapter_seed=seed, **kw)
    assert (ours - other).abs().max().item() > 100 * tolerance
    plain, _ = _run(setup, family, [], latents=True, **kw)
    assert (ours - plain).abs().max().item() > 100 * tolerance


# --- the extension's rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,sampler", [("CPU", "Euler a"), ("GPU", "Euler")])
def test_window_and_features_once_per_pass(setup, source, sampler):
    """Both sampling paths (diffusers' schedulers, our k-diffusion loop): the map goes through the adapter once
    per generation, whatever the steps; a window covering no step is no control at all."""
    kw = dict(randn_source=source, sampler=sampler, steps=4)
    plain, _ = _run(setup, latents=True, **kw)
    with Calls(_adapter(setup, "ad-sd1")) as calls:
        never, _ = _run(setup, units=[_unit(guidance_start=1.0, guidance_end=1.0)], latents=True, **kw)
        assert calls.shapes == []
        late, _ = _run(setup, units=[_unit(guidance_start=0.5, guidance_end=1.0)], latents=True, **kw)
        whole, _ = _run(setup, units=[_unit()], latents=True, **kw)
    assert calls.shapes == [(1, 3, 64, 64)] * 2
    assert torch.equal(plain, never)
    assert (whole - plain).abs().max() > 1e-2 and (whole - late).abs().max() > 1e-2 and (late - plain).abs().max() > 0


def _residuals(setup, units, *, n=1, uncond=True, hires=False, step=0):
    from darkroom.control.apply import Control, ControlUnitRun
    from darkroom.control.prepare import to_hint

    hint = to_hint(np.asarray(HINT, dtype=np.float32) / 255)
    runs = [ControlUnitRun(load_controlnet(setup["home"].controlnets / f"{name}.safetensors", dtype=torch.float32),
                           hint, **kw) for name, kw in units]
    rows = 2 * n if uncond else n
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 4, 32, 32, generator=g)
    context = torch.randn(rows, 5, 32, generator=g)
    return Control(runs, hires=hires).residuals(x, torch.tensor(500), context, None, n=n, uncond=uncond, step=step,
                                                total=4)


def test_units_sum_with_each_other_and_with_controlnets(setup):
    key = "down_intrablock_additional_residuals"
    a = _residuals(setup, [("ad-sd1", {})])[key]
    b = _residuals(setup, [("ad-sd1-b", {"weight": 0.5})])[key]
    both = _residuals(setup, [("ad-sd1", {}), ("ad-sd1-b", {"weight": 0.5})])[key]
    assert len(both) == 2 and all(torch.allclose(s, p + q, atol=1e-6) for s, p, q in zip(both, a, b, strict=True))
    mixed = _residuals(setup, [("ad-sd1", {}), ("cn-sd1", {})])
    assert set(mixed) == {key, "down_block_additional_residuals", "mid_block_additional_residual"}
    assert all(torch.equal(m, p) for m, p in zip(mixed[key], a, strict=True))
    whole, _ = _run(setup, units=[_unit()], latents=True)
    halves, _ = _run(setup, units=[_unit(weight=0.5), _unit(weight=0.5)], latents=True)
    assert torch.allclose(whole, halves, atol=1e-4)
    with_cn, _ = _run(setup, units=[_unit(), _unit("cn-sd1")], latents=True)
    cn_only, _ = _run(setup, units=[_unit("cn-sd1")], latents=True)
    assert (with_cn - whole).abs().max() > 1e-2 and (with_cn - cn_only).abs().max() > 1e-2


def test_modes_scale_and_place_features_per_cfg_half(setup):
    """Balanced: features x weight on every row; "My prompt is more important" (and canny in the hires pass):
    the extension's adapter factors 0.25, 0.62, ...; "ControlNet is more important": prompt rows only."""
    key = "down_intrablock_additional_residuals"
    plain = _residuals(setup, [("ad-sd1", {"weight": 1.0})], n=2)[key]
    assert all(torch.equal(r[0], r[3]) for r in plain)  # negative and prompt rows alike
    prompt = _residuals(setup, [("ad-sd1", {"weight": 0.8, "mode": "My prompt is more important"})], n=2)[key]
    for r, p, s in zip(prompt, plain, (0.25, 0.62), strict=True):
        assert torch.allclose(r, p * 0.8 * s, atol=1e-6)
    control = _residuals(setup, [("ad-sd1", {"mode": "ControlNet is more important"})], n=2)[key]
    for r, p, s in zip(control, plain, (0.25, 0.62), strict=True):
        assert torch.count_nonzero(r[:2]) == 0 and torch.allclose(r[2:], p[2:] * s, atol=1e-6)
    canny = _residuals(setup, [("ad-sd1", {"module": "canny"})], hires=True)[key]
    assert torch.allclose(canny[0], plain[0][:2] * 0.25, atol=1e-6)
    no_cfg = _residuals(setup, [("ad-sd1", {"mode": "ControlNet is more important"})], uncond=False)[key]
    assert all(torch.count_nonzero(r) == r.numel() for r in no_cfg)


def test_batch_equals_single_runs(setup):
    def pixels(result, i=0):
        return np.asarray(Image.open(io.BytesIO(result.images[i].png)).convert("RGB")).astype(np.int16)

    batch = _run(setup, units=[_unit()], batch_size=2)
    for i in range(2):
        single = _run(setup, units=[_unit()], seed=KW["seed"] + i)
        assert np.abs(pixels(batch, i) - pixels(single)).max() <= 1


def test_hires_features_at_each_pass_size(setup):
    kw = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, steps=2)
    with Calls(_adapter(setup, "ad-light")) as calls:
        result = _run(setup, units=[_unit("ad-light")], **kw)
    assert calls.shapes == [(1, 3, 64, 64), (1, 3, 96, 96)]
    assert Image.open(io.BytesIO(result.images[0].png)).size == (96, 96)


def test_wrong_family_is_a_clear_error(setup):
    with pytest.raises(InvalidRequest) as err:
        _run(setup, "sd1", [_unit("ad-sdxl")])
    assert "ad-sdxl is an SDXL T2I-Adapter" in str(err.value) and "pick an SD1 T2I-Adapter" in str(err.value)


def test_sides_not_a_multiple_of_the_unshuffle_factor_are_padded(tmp_path):
    loaded = load_controlnet(write_tiny_adapter(tmp_path, "xl", "xl", "original"), dtype=torch.float32)
    features = loaded.features(torch.rand(1, 3, 72, 88), torch.device("cpu"))  # unshuffle 4: 18 x 22
    assert [tuple(f.shape[-2:]) for f in features] == [(18, 22), (18, 22), (9, 11), (9, 11)]
    features = loaded.features(torch.rand(1, 3, 40, 56), torch.device("cpu"))  # 10 x 14 -> 5 x 7 (ceil)
    assert [tuple(f.shape[-2:]) for f in features][-1] == (5, 7)
    odd = loaded.features(torch.rand(1, 3, 66, 66), torch.device("cpu"))  # padded to 68: ceil(66 / 4) = 17
    assert tuple(odd[0].shape[-2:]) == (17, 17)


def test_inpainting_checkpoint_and_img2img_with_an_adapter(setup, tiny_model):
    """A 9-channel inpainting UNet takes the features as any UNet does; img2img without a unit image uses the
    init image as the map (the extension's fallback)."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    init = _png(_noise_image(64, seed=9))
    kw = dict(init_image=init, mask=_png(mask), denoising_strength=1.0)
    setup = {**setup, "inpaint": tiny_model("sd1-inpainting")["path"]}
    steered, _ = _run(setup, "inpaint", [_unit()], latents=True, **kw)
    plain, _ = _run(setup, "inpaint", [], latents=True, **kw)
    assert (steered - plain).abs().max() > 1e-2
    implicit, _ = _run(setup, units=[_unit(image=None)], latents=True, init_image=init, denoising_strength=0.7)
    explicit, _ = _run(setup, units=[_unit(image=init)], latents=True, init_image=init, denoising_strength=0.7)
    assert torch.equal(implicit, explicit)
