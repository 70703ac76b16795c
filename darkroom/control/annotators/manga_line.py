"""Manga line extraction (lineart_anime_denoise, once called manga_line) from erika.pth.

The network is the "res_skip" line extractor of MangaLineExtraction (Li et al.): a residual U-Net on a
greyscale picture. Five down stages of pre-activation residual blocks (batch norm with epsilon 1e-3, leaky
ReLU 0.2, 3x3 convolution; 2, 3, 5, 7 and 12 blocks; 24 to 384 channels), each but the first halving the
size in its last block; four up stages (7, 5, 3 and 2 blocks) whose first block doubles the size (nearest)
after its convolution, each added to the down stage of the same size; two more blocks to 16 channels and a
1x1 pre-activation convolution to one channel. A block's shortcut is a 1x1 convolution (upsampled too in an
up block) where the width or size changes, else the identity. The module names below are the checkpoint's
keys. As the extension: the picture (short side at the resolution, padded to a multiple of 64) goes in as
grey 0-255 (ITU-R BT.601, as OpenCV converts it, within one grey level), and the map is 255 minus the
output: white lines on black.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

FILE, KIND = "erika.pth", "manga_line"
WIDTHS = (24, 48, 96, 192, 384)  # the down stages'; the up stages mirror them back to 24
BLOCKS_DOWN, BLOCKS_UP = (2, 3, 5, 7, 12), (7, 5, 3, 2)
HEAD_WIDTH = 16


class _PreActConv(nn.Module):
    """Batch norm, leaky ReLU, convolution (then a nearest 2x upsample in an up block's first layer)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, up: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(cin, eps=1e-3), nn.LeakyReLU(0.2),
                                   nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)]
        if up:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _Shortcut(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, up: bool):
        super().__init__()
        self.model = None
        if cin != cout or stride != 1:
            layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride)]
            if up:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.model is None else self.model(x)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, up: bool = False):
        super().__init__()
        self.conv1 = _PreActConv(cin, cout, stride=stride, up=up)
        self.residual = _PreActConv(cout, cout)
        self.shortcut = _Shortcut(cin, cout, stride, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(self.conv1(x)) + self.shortcut(x)


class _Stage(nn.Module):
    """`blocks` residual blocks to `cout` channels: `down` halves the size in the last, `up` doubles it in
    the first."""

    def __init__(self, cin: int, cout: int, blocks: int, down: bool = False, up: bool = False):
        super().__init__()
        self.model = nn.Sequential(*[
            _Block(cin if i == 0 else cout, cout, stride=2 if down and i == blocks - 1 else 1, up=up and i == 0)
            for i in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class MangaLineNet(nn.Module):
    """Keys as in erika.pth: block0-4 (down), block5-8 (up), block9, conv15. The widths are read from the
    file (the tests' tiny one is narrower); the block counts are the released network's."""

    def __init__(self, widths: Sequence[int] = WIDTHS, head: int = HEAD_WIDTH):
        super().__init__()
        cin = 1
        for i, (width, blocks) in enumerate(zip(widths, BLOCKS_DOWN, strict=True)):
            setattr(self, f"block{i}", _Stage(cin, width, blocks, down=i > 0))
            cin = width
        for i, blocks in enumerate(BLOCKS_UP):
            width = widths[len(widths) - 2 - i]
            setattr(self, f"block{len(widths) + i}", _Stage(cin, width, blocks, up=True))
            cin = width
        self.block9 = _Stage(cin, head, 2)
        self.conv15 = _PreActConv(head, 1, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(len(BLOCKS_DOWN)):
            x = getattr(self, f"block{i}")(x)
            skips.append(x)
        skips.pop()  # the deepest stage feeds the first up stage directly
        for i in range(len(BLOCKS_DOWN), len(BLOCKS_DOWN) + len(BLOCKS_UP)):
            x = getattr(self, f"block{i}")(x) + skips.pop()
        return self.conv15(self.block9(x))


def load(path: Path) -> MangaLineNet:
    state = files.read_state_dict(path)
    try:
        widths = [int(state[f"block{i}.model.0.conv1.model.2.weight"].shape[0]) for i in range(len(WIDTHS))]
        head = int(state["block9.model.0.conv1.model.2.weight"].shape[0])
    except (KeyError, AttributeError, IndexError):
        widths = None
    if widths is None or "conv15.model.2.weight" not in state:
        raise ModelLoadError(f"{path.name}: not a manga line weight file (no res_skip stages and `conv15`"
                             " output layer)")
    return files.load_strict(MangaLineNet(widths, head), state, path, "manga line (erika.pth)")


def lines(net: MangaLineNet, img: np.ndarray) -> np.ndarray:
    """uint8 white-on-black lines of a uint8 RGB picture whose sides are multiples of 16."""
    grey = np.asarray(Image.fromarray(img).convert("L"), dtype=np.float32)
    device = net.conv15.model[2].weight.device
    with torch.no_grad():
        out = net(torch.from_numpy(grey).to(device)[None, None])[0, 0].float().cpu().numpy()
    return (255.0 - out).clip(0, 255).astype(np.uint8)


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """The lineart_anime_denoise map at the unit's resolution."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return lines(net, padded)[:h, :w]
