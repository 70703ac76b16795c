"""T2I-Adapter style and ReVision units (darkroom.control.vision_prompt): the style adapter's network against the
reference formula, its tokens on the prompt's rows of the context, ReVision's embedding in SDXL's pooled text
embedding, the prompt dropped by revision_ignore_prompt, and the errors a user meets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from darkroom.control import vision_prompt
from darkroom.control.config import classify
from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_adapter import style_adapter_state, write_tiny_style_adapter
from darkroom.testing.tiny_ipadapter import write_tiny_clip_vision
from tests.control_util import generate_with_units, png_bytes

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
STYLE_WIDTH = 64  # the tiny CLIP-L tower's width (the real one: 1024)


def _picture() -> Image.Image:
    g = np.random.default_rng(7)
    return Image.fromarray((g.random((224, 224, 3)) * 255).astype(np.uint8))


def _style(model="t2iadapter_style_tiny", module="t2ia_style_clipvision", **kw) -> ControlUnit:
    return ControlUnit(model=model, module=module, image=png_bytes(_picture()), **kw)


def _revision(module="revision_clipvision", **kw) -> ControlUnit:
    return ControlUnit(model="None", module=module, image=png_bytes(_picture()), **kw)


def _pooled_width(unet) -> int:
    return unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("vision")
    home = Home(root / "home").ensure()
    engine = engine_factory(home)
    sd1, sdxl = tiny_model("sd1")["path"], tiny_model("sdxl")["path"]
    context = engine.cache.get(sd1).unet.config.cross_attention_dim
    pooled = _pooled_width(engine.cache.get(sdxl).unet)
    write_tiny_style_adapter(home.controlnets, "t2iadapter_style_tiny", STYLE_WIDTH, context, seed=1)
    towers = home.root / "models" / "clip_vision"
    write_tiny_clip_vision(towers / "clip_vitl.pth", seed=2, hidden=STYLE_WIDTH)
    write_tiny_clip_vision(towers / "clip_g.pth", seed=3, projection=pooled)
    return {"home": home, "engine": engine, "sd1": sd1, "sdxl": sdxl, "context": context, "pooled": pooled}


class _Seen:
    """The UNet's encoder_hidden_states and added_cond_kwargs at every call (a forward pre-hook on the cached
    model, which the engine keeps one at a time: loaded here, it is the one the next generation runs)."""

    def __init__(self, setup, family: str):
        self.unet = setup["engine"].cache.get(setup[family]).unet
        self.calls: list[tuple[torch.Tensor, dict | None]] = []

    def _see(self, module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        self.calls.append((kwargs["encoder_hidden_states"].clone(),
                           None if added is None else {k: v.clone() for k, v in added.items()}))

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._see, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _run(setup, units=(), family="sd1", **kw):
    return generate_with_units(setup["engine"], setup[family], units, **{**KW, **kw})


# --- the style adapter -----------------------------------------------------------------------------------------


def _reference_style(state: dict, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """The style adapter written out from its definition: CLIP hidden states with the style tokens appended,
    pre-LayerNorm, residual attention blocks (LayerNorm, multi-head attention, LayerNorm, quick-GELU MLP),
    post-LayerNorm on the style tokens, projection."""
    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], state[name + ".weight"], state[name + ".bias"], 1e-5)

    tokens = state["style_embedding"].shape[1]
    x = norm(torch.cat([hidden, state["style_embedding"].expand(hidden.shape[0], -1, -1)], 1), "ln_pre")
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_layes."))
    for i in range(layers):
        p = f"transformer_layes.{i}."
        h = norm(x, p + "ln_1")
        q, k, v = (h @ state[p + "attn.in_proj_weight"].T + state[p + "attn.in_proj_bias"]).chunk(3, -1)
        split = (lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2))
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5, -1) @ split(v)
        x = x + att.transpose(1, 2).flatten(2) @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
        h = norm(x, p + "ln_2") @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"]
        x = x + (h * torch.sigmoid(1.702 * h)) @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    return norm(x[:, -tokens:], "ln_post") @ state["proj"]


def test_style_network_follows_its_definition(tmp_path):
    from pathlib import Path

    state = style_adapter_state(64, 40, layers=3, tokens=8, seed=4)
    assert classify({k: tuple(v.shape) for k, v in state.items()}).detail.endswith("no SD family has")
    real = {k: tuple(v.shape) for k, v in style_adapter_state(1024, 768, layers=1).items()}
    assert classify(real).label == "SD1 T2I-Adapter"  # the released file's widths name its family
    loaded = vision_prompt.load_style(state, {"darkroom_config": '{"t2i_style": {"family": "sd1"}}'},
                                      Path("t2iadapter_style_sd14v1.pth"), device="cpu")
    hidden = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(0))
    want = _reference_style(state, hidden, vision_prompt.STYLE_HEADS)
    got = loaded.model(hidden)
    assert got.shape == (2, 8, 40)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    state["proj"] = state["proj"] * 1.01  # the comparison sees a change
    assert not torch.allclose(loaded.model(hidden), _reference_style(state, hidden, 8), atol=1e-5)


def test_style_tokens_join_the_prompt_rows_of_the_context(setup):
    """Both CFG halves get the tokens' length; the prompt's rows the tokens x weight, the negative's zeros; only
    inside the window; the picture then differs from the plain one."""
    from darkroom.control import ipadapter
    from darkroom.control.load import load_controlnet

    adapter = load_controlnet(setup["home"].controlnets / "t2iadapter_style_tiny.safetensors", dtype=torch.float32)
    clip = ipadapter.load_clip(setup["home"].root / "models" / "clip_vision" / "clip_vitl.pth", dtype=torch.float32,
                               device="cpu")
    tokens = vision_prompt.style_tokens(adapter, clip, ipadapter.clip_pixels(np.asarray(_picture())))
    assert tokens.shape == (1, 8, setup["context"])
    plain, _ = _run(setup)
    with _Seen(setup, "sd1") as seen:
        latents, styled = _run(setup, [_style(weight=0.6, guidance_end=0.5)])
    assert len(seen.calls) == 3
    first, _ = seen.calls[0]
    assert first.shape[:2] == (2, 77 + 8)
    torch.testing.assert_close(first[1, 77:], tokens[0] * 0.6, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(first[0, 77:]) == 0  # the negative's rows: zeros
    assert seen.calls[2][0].shape[1] == 77  # step 2 of 3 is past guidance_end 0.5
    assert (latents - plain).abs().mean() > 1e-3
    assert "Module: clip_vision, Model: t2iadapter_style_tiny [" in styled.images[0].infotext


def test_style_errors_name_what_to_do(setup):
    with pytest.raises(InvalidRequest, match="t2iadapter_style_tiny is a T2I-Adapter style model; give it the"
                                             " t2ia_style_clipvision preprocessor"):
        _run(setup, [_style(module="canny")])
    tower = setup["home"].root / "models" / "clip_vision" / "clip_vitl.pth"
    moved = tower.with_suffix(".away")
    tower.rename(moved)
    try:
        with pytest.raises(InvalidRequest, match=r"t2ia_style_clipvision needs clip_vitl.pth \(or"
                                                 r" clip_vision_l.safetensors\)"):
            _run(setup, [_style()])
    finally:
        moved.rename(tower)


# --- ReVision --------------------------------------------------------------------------------------------------


def _embedding(setup, noise=0.0, seed=KW["seed"]) -> torch.Tensor:
    from darkroom.control import ipadapter

    clip = ipadapter.load_clip(setup["home"].root / "models" / "clip_vision" / "clip_g.pth", dtype=torch.float32,
                               device="cpu")
    return vision_prompt.revision_embedding(clip, ipadapter.clip_pixels(np.asarray(_picture())), noise, seed)


def test_revision_replaces_the_pooled_embedding_of_the_prompt_rows(setup):
    with _Seen(setup, "sdxl") as plain:
        _run(setup, family="sdxl")
    with _Seen(setup, "sdxl") as seen:
        _, result = _run(setup, [_revision(weight=0.8)], family="sdxl")
    context, added = seen.calls[0]
    torch.testing.assert_close(added["text_embeds"][1], _embedding(setup)[0] * 0.8, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(added["text_embeds"][0]) == 0 and added["text_embeds"].shape[1] == setup["pooled"]
    torch.testing.assert_close(added["time_ids"], plain.calls[0][1]["time_ids"])
    torch.testing.assert_close(context, plain.calls[0][0])  # the prompt is kept
    assert "Module: revision_clipvision, Model: None" in result.images[0].infotext


def test_revision_ignore_prompt_and_empty_prompts_drop_the_text(setup):
    with _Seen(setup, "sdxl") as seen:
        _run(setup, [_revision(module="revision_ignore_prompt")], family="sdxl")
    assert torch.count_nonzero(seen.calls[0][0]) == 0
    with _Seen(setup, "sdxl") as seen:
        _run(setup, [_revision()], family="sdxl", prompt="", negative_prompt="")
    assert torch.count_nonzero(seen.calls[0][0]) == 0
    with _Seen(setup, "sdxl") as seen:  # outside the window: nothing changes
        _run(setup, [_revision(module="revision_ignore_prompt", guidance_start=0.5)], family="sdxl")
    assert torch.count_nonzero(seen.calls[0][0]) > 0 and torch.count_nonzero(seen.calls[2][0]) == 0


def test_revision_noise_augmentation_is_seeded(setup):
    """Noise Augmentation a noises the embedding to timestep int(a x 1000) of the low-scale model's schedule
    (scaled-linear betas 1e-4 .. 2e-2), with noise from the seed."""
    from darkroom.control import ipadapter

    clip = ipadapter.load_clip(setup["home"].root / "models" / "clip_vision" / "clip_g.pth", dtype=torch.float32,
                               device="cpu")
    clean = clip(ipadapter.clip_pixels(np.asarray(_picture()))).image_embeds.detach()
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(KW["seed"]))
    betas = np.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, 1000) ** 2
    for a, step in ((0.0, 0), (0.5, 500), (1.0, 999)):
        kept = float(np.prod(1 - betas[:step + 1]))
        want = kept ** 0.5 * clean + (1 - kept) ** 0.5 * noise
        torch.testing.assert_close(_embedding(setup, a), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_embedding(setup, 0.5), _embedding(setup, 0.5, seed=9))


def test_revision_on_sd1_is_refused_and_listed_as_model_free(setup, api):
    with pytest.raises(InvalidRequest, match="revision_clipvision \\(ReVision\\) works with SDXL checkpoints only"):
        _run(setup, [_revision()])
    detail = api.get("/controlnet/module_list").json()["module_detail"]
    assert detail["revision_clipvision"]["model_free"] and not detail["clip_vision"]["model_free"]
    assert any(s and s["name"] == "Noise Augmentation" for s in detail["revision_ignore_prompt"]["sliders"])
    types = api.get("/controlnet/control_types").json()["control_types"]
    assert types["Revision"]["default_option"] == "revision_clipvision"


def test_webuiapi_style_unit_over_a_socket(setup, studio):
    """The extension's unit shape from webuiapi: the style model by its title, the preprocessor by its label."""
    import webuiapi

    from darkroom.control.files import find_controlnets
    from tests.server_util import live_server

    write_tiny_style_adapter(studio.home.controlnets, "t2iadapter_style_tiny", STYLE_WIDTH, setup["context"], seed=1)
    write_tiny_clip_vision(studio.home.root / "models" / "clip_vision" / "clip_vitl.pth", seed=2, hidden=STYLE_WIDTH)
    title = next(f.title for f in find_controlnets(studio.home) if f.name == "t2iadapter_style_tiny")
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        assert title in api.controlnet_model_list()
        unit = webuiapi.ControlNetUnit(image=_picture(), module="t2ia_style_clipvision", model=title, weight=0.7)
        out = api.txt2img(prompt="a red circle", seed=5, width=64, height=64, steps=2, cfg_scale=6,
                          sampler_name="Euler", controlnet_units=[unit], alwayson_scripts={})
        assert "Module: clip_vision, Model: t2iadapter_style_tiny [" in out.info["infotexts"][0]
