"""LaMa's fill for inpaint_only+lama, from ControlNetLama.pth (Suvorov et al.'s big-lama generator).

The generator is a fast-Fourier-convolution ResNet: a 7x7 convolution (4 channels in: the picture with the
mask blanked, and the mask), three stride-2 3x3 convolutions to 512 channels, the last of which splits them
into a local part (128) and a global part (384); 18 residual blocks of two "FFC" layers, each the sum of four
paths (local to local, local to global, global to local: reflect-padded 3x3 convolutions; global to global: a
spectral transform, i.e. a 1x1 convolution to half width, a Fourier unit (2-D real FFT, a 1x1 convolution with
batch norm and ReLU over the real and imaginary parts as channels, the inverse FFT) added to its input, and a
1x1 convolution back), with batch norm and ReLU per part; the parts joined again, three stride-2 transposed
convolutions back to 64 channels and a 7x7 convolution to RGB through a sigmoid. The module indices below are
the checkpoint's keys (`model.<i>....`); the widths and block count are read from the file.

As the extension: the picture and mask (short side at 256, padded to a multiple of 64) go in as [0, 1] with
the mask made binary at 0.5; the prediction replaces the masked pixels, is scaled back to the picture's size
and blended in by the (soft) mask.
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

FILE, KIND = "ControlNetLama.pth", "lama"
RESOLUTION = 256  # LaMa was trained at 256: the extension always runs it there
GLOBAL_RATIO = 0.75
DOWNSAMPLINGS = 3


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, bias=False, padding_mode="reflect")


class _FourierUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = nn.Conv2d(channels * 2, channels * 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        spectrum = torch.fft.rfftn(x.float(), dim=(-2, -1), norm="ortho")
        # real and imaginary parts as channels, interleaved per input channel (c0 re, c0 im, c1 re, ...)
        parts = torch.stack((spectrum.real, spectrum.imag), dim=2).reshape(b, c * 2, h, -1).to(x.dtype)
        parts = F.relu(self.bn(self.conv_layer(parts)))
        parts = parts.reshape(b, c, 2, h, -1).float()
        return torch.fft.irfftn(torch.complex(parts[:, :, 0], parts[:, :, 1]), s=(h, w), dim=(-2, -1),
                                norm="ortho").to(x.dtype)


class _SpectralTransform(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Sequential(nn.Conv2d(channels, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())
        self.fu = _FourierUnit(half)
        self.conv2 = nn.Conv2d(half, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(x + self.fu(x))


class _FFC(nn.Module):
    """The four paths between local and global channels (those a side lacks are left out)."""

    def __init__(self, cin: int, cout: int, kernel: int, gin: float, gout: float, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        in_g, out_g = int(cin * gin), int(cout * gout)
        in_l, out_l = cin - in_g, cout - out_g
        self.convl2l = _conv(in_l, out_l, kernel, stride, padding) if in_l and out_l else None
        self.convl2g = _conv(in_l, out_g, kernel, stride, padding) if in_l and out_g else None
        self.convg2l = _conv(in_g, out_l, kernel, stride, padding) if in_g and out_l else None
        self.convg2g = _SpectralTransform(in_g) if in_g and out_g else None

    def forward(self, local: torch.Tensor, glob: torch.Tensor | None):
        out_l = out_g = None
        for conv, src, to_local in ((self.convl2l, local, True), (self.convg2l, glob, True),
                                    (self.convl2g, local, False), (self.convg2g, glob, False)):
            if conv is None or src is None:
                continue
            y = conv(src)
            if to_local:
                out_l = y if out_l is None else out_l + y
            else:
                out_g = y if out_g is None else out_g + y
        return out_l, out_g


class _FFCNormAct(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, gin: float, gout: float, stride: int = 1,
                 padding: int = 0):
        super().__init__()
        self.ffc = _FFC(cin, cout, kernel, gin, gout, stride, padding)
        out_g = int(cout * gout)
        self.bn_l = nn.BatchNorm2d(cout - out_g) if cout - out_g else None
        self.bn_g = nn.BatchNorm2d(out_g) if out_g else None

    def forward(self, x):
        local, glob = x if isinstance(x, tuple) else (x, None)
        out_l, out_g = self.ffc(local, glob)
        return (None if out_l is None else F.relu(self.bn_l(out_l)),
                None if out_g is None else F.relu(self.bn_g(out_g)))


class _ResBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = _FFCNormAct(dim, dim, 3, GLOBAL_RATIO, GLOBAL_RATIO, padding=1)
        self.conv2 = _FFCNormAct(dim, dim, 3, GLOBAL_RATIO, GLOBAL_RATIO, padding=1)

    def forward(self, x):
        local, glob = x
        out_l, out_g = self.conv2(self.conv1((local, glob)))
        return local + out_l, glob + out_g


class _Join(nn.Module):
    def forward(self, x):
        return torch.cat(x, dim=1)


class LamaGenerator(nn.Module):
    def __init__(self, width: int = 64, blocks: int = 18):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), _FFCNormAct(4, width, 7, 0, 0)]
        for i in range(DOWNSAMPLINGS):
            gout = GLOBAL_RATIO if i == DOWNSAMPLINGS - 1 else 0
            layers.append(_FFCNormAct(width * 2 ** i, width * 2 ** (i + 1), 3, 0, gout, stride=2, padding=1))
        dim = width * 2 ** DOWNSAMPLINGS
        layers += [_ResBlock(dim) for _ in range(blocks)]
        layers.append(_Join())
        for i in range(DOWNSAMPLINGS):
            c = dim // 2 ** i
            layers += [nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(c // 2), nn.ReLU()]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, 3, 7), nn.Sigmoid()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def load(path: Path) -> LamaGenerator:
    state = files.read_state_dict(path)
    state = {k.removeprefix("generator."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith("model.")}  # the extension loads it non-strictly
    try:
        width = int(state["model.1.ffc.convl2l.weight"].shape[0])
        first = 2 + DOWNSAMPLINGS
        blocks = len({k.split(".")[1] for k in state if k.startswith("model.") and ".conv1.ffc." in k
                      and int(k.split(".")[1]) >= first})
    except (KeyError, AttributeError, IndexError, ValueError):
        raise ModelLoadError(f"{path.name}: not a LaMa weight file (no `model.1.ffc` first layer)") from None
    return files.load_strict(LamaGenerator(width, blocks), state, path, "LaMa (ControlNetLama.pth)")


def fill(net: LamaGenerator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 `img` with LaMa's fill blended in by `mask` (float HxW in [0, 1], 1: fill), at its size."""
    h, w = img.shape[:2]
    rgba = np.concatenate([img, (mask.clip(0, 1) * 255.0).astype(np.uint8)[:, :, None]], axis=2)
    padded, (ph, pw) = imageops.pad64(imageops.to_resolution(rgba, RESOLUTION))
    colour = torch.from_numpy(padded[:, :, :3].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    m = (torch.from_numpy(padded[:, :, 3:].astype(np.float32) / 255.0).permute(2, 0, 1)[None] > 0.5).float()
    device = net.model[1].ffc.convl2l.weight.device
    with torch.no_grad():
        colour, m = colour.to(device), m.to(device)
        colour = colour * (1 - m)
        out = net(torch.cat([colour, m], dim=1)) * m + colour * (1 - m)
    predicted = (out[0].permute(1, 2, 0).float().cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)[:ph, :pw]
    predicted = imageops.resize(predicted, w, h, imageops.LINEAR)
    alpha = mask.astype(np.float32)[:, :, None]
    return (predicted.astype(np.float32) * alpha + img.astype(np.float32) * (1 - alpha)).clip(0, 255).astype(np.uint8)


def fill_picture(img: np.ndarray, mask: np.ndarray, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """`fill` with the net from the annotator folders."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    return fill(net, img, mask)
