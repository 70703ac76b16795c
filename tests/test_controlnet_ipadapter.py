"""IP-Adapter units: the authors' files recognised and loaded, the CLIP vision tower found and checked, and the
generation equal to diffusers' own IP-Adapter pipeline on the same weights (plain and plus), with the unit's
weight, window and the errors a user meets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.control import ipadapter
from darkroom.control.config import classify
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_ipadapter import (
    clip_vision_config,
    ipadapter_state,
    write_tiny_clip_vision,
    write_tiny_ipadapter,
)
from tests.control_util import diffusers_ip_adapter_pipeline, generate_with_units, png_bytes

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")


def _reference() -> Image.Image:
    """A 224 x 224 picture: the CLIP input size, so diffusers' CLIPImageProcessor and the extension's squash agree."""
    g = np.random.default_rng(5)
    return Image.fromarray((g.random((224, 224, 3)) * 255).astype(np.uint8))


def _unit(model="ipa-plain", module="ip-adapter_clip_h", **kw) -> ControlUnit:
    return ControlUnit(model=model, module=module, image=png_bytes(_reference()), **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("ipa")
    home = Home(root / "home").ensure()
    engine = engine_factory(home)
    sd1 = tiny_model("sd1")["path"]
    unet = engine.cache.get(sd1).unet
    write_tiny_ipadapter(home.controlnets, "ipa-plain", unet, "sd1", variant="plain", clip_width=48, seed=1)
    write_tiny_ipadapter(home.controlnets, "ipa-plus", unet, "sd1", variant="plus", clip_width=64, seed=2)
    clip = write_tiny_clip_vision(home.root / "models" / "clip_vision" / "clip_h.pth", seed=3)
    return {"root": root, "home": home, "engine": engine, "sd1": sd1, "sdxl": tiny_model("sdxl")["path"],
            "unet": unet, "clip": clip}


def _run(setup, units=(), family="sd1", **kw):
    return generate_with_units(setup["engine"], setup[family], units, **{**KW, **kw})


def _diffusers_latents(setup, name, variant, weight, **kw):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    flat = ipadapter_state(setup["unet"], variant=variant, clip_width=48 if variant == "plain" else 64,
                           seed=1 if variant == "plain" else 2)
    pipe = diffusers_ip_adapter_pipeline(setup["root"], setup["sd1"], flat, name, weight, kw)
    encoder = CLIPVisionModelWithProjection(clip_vision_config())
    encoder.load_state_dict(torch.load(setup["clip"], weights_only=True), strict=False)
    pipe.register_modules(image_encoder=encoder.eval(), feature_extractor=CLIPImageProcessor())
    return pipe(prompt=kw["prompt"], negative_prompt=kw["negative_prompt"], ip_adapter_image=_reference(),
                height=kw["height"], width=kw["width"], num_inference_steps=kw["steps"], guidance_scale=kw["cfg_scale"],
                generator=[torch.Generator("cpu").manual_seed(kw["seed"])], output_type="latent").images


# --- files ------------------------------------------------------------------------------------------------------


def test_files_are_recognised_and_listed(setup):
    from darkroom.control.files import find_controlnets

    rows = {f.name: f for f in find_controlnets(setup["home"])}
    assert rows["ipa-plain"].supported and rows["ipa-plain"].noun == "IP-Adapter" and rows["ipa-plain"].family == "sd1"
    real = {"image_proj.proj.weight": (3072, 1024), "image_proj.norm.weight": (768,),
            "ip_adapter.1.to_k_ip.weight": (320, 768)}
    kind = classify(real)
    assert kind.supported and kind.family == "sd1" and kind.noun == "IP-Adapter"
    sdxl = classify({"image_proj.proj.weight": (8192, 1280), "ip_adapter.1.to_k_ip.weight": (640, 2048)})
    assert sdxl.family == "sdxl"
    faceid = classify({"image_proj.proj.0.weight": (1024, 512), "image_proj.proj.2.weight": (3072, 1024),
                       "image_proj.norm.weight": (768,), "ip_adapter.1.to_k_ip.weight": (320, 768)})
    assert faceid.supported and faceid.family == "sd1"  # test_controlnet_faceid.py runs them
    instantid = classify({"image_proj.latents": (1, 16, 1280), "image_proj.proj_in.weight": (1280, 512),
                          "ip_adapter.1.to_k_ip.weight": (640, 2048)})
    assert instantid.supported and instantid.family == "sdxl"  # test_controlnet_instantid.py runs them


def test_the_tower_each_adapter_takes():
    """ip-adapter_sd15 projects ViT-H's 1024-wide embedding, ip-adapter_sdxl bigG's 1280; plus models the
    hidden states (1280 ViT-H, 1664 bigG); the wrong preprocessor is named."""
    def adapter(variant, width):
        return ipadapter.LoadedIPAdapter(None, "sd1", Path("ip-adapter_x.safetensors"),
                                         torch.float32, torch.device("cpu"), variant=variant, clip_width=width)

    assert adapter("plain", 1024).encoder == "h" and adapter("plain", 1280).encoder == "g"
    assert adapter("plus", 1280).encoder == "h" and adapter("plus", 1664).encoder == "g"
    assert ipadapter.encoder_for("ip-adapter-auto", adapter("plain", 1280), "x") == "g"
    with pytest.raises(InvalidRequest, match="trained with CLIP ViT-bigG/14.*ip-adapter_clip_g"):
        ipadapter.encoder_for("ip-adapter_clip_sd15", adapter("plain", 1280), "x")


# --- parity -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variant"), [("ipa-plain", "plain"), ("ipa-plus", "plus")])
def test_matches_diffusers_ip_adapter_pipeline(setup, name, variant):
    """Same checkpoint, adapter and CLIP tower as diffusers' StableDiffusionPipeline.load_ip_adapter: the final
    latents agree; at another scale they do not, nor without the unit (so the comparison can fail)."""
    ours, _ = _run(setup, [_unit(name, weight=0.8)])
    theirs = _diffusers_latents(setup, name, variant, 0.8, **KW)
    tolerance = 1e-4 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < tolerance
    other = _diffusers_latents(setup, name, variant, 0.3, **KW)
    assert (ours - other).abs().max().item() > 100 * tolerance
    plain, _ = _run(setup)
    assert (ours - plain).abs().max().item() > 100 * tolerance


# --- the unit's settings and errors -----------------------------------------------------------------------------


def test_weight_window_and_recording(setup):
    plain, _ = _run(setup)
    zero, _ = _run(setup, [_unit(weight=0.0)])
    late, _ = _run(setup, [_unit(guidance_start=0.99, guidance_end=1.0)], steps=3)  # steps 0-2: fractions < 0.99
    assert torch.equal(zero, plain) and torch.equal(late, plain)
    _, result = _run(setup, [_unit()])
    assert "Module: ip-adapter_clip_sd15, Model: ipa-plain [" in result.images[0].infotext
    assert all(not m._forward_hooks for m in setup["unet"].modules())  # the hooks are gone


def test_errors_name_what_to_do(setup):
    with pytest.raises(InvalidRequest, match="IP-Adapter; give it the ip-adapter-auto preprocessor"):
        _run(setup, [_unit(module="canny")])
    with pytest.raises(InvalidRequest, match="ipa-plain is an SD1 IP-Adapter"):
        _run(setup, [_unit()], family="sdxl", negative_prompt="")
    moved = setup["clip"].with_name("elsewhere.pth")
    setup["clip"].rename(moved)
    try:
        with pytest.raises(InvalidRequest, match=r"needs the CLIP ViT-H/14 vision model: clip_h.pth"):
            _run(setup, [_unit()])
    finally:
        moved.rename(setup["clip"])
    with pytest.raises(InvalidRequest, match="ipa-plain is not a FaceID or InstantID adapter: pick the"
                                             " ip-adapter-auto"):
        _run(setup, [_unit(module="ip-adapter_face_id")])
    with pytest.raises(InvalidRequest, match="cannot run the ip-adapter_pulid preprocessor"):
        _run(setup, [_unit(module="ip-adapter_pulid")])


def test_webuiapi_unit_over_a_socket(setup, studio):
    """The A1111 extension's unit shape from webuiapi: model and module by their titles and labels."""
    import webuiapi

    from darkroom.control.files import find_controlnets
    from tests.server_util import live_server

    write_tiny_ipadapter(studio.home.controlnets, "ip-adapter-plus_tiny", setup["unet"], "sd1", variant="plus",
                         clip_width=64, seed=2)
    write_tiny_clip_vision(studio.home.root / "models" / "clip_vision" / "clip_h.pth", seed=3)
    title = next(f.title for f in find_controlnets(studio.home) if f.name == "ip-adapter-plus_tiny")
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        types = api.custom_get("controlnet/control_types")["control_types"]["IP-Adapter"]
        assert types["default_option"] == "ip-adapter_clip_sd15" and title in types["model_list"]
        unit = webuiapi.ControlNetUnit(image=_reference(), module="ip-adapter_clip_h", model=title, weight=0.7)
        out = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, steps=2, cfg_scale=6,
                          sampler_name="Euler", controlnet_units=[unit], alwayson_scripts={})
        assert "Module: ip-adapter_clip_sd15, Model: ip-adapter-plus_tiny [" in out.info["infotexts"][0]


def test_admission_counts_the_clip_tower(setup):
    """The tower is loaded while the unit is prepared: memory admission counts it with the weights."""
    from darkroom.engine.admission import clip_tower_bytes, control_weight_bytes
    from darkroom.request import GenerationRequest

    req = GenerationRequest(model=str(setup["sd1"]), controlnet=[_unit()], **KW)
    tower = clip_tower_bytes(setup["engine"], req, torch.float32)
    assert tower == setup["clip"].stat().st_size // 4 * 4 > 0  # a pickle: its size, as fp32
    assert control_weight_bytes(setup["engine"], req, torch.float32) > tower
    canny = GenerationRequest(model=str(setup["sd1"]), controlnet=[_unit(module="canny")], **KW)
    assert clip_tower_bytes(setup["engine"], canny, torch.float32) == 0


def test_the_authors_nested_pickle_loads(setup, tmp_path):
    """ip-adapter_sd15.bin renamed .pth, as the extension's docs say: {"image_proj": {...}, "ip_adapter": {...}}."""
    from darkroom.control.load import load_controlnet

    flat = ipadapter_state(setup["unet"], variant="plain", clip_width=48, seed=1)
    nested = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    path = tmp_path / "ip-adapter_sd15.pth"
    torch.save(nested, path)
    with pytest.raises(InvalidRequest, match="32-wide text context"):  # a tiny UNet's width names no family
        load_controlnet(path, dtype=torch.float32)
    real_width = {part: {k: torch.zeros(v.shape[0], 768) if k.endswith("_ip.weight") else v
                         for k, v in nested[part].items()} for part in nested}
    torch.save(real_width, path)
    loaded = load_controlnet(path, dtype=torch.float32)
    assert loaded.is_ipadapter and loaded.family == "sd1" and loaded.variant == "plain"
    assert len(loaded.model.to_k_ip) == len(ipadapter.cross_attentions(setup["unet"]))


def test_the_units_mask_masks_what_clip_sees(setup):
    """The extension's CLIP mask: white in the unit's mask zeroes those pixels of the normalised tower input;
    an all-black mask changes nothing."""
    picture = np.asarray(_reference())
    half = np.zeros((224, 224), np.uint8)
    half[:, :112] = 255
    pixels = ipadapter.clip_pixels(picture, half)
    assert torch.count_nonzero(pixels[..., :112]) == 0
    torch.testing.assert_close(pixels[..., 112:], ipadapter.clip_pixels(picture)[..., 112:])
    plain, _ = _run(setup, [_unit()])
    black, _ = _run(setup, [_unit(mask=png_bytes(Image.new("L", (224, 224), 0)))])
    white, _ = _run(setup, [_unit(mask=png_bytes(Image.new("L", (224, 224), 255)))])
    assert torch.equal(black, plain)
    assert (white - plain).abs().max() > 1e-4
