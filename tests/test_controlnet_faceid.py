"""IP-Adapter FaceID units: the authors' FaceID and FaceID Plus v2 files run with InsightFace's face embedding
(darkroom.control.annotators.insightface, on tiny stand-ins of the buffalo_l files) and equal diffusers' own
FaceID pipeline given the same embedding; the errors a user meets (no face, no pack, the wrong preprocessor)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.control.annotators import insightface
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing import tiny_insightface
from darkroom.testing.tiny_ipadapter import (
    clip_vision_config,
    ipadapter_state,
    write_tiny_clip_vision,
    write_tiny_ipadapter,
)
from tests.control_util import diffusers_ip_adapter_pipeline, generate_with_units, png_bytes

KW = dict(prompt="a portrait", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
FACE_BOX = (200.0, 150.0, 424.0, 374.0)  # detector-input pixels = picture pixels: the picture is 640 x 640


def _picture(seed: int = 11) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray((g.random((640, 640, 3)) * 255).astype(np.uint8))


def _unit(model="ip-adapter-faceid_tiny", module="ip-adapter_face_id", **kw) -> ControlUnit:
    return ControlUnit(model=model, module=module, image=png_bytes(_picture()), **kw)


ADAPTERS = {"ip-adapter-faceid_tiny": ("faceid", 7), "ip-adapter-faceid-plusv2_tiny": ("faceid-plus", 8)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("faceid")
    home = Home(root / "home").ensure()
    engine = engine_factory(home)
    sd1 = tiny_model("sd1")["path"]
    unet = engine.cache.get(sd1).unet
    for name, (variant, seed) in ADAPTERS.items():
        write_tiny_ipadapter(home.controlnets, name, unet, "sd1", variant=variant, clip_width=64, seed=seed)
    clip = write_tiny_clip_vision(home.root / "models" / "clip_vision" / "clip_h.pth", seed=3)
    kps = insightface.ARCFACE_DST * 2 + np.array([FACE_BOX[0], FACE_BOX[1]], np.float32)
    pack = tiny_insightface.pack(home.root / "models" / "insightface" / "models",
                                 [tiny_insightface.face_anchor(FACE_BOX, kps, 0.95)], seed=5)
    return {"root": root, "home": home, "engine": engine, "sd1": sd1, "unet": unet, "clip": clip, "pack": pack}


def _run(setup, units=(), **kw):
    return generate_with_units(setup["engine"], setup["sd1"], units, **{**KW, **kw})


def _face(setup) -> torch.Tensor:
    """The embedding FaceID takes: the largest face's normed ArcFace embedding."""
    found = insightface.largest_face(insightface.faces(np.asarray(_picture()), [setup["pack"].parent]))
    return torch.from_numpy(found.normed_embedding)[None]


def _diffusers_latents(setup, name: str, weight: float) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline with load_ip_adapter on the same file, given the face embedding (and, for
    Plus, the CLIP hidden states of the picture and of an all-zero one) as its FaceID documentation shows."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from darkroom.control.ipadapter import clip_pixels

    variant, seed = ADAPTERS[name]
    flat = ipadapter_state(setup["unet"], variant=variant, clip_width=64, seed=seed)
    pipe = diffusers_ip_adapter_pipeline(setup["root"], setup["sd1"], flat, name, weight, KW)
    face = _face(setup)
    embeds = torch.stack([torch.zeros_like(face), face])  # [negative, prompt] x 1 image x 512
    if variant == "faceid-plus":
        encoder = CLIPVisionModelWithProjection(clip_vision_config())
        encoder.load_state_dict(torch.load(setup["clip"], weights_only=True), strict=False)
        pipe.register_modules(image_encoder=encoder.eval(), feature_extractor=CLIPImageProcessor())
        pixels = clip_pixels(np.asarray(_picture()))
        with torch.no_grad():
            hidden = encoder(torch.cat([torch.zeros_like(pixels), pixels]), output_hidden_states=True).hidden_states[-2]
        projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds = hidden[:, None]
        projection.shortcut = True  # v2
    return pipe(prompt=KW["prompt"], negative_prompt=KW["negative_prompt"], ip_adapter_image_embeds=[embeds],
                height=KW["height"], width=KW["width"], num_inference_steps=KW["steps"], guidance_scale=KW["cfg_scale"],
                generator=[torch.Generator("cpu").manual_seed(KW["seed"])], output_type="latent").images


@pytest.mark.parametrize(("name", "module"), [("ip-adapter-faceid_tiny", "ip-adapter_face_id"),
                                              ("ip-adapter-faceid-plusv2_tiny", "ip-adapter_face_id_plus")])
def test_matches_diffusers_faceid_pipeline(setup, name, module):
    """The same file and face embedding as diffusers' FaceID pipeline: the final latents agree; at another scale
    they do not, nor without the unit (so the comparison can fail)."""
    ours, result = _run(setup, [_unit(name, module, weight=0.8)])
    theirs = _diffusers_latents(setup, name, 0.8)
    tolerance = 1e-4 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < tolerance
    assert (ours - _diffusers_latents(setup, name, 0.3)).abs().max().item() > 100 * tolerance
    plain, _ = _run(setup)
    assert (ours - plain).abs().max().item() > 100 * tolerance
    assert f"Module: {module}, Model: {name} [" in result.images[0].infotext


def test_v2_is_told_by_the_file_name(setup, tmp_path):
    """The extension's rule: FaceID Plus with "v2" in its name adds the face tokens back to the resampler's."""
    from darkroom.control.load import load_controlnet

    v2 = load_controlnet(setup["home"].controlnets / "ip-adapter-faceid-plusv2_tiny.safetensors",
                         dtype=torch.float32)
    v1_path = tmp_path / "ip-adapter-faceid-plus_tiny.safetensors"
    shutil.copy(setup["home"].controlnets / "ip-adapter-faceid-plusv2_tiny.safetensors", v1_path)
    v1 = load_controlnet(v1_path, dtype=torch.float32)
    assert v2.shortcut and not v1.shortcut and v2.face and v1.hidden_states
    plain = load_controlnet(setup["home"].controlnets / "ip-adapter-faceid_tiny.safetensors", dtype=torch.float32)
    assert plain.face and not plain.hidden_states and plain.encoder is None


def test_errors_name_what_to_do(setup):
    with pytest.raises(InvalidRequest, match="ip-adapter-faceid_tiny is a FaceID adapter: pick the"
                                             " ip-adapter_face_id preprocessor, not ip-adapter_clip_sd15"):
        _run(setup, [_unit(module="ip-adapter_clip_h")])
    with pytest.raises(InvalidRequest, match="pick the ip-adapter_face_id_plus preprocessor"):
        _run(setup, [_unit("ip-adapter-faceid-plusv2_tiny", module="ip-adapter_face_id")])
    blank = ControlUnit(model="ip-adapter-faceid_tiny", module="ip-adapter_face_id",
                        image=png_bytes(Image.new("RGB", (64, 64))))
    pack = setup["pack"]
    empty = pack.with_name("with-a-face")
    pack.rename(empty)
    try:
        with pytest.raises(InvalidRequest, match="FaceID needs InsightFace's buffalo_l models: det_10g.onnx and"
                                                 " w600k_r50.onnx"):
            _run(setup, [blank])
        tiny_insightface.pack(pack.parent, [])  # a detector that finds nothing
        with pytest.raises(InvalidRequest, match="no face was found in the picture"):
            _run(setup, [blank])
    finally:
        shutil.rmtree(pack)
        empty.rename(pack)


def test_admission_counts_the_face_pack(setup):
    """The InsightFace sessions stay loaded after a FaceID unit runs, so admission counts the pack's two files."""
    from darkroom.engine.admission import control_weight_bytes, face_pack_bytes
    from darkroom.request import GenerationRequest

    req = GenerationRequest(model=str(setup["sd1"]), controlnet=[_unit()], **KW)
    files = sum((setup["pack"] / name).stat().st_size for name in insightface.PACK_FILES["buffalo_l"])
    assert files > 0 and face_pack_bytes(setup["engine"], req) == files
    adapter = (setup["home"].controlnets / "ip-adapter-faceid_tiny.safetensors").stat().st_size
    assert control_weight_bytes(setup["engine"], req, torch.float32) >= files + adapter // 2
    canny = req.model_copy(update={"controlnet": [ControlUnit(model="x", module="canny", image=b"")]})
    assert face_pack_bytes(setup["engine"], canny) == 0
