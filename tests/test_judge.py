"""Starter judge: near-perfect on ground-truth renders, fails what is wrong, never crashes on junk."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFilter

from darkroom.starter_training import judge as J
from darkroom.starter_training.judge import judge, summarise
from darkroom.starter_training.scenes import SHAPES, Claims, ObjectClaim, Scene, SceneObject, eval_set, render


@pytest.fixture(scope="module")
def ground_truth() -> list[tuple]:
    ev = eval_set()
    return [(e, render(e.scene, jitter_seed=i)) for i, e in enumerate(ev)]


def test_ground_truth_scores_near_perfect(ground_truth) -> None:
    stats = summarise([judge(image, e) for e, image in ground_truth])
    for key in ("colour", "position", "shape", "size", "relation", "background"):
        assert stats[key] >= 0.98, stats
    assert stats["all"] >= 0.95 and stats["n"] == len(ground_truth)


def test_mild_degradation_still_judged_right(ground_truth) -> None:
    verdicts = []
    for i, (e, image) in enumerate(ground_truth[:60]):
        if i % 2:
            image = image.filter(ImageFilter.GaussianBlur(1.5))
        else:
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=40)
            image = Image.open(buf)
        verdicts.append(judge(image, e))
    stats = summarise(verdicts)
    for key in ("colour", "position", "shape"):
        assert stats[key] >= 0.9, stats


def _one(shape: str = "circle", colour: str = "red", position: str = "top left", size: str = "medium",
         background: str = "white") -> Scene:
    return Scene(background, (SceneObject(shape, colour, size, position),))


def test_wrong_scene_fails_that_attribute() -> None:
    claims = Claims((ObjectClaim("circle", "red", "medium", "top left"),), "white")
    v = judge(render(_one()), claims)
    assert v.passed and v.objects[0].predicted_shape == "circle"
    v = judge(render(_one(colour="blue")), claims)
    assert not v.objects[0].colour and not v.objects[0].shape and not v.passed
    v = judge(render(_one(position="bottom right")), claims).objects[0]
    assert v.colour and v.shape and v.position is False
    v = judge(render(_one(size="large")), claims).objects[0]
    assert v.colour and v.position and v.size is False
    assert judge(render(_one(background="yellow")), claims).background is False
    for drawn in SHAPES:
        for claimed in SHAPES:
            v = judge(render(_one(shape=drawn), jitter_seed=7), Claims((ObjectClaim(claimed, "red"),))).objects[0]
            assert v.colour and v.shape == (drawn == claimed), (drawn, claimed)


def test_wrong_relation_fails() -> None:
    objects = (SceneObject("star", "green", "small", "top"), SceneObject("ring", "blue", "large", "bottom"))
    scene = Scene("white", objects, "above")
    image = render(scene, jitter_seed=2)
    assert judge(image, "a green star above a blue ring").passed
    assert judge(image, "a blue ring below a green star").passed
    for wrong in ("below", "left of", "right of"):
        v = judge(image, f"a green star {wrong} a blue ring")
        assert v.relation is False and all(o.colour and o.shape for o in v.objects)


def test_junk_images_fail_without_crashing() -> None:
    claims = Claims((ObjectClaim("star", "red", "small", "left"), ObjectClaim("ring", "gray")), "black", "above")
    rng = np.random.default_rng(0)
    junk = [
        Image.new("RGB", (128, 128), (255, 255, 255)),
        Image.new("RGB", (64, 64), (130, 130, 130)),  # the object's colour everywhere is not an object
        rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
        rng.random((3, 96, 96), dtype=np.float32),  # CHW float in 0..1
        np.zeros((128, 128), dtype=np.uint8),
    ]
    for image in junk:
        v = judge(image, claims)
        for o, claim in zip(v.objects, claims.objects, strict=True):
            assert (o.colour, o.shape, o.position, o.size) == (False, False, claim.position and False,
                                                               claim.size and False)
        assert v.relation is False and not v.passed
    assert judge(junk[0], claims).background is False


def test_any_image_size_and_array_input() -> None:
    scene = _one(shape="triangle", colour="green", position="bottom", background="purple")
    text = "a medium green triangle at the bottom on a purple background"
    for image in (render(scene, size=256), render(scene, size=64), np.asarray(render(scene)),
                  np.asarray(render(scene)).transpose(2, 0, 1).astype(np.float32) / 255,
                  np.asarray(render(scene)).astype(np.float32) / 127.5 - 1):
        assert judge(image, text).passed


def test_components_match_flood_fill() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        mask = rng.random((20, 23)) < 0.45
        labels, n = J.components(mask)
        seen = np.zeros_like(mask)
        count = 0
        for y, x in zip(*np.nonzero(mask), strict=True):
            if seen[y, x]:
                continue
            count += 1
            stack, comp = [(y, x)], []
            seen[y, x] = True
            while stack:
                cy, cx = stack.pop()
                comp.append((cy, cx))
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < 20 and 0 <= nx < 23 and mask[ny, nx] and not seen[ny, nx]:
                            seen[ny, nx] = True
                            stack.append((ny, nx))
            assert len({labels[p] for p in comp}) == 1 and (labels == labels[comp[0]]).sum() == len(comp)
        assert n == count


def test_summarise_counts_only_asserted_checks() -> None:
    ok = J.ObjectVerdict(colour=True, shape=False, position=None, size=True)
    bad = J.ObjectVerdict(colour=False, shape=False, position=False, size=None)
    stats = summarise([J.Verdict((ok,), background=True), J.Verdict((ok, bad), relation=True)])
    assert stats["colour"] == pytest.approx(2 / 3) and stats["shape"] == 0
    assert stats["position"] == pytest.approx(1 / 2)  # the failed position and the passed relation
    assert stats["placement"] == 0 and stats["relation"] == 1  # ... and each alone
    assert stats["size"] == 1 and stats["background"] == 1 and stats["all"] == 0 and stats["n"] == 2
    assert summarise([])["colour"] is None
