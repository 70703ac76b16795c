"""InstantID: its IP-Adapter projects the raw antelopev2 embedding of the largest face, its ControlNet (the next
unit, told by its file name as the extension does) reads those face tokens instead of the prompt and steers with
the keypoints map; the errors a user meets (units in the wrong order, the wrong preprocessor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.control import ipadapter
from darkroom.control.annotators import insightface, instantid
from darkroom.control.config import classify
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing import tiny_insightface
from darkroom.testing.tiny_controlnet import write_tiny_controlnet
from darkroom.testing.tiny_ipadapter import write_tiny_ipadapter
from tests.control_util import generate_with_units, png_bytes

KW = dict(prompt="a portrait", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
SIDE = 512  # the picture's side: the annotators' size already, so the detector sees it at 640 / 512
FACE = (150.0, 100.0, 350.0, 330.0)  # in picture pixels


def _picture() -> Image.Image:
    g = np.random.default_rng(21)
    return Image.fromarray((g.random((SIDE, SIDE, 3)) * 255).astype(np.uint8))


def _kps() -> np.ndarray:
    return (insightface.ARCFACE_DST * 1.6 + np.array([FACE[0] + 10, FACE[1] + 20], np.float32)).astype(np.float32)


def _units(ip_module="instant_id_face_embedding", order=("ip", "cn"), **kw) -> list[ControlUnit]:
    made = {"ip": ControlUnit(model="ip-adapter_instant_id_tiny", module=ip_module, image=png_bytes(_picture())),
            "cn": ControlUnit(model="control_instant_id_tiny", module="instant_id_face_keypoints",
                              image=png_bytes(_picture()), **kw)}
    return [made[k] for k in order]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("instantid")
    home = Home(root / "home").ensure()
    engine = engine_factory(home)
    sdxl = tiny_model("sdxl")["path"]
    unet = engine.cache.get(sdxl).unet
    write_tiny_ipadapter(home.controlnets, "ip-adapter_instant_id_tiny", unet, "sdxl", variant="plus",
                         clip_width=512, tokens=16, seed=4)
    write_tiny_controlnet(home.controlnets, "control_instant_id_tiny", "sdxl", "diffusers-single", seed=5)
    scale = 640 / SIDE  # detector-input pixels per picture pixel
    box = tuple(v * scale for v in FACE)
    pack = tiny_insightface.pack(home.root / "models" / "insightface" / "models",
                                 [tiny_insightface.face_anchor(box, _kps() * scale, 0.95)], name="antelopev2", seed=6)
    return {"home": home, "engine": engine, "sdxl": sdxl, "pack": pack}


def _run(setup, units, **kw):
    return generate_with_units(setup["engine"], setup["sdxl"], units, **{**KW, **kw})


def test_the_adapter_file_is_recognised():
    real = {"image_proj.latents": (1, 16, 1280), "image_proj.proj_in.weight": (1280, 512),
            "image_proj.layers.0.0.to_q.weight": (1280, 1280), "ip_adapter.1.to_k_ip.weight": (640, 2048)}
    kind = classify(real)
    assert kind.supported and kind.family == "sdxl" and kind.noun == "IP-Adapter"


def test_the_controlnet_reads_the_face_tokens(setup):
    """The ControlNet's encoder_hidden_states are the adapter's projection of the raw embedding (prompt rows) and
    of zeros (negative rows), not the prompt; the picture differs from one without the units."""
    from darkroom.control.load import load_controlnet

    adapter = load_controlnet(setup["home"].controlnets / "ip-adapter_instant_id_tiny.safetensors",
                              dtype=torch.float32)
    assert adapter.variant == "instantid" and adapter.face and adapter.encoder is None
    embedding = instantid.face_embedding(np.asarray(_picture()), [setup["pack"].parent])
    found = insightface.faces(np.asarray(_picture()), [setup["pack"].parent], "antelopev2")
    assert np.allclose(embedding, found[0].embedding) and abs(np.linalg.norm(embedding) - 1) > 1e-3  # raw
    cond, negative = ipadapter.tokens(adapter, None, None, torch.from_numpy(embedding)[None])
    assert cond.shape[1] == 16
    seen = []

    def see(module, args, kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())

    plain, _ = _run(setup, [])
    controlnet = setup["engine"].controlnets.get(setup["home"].controlnets / "control_instant_id_tiny.safetensors",
                                                 dtype=torch.float32, device="cpu").model
    handle = controlnet.register_forward_pre_hook(see, with_kwargs=True)
    try:
        steered, result = _run(setup, _units())
    finally:
        handle.remove()
    assert len(seen) == 3
    torch.testing.assert_close(seen[0][1], cond[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen[0][0], negative[0], atol=1e-5, rtol=1e-5)
    assert (steered - plain).abs().max() > 1e-3
    infotext = result.images[0].infotext
    assert "Module: instant_id_face_embedding, Model: ip-adapter_instant_id_tiny [" in infotext
    assert "Module: instant_id_face_keypoints, Model: control_instant_id_tiny [" in infotext


def test_the_keypoints_map(setup):
    from darkroom.control import preprocess

    found = preprocess.detect("instant_id_face_keypoints", _picture(), annotator_dirs=[setup["pack"].parent])
    assert found.shape == (SIDE, SIDE, 3)
    pixels = np.rint(found * 255).astype(int)
    for (x, y), colour in zip(_kps(), instantid.COLOURS, strict=True):
        assert tuple(pixels[int(y), int(x)]) == colour  # a full-colour circle on each point
    nose, eye = _kps()[2], _kps()[0]
    middle = ((nose + eye) / 2).astype(int)
    assert tuple(pixels[middle[1], middle[0]]) == (153, 0, 0)  # the limb, 60% of the first point's colour
    assert pixels[5, 5].sum() == 0  # black elsewhere


def test_errors_name_what_to_do(setup):
    with pytest.raises(InvalidRequest, match="control_instant_id_tiny.* is InstantID's ControlNet; put its"
                                             " IP-Adapter unit"):
        _run(setup, _units(order=("cn",)))
    with pytest.raises(InvalidRequest, match="put its IP-Adapter unit"):
        _run(setup, _units(order=("cn", "ip")))
    with pytest.raises(InvalidRequest, match="is an InstantID adapter: pick the instant_id_face_embedding"):
        _run(setup, _units(ip_module="ip-adapter_face_id"))
    blank = [u.model_copy(update={"image": png_bytes(Image.new("RGB", (SIDE, SIDE)))}) for u in _units()]
    pack = setup["pack"]
    away = pack.with_name("elsewhere")
    pack.rename(away)
    try:
        with pytest.raises(InvalidRequest, match="InsightFace's antelopev2 models: scrfd_10g_bnkps.onnx and"
                                                 " glintr100.onnx"):
            _run(setup, blank)
    finally:
        away.rename(pack)
