"""The trained starter model: loads through the ordinary loader and obeys simple prompts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from darkroom.models.starter import STARTER_FILE
from darkroom.request import GenerationRequest

pytestmark = pytest.mark.skipif(not STARTER_FILE.exists(), reason="the starter model has not been trained yet")


@pytest.fixture(scope="module")
def starter_engine(tmp_path_factory):
    from darkroom.api import build_engine
    from darkroom.home import Home

    return build_engine(Home(tmp_path_factory.mktemp("starter-home")).ensure())


def generate(engine, prompt: str, seed: int = 1, **kw) -> Image.Image:
    req = GenerationRequest(prompt=prompt, seed=seed, steps=kw.pop("steps", 20), **kw)
    return Image.open(io.BytesIO(engine.generate(req).images[0].png)).convert("RGB")


def test_is_the_default_and_loads_through_the_ordinary_loader(starter_engine):
    from darkroom.models.header import read_header

    assert starter_engine.model_path(GenerationRequest()) == STARTER_FILE
    model = starter_engine.cache.get(STARTER_FILE)
    assert model.family.id == "sd1" and model.native_size == 128
    assert read_header(STARTER_FILE).metadata["darkroom_model"] == "darkroom-starter"
    assert STARTER_FILE.stat().st_size < 40 * 1024 * 1024


@pytest.mark.parametrize("prompt", [
    "a red circle on a white background",
    "a blue square in the top left corner",
    "a large yellow star on a black background",
    "a green triangle at the bottom",
])
def test_prompts_pass_the_judge(starter_engine, prompt):
    from darkroom.starter_training.judge import judge

    passed = [judge(generate(starter_engine, prompt, seed=s), prompt).passed for s in (1, 2, 3)]
    assert sum(passed) >= 2, f"{prompt!r}: judge passed {passed}"


@pytest.mark.parametrize("prompt", [
    "a blue circle below an orange square on a white background",
    "a red circle above a blue square on a white background",
    "a green square to the left of a pink circle",
])
def test_relations_put_each_object_on_its_side(starter_engine, prompt):
    """Both colours found and the relation the right way round (not swapped); shape is checked above."""
    from darkroom.starter_training.judge import judge

    verdicts = [judge(generate(starter_engine, prompt, seed=s), prompt) for s in (1, 2, 3)]
    right = [all(o.colour for o in v.objects) and bool(v.relation) for v in verdicts]
    assert sum(right) >= 2, f"{prompt!r}: colours and relation right {right}"


def test_red_circle_is_red_and_round(starter_engine):
    arr = np.asarray(generate(starter_engine, "a red circle on a white background", seed=4)).astype(int)
    red = (arr[..., 0] > 170) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    assert red.mean() > 0.02, "no red pixels"
    ys, xs = np.nonzero(red)
    h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
    assert 0.7 < h / w < 1.4 and red.sum() / (h * w) > 0.6, "red pixels are not a round blob"


def test_vae_gives_back_drawn_scenes_the_judge_can_read(starter_engine):
    """Every picture passes through the decoder, so its losses cap what any prompt can score.

    Drawn eval scenes, encoded and decoded by the shipped VAE, must keep their objects' colour and shape.
    """
    from darkroom.starter_training.judge import vae_round_trip
    from darkroom.starter_training.scenes import eval_set

    score = vae_round_trip(starter_engine.cache.get(STARTER_FILE).vae, eval_set()[:50])
    assert score["colour"] >= 0.95 and score["shape"] >= 0.85, score


def test_same_seed_same_image_and_cfg_matters(starter_engine):
    a = generate(starter_engine, "a pink ring on a gray background", seed=7)
    b = generate(starter_engine, "a pink ring on a gray background", seed=7)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c = generate(starter_engine, "a pink ring on a gray background", seed=7, cfg_scale=1.0)
    assert np.abs(np.asarray(a).astype(int) - np.asarray(c).astype(int)).mean() > 2.0


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_img2img_recolours_the_circle(starter_engine):
    """img2img of a red circle with "a blue circle" at strength 0.6: the judge sees a blue circle, no red one."""
    from darkroom.starter_training.judge import judge
    from darkroom.starter_training.scenes import Scene, SceneObject, render

    source = _png(render(Scene("white", (SceneObject("circle", "red", "large", "centre"),)), 128))
    blue = red = 0
    for seed in range(4):
        image = generate(starter_engine, "a blue circle on a white background", seed=seed, init_image=source,
                         denoising_strength=0.6)
        blue += judge(image, "a blue circle").objects[0].colour
        red += judge(image, "a red circle").objects[0].colour
    assert blue >= 3 and red <= 1, (blue, red)


@pytest.mark.slow
def test_inpainting_a_corner_adds_the_shape_there_only(starter_engine):
    from darkroom.starter_training.judge import judge
    from darkroom.starter_training.scenes import Scene, SceneObject, render

    source = render(Scene("white", (SceneObject("circle", "red", "small", "bottom right"),)), 128)
    mask = Image.new("L", (128, 128), 0)
    mask.paste(255, (0, 0, 64, 64))
    found = 0
    for seed in range(4):
        image = generate(starter_engine, "a yellow square in the top left corner on a white background", seed=seed,
                         init_image=_png(source), mask=_png(mask), mask_blur=0, denoising_strength=1.0)
        out, src = np.asarray(image).astype(int), np.asarray(source).astype(int)
        assert np.array_equal(out[64:], src[64:]) and np.array_equal(out[:64, 64:], src[:64, 64:])
        verdict = judge(image, "a yellow square")
        obj = verdict.objects[0]
        if obj.colour and obj.centroid[0] < 0.5 and obj.centroid[1] < 0.5:
            found += 1
    assert found >= 3, found
