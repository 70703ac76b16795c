"""The built-in starter ControlNet: a small diffusers ControlNetModel file that really places objects.

Trained by scripts/train_starter_control.py and evaluated by scripts/eval_starter_control.py (docs/starter-control.md).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from darkroom.starter_training import control_maps
from darkroom.starter_training.judge import judge
from darkroom.starter_training.scenes import Claims, ObjectClaim, Scene, SceneObject, render

ROOT = Path(__file__).resolve().parent.parent
CONTROL = ROOT / "darkroom" / "assets" / "controlnet" / "darkroom-starter-control.safetensors"


def _metadata() -> dict[str, str]:
    with safe_open(str(CONTROL), "pt") as f:
        return f.metadata() or {}


@pytest.fixture(scope="module")
def controlnet():
    from diffusers import ControlNetModel

    model = ControlNetModel.from_config(json.loads(_metadata()["config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(str(CONTROL)).items()}, strict=True)
    return model.float().eval().requires_grad_(False)


def test_file_is_small_and_described() -> None:
    assert CONTROL.exists()
    assert CONTROL.stat().st_size < 15 * 1024 * 1024
    meta = _metadata()
    assert meta["darkroom.base"] == "darkroom-starter"
    assert meta["description"]
    config = json.loads(meta["config"])
    assert config["_class_name"] == "ControlNetModel"
    assert config["conditioning_channels"] == 3
    with safe_open(str(CONTROL), "pt") as f:
        keys = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F16"}
    for prefix in ("controlnet_cond_embedding.", "down_blocks.", "controlnet_down_blocks.", "mid_block.",
                   "controlnet_mid_block."):
        assert any(k.startswith(prefix) for k in keys), prefix


def test_loads_strictly_and_matches_the_starter_unet(controlnet) -> None:
    from darkroom.models.loader import LoadOptions, load_checkpoint
    from darkroom.models.starter import STARTER_FILE

    unet = load_checkpoint(STARTER_FILE, LoadOptions()).unet
    assert controlnet.config.block_out_channels == unet.config.block_out_channels
    assert controlnet.config.cross_attention_dim == unet.config.cross_attention_dim
    # its residuals fit the starter UNet's skip connections
    z, ctx = torch.zeros(1, 4, 16, 16), torch.zeros(1, 77, unet.config.cross_attention_dim)
    cond = torch.from_numpy(control_maps.to_array(Image.new("RGB", (128, 128))))[None]
    down, mid = controlnet(z, torch.tensor([500]), encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
    out = unet.float()(z, torch.tensor([500]), encoder_hidden_states=ctx, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_outline_maps_follow_the_scene() -> None:
    scene = Scene("black", (SceneObject("square", "red", "large", "top left"),))
    picture = np.asarray(render(scene, 128, jitter_seed=3))
    drawn = np.asarray(control_maps.eval_map(scene, 3))[..., 0] > 0
    ys, xs = np.nonzero(drawn)
    assert xs.mean() < 64 and ys.mean() < 64  # the outline is in the top left, like the object
    red = np.nonzero((picture[..., 0] > 128) & (picture[..., 1] < 128))
    assert abs(xs.mean() - red[1].mean()) < 3 and abs(ys.mean() - red[0].mean()) < 3
    edges = np.asarray(control_maps.edge_map(Image.fromarray(picture)))[..., 0] > 0
    assert (edges & drawn).sum() > 0.3 * edges.sum()
    rng = random.Random(0)
    augmented = np.asarray(control_maps.outline_map(control_maps.placements(scene, rng), rng=rng))[..., 0] > 0
    assert 0 < augmented.mean() < 0.2


# Scenes whose only position signal is the map: the prompt names colour and shape alone.
STEERED = [
    (Scene("white", (SceneObject("circle", "red", "medium", "top left"),)), "a red circle"),
    (Scene("black", (SceneObject("square", "blue", "medium", "bottom right"),)), "a blue square"),
    (Scene("gray", (SceneObject("heart", "yellow", "large", "right"),)), "a yellow heart"),
]


@pytest.fixture(scope="module")
def pipe(controlnet):
    """diffusers' ControlNet pipeline over the starter's own modules, Darkroom's default sampler."""
    from diffusers import StableDiffusionControlNetPipeline

    from darkroom.engine.samplers import make_scheduler, resolve
    from darkroom.models.configs import scheduler_config
    from darkroom.models.loader import LoadOptions, load_checkpoint
    from darkroom.models.starter import STARTER_FILE
    from darkroom.text.tokenizer import load_clip_tokenizer

    model = load_checkpoint(STARTER_FILE, LoadOptions())
    pipe = StableDiffusionControlNetPipeline(
        vae=model.vae.float(), text_encoder=model.text_encoders[0].model.float(), tokenizer=load_clip_tokenizer(),
        unet=model.unet.float(), controlnet=controlnet, scheduler=make_scheduler(*resolve("DPM++ 2M"),
                                                                                 scheduler_config(False)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompts: list[str], maps: list[Image.Image]) -> list[Image.Image]:
    with torch.no_grad():
        return pipe(prompt=prompts, image=maps, num_inference_steps=20, guidance_scale=7.0, height=128, width=128,
                    generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))]).images


def test_the_map_places_the_object(pipe) -> None:
    maps = [control_maps.eval_map(scene, 0) for scene, _ in STEERED]
    images = _generate(pipe, [p for _, p in STEERED], maps)
    for image, (scene, prompt) in zip(images, STEERED, strict=True):
        (obj,) = scene.objects
        verdict = judge(image, Claims((ObjectClaim(obj.shape, obj.colour, None, obj.position),)))
        assert verdict.objects[0].position, (prompt, obj.position, verdict)


def test_colour_maps_draw_each_outline_in_its_objects_colour() -> None:
    scene = Scene("gray", (SceneObject("circle", "red", "medium", "left"),
                           SceneObject("square", "black", "medium", "right")))
    pixels = np.asarray(control_maps.eval_map(scene, 0, coloured=True)).reshape(-1, 3)
    drawn = {tuple(p) for p in pixels if p.any()}
    assert (230, 25, 35) in drawn  # the red circle's outline is red
    assert (255, 255, 255) in drawn  # a black object keeps a white outline: black would vanish on the ground
    plain = np.asarray(control_maps.eval_map(scene, 0)).reshape(-1, 3)
    assert {tuple(p) for p in plain if p.any()} == {(255, 255, 255)}


def test_filled_maps_paint_each_shape_inside_a_white_outline() -> None:
    scene = Scene("gray", (SceneObject("ring", "red", "large", "left"),
                           SceneObject("square", "black", "medium", "right")))
    filled = np.asarray(control_maps.eval_map(scene, 0, filled=True))
    plain = np.asarray(control_maps.eval_map(scene, 0))
    ring, square = control_maps.layout(scene, 0)
    # the ring's body is red, its hole and the ground stay black, the outlines are white as in a plain map
    cx, cy = (int(round(c * control_maps.SIZE)) for c in ring.centre)
    assert tuple(filled[cy, cx]) == (0, 0, 0)  # the hole
    red = (filled == (230, 25, 35)).all(-1)
    assert red.sum() > 100 and not red[plain.any(-1)].any()  # painted inside, never over the outline
    assert ((filled == 255).all(-1) == (plain == 255).all(-1)).all()
    assert tuple(filled[0, 0]) == (0, 0, 0)
    # a black object's fill is the black ground: its outline alone says "the colour the prompt names"
    sx, sy = (int(round(c * control_maps.SIZE)) for c in square.centre)
    assert tuple(filled[sy, sx]) == (0, 0, 0)
