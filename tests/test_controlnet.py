"""ControlNet during sampling: parity with diffusers' ControlNet pipelines, the extension's rules, the
infotext and the maps stored in the PNG, and every generation mode with a unit."""

from __future__ import annotations

import io
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.metadata.control_maps import control_units_from_infotext, read_control_maps
from darkroom.metadata.infotext import parse_infotext
from darkroom.request import GenerationRequest
from darkroom.testing.tiny_controlnet import write_tiny_controlnet
from tests.control_util import generate_with_units
from tests.control_util import noise_image as _noise_image
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")


HINT = _noise_image()


def _unit(model="cn-sd1", **kw) -> ControlUnit:
    kw.setdefault("image", _png(HINT))
    kw.setdefault("module", "none")
    return ControlUnit(model=model, resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("cn")
    home = Home(root / "home").ensure()
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd1", "single")
    write_tiny_controlnet(home.controlnets, "cn-sd1-b", "sd1", "single", seed=1)
    write_tiny_controlnet(home.controlnets, "cn-sdxl", "sdxl", "diffusers-single")
    engine = engine_factory(home)
    return {"root": root, "home": home, "engine": engine, "sd1": tiny_model("sd1")["path"],
            "sdxl": tiny_model("sdxl")["path"]}


def _run(setup, family="sd1", units=(), *, latents=False, **kw):
    last, result = generate_with_units(setup["engine"], setup[family], units, **{**KW, **kw})
    return (last, result) if latents else result


def _pixels(result, i=0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.images[i].png)).convert("RGB")).astype(np.int16)


def _controlnet(setup, name, family="sd1"):
    """The engine's cached ControlNet (what it runs), to watch its calls. The checkpoint of `family` is loaded
    first: loading another model empties the ControlNet cache (ModelCache.unload)."""
    from darkroom.control.files import find_controlnets, resolve

    setup["engine"].cache.get(setup[family])
    path = resolve(find_controlnets(setup["home"]), name).path
    return setup["engine"].controlnets.get(path, dtype=torch.float32, device="cpu").model


class Calls:
    """Counts a module's forward calls and records its hint's shape (a context manager)."""

    def __init__(self, module):
        self.module, self.shapes = module, []

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(
            lambda m, args, kwargs: self.shapes.append(tuple(kwargs["controlnet_cond"].shape)), with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def count(self):
        return len(self.shapes)


# --- parity with diffusers -------------------------------------------------------------------------------------


def _diffusers_latents(setup, family, weight, **kw):
    import diffusers

    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config
    from darkroom.testing.tiny import save_diffusers_folder

    config = save_diffusers_folder(setup["root"] / f"cfg-{family}", family, seed=1)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    folder = write_tiny_controlnet(setup["root"], f"ref-{family}", family, "diffusers")
    controlnet = diffusers.ControlNetModel.from_pretrained(str(folder), local_files_only=True)
    cls = (diffusers.StableDiffusionXLControlNetPipeline if family == "sdxl"
           else diffusers.StableDiffusionControlNetPipeline)
    pipe = cls.from_single_file(str(setup[family]), config=str(config), controlnet=controlnet,
                                local_files_only=True, torch_dtype=torch.float32)
    spec, schedule = samplers.resolve(kw["sampler"], "Automatic")
    pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=kw["seed"])
    out = pipe(prompt=kw["prompt"], negative_prompt=kw["negative_prompt"] or None, image=HINT, height=kw["height"],
               width=kw["width"], num_inference_steps=kw["steps"], guidance_scale=kw["cfg_scale"],
               controlnet_conditioning_scale=weight, generator=[torch.Generator("cpu").manual_seed(kw["seed"])],
               output_type="latent").images
    shutil.rmtree(config)
    shutil.rmtree(folder)
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_matches_diffusers_controlnet_pipeline(setup, family):
    """Same checkpoint, ControlNet weights (ours from the original single-file layout or diffusers keys),
    seed and scheduler as diffusers' ControlNet pipeline: the final latents agree; at another weight they
    do not (so the comparison can fail)."""
    kw = {**KW, "negative_prompt": "" if family == "sdxl" else "ugly"}
    model = f"cn-{family}"
    ours, _ = _run(setup, family, [_unit(model)], latents=True, **kw)
    theirs = _diffusers_latents(setup, family, 1.0, **kw)
    tolerance = 1e-4 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < tolerance
    half = _diffusers_latents(setup, family, 0.5, **kw)
    assert (ours - half).abs().max().item() > 100 * tolerance
    plain, _ = _run(setup, family, [], latents=True, **kw)
    assert (ours - plain).abs().max().item() > 100 * tolerance


# --- the extension's rules ---------------------------------------------------------------------------------------


def test_batch_equals_single_runs_with_control(setup):
    batch = _run(setup, units=[_unit()], batch_size=2)
    for i in range(2):
        single = _run(setup, units=[_unit()], seed=KW["seed"] + i)
        assert np.abs(_pixels(batch, i) - _pixels(single)).max() <= 1


def test_units_sum(setup):
    """Two units' residuals add: two halves of one unit equal the whole; two different models differ from each."""
    whole, _ = _run(setup, units=[_unit(weight=1.0)], latents=True)
    halves, _ = _run(setup, units=[_unit(weight=0.5), _unit(weight=0.5)], latents=True)
    assert torch.allclose(whole, halves, atol=1e-4)
    both, _ = _run(setup, units=[_unit(), _unit("cn-sd1-b")], latents=True)
    other, _ = _run(setup, units=[_unit("cn-sd1-b")], latents=True)
    assert (both - whole).abs().max() > 1e-2 and (both - other).abs().max() > 1e-2


def test_disabled_and_zero_weight_units_do_nothing(setup):
    plain, _ = _run(setup, latents=True)
    off, _ = _run(setup, units=[_unit(enabled=False), _unit(weight=0.0), _unit(model="None")], latents=True)
    assert torch.equal(plain, off)


@pytest.mark.parametrize("source,sampler", [("CPU", "Euler a"), ("GPU", "Euler")])
def test_guidance_window(setup, source, sampler):
    """Step i of T is steered when start <= i / T <= end; a window that covers no step is no control at all.
    Both sampling paths (diffusers' schedulers, our k-diffusion loop) follow it."""
    kw = dict(randn_source=source, sampler=sampler, steps=4)
    plain, _ = _run(setup, latents=True, **kw)
    with Calls(_controlnet(setup, "cn-sd1")) as calls:
        never, _ = _run(setup, units=[_unit(guidance_start=1.0, guidance_end=1.0)], latents=True, **kw)
        assert calls.count == 0
        _run(setup, units=[_unit(guidance_start=0.0, guidance_end=0.5)], **kw)
        assert calls.count == 3  # steps 0, 1, 2 (0.5 included); the CFG halves share one call
        _run(setup, units=[_unit(guidance_start=0.5, guidance_end=1.0)], **kw)
        assert calls.count == 3 + 2
    assert torch.equal(plain, never)
    steered, _ = _run(setup, units=[_unit()], latents=True, **kw)
    assert (steered - plain).abs().max() > 1e-2


def test_control_modes_differ_from_balanced(setup):
    results = {mode: _run(setup, units=[_unit(control_mode=mode)], latents=True)[0]
               for mode in ("Balanced", "My prompt is more important", "ControlNet is more important")}
    values = list(results.values())
    for i in range(3):
        for j in range(i + 1, 3):
            assert (values[i] - values[j]).abs().max() > 1e-3


def _loaded(setup, name):
    from darkroom.control.files import find_controlnets, resolve
    from darkroom.control.load import load_controlnet

    return load_controlnet(resolve(find_controlnets(setup["home"]), name).path, dtype=torch.float32)


def _residuals(setup, name, *, uncond=True, n=1, hires=False, cn=None, **unit_kw):
    """The residuals a Control gives for a CFG batch whose negative and prompt rows are identical."""
    from darkroom.control.apply import Control, ControlUnitRun

    cn = cn or _loaded(setup, name)
    g = torch.Generator().manual_seed(5)
    rows = 2 * n if uncond else n
    x = torch.randn(1, 4, 16, 16, generator=g).expand(rows, -1, -1, -1)
    context = torch.randn(1, 5, cn.model.config.cross_attention_dim, generator=g).expand(rows, -1, -1)
    added = None
    if cn.family == "sdxl":
        dim = cn.model.config.projection_class_embeddings_input_dim - 6 * cn.model.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, dim, generator=g).expand(rows, -1),
                 "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(rows, -1)}
    hint = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    control = Control([ControlUnitRun(cn, hint, **unit_kw)], hires=hires)
    with torch.no_grad():
        out = control.residuals(x, torch.tensor(400.0), context, added, n=n, uncond=uncond, step=0, total=1)
    return [*out["down_block_additional_residuals"], out["mid_block_additional_residual"]]


@pytest.mark.parametrize("name,top", [("cn-sd1", None), ("cn-sdxl", 12)])
def test_mode_rules_per_block_and_per_half(setup, name, top):
    """Balanced: weight everywhere, both halves. "My prompt is more important": residual k of n x 0.825^(top-k)
    (top = n - 1 for SD1/SD2: the middle block keeps the full weight; SDXL keeps the first n of the 13 SD1
    factors, as the extension does). "ControlNet is more important": the same, on the prompt half only."""
    balanced = _residuals(setup, name, weight=0.8)
    soft = _residuals(setup, name, weight=0.8, mode="My prompt is more important")
    control = _residuals(setup, name, weight=0.8, mode="ControlNet is more important")
    count = len(balanced)
    top = count - 1 if top is None else top
    for k, (b, s, c) in enumerate(zip(balanced, soft, control, strict=True)):
        assert torch.equal(b[0], b[1])  # the negative row gets the same control
        assert torch.allclose(s, b * 0.825 ** (top - k), atol=1e-6)
        assert torch.count_nonzero(c[0]) == 0  # none for the negative prompt
        assert torch.allclose(c[1], s[1], atol=1e-5, rtol=1e-4)  # a batch of 1, not 2: float noise
    plain = _residuals(setup, name, weight=1.0)
    assert all(torch.allclose(b, p * 0.8, atol=1e-6) for b, p in zip(balanced, plain, strict=True))


def test_canny_and_mlsd_get_soft_injection_in_the_hires_pass(setup):
    """The extension's rule against hires artifacts: in the second pass these units use soft injection."""
    balanced = _residuals(setup, "cn-sd1", module="canny")
    hires = _residuals(setup, "cn-sd1", module="canny", hires=True)
    other = _residuals(setup, "cn-sd1", module="depth", hires=True)
    n = len(balanced)
    for k in range(n):
        assert torch.allclose(hires[k], balanced[k] * 0.825 ** (n - 1 - k), atol=1e-6)
        assert torch.equal(other[k], balanced[k])


def test_shuffle_models_pool_globally_on_the_prompt_half(setup, tmp_path):
    """A ControlNet whose .yaml asks for global average pooling (the shuffle model): residuals averaged over
    the image and given to the prompt half only."""
    from darkroom.control.load import load_controlnet

    path = write_tiny_controlnet(tmp_path, "control_v11e_sd15_shuffle", "sd1", "single")
    path.with_suffix(".yaml").write_text("model:\n  params:\n    control_stage_config:\n      params:\n"
                                         "        global_average_pooling: True\n")
    cn = load_controlnet(path, dtype=torch.float32)
    assert cn.global_pooling
    pooled = _residuals(setup, "", cn=cn)
    for r in pooled:
        assert r.shape[-2:] == (1, 1) and torch.count_nonzero(r[0]) == 0 and torch.count_nonzero(r[1]) > 0


def test_guess_mode_is_diffusers(setup):
    """guess_mode: the prompt half only, residual k scaled by logspace(-1, 0, n)[k] x weight."""
    plain = _residuals(setup, "cn-sd1", weight=1.0)
    guess = _residuals(setup, "cn-sd1", weight=0.5, guess_mode=True)
    scales = torch.logspace(-1, 0, len(plain))
    for k, (p, g) in enumerate(zip(plain, guess, strict=True)):
        assert torch.count_nonzero(g[0]) == 0
        assert torch.allclose(g[1], p[1] * scales[k] * 0.5, atol=1e-5, rtol=1e-4)


def test_without_cfg_every_row_is_steered(setup):
    """At CFG 1 there is no negative half: "ControlNet is more important" steers every row."""
    rows = _residuals(setup, "cn-sd1", uncond=False, n=2, mode="ControlNet is more important")
    assert all(torch.count_nonzero(r) == r.numel() for r in rows)
    assert torch.isfinite(_run(setup, units=[_unit(control_mode="ControlNet is more important")], cfg_scale=1.0,
                               latents=True)[0]).all()


# --- errors ---------------------------------------------------------------------------------------------------------


def test_wrong_family_is_a_clear_error(setup):
    with pytest.raises(InvalidRequest) as err:
        _run(setup, "sd1", [_unit("cn-sdxl")])
    assert "cn-sdxl is an SDXL ControlNet" in str(err.value) and "is SD1" in str(err.value)


def test_unknown_model_is_refused_before_loading(setup):
    with pytest.raises(InvalidRequest) as err:
        _run(setup, units=[_unit("control_v11p_sd15_canny")])
    assert "control_v11p_sd15_canny" in str(err.value) and "cn-sd1 [" in str(err.value)


def test_txt2img_unit_needs_an_image(setup):
    with pytest.raises(InvalidRequest, match="unit 0 has no image"):
        _run(setup, units=[_unit(image=None)])


def test_unreadable_unit_image_is_a_clear_error(setup):
    with pytest.raises(InvalidRequest, match="ControlNet unit 0 image"):
        _run(setup, units=[_unit(image=b"not an image")])


# --- infotext and the stored maps ----------------------------------------------------------------------------


def test_infotext_line_and_parse_back(setup):
    unit = _unit(weight=0.75, guidance_start=0.1, guidance_end=0.9, control_mode="My prompt is more important")
    result = _run(setup, units=[_unit(enabled=False), unit])
    infotext = result.images[0].infotext
    from darkroom.control.files import find_controlnets, resolve

    title = resolve(find_controlnets(setup["home"]), "cn-sd1").title
    assert (f'ControlNet 1: "Module: none, Model: {title}, Weight: 0.75, Resize Mode: Just Resize, Processor Res:'
            f' 512, Threshold A: -1, Threshold B: -1, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False,'
            ' Control Mode: My prompt is more important"') in infotext
    assert "ControlNet 0" not in infotext  # the disabled unit is not written
    [parsed] = control_units_from_infotext(parse_infotext(infotext))
    assert parsed == {"unit": 1, "enabled": True, "module": "none", "model": title, "weight": 0.75,
                      "resize_mode": "Just Resize", "processor_res": 512, "threshold_a": -1, "threshold_b": -1,
                      "guidance_start": 0.1, "guidance_end": 0.9, "pixel_perfect": False,
                      "control_mode": "My prompt is more important"}
    fields = {k: v for k, v in parsed.items() if k != "unit"}
    assert ControlUnit(**fields).model_dump(exclude={"image", "mask"}) == unit.model_copy(
        update={"model": title}).model_dump(exclude={"image", "mask"})


def test_stored_map_reruns_the_exact_image(setup):
    """The PNG holds the prepared map: a rerun with it as the unit image gives the same pixels."""
    small = _noise_image(40, seed=3)  # not the generation size: the stored map is the fitted one
    first = _run(setup, units=[_unit(image=_png(small))])
    maps = read_control_maps(first.images[0].png)
    assert list(maps) == [0] and maps[0].shape == (64, 64, 3)
    rerun = _run(setup, units=[_unit(image=_png(Image.fromarray(np.round(maps[0] * 255).astype(np.uint8))))])
    assert np.array_equal(_pixels(first), _pixels(rerun))
    assert read_control_maps(_run(setup).images[0].png) == {}


def test_map_chunks_round_trip_masks_and_large_maps():
    from darkroom.metadata import control_maps as cm
    from darkroom.metadata.images import encode_png

    rng = np.random.default_rng(1)
    inpaint = cm.quantize_map(rng.random((48, 40, 3)).astype(np.float32))
    inpaint[10:20, 5:15] = -1.0
    big = cm.quantize_map(rng.random((720, 720, 3)).astype(np.float32))  # ~1.5 MB of PNG: several chunks
    chunks = cm.map_chunks({0: inpaint, 2: big})
    assert any(k.startswith("darkroom-controlnet-2-p") for k in chunks)
    assert all(len(v) <= cm.PART_CHARS for v in chunks.values())
    png = encode_png(Image.new("RGB", (8, 8)), "x\nSteps: 1", chunks)
    maps = read_control_maps(png)
    assert np.array_equal(maps[0], inpaint) and np.array_equal(maps[2], big)
    with pytest.raises(InvalidRequest, match="damaged"):
        cm.control_maps_from_chunks({"darkroom-controlnet-0": "@@not base64@@"})
    parts = {k: v for k, v in chunks.items() if k != "darkroom-controlnet-2-p1"}
    assert list(cm.control_maps_from_chunks(parts)) == [0]  # an incomplete map is left out


def test_infotext_parse_ignores_other_keys():
    params = {"Steps": "20", "ControlNet 0": "Module: canny, Model: a [12345678], Weight: 1.0",
              "ControlNet 2": "Module: depth, Model: b, Guidance End: 0.5, Hr Option: Low res only"}
    units = control_units_from_infotext(params)
    assert [u["unit"] for u in units] == [0, 2]
    assert units[0]["model"] == "a [12345678]" and units[1]["hr_option"] == "Low res only"


# --- every generation mode -----------------------------------------------------------------------------------------


def test_hires_second_pass_uses_the_map_at_its_size(setup):
    kw = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6, steps=2)
    cn = _controlnet(setup, "cn-sd1")
    with Calls(cn) as both:
        result = _run(setup, units=[_unit()], **kw)
    assert set(both.shapes) == {(2, 3, 64, 64), (2, 3, 96, 96)}
    assert Image.open(io.BytesIO(result.images[0].png)).size == (96, 96)
    with Calls(cn) as low:
        low_only = _run(setup, units=[_unit(hr_option="Low res only")], **kw)
    assert set(low.shapes) == {(2, 3, 64, 64)}
    with Calls(cn) as high:
        _run(setup, units=[_unit(hr_option="High res only")], **kw)
    assert set(high.shapes) == {(2, 3, 96, 96)}
    assert np.abs(_pixels(result) - _pixels(low_only)).max() > 0


def test_img2img_unit_without_image_uses_the_init_image(setup):
    init = _noise_image(64, seed=9)
    kw = dict(init_image=_png(init), denoising_strength=0.7)
    implicit = _run(setup, units=[_unit(image=None)], **kw)
    explicit = _run(setup, units=[_unit(image=_png(init))], **kw)
    plain = _run(setup, **kw)
    assert np.array_equal(_pixels(implicit), _pixels(explicit))
    assert np.abs(_pixels(implicit) - _pixels(plain)).max() > 0


def test_inpainting_checkpoint_with_a_unit(setup, tiny_model):
    """A 9-channel inpainting UNet: the ControlNet sees the 4 latent channels only."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    kw = dict(init_image=_png(_noise_image(64, seed=9)), mask=_png(mask), denoising_strength=1.0)
    setup = {**setup, "inpaint": tiny_model("sd1-inpainting")["path"]}
    with Calls(_controlnet(setup, "cn-sd1", "inpaint")) as calls:
        steered = _run(setup, "inpaint", [_unit()], **kw)
    assert calls.count == KW["steps"]
    plain = _run(setup, "inpaint", [], **kw)
    assert np.abs(_pixels(steered) - _pixels(plain)).max() > 0


def test_interrupt_inside_a_controlnet(setup):
    """Cancel set while a ControlNet runs stops the generation before the UNet's next block."""
    cancel = threading.Event()
    cn = _controlnet(setup, "cn-sd1")
    unet_calls = []
    unet = setup["engine"].cache.get(setup["sd1"]).unet
    handle = cn.register_forward_pre_hook(lambda m, a: cancel.set())
    unet_handle = unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))
    try:
        req = GenerationRequest(model=str(setup["sd1"]), controlnet=[_unit()], **KW)
        result = setup["engine"].generate(req, cancel=cancel)
    finally:
        handle.remove()
        unet_handle.remove()
    assert result.interrupted and result.images == [] and unet_calls == []


def test_interrupt_inside_a_preprocessor(setup, monkeypatch):
    """Cancel set while a preprocessor's net runs (built for the one picture, so it has no hooks of its own)
    stops the generation at that net's next layer, and nothing is sampled."""
    from torch import nn

    from darkroom.control.annotators import teed
    from darkroom.testing.tiny_annotators import save, teed_state

    annotators = setup["home"].root / "models" / "annotators"
    save(teed_state(), annotators / "7_model.pth")
    cancel = threading.Event()
    layers = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Identity(), nn.Identity()

        def forward(self, x):
            cancel.set()  # Interrupt pressed while the net is half way through
            layers.append("a")
            self.a(x)
            layers.append("b")
            return self.b(x)

    def slow_edges(net, img):
        Net()(torch.zeros(1))
        raise AssertionError("the net should have been stopped")

    monkeypatch.setattr(teed, "edges", slow_edges)
    unet_calls = []
    unet = setup["engine"].cache.get(setup["sd1"]).unet
    handle = unet.register_forward_pre_hook(lambda m, a: unet_calls.append(1))
    try:
        req = GenerationRequest(model=str(setup["sd1"]), controlnet=[_unit(module="softedge_teed")], **KW)
        result = setup["engine"].generate(req, cancel=cancel)
    finally:
        handle.remove()
    assert result.interrupted and result.images == [] and unet_calls == [] and layers == ["a"]
    Net()(torch.zeros(1))  # the hook is gone once the phase ends
    assert layers == ["a", "a", "b"]


def test_admission_counts_the_controlnet_weights(setup):
    from darkroom.engine.admission import control_weight_bytes

    engine = setup["engine"]
    params = sum(p.numel() for p in _controlnet(setup, "cn-sd1").parameters())
    req = GenerationRequest(model=str(setup["sd1"]), controlnet=[_unit(), _unit(weight=0.5)], **KW)
    assert control_weight_bytes(engine, req, torch.float16) == params * 2  # one model, counted once
    both = req.model_copy(update={"controlnet": [_unit(), _unit("cn-sd1-b")]})
    assert control_weight_bytes(engine, both, torch.float32) == params * 4 * 2
    assert control_weight_bytes(engine, req.model_copy(update={"controlnet": []}), torch.float32) == 0
    engine.admit(req)  # tiny: admitted


def test_unit_line_extras_and_unwritable_values():
    from darkroom.metadata.control_maps import format_unit

    values = {"module": "canny", "model": "m [12345678]", "weight": 1.0, "resize_mode": "Crop and Resize",
              "processor_res": 512, "threshold_a": 100.0, "threshold_b": 200.0, "guidance_start": 0.0,
              "guidance_end": 1.0, "pixel_perfect": False, "control_mode": "Balanced", "hr_option": "Both",
              "guess_mode": False}
    line = format_unit(values)
    assert line.startswith("Module: canny, Model: m [12345678], Weight: 1.0, Resize Mode: Crop and Resize,")
    assert "Hr Option" not in line and "Guess Mode" not in line  # defaults: the extension's line exactly
    extra = format_unit({**values, "hr_option": "Low res only", "guess_mode": True})
    assert extra.endswith("Control Mode: Balanced, Hr Option: Low res only, Guess Mode: True")
    assert format_unit({**values, "model": "a,b [12345678]"}) is None


def test_only_masked_inpainting_crops_the_unit_image_like_the_init_image():
    """The crop box is in the init image's pixels; a unit picture of another size is cropped at the same place."""
    from darkroom.control.prepare import crop_to_region

    picture = _noise_image(128, seed=4)
    assert crop_to_region(picture, None) is picture
    cropped = crop_to_region(picture, ((16, 8, 48, 40), (64, 64)))
    assert cropped.size == (64, 64)
    assert np.array_equal(np.asarray(cropped), np.asarray(picture.crop((32, 16, 96, 80))))


def test_only_masked_inpainting_runs_with_a_unit(setup):
    mask = Image.new("L", (96, 96), 0)
    mask.paste(255, (40, 40, 60, 60))
    result = _run(setup, units=[_unit(image=_png(_noise_image(192, seed=2)))], init_image=_png(_noise_image(96)),
                  mask=_png(mask), inpaint_full_res=True, inpaint_full_res_padding=4, denoising_strength=0.8,
                  width=64, height=64)
    assert read_control_maps(result.images[0].png)[0].shape == (64, 64, 3)
    assert Image.open(io.BytesIO(result.images[0].png)).size == (96, 96)


def test_pixel_perfect_writes_the_resolution_it_used(setup):
    from darkroom.control.preprocess import pixel_perfect_resolution

    result = _run(setup, units=[_unit(image=_png(_noise_image(40)), pixel_perfect=True, processor_res=256)])
    [unit] = control_units_from_infotext(parse_infotext(result.images[0].infotext))
    assert unit["pixel_perfect"] is True
    assert unit["processor_res"] == pixel_perfect_resolution(40, 40, 64, 64, "Just Resize") != 256


def test_thresholds_and_resolution_are_written_resolved(setup):
    """As the extension writes them: -1 (or out of range) thresholds as the preprocessor's defaults, a -1
    resolution as the one used; a threshold the preprocessor has no slider for stays as given."""
    canny = _unit(module="canny", processor_res=-1, threshold_a=-1, threshold_b=999)
    threshold = _unit(model="cn-sd1-b", module="threshold", threshold_b=-1)
    [first, second] = control_units_from_infotext(parse_infotext(_run(setup, units=[canny, threshold])
                                                                 .images[0].infotext))
    assert (first["threshold_a"], first["threshold_b"], first["processor_res"]) == (100.0, 200.0, 512)
    assert (second["threshold_a"], second["threshold_b"]) == (127.0, -1)


def test_prepared_unit_uses_its_image_as_the_map_and_keeps_its_module(setup):
    """A prepared unit (a stored map rerun) is not preprocessed: the same picture as with module none, but
    the infotext names the unit's preprocessor and its settings as given."""
    edges = _png(Image.fromarray((np.asarray(HINT) > 128).astype(np.uint8) * 255))
    plain = _run(setup, units=[_unit(image=edges)])
    prepared = _run(setup, units=[_unit(image=edges, module="canny", prepared=True, pixel_perfect=True,
                                        processor_res=384, threshold_a=50, threshold_b=150)])
    detected = _run(setup, units=[_unit(image=edges, module="canny")])
    assert np.array_equal(_pixels(plain), _pixels(prepared))
    assert not np.array_equal(_pixels(detected), _pixels(prepared))  # canny would have changed the map
    line = parse_infotext(prepared.images[0].infotext)["ControlNet 0"]
    assert "Module: canny" in line and "Processor Res: 384, Threshold A: 50.0, Threshold B: 150.0" in line
    assert np.array_equal(read_control_maps(prepared.images[0].png)[0], read_control_maps(plain.images[0].png)[0])


def test_prepared_inpaint_map_keeps_its_masked_pixels():
    from darkroom.control.prepare import prepared_map

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    rgba[:4, :, 3] = 0  # transparent: masked, as a stored inpaint map keeps them
    control = prepared_map("inpaint_only", Image.fromarray(rgba, "RGBA"), None)
    assert (control[:4] == -1).all() and np.allclose(control[4:], 200 / 255)
    mask = Image.fromarray(np.where(np.arange(8)[None, :] < 2, 255, 0).repeat(8, 0).astype(np.uint8), "L")
    control = prepared_map("inpaint_only", Image.fromarray(rgba[..., :3]), mask)  # a mask file instead
    assert (control[:, :2] == -1).all() and (control[:, 2:] >= 0).all()
    assert (prepared_map("none", Image.fromarray(rgba, "RGBA"), mask) >= 0).all()  # only inpaint masks


def test_unloading_the_checkpoint_frees_the_controlnets(setup):
    engine = setup["engine"]
    _run(setup, units=[_unit()])
    assert engine.controlnets._items  # kept loaded between generations
    engine.cache.unload()  # what /sdapi/v1/unload-checkpoint and a switch to another model call
    assert not engine.controlnets._items and engine.cache.current is None


def test_a_greyscale_controlnet_gets_the_maps_luminance(setup):
    """A ControlNet whose hint takes one channel (as some Control-LoRAs' do) is fed the map's luminance instead
    of failing inside the convolution."""
    write_tiny_controlnet(setup["home"].controlnets, "cn-grey", "sd1", "single", hint_channels=1)
    cn = _controlnet(setup, "cn-grey")
    assert cn.config.conditioning_channels == 1
    with Calls(cn) as calls:
        result = _run(setup, units=[_unit("cn-grey")])
    assert calls.count and all(shape[1] == 1 for shape in calls.shapes)
    assert not np.array_equal(_pixels(result), _pixels(_run(setup)))
    # the hint it gets: each pixel's BT.601 luminance
    from darkroom.control.apply import ControlUnitRun
    from darkroom.control.load import LoadedControlNet

    rgb = torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1).expand(1, 3, 4, 4).clone()
    rgb[..., 0, 0] = -1.0  # a masked pixel stays masked
    loaded = LoadedControlNet(cn, "sd1", setup["home"].controlnets / "cn-grey.safetensors", torch.float32,
                              torch.device("cpu"))
    grey = ControlUnitRun(loaded, rgb).ready_hint(torch.device("cpu"))
    assert grey.shape == (1, 1, 4, 4)
    assert grey[0, 0, 1, 1].item() == pytest.approx(0.299 + 0.5 * 0.587) and grey[0, 0, 0, 0].item() == -1.0
