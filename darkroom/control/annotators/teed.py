"""TEED soft edges (softedge_teed) from 7_model.pth: Soria et al.'s Tiny and Efficient Edge Detector.

A 58 K-weight network, so it runs in a fraction of a second on a CPU. Three stages (two 3x3 convolutions
at half size; two more at half size; one dense layer at a quarter size, fed by a max-pool and a strided
1x1 skip) each give one edge map through a 1x1 convolution and transposed-convolution upsampling; a
depthwise "double fusion" of the three makes the fourth. Every activation is smish,
x * tanh(ln(1 + sigmoid(x))). As the extension: the picture (short side at the resolution, padded to a
multiple of 64) goes in as RGB 0-255 with no normalisation; the four maps are averaged and put through a
sigmoid, quantised by the Safe Steps slider (0: not at all), and cropped back. The module names below are
the checkpoint's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

FILE, KIND = "7_model.pth", "TEED"


def smish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tanh(torch.log1p(torch.sigmoid(x)))


class _Smish(nn.Module):
    """Holds smish's place in a Sequential, so the convolutions keep the checkpoint's indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return smish(x)


class _TwoConvs(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act_after: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.act_after = act_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(smish(self.conv1(x)))
        return smish(h) if self.act_after else h


class _Pointwise(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _DenseLayer(nn.Module):
    """A padded then an unpadded 3x3 convolution of the main path, averaged with the skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=2)
        self.conv2 = nn.Conv2d(cout, cout, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.conv2(smish(self.conv1(smish(x)))) + skip)


class _DenseBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.denselayer1 = _DenseLayer(cin, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.denselayer1(x, skip)


class _Upsample(nn.Module):
    """`doublings` rounds of (1x1 convolution, smish, stride-2 transposed convolution), to 16 channels and
    1 at the last; the kernel is 2 for one doubling and 4 (padding 1) for two."""

    def __init__(self, cin: int, doublings: int):
        super().__init__()
        kernel, pad = (2, 0) if doublings == 1 else (4, 1)
        layers: list[nn.Module] = []
        for i in range(doublings):
            cout = 1 if i == doublings - 1 else 16
            layers += [nn.Conv2d(cin, cout, 1), _Smish(), nn.ConvTranspose2d(cout, cout, kernel, stride=2, padding=pad)]
            cin = cout
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class _DoubleFusion(nn.Module):
    """Two depthwise 3x3 convolutions (3 -> 24 -> 24 channels) whose outputs are summed over channels."""

    def __init__(self):
        super().__init__()
        self.DWconv1 = nn.Conv2d(3, 24, 3, padding=1, groups=3)
        self.DWconv2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.DWconv1(smish(x))
        second = self.DWconv2(smish(first))
        return smish((first + second).sum(1, keepdim=True))


class TEED(nn.Module):
    def __init__(self):
        super().__init__()
        self.block_1 = _TwoConvs(3, 16, stride=2, act_after=True)
        self.block_2 = _TwoConvs(16, 32, stride=1, act_after=False)
        self.dblock_3 = _DenseBlock(32, 48)
        self.side_1 = _Pointwise(16, 32, stride=2)
        self.pre_dense_3 = _Pointwise(32, 48, stride=1)
        self.up_block_1 = _Upsample(16, 1)
        self.up_block_2 = _Upsample(32, 1)
        self.up_block_3 = _Upsample(48, 2)
        self.block_cat = _DoubleFusion()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        half = self.block_1(x)
        second = self.block_2(half)
        quarter = F.max_pool2d(second, 3, stride=2, padding=1)
        third = self.dblock_3(quarter + self.side_1(half), self.pre_dense_3(quarter))
        maps = [self.up_block_1(half), self.up_block_2(second), self.up_block_3(third)]
        return [*maps, self.block_cat(torch.cat(maps, dim=1))]


def load(path: Path) -> TEED:
    state = files.read_state_dict(path)
    if not any(k.startswith("block_cat.") for k in state):
        raise ModelLoadError(f"{path.name}: not a TEED weight file (no `block_cat` fusion layer)")
    return files.load_strict(TEED(), state, path, "TEED")


def edges(net: TEED, img: np.ndarray) -> np.ndarray:
    """Soft edges in [0, 1] (float64 HxW) of a uint8 HxWx3 picture whose sides are multiples of 4."""
    h, w = img.shape[:2]
    device = net.block_1.conv1.weight.device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float().permute(2, 0, 1)[None]
        maps = [F.interpolate(m.float(), size=(h, w), mode="bilinear", align_corners=False) for m in net(x)]
        mean = torch.cat(maps, dim=1).mean(dim=1)[0].double()
    return torch.sigmoid(mean).cpu().numpy()


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], safe_steps: int = 2,
           device: str | None = None) -> np.ndarray:
    """The softedge_teed map: uint8 soft edges at the unit's resolution."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    edge = edges(net, padded)
    if safe_steps > 0:
        edge = imageops.safe_step(edge, safe_steps)
    return (edge * 255.0).clip(0, 255).astype(np.uint8)[:h, :w]


ANYLINE_FILE = "MTEED.pth"  # TheMistoAI's TEED retrained for MistoLine (Anyline), the same network
FAINT_MIN_PIXELS = 12


def detect_anyline(img: np.ndarray, res: int, dirs: Sequence[Path], safe_steps: int = 2,
                   device: str | None = None) -> np.ndarray:
    """The softedge_anyline map as the extension makes it: MTEED's soft edges (as softedge_teed's), with the
    pixels where lineart_standard's map is exactly 1 (the extension's 0-1 intensity window, applied to 8-bit
    values) in 4-connected groups of at least 12 (its remove_small_objects on the three equal channels: 36)
    set to 1. What Anyline meant as a blend of fine lines comes out, there and here, almost as MTEED's map."""
    from scipy import ndimage

    from darkroom.control.annotators.simple import lineart_standard

    net = load(files.find(ANYLINE_FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    edge = edges(net, padded)
    if safe_steps > 0:
        edge = imageops.safe_step(edge, safe_steps)
    base = (edge * 255.0).clip(0, 255).astype(np.uint8)
    faint = lineart_standard(padded, min(padded.shape[:2])) == 1
    labels, count = ndimage.label(faint)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = (sizes >= FAINT_MIN_PIXELS)[labels] & faint
    return np.where(keep, 1, base).astype(np.uint8)[:h, :w]
