"""Anime face segmentation (seg_anime_face) from UNet.pth: seven classes painted in the extension's colours.

The network (siyeong0's Anime-Face-Segmentation) is a U-Net whose encoder is torchvision's MobileNetV2 up to
its 160-channel stage (features 0-16: a stride-2 3x3 convolution, then inverted residual blocks of a 1x1
expansion, a depthwise 3x3 and a 1x1 projection, batch norm and ReLU6, a shortcut where the shape allows),
grouped as en_block0-4 at 1/2 to 1/32 of the input. Each decoder block doubles the size (nearest), applies a
3x3 convolution, instance norm and leaky ReLU 0.1, is scaled to the skip's size (bilinear, corners aligned)
and joined to it; the last gives 7 class scores through a softmax. MobileNetV2 is written out here with
torchvision's module names (the checkpoint's keys) since torchvision cannot be installed beside this torch.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) is scaled so its
short side is 512 (bicubic), fed in [0, 1] without normalisation, and each pixel takes the colour of its
most likely class: background yellow, hair blue, eye red, mouth white, face green, skin cyan, clothes
magenta. The map stays at that 512-pixel size (cropped like the picture), as there.
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

FILE, KIND = "UNet.pth", "anime_face_segment"
SIZE = 512
PALETTE = np.array([(255, 255, 0), (0, 0, 255), (255, 0, 0), (255, 255, 255), (0, 255, 0), (0, 255, 255),
                    (255, 0, 255)], np.uint8)  # background, hair, eye, mouth, face, skin, clothes
# MobileNetV2's stages: (expansion, output channels, blocks, first stride)
MOBILENET_V2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))
ENCODER_GROUPS = ((0, 1), (2, 3), (4, 5, 6), (7, 8, 9, 10, 11, 12, 13), (14, 15, 16))  # features per en_block


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = [_conv_bn_relu6(cin, hidden, 1)] if expansion != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.shortcut else self.conv(x)


def mobilenet_v2_features() -> list[nn.Module]:
    """torchvision's mobilenet_v2().features (width 1.0): 19 modules, 2,223,872 weights."""
    layers: list[nn.Module] = [_conv_bn_relu6(3, 32, 3, 2)]
    cin = 32
    for expansion, cout, blocks, stride in MOBILENET_V2:
        for i in range(blocks):
            layers.append(_InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
            cin = cout
    layers.append(_conv_bn_relu6(cin, 1280, 1))
    return layers


def _decoder(cin: int, cout: int, last: bool = False) -> nn.Sequential:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    if last:
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv, nn.Softmax(dim=1))
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv, nn.InstanceNorm2d(cout),
                         nn.LeakyReLU(0.1), nn.Dropout(0.2))


class AnimeFaceUNet(nn.Module):
    """Keys as in UNet.pth: en_block0-4 (MobileNetV2's features), de_block4-0."""

    def __init__(self):
        super().__init__()
        features = mobilenet_v2_features()
        for i, group in enumerate(ENCODER_GROUPS):
            setattr(self, f"en_block{i}", nn.Sequential(*[features[k] for k in group]))
        self.de_block4 = _decoder(160, 96)
        self.de_block3 = _decoder(96 * 2, 32)
        self.de_block2 = _decoder(32 * 2, 24)
        self.de_block1 = _decoder(24 * 2, 16)
        self.de_block0 = _decoder(16 * 2, len(PALETTE), last=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i in range(len(ENCODER_GROUPS)):
            x = getattr(self, f"en_block{i}")(x)
            skips.append(x)
        x = skips.pop()
        for i in range(len(ENCODER_GROUPS) - 1, 0, -1):
            skip = skips.pop()
            up = getattr(self, f"de_block{i}")(x)
            x = torch.cat([F.interpolate(up, size=skip.shape[2:], mode="bilinear", align_corners=True), skip], 1)
        return self.de_block0(x)


def load(path: Path) -> AnimeFaceUNet:
    state = files.read_state_dict(path)
    if "de_block0.1.weight" not in state:
        raise ModelLoadError(f"{path.name}: not an anime face segmentation weight file (no `de_block0` output layer)")
    return files.load_strict(AnimeFaceUNet(), state, path, "anime face segmentation (UNet.pth)")


def segment(net: AnimeFaceUNet, img: np.ndarray) -> np.ndarray:
    """uint8 class colours of a uint8 RGB picture, its short side scaled to 512 first (the size returned)."""
    h, w = img.shape[:2]
    k = SIZE / min(h, w)
    width, height = (SIZE, int(h * k)) if w <= h else (int(w * k), SIZE)  # torchvision's Resize(512) truncates
    x = imageops.resize(img, width, height, imageops.CUBIC).astype(np.float32) / 255.0
    device = net.de_block0[1].weight.device
    with torch.no_grad():
        scores = net(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None].to(device))
    return PALETTE[scores[0].argmax(0).cpu().numpy()]


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """The seg_anime_face map (see the module doc for its size)."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return segment(net, padded)[:h, :w]
