"""Tiny annotator weight files in the real key layouts (tests only).

- ControlNetHED.pth: the HED network with narrow widths (4-8 channels instead of 64-512). With
  `brightness=True` its first side output is set to answer to brightness (white pixels give edge
  values near 1, black near 0) and the other four to nothing, so a test can tell where the map lands.
- sk_model.pth / sk_model2.pth: the line art ResNet generator at 4 channels; netG.pth: the U-Net at 2.
  `constant` sets the last layer to a fixed output (1: all line, 0: none) to check the inversion.
The real files are fp16 (HED) or fp32 (line art); `dtype` chooses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from darkroom.control.annotators.hed import HED
from darkroom.control.annotators.lineart import AnimeUnet, SketchGenerator


def hed_state(*, widths=(4, 4, 8, 8, 8), seed: int = 0, brightness: bool = False) -> dict:
    torch.manual_seed(seed)
    net = HED(widths)
    if brightness:
        with torch.no_grad():
            for i in range(1, 6):
                block = getattr(net, f"block{i}")
                block.projection.weight.zero_()
                block.projection.bias.zero_()
            net.norm.zero_()
            first, second = net.block1.convs
            first.weight.zero_()
            first.bias.zero_()
            first.weight[0, :, 1, 1] = 1.0 / (3 * 255.0)  # channel 0: mean brightness in [0, 1]
            second.weight.zero_()
            second.bias.zero_()
            second.weight[0, 0, 1, 1] = 1.0
            net.block1.projection.weight[0, 0] = 100.0  # mean over five outputs: (100 b - 50) / 5 = +-10
            net.block1.projection.bias.fill_(-50.0)
    return net.state_dict()


def sketch_state(*, width: int = 4, blocks: int = 3, seed: int = 0, constant: float | None = None) -> dict:
    torch.manual_seed(seed)
    net = SketchGenerator(width, blocks)
    if constant is not None:
        with torch.no_grad():
            net.model4[1].weight.zero_()
            net.model4[1].bias.fill_(20.0 if constant > 0.5 else -20.0)
    return net.state_dict()


def anime_state(*, width: int = 2, levels: int = 8, seed: int = 0, constant: float | None = None) -> dict:
    torch.manual_seed(seed)
    net = AnimeUnet(width, levels)
    if constant is not None:
        with torch.no_grad():
            up = net.model.model[3]
            up.weight.zero_()
            up.bias.fill_(20.0 if constant > 0.5 else -20.0)
    return net.state_dict()


def save(state: dict, path: Path, *, dtype: torch.dtype = torch.float32, prefix: str = "") -> Path:
    """Write `state` as a .pth (optionally cast, optionally with the DataParallel `module.` prefix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + k: v.to(dtype) for k, v in state.items()}, path)
    return path
