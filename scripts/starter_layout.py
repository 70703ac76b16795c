"""Training-only layout loss for the starter model (`train_starter.py --layout-aux`).

At the noisiest timesteps the picture's share of the noisy input is ~7% (t=999), so the layout must come
from the caption, and in a relation the model swaps its two objects as often as not. This loss asks the
question directly: a linear head reads, from the UNet's mid-block features (4x4, after cross-attention),
which colours each cell of the picture holds, scored against the scene's true colour map. It is a probe on
the features, not on the predicted picture: scoring the predicted picture (at t=999 the blurred mean of
what could be there) with a colour classifier fights the eps loss, whose best answer is that blur, and
its gradient, amplified 15x through x0 = (x_t - sqrt(1 - a) eps) / sqrt(a), swamps the eps loss's.
"""

import random

import numpy as np
import torch
import torch.nn.functional as F

from darkroom.starter_training import scenes

SUPER = 4  # label maps are drawn at 4x the latent size and counted per latent pixel


def pool_jitter_seeds(pool_size: int, seed: int) -> tuple[list, list[int]]:
    """Replay the pool's scene draw (see train_starter.encode_pool) to recover each scene's jitter seed."""
    rng = random.Random(seed)
    all_scenes, seeds = [], []
    for start in range(0, pool_size, 64):
        batch = [scenes.sample_example(rng, split="train").scene for _ in range(min(64, pool_size - start))]
        seeds.extend(rng.randrange(1 << 30) for _ in batch)
        all_scenes.extend(batch)
    return all_scenes, seeds


def colour_map(scene: scenes.Scene, size: int, jitter_seed: int) -> np.ndarray:
    """Palette index per latent pixel: an object's colour where it covers at least half the pixel, else
    the background's."""
    big = size * SUPER
    labels = np.full((size, size), scenes.COLOURS.index(scene.background), dtype=np.uint8)
    for obj, placement in zip(scene.objects, scenes.layout(scene, jitter_seed), strict=True):
        mask = scenes.object_mask(placement, big)
        cover = np.asarray(mask, dtype=np.float32).reshape(size, SUPER, size, SUPER).mean(axis=(1, 3)) / 255
        labels[cover >= 0.5] = scenes.COLOURS.index(obj.colour)
    return labels


def pool_colour_maps(pool: dict, size: int, seed: int) -> torch.Tensor:
    """(N, size, size) uint8 colour maps for the pool's scenes, in the pool's order."""
    replayed, seeds = pool_jitter_seeds(len(pool["scenes"]), seed)
    if replayed != pool["scenes"]:
        raise RuntimeError("the latent pool was not drawn with this seed; delete latents.pt or use another --work")
    return torch.from_numpy(np.stack([colour_map(s, size, j) for s, j in zip(replayed, seeds, strict=True)]))


class FeatureHead(torch.nn.Module):
    """Colour mix per cell, read linearly off the UNet's mid-block features (a training-only probe)."""

    def __init__(self, channels: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(channels, len(scenes.COLOURS), 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features.float())


def cell_targets(labels: torch.Tensor, cells: int) -> torch.Tensor:
    """(N, colours, cells, cells): the share of each colour in each cell of the latent colour maps."""
    n, size, _ = labels.shape
    k = size // cells
    onehot = F.one_hot(labels.long(), len(scenes.COLOURS)).float()  # N, size, size, C
    return onehot.view(n, cells, k, cells, k, -1).mean(dim=(2, 4)).permute(0, 3, 1, 2)


def layout_loss(logits: torch.Tensor, target: torch.Tensor, backgrounds: torch.Tensor,
                object_weight: float) -> torch.Tensor:
    """Soft cross-entropy per cell. Cells are weighted up by how much object they hold: the few object
    cells decide the judge's verdict, and a swapped relation shows only there."""
    ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    index = backgrounds.view(-1, 1, 1, 1).expand(-1, 1, *target.shape[2:])
    weights = 1 + (object_weight - 1) * (1 - target.gather(1, index)[:, 0])
    return (ce * weights).sum() / weights.sum()
