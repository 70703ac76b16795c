"""M-LSD straight lines (the extension's `mlsd`) from mlsd_large_512_fp32.pth (MobileV2_MLSD_Large).

The network (Gu et al., "Towards light-weight and real-time line segment detection") is a MobileNetV2 cut
after its 96-channel stage (thirteen inverted residuals behind a stride-2 stem, ReLU6, TFLite-style
padding: a stride-2 convolution pads only right and bottom) and a small U-shaped decoder: four "A" blocks
that merge a 1x1-projected skip with the upsampled deeper map, each followed by a "B" block (two 3x3
convolutions, the first residual), and a "C" head (a dilated 3x3, a 3x3, a 1x1 to 16 channels, of which
the last 9 are kept). At half the input size, channel 0 scores line centres and channels 1-4 give the
offsets from the centre to the segment's two ends.

Input: RGB plus a constant fourth plane, all four scaled by x/127.5 - 1 (so the extra plane is -0.992, as
the extension feeds it). Decoding as the extension: centres that are the maximum of their 3x3 and in the
200 best, kept when the sigmoid score is above the value threshold and the segment, in half-size pixels,
is longer than the distance threshold; ends doubled to full size and drawn 1 pixel wide, white on black.
The network is small (1.5 M weights), so the tests build it at the released size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from darkroom.control.annotators import files, imageops

FILE, KIND = "mlsd_large_512_fp32.pth", "mlsd"
TOP_K = 200
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
"""MobileNetV2's (expansion, width, repeats, first stride) for the stages M-LSD keeps."""
SKIPS = (1, 3, 6, 10, 13)
"""The backbone layers whose outputs feed the decoder (1/2, 1/4, 1/8, 1/16, 1/16 of the input)."""


def _conv_bn(cin: int, cout: int, k: int, *, stride: int = 1, groups: int = 1, dilation: int = 1,
             bias: bool = True) -> list[nn.Module]:
    pad = 0 if stride == 2 else dilation * (k // 2)
    return [nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=bias), nn.BatchNorm2d(cout)]


class _ConvBNReLU6(nn.Sequential):
    """Convolution, batch norm, ReLU6; stride 2 pads one pixel right and bottom first (TFLite's "same")."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(*_conv_bn(cin, cout, k, stride=stride, groups=groups, bias=False), nn.ReLU6())
        self.stride = stride

    def forward(self, x):
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1))
        return super().forward(x)


class _InvertedResidual(nn.Module):
    """1x1 expansion (absent at ratio 1), 3x3 depthwise, linear 1x1 projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, ratio: int):
        super().__init__()
        hidden = int(round(cin * ratio))
        layers: list[nn.Module] = [] if ratio == 1 else [_ConvBNReLU6(cin, hidden, 1)]
        layers += [_ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), *_conv_bn(hidden, cout, 1, bias=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [_ConvBNReLU6(4, 32, 3, stride=2)]
        cin = 32
        for ratio, width, repeats, stride in STAGES:
            for i in range(repeats):
                layers.append(_InvertedResidual(cin, width, stride if i == 0 else 1, ratio))
                cin = width
        self.features = nn.Sequential(*layers)

    def forward(self, x) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in SKIPS:
                out.append(x)
        return out


class _Merge(nn.Module):
    """Decoder "A": 1x1+BN+ReLU on the skip (conv2) and on the deeper map (conv1, then 2x up), concatenated."""

    def __init__(self, skip: int, deep: int, upscale: bool = True):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(deep, 64, 1), nn.ReLU())
        self.conv2 = nn.Sequential(*_conv_bn(skip, 64, 1), nn.ReLU())
        self.upscale = upscale

    def forward(self, skip, deep):
        deep = self.conv1(deep)
        if self.upscale:
            deep = F.interpolate(deep, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat([self.conv2(skip), deep], 1)


class _Refine(nn.Module):
    """Decoder "B": a residual 3x3 at the merged width, then a 3x3 down to 64 (both BN+ReLU)."""

    def __init__(self, cin: int = 128, cout: int = 64):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(cin, cin, 3), nn.ReLU())
        self.conv2 = nn.Sequential(*_conv_bn(cin, cout, 3), nn.ReLU())

    def forward(self, x):
        return self.conv2(self.conv1(x) + x)


class _Head(nn.Module):
    def __init__(self, cin: int = 64, cout: int = 16):
        super().__init__()
        self.conv1 = nn.Sequential(*_conv_bn(cin, cin, 3, dilation=5), nn.ReLU())
        self.conv2 = nn.Sequential(*_conv_bn(cin, cin, 3), nn.ReLU())
        self.conv3 = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class MLSD(nn.Module):
    """Keys as in mlsd_large_512_fp32.pth: backbone.features.{0-13}.*, block15-block23.*"""

    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.block15, self.block16 = _Merge(64, 96, upscale=False), _Refine()
        self.block17, self.block18 = _Merge(32, 64), _Refine()
        self.block19, self.block20 = _Merge(24, 64), _Refine()
        self.block21, self.block22 = _Merge(16, 64), _Refine()
        self.block23 = _Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1, c2, c3, c4, c5 = self.backbone(x)
        h = self.block16(self.block15(c4, c5))
        h = self.block18(self.block17(c3, h))
        h = self.block20(self.block19(c2, h))
        h = self.block22(self.block21(c1, h))
        return self.block23(h)[:, 7:]


def load(path: Path) -> MLSD:
    return files.load_strict(MLSD(), files.read_state_dict(path), path, "M-LSD large")


def decode(out: np.ndarray, score_threshold: float, distance_threshold: float) -> np.ndarray:
    """Segments (n, 4: x0, y0, x1, y1 in input pixels) from the network's output (>= 5, h, w) at half size."""
    maps = torch.from_numpy(np.ascontiguousarray(out[:5], dtype=np.float32))
    heat = torch.sigmoid(maps[0])[None, None]
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
    scores, index = torch.topk(peaks.flatten(), min(TOP_K, peaks.numel()))
    w = maps.shape[2]
    ys, xs = (index // w).numpy(), (index % w).numpy()
    offsets = maps[1:5].numpy()[:, ys, xs].T.astype(np.float64)  # (k, 4): start dx, dy, end dx, dy
    length = np.hypot(offsets[:, 0] - offsets[:, 2], offsets[:, 1] - offsets[:, 3])
    keep = (scores.numpy() > score_threshold) & (length > distance_threshold)
    centre = np.stack([xs, ys, xs, ys], axis=1).astype(np.float64)
    return 2.0 * (centre + offsets)[keep]


def draw(segments: np.ndarray, height: int, width: int) -> np.ndarray:
    """Segments as 1-pixel white lines on black (ends cut to whole pixels toward zero, as the extension)."""
    canvas = Image.new("L", (width, height))
    pen = ImageDraw.Draw(canvas)
    for x0, y0, x1, y1 in segments:
        pen.line([(int(x0), int(y0)), (int(x1), int(y1))], fill=255, width=1)
    return np.asarray(canvas, dtype=np.uint8).copy()


def network_input(img: np.ndarray) -> torch.Tensor:
    """[1, 4, H, W]: RGB and a plane of ones, each scaled by x / 127.5 - 1."""
    planes = np.concatenate([img.astype(np.float32), np.ones(img.shape[:2] + (1,), np.float32)], axis=2)
    return torch.from_numpy(planes / 127.5 - 1.0).permute(2, 0, 1)[None]


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], score_threshold: float, distance_threshold: float,
           device: str | None = None) -> np.ndarray:
    """The `mlsd` map: the picture's straight lines, the short side at `res` (padded to 64 while detecting)."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    with torch.no_grad():
        out = net(network_input(padded).to(device or "cpu"))[0].float().cpu().numpy()
    segments = decode(out, score_threshold, distance_threshold)
    return draw(segments, padded.shape[0], padded.shape[1])[:h, :w]
