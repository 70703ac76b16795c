"""Line art from lllyasviel's small image-to-image nets: lineart_realistic (sk_model.pth), lineart_coarse
(sk_model2.pth) and lineart_anime (netG.pth).

- sk_model*.pth: a ResNet generator (7x7 conv, two stride-2 convs, 3 residual blocks, two transposed
  convs, 7x7 conv, sigmoid; instance norm without weights; reflection padding), RGB in [0, 1] in,
  white-background line art out.
- netG.pth: pix2pix's 8-level U-Net (4x4 stride-2 convs, instance norm, tanh), RGB in [-1, 1] at a
  multiple of 256 pixels.
Both maps are inverted at the end (white lines on black), as the extension does. Widths and depths are
read from the file, so the tests' tiny files build the same networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

SK_FILES = {"realistic": ("sk_model.pth", "lineart"), "coarse": ("sk_model2.pth", "lineart"),
            "anime": ("netG.pth", "lineart_anime")}


class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width), nn.ReLU(),
            nn.ReflectionPad2d(1), nn.Conv2d(width, width, 3), nn.InstanceNorm2d(width))

    def forward(self, x):
        return x + self.conv_block(x)


class SketchGenerator(nn.Module):
    """Keys as in sk_model.pth: model0.1, model1.{0,3}, model2.{i}.conv_block.{1,5}, model3.{0,3}, model4.1."""

    def __init__(self, width: int = 64, blocks: int = 3):
        super().__init__()
        w1, w2 = width * 2, width * 4
        self.model0 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, width, 7), nn.InstanceNorm2d(width), nn.ReLU())
        self.model1 = nn.Sequential(
            nn.Conv2d(width, w1, 3, stride=2, padding=1), nn.InstanceNorm2d(w1), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, stride=2, padding=1), nn.InstanceNorm2d(w2), nn.ReLU())
        self.model2 = nn.Sequential(*[_Residual(w2) for _ in range(blocks)])
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(w2, w1, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(w1), nn.ReLU(),
            nn.ConvTranspose2d(w1, width, 3, stride=2, padding=1, output_padding=1), nn.InstanceNorm2d(width),
            nn.ReLU())
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width, 1, 7), nn.Sigmoid())

    def forward(self, x):
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


class _UnetLevel(nn.Module):
    """One level of pix2pix's U-Net; `model` keeps the original's layer indices (so the keys match):
    outermost [down, inner, relu, up, tanh]; innermost [lrelu, down, relu, up, norm];
    middle [lrelu, down, norm, inner, relu, up, norm]. Non-outermost levels concatenate their input."""

    def __init__(self, outer: int, inner: int, sub: nn.Module | None, *, in_ch: int | None = None,
                 outermost: bool = False):
        super().__init__()
        self.outermost = outermost
        down = nn.Conv2d(in_ch or outer, inner, 4, stride=2, padding=1)
        if outermost:
            layers = [down, sub, nn.ReLU(), nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.Tanh()]
        elif sub is None:
            layers = [nn.LeakyReLU(0.2), down, nn.ReLU(), nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1),
                      nn.InstanceNorm2d(outer)]
        else:
            layers = [nn.LeakyReLU(0.2), down, nn.InstanceNorm2d(inner), sub, nn.ReLU(),
                      nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.InstanceNorm2d(outer)]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class AnimeUnet(nn.Module):
    """netG.pth: `levels` 2x downsamplings, `width` filters at the outer level, up to 8x that inside."""

    def __init__(self, width: int = 64, levels: int = 8):
        super().__init__()
        block = _UnetLevel(width * 8, width * 8, None)
        for _ in range(levels - 5):
            block = _UnetLevel(width * 8, width * 8, block)
        for outer, inner in ((width * 4, width * 8), (width * 2, width * 4), (width, width * 2)):
            block = _UnetLevel(outer, inner, block)
        self.model = _UnetLevel(1, width, block, in_ch=3, outermost=True)

    def forward(self, x):
        return self.model(x)


def load(path: Path, kind: str) -> nn.Module:
    state = files.read_state_dict(path)
    try:
        if kind == "anime":
            width = int(state["model.model.0.weight"].shape[0])
            levels = sum(1 for k, v in state.items() if k.endswith("weight") and v.ndim == 4 and v.shape[-1] == 4) // 2
            net = AnimeUnet(width, levels)
        else:
            width = int(state["model0.1.weight"].shape[0])
            blocks = len({k.split(".")[1] for k in state if k.startswith("model2.")})
            net = SketchGenerator(width, blocks)
    except (KeyError, AttributeError, IndexError, TypeError):
        raise ModelLoadError(f"{path.name}: not a {SK_FILES[kind][0]} line art weight file") from None
    return files.load_strict(net, state, path, f"lineart_{kind}")


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _sketch(net: nn.Module, img: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(_device(net)).float().permute(2, 0, 1)[None] / 255.0
        line = net(x)[0, 0].cpu().numpy()
    return (line * 255.0).clip(0, 255).astype(np.uint8)


def _anime(net: nn.Module, img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    hn, wn = 256 * int(np.ceil(h / 256.0)), 256 * int(np.ceil(w / 256.0))
    feed = imageops.resize(img, wn, hn, imageops.CUBIC)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(feed)).to(_device(net)).float().permute(2, 0, 1)[None]
        line = (net(x / 127.5 - 1.0)[0, 0] * 127.5 + 127.5).cpu().numpy().astype(np.float32)
    return imageops.resize(line, w, h, imageops.CUBIC).clip(0, 255).astype(np.uint8)


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], kind: str, device: str | None = None) -> np.ndarray:
    """White-on-black line art of the picture, the short side at `res`."""
    file, folder = SK_FILES[kind]
    net = load(files.find(file, folder, dirs), kind).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    line = _anime(net, padded) if kind == "anime" else _sketch(net, padded)
    return 255 - line[:h, :w]
