"""LeReS depth (depth_leres) from res101.pth: AdelaiDepth's relative-depth network, as the extension runs it.

The network is a ResNeXt-101 (32 groups x 8 channels) encoder, whose four stages (1/4 to 1/32 of the input,
256 to 2048 channels) feed a decoder of "feature transfer blocks" (a 3x3 convolution, plus a residual branch
of ReLU, 3x3 convolution, batch norm, ReLU, 3x3 convolution, then ReLU): the deepest stage to 512 channels,
a 3x3 convolution to 256 and a 2x upsample (bilinear, corners aligned); each shallower stage through its own
block, added, through a second block and upsampled; then a 3x3 convolution with batch norm and ReLU to 128
channels, a 3x3 convolution to one and a last 2x upsample to the input size. The module names below are the
checkpoint's keys (`depth_model.encoder_modules.encoder.` and `depth_model.decoder_modules.`). In a block,
the skip joins the branch after a ReLU: the original's in-place ReLU at the head of the branch rewrites it.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) goes in as BGR,
normalised with ImageNet's mean and deviation but without first dividing by 255 (torchvision's ToTensor
leaves a float array's 0-255 values as they are: the extension converts to float first). The depth is
stretched to 16 bits and brought to 8 (rounded), Remove Near % zeroes the levels at or under that share
of 255, the map is inverted (near white), and Remove Background % zeroes what is then at or under its share.
leres++ (the extension's multi-resolution "boost" merge with a pix2pix network) is not built.
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

FILE, KIND = "res101.pth", "leres"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
RESNEXT101 = (3, 4, 23, 3)  # bottlenecks per stage
GROUPS, GROUP_WIDTH = 32, 8
PREFIX = "depth_model."


class _Bottleneck(nn.Module):
    def __init__(self, cin: int, planes: int, stride: int, groups: int, group_width: int):
        super().__init__()
        width = planes * group_width // 64 * groups
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride != 1 or cin != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNeXt(nn.Module):
    """torchvision's ResNeXt without its classifier, giving the four stages' features."""

    def __init__(self, blocks: Sequence[int] = RESNEXT101, groups: int = GROUPS, group_width: int = GROUP_WIDTH,
                 stem: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, count in enumerate(blocks):
            planes = stem * 2 ** i
            layer = []
            for k in range(count):
                layer.append(_Bottleneck(cin, planes, 2 if k == 0 and i > 0 else 1, groups, group_width))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        features = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            features.append(x)
        return features


class _FTB(nn.Module):
    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1)
        self.conv_branch = nn.Sequential(nn.ReLU(), nn.Conv2d(mid, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.ReLU(),
                                         nn.Conv2d(mid, mid, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the branch's first ReLU works in place in the original, so the skip it is added to is ReLU'd too
        x = F.relu(self.conv1(x))
        return F.relu(x + self.conv_branch(x))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class _FFM(nn.Module):
    def __init__(self, cin: int, mid: int):
        super().__init__()
        self.ftb1 = _FTB(cin, mid)
        self.ftb2 = _FTB(mid, mid)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return _up(self.ftb2(self.ftb1(low) + high))


class _Decoder(nn.Module):
    def __init__(self, widths: Sequence[int], mid: int = 256, top: int = 512):
        super().__init__()
        self.conv = _FTB(widths[3], top)
        self.conv1 = nn.Conv2d(top, mid, 3, padding=1)
        self.ffm2, self.ffm1, self.ffm0 = _FFM(widths[2], mid), _FFM(widths[1], mid), _FFM(widths[0], mid)
        self.outconv = nn.Module()
        self.outconv.adapt_conv = nn.Sequential(nn.Conv2d(mid, mid // 2, 3, padding=1), nn.BatchNorm2d(mid // 2),
                                                nn.ReLU(), nn.Conv2d(mid // 2, 1, 3, padding=1))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = _up(self.conv1(self.conv(features[3])))
        x = self.ffm0(features[0], self.ffm1(features[1], self.ffm2(features[2], x)))
        return _up(self.outconv.adapt_conv(x))


class LeReS(nn.Module):
    """Keys as in res101.pth's `depth_model` (with its `depth_model.` prefix)."""

    def __init__(self, blocks: Sequence[int] = RESNEXT101, groups: int = GROUPS, group_width: int = GROUP_WIDTH,
                 stem: int = 64, mid: int = 256):
        super().__init__()
        self.encoder_modules = nn.Module()
        self.encoder_modules.encoder = ResNeXt(blocks, groups, group_width, stem)
        widths = [stem * 2 ** i * 4 for i in range(4)]
        self.decoder_modules = _Decoder(widths, mid, mid * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder_modules(self.encoder_modules.encoder(x))


def load(path: Path) -> LeReS:
    state = {k.removeprefix(PREFIX): v for k, v in files.read_state_dict(path, nested="depth_model").items()}
    enc = "encoder_modules.encoder."
    try:
        stem = int(state[enc + "conv1.weight"].shape[0])
        blocks = [1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"{enc}layer{i}."))
                  for i in range(1, 5)]
        width = int(state[enc + "layer1.0.conv1.weight"].shape[0])  # the first stage's grouped width
        groups = width // int(state[enc + "layer1.0.conv2.weight"].shape[1])
        group_width = width // groups * 64 // stem
        mid = int(state["decoder_modules.conv1.weight"].shape[0])
    except (KeyError, AttributeError, IndexError, ValueError, ZeroDivisionError):
        raise ModelLoadError(f"{path.name}: not a LeReS weight file (no ResNeXt `encoder_modules` and"
                             " `decoder_modules`)") from None
    net = LeReS(blocks, groups, group_width, stem, mid)
    return files.load_strict(net, state, path, "LeReS (res101.pth)")


def depth(net: LeReS, img: np.ndarray) -> np.ndarray:
    """Relative depth of a uint8 RGB picture whose sides are multiples of 32, at its size (float32)."""
    x = (img[:, :, ::-1].astype(np.float32) - MEAN) / STD  # BGR, 0-255 "normalised": the extension's input
    device = next(net.parameters()).device
    with torch.no_grad():
        out = net(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(device))
    return out[0, 0].float().cpu().numpy()


def depth_map(d: np.ndarray, remove_near: float, remove_background: float) -> np.ndarray:
    """The extension's 8-bit map of a depth: stretched to 16 bits and back to 8, near levels removed, inverted,
    background levels removed (both thresholds in % of 255; 0: off)."""
    lo, hi = float(d.min()), float(d.max())
    sixteen = (65535.0 * (d - lo) / (hi - lo)).astype(np.uint16) if hi - lo > np.finfo(float).eps else \
        np.zeros(d.shape, np.uint16)
    out = np.rint(sixteen.astype(np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
    if remove_near != 0:
        out = np.where(out > remove_near / 100 * 255, out, 0).astype(np.uint8)
    out = 255 - out
    if remove_background != 0:
        out = np.where(out > remove_background / 100 * 255, out, 0).astype(np.uint8)
    return out


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], remove_near: float = 0.0,
           remove_background: float = 0.0, device: str | None = None) -> np.ndarray:
    """The depth_leres map at the unit's resolution."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return depth_map(depth(net, padded), remove_near, remove_background)[:h, :w]
