"""The starter model's training-only layout loss: its colour maps must tell the truth about the scene,
and its pool replay must refuse a pool drawn another way (a wrong map would teach wrong layouts)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from darkroom.starter_training import scenes
from darkroom.starter_training.scenes import COLOURS, Scene, SceneObject

_SPEC = importlib.util.spec_from_file_location(
    "starter_layout", Path(__file__).resolve().parent.parent / "scripts" / "starter_layout.py")
starter_layout = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(starter_layout)


def test_colour_map_puts_each_object_where_the_scene_draws_it():
    scene = Scene("white", (SceneObject("square", "red", "large", "top left"),
                            SceneObject("circle", "blue", "large", "bottom left")), "above")
    labels = starter_layout.colour_map(scene, 16, jitter_seed=5)
    red, blue, white = (COLOURS.index(c) for c in ("red", "blue", "white"))
    assert labels[3, 3] == red and labels[12, 3] == blue
    assert labels[3, 12] == white and labels[12, 12] == white
    # the map agrees with the rendered picture, pixel block by pixel block
    picture = np.asarray(scenes.render(scene, 128, jitter_seed=5), dtype=np.int32).reshape(16, 8, 16, 8, 3)
    palette = np.array([scenes.PALETTE[c] for c in COLOURS])
    centre = picture[:, 4, :, 4]  # the middle pixel of each 8x8 block
    nearest = np.abs(centre[:, :, None, :] - palette[None, None]).sum(-1).argmin(-1)
    assert (nearest == labels).mean() > 0.95


def test_pool_replay_recovers_the_scenes_and_refuses_another_pool():
    scenes_, seeds = starter_layout.pool_jitter_seeds(130, seed=11)
    again, seeds_again = starter_layout.pool_jitter_seeds(130, seed=11)
    assert scenes_ == again and seeds == seeds_again and len(set(seeds)) == 130
    maps = starter_layout.pool_colour_maps({"scenes": scenes_}, 16, seed=11)
    assert maps.shape == (130, 16, 16) and maps.dtype == torch.uint8
    with pytest.raises(RuntimeError, match="latents.pt"):
        starter_layout.pool_colour_maps({"scenes": scenes_}, 16, seed=12)


def test_layout_loss_tells_a_swapped_relation_from_the_right_one():
    scene = Scene("white", (SceneObject("square", "red", "large", "top"),
                            SceneObject("circle", "blue", "large", "bottom")), "above")
    labels = torch.from_numpy(starter_layout.colour_map(scene, 16, jitter_seed=3))[None]
    target = starter_layout.cell_targets(labels, 4)
    assert target.shape == (1, len(COLOURS), 4, 4)
    assert torch.allclose(target.sum(dim=1), torch.ones(1, 4, 4))
    red, blue, white = (COLOURS.index(c) for c in ("red", "blue", "white"))
    assert target[0, red, :2].sum() > 2 * target[0, red, 2:].sum()  # red in the top half, blue below
    assert target[0, blue, 2:].sum() > 2 * target[0, blue, :2].sum()
    swapped = target.clone()
    swapped[:, [red, blue]] = target[:, [blue, red]]
    background = torch.tensor([white])

    def loss(read: torch.Tensor) -> float:
        return starter_layout.layout_loss(torch.log(read + 1e-4), target, background, 5.0).item()

    assert loss(target) < loss(0.5 * (target + swapped)) < loss(swapped)


def test_feature_head_reads_every_cell_and_passes_gradients_back():
    head = starter_layout.FeatureHead(8)
    features = torch.randn(2, 8, 4, 4, requires_grad=True)
    labels = torch.from_numpy(np.stack([starter_layout.colour_map(
        scenes.sample_scene(random.Random(k)), 16, k) for k in range(2)]))
    loss = starter_layout.layout_loss(head(features), starter_layout.cell_targets(labels, 4),
                                      torch.tensor([0, 1]), 5.0)
    loss.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    assert head.proj.weight.grad is not None
