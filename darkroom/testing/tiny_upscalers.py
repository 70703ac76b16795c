"""Tiny random upscaler networks in the key layouts of the real files, for tests.

- ESRGAN as Real-ESRGAN publishes it (BasicSR's RRDBNet, "new arch" keys: conv_first, body.N.rdbK.convJ,
  conv_body, conv_up1/2, conv_hr, conv_last; wrapped in "params_ema" like RealESRGAN_x4plus.pth);
- Real-ESRGAN "Compact" (SRVGGNetCompact, realesr-general-x4v3.pth's layout: body.N);
- SwinIR (the original repository's layout, built by spandrel's copy of the original class).
Widths are a few channels, so a 32x32 image upscales in milliseconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class _DenseBlock(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x):
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int):
        super().__init__()
        self.rdb1, self.rdb2, self.rdb3 = _DenseBlock(nf, gc), _DenseBlock(nf, gc), _DenseBlock(nf, gc)

    def forward(self, x):
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class TinyRRDBNet(nn.Module):
    """BasicSR's RRDBNet (scale 4: two nearest-neighbour x2 upsamplings)."""

    def __init__(self, nf: int = 8, gc: int = 32, blocks: int = 1):  # spandrel assumes gc 32, as every release
        super().__init__()
        self.conv_first = nn.Conv2d(3, nf, 3, 1, 1)
        self.body = nn.Sequential(*(_RRDB(nf, gc) for _ in range(blocks)))
        self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_up2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, 3, 3, 1, 1)

    def forward(self, x):
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class TinyCompact(nn.Module):
    """SRVGGNetCompact: convs and PReLUs at the input size, a pixel shuffle, plus the nearest-upsampled input."""

    def __init__(self, nf: int = 8, convs: int = 2, scale: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(convs):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        layers.append(nn.Conv2d(nf, 3 * scale * scale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(scale)
        self.scale = scale

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def tiny_swinir(scale: int = 2) -> nn.Module:
    """SwinIR (classical SR: "pixelshuffle" upsampler) at embed_dim 12, one stage of depth 2, window 4."""
    from darkroom.upscale.spandrel_import import import_spandrel

    import_spandrel()
    from spandrel.architectures.SwinIR.__arch.SwinIR import SwinIR

    return SwinIR(img_size=16, in_chans=3, embed_dim=12, depths=[2], num_heads=[2], window_size=4, mlp_ratio=2.0,
                  upscale=scale, img_range=1.0, upsampler="pixelshuffle", resi_connection="1conv")


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif not name.endswith("weight") or "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def build(kind: str, seed: int = 0) -> nn.Module:
    """A tiny random network: "esrgan" (4x), "compact" (4x) or "swinir" (2x)."""
    makers = {"esrgan": TinyRRDBNet, "compact": TinyCompact, "swinir": tiny_swinir}
    return _randomize(makers[kind](), seed)


def state_of(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in build(kind, seed).state_dict().items()}


def save(kind: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny `kind` network to `path` (.safetensors or a .pth pickle; ESRGAN pickles wrapped in
    "params_ema" as Real-ESRGAN's releases are)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = state_of(kind, seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"params_ema": state} if kind == "esrgan" else state, path)
    return path
