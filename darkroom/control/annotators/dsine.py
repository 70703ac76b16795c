"""Surface normals (normal_dsine) from dsine.pt: Bae and Davison's DSINE ("Rethinking inductive biases for
surface normal estimation", CVPR 2024).

The encoder is normal_bae's EfficientNet-B5 (its stage 2 and 4 outputs and its head before batch norm). The
decoder sees, at every scale, the camera ray's (u, v) for each pixel beside the features: a 1x1 convolution at
1/32, two upsample-and-merge steps with weight-standardised 3x3 convolutions, group norm (8 groups) and leaky
ReLU to 1/8, and three heads (3x3, 1x1, 1x1) giving an initial normal, a feature map and a hidden state. A
"ray ReLU" keeps every normal facing the camera (its cosine with the ray at least 0.01). Each refinement step
updates the hidden state with a convolutional GRU (5x5), predicts for the 5x5 neighbours of each pixel a weight,
a rotation axis (from a predicted in-plane offset, through the camera) and an angle, rotates the neighbours'
normals, ray-ReLUs them and takes their weighted mean; a learned convex combination of 3x3 neighbours
(softmax over 9 weights per output pixel) brings it to full size. The module names are the checkpoint's keys.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) goes in as RGB in
[0, 1] normalised with ImageNet's mean and deviation, the camera has the Fov slider's field of view across its
longer side and its principal point at the picture's centre, and Iterations refinements run; the map is
(n + 1) / 2 as RGB. Unlike the extension, the camera and the final crop use the size the network sees: the
extension takes them from the picture's original size, which crops its map to a corner whenever that size is
not a multiple of 32 pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.control.annotators.normalbae import ENC, MEAN, STD, _Encoder, encoder_spec_of
from darkroom.errors import ModelLoadError

FILE, KIND = "dsine.pt", "normal_dsine"
DOWN, PATCH = 8, 5  # the coarse output's downsampling, the refinement's neighbourhood
HIDDEN, FEATURES = 64, 64


class _WSConv(nn.Conv2d):
    """A convolution with weight standardisation (each filter zero-mean, unit deviation plus 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _UpMerge(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self._net = nn.Sequential(_WSConv(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.LeakyReLU(),
                                  _WSConv(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.LeakyReLU())

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self._net(torch.cat([x, skip], 1))


def _head(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
                         nn.Conv2d(hidden, cout, 1))


class _Decoder(nn.Module):
    def __init__(self, head: int, mid: int, low: int):
        super().__init__()
        self.conv2 = nn.Conv2d(head + 2, head, 1)
        self.up1 = _UpMerge(head + mid + 2, head // 2)
        self.up2 = _UpMerge(head // 2 + low + 2, head // 4)
        width = head // 4 + 2
        self.normal_head = _head(width, 128, 3)
        self.feature_head = _head(width, 128, FEATURES)
        self.hidden_head = _head(width, 128, HIDDEN)

    def forward(self, feats: list[torch.Tensor], uv32, uv16, uv8):
        _, _, low, mid, head = feats  # stages 2 and 4 (1/8, 1/16) and the head (1/32)
        x = self.conv2(torch.cat([head, uv32], 1))
        x = self.up1(x, torch.cat([mid, uv16], 1))
        x = torch.cat([self.up2(x, torch.cat([low, uv8], 1)), uv8], 1)
        return F.normalize(self.normal_head(x), dim=1), self.feature_head(x), self.hidden_head(x)


class _ConvGRU(nn.Module):
    def __init__(self, hidden: int, cin: int, k: int):
        super().__init__()
        self.convz = nn.Conv2d(hidden + cin, hidden, k, padding=k // 2)
        self.convr = nn.Conv2d(hidden + cin, hidden, k, padding=k // 2)
        self.convq = nn.Conv2d(hidden + cin, hidden, k, padding=k // 2)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], 1)
        z, r = torch.sigmoid(self.convz(hx)), torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


def ray_relu(normal: torch.Tensor, ray: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """`normal` turned towards the camera until its cosine with `ray` is at least `eps`, unit length."""
    cos = torch.cosine_similarity(normal, ray, dim=1).unsqueeze(1)
    return F.normalize(normal + ray * (F.relu(cos - eps) + eps) - ray * cos, dim=1)


def _neighbours(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, size^2, H, W): each pixel's size x size neighbourhood, the border repeated."""
    b, c, h, w = x.shape
    pad = (size - 1) // 2
    return F.unfold(F.pad(x, (pad,) * 4, mode="replicate"), size).view(b, c, size * size, h, w)


def convex_upsample(x: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """x [B, C, H, W] at k times the size, each output pixel a softmax-weighted mix of its source's 3x3."""
    b, c, h, w = x.shape
    weights = torch.softmax(mask.view(b, 1, 9, k, k, h, w), dim=2)
    mixed = (weights * _neighbours(x, 3).view(b, c, 9, 1, 1, h, w)).sum(2)  # (B, C, k, k, H, W)
    return mixed.permute(0, 1, 4, 2, 5, 3).reshape(b, c, k * h, k * w)


def rotation_matrices(axis_angle: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotations from axis-angle vectors (..., 3), through unit quaternions (small angles by their
    series, as PyTorch3D does)."""
    angle = axis_angle.norm(dim=-1, keepdim=True)
    small = angle.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(angle), angle)
    factor = torch.where(small, 0.5 - angle * angle / 48, torch.sin(angle * 0.5) / safe)
    q = torch.cat([torch.cos(angle * 0.5), axis_angle * factor], -1)
    r, i, j, k = q.unbind(-1)
    s = 2.0 / (q * q).sum(-1)
    rows = (1 - s * (j * j + k * k), s * (i * j - k * r), s * (i * k + j * r),
            s * (i * j + k * r), 1 - s * (i * i + k * k), s * (j * k - i * r),
            s * (i * k - j * r), s * (j * k + i * r), 1 - s * (i * i + j * j))
    return torch.stack(rows, -1).reshape(q.shape[:-1] + (3, 3))


def _pixels(h: int, w: int, device) -> torch.Tensor:
    """(1, 3, h, w): each pixel's centre (x + 0.5, y + 0.5) and 1."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs + 0.5, ys + 0.5, torch.ones_like(xs)])[None]


class DSINE(nn.Module):
    """Keys as in dsine.pt: encoder.original_model (EfficientNet), decoder, gru and the four heads."""

    def __init__(self, spec=None):
        super().__init__()
        from darkroom.control.annotators.normalbae import b5

        spec = spec or b5()
        self.encoder = _Encoder(spec)
        self.decoder = _Decoder(spec.head, spec.stages[4][-1].cout, spec.stages[2][-1].cout)
        self.gru = _ConvGRU(HIDDEN, FEATURES + 2, PATCH)
        self.prob_head = _head(HIDDEN + 2, 64, PATCH * PATCH)
        self.xy_head = _head(HIDDEN + 2, 64, PATCH * PATCH * 2)
        self.angle_head = _head(HIDDEN + 2, 64, PATCH * PATCH)
        self.up_prob_head = _head(HIDDEN + 2, 64, 9 * DOWN * DOWN)
        self.iterations = 5

    @staticmethod
    def _rays(intrins: torch.Tensor, h: int, w: int, full_h: int, full_w: int, uv: bool) -> torch.Tensor:
        fu, cu = (intrins[:, 0, 0] * (w / full_w)).view(-1, 1, 1), (intrins[:, 0, 2] * (w / full_w)).view(-1, 1, 1)
        fv, cv = (intrins[:, 1, 1] * (h / full_h)).view(-1, 1, 1), (intrins[:, 1, 2] * (h / full_h)).view(-1, 1, 1)
        ray = _pixels(h, w, intrins.device).repeat(intrins.shape[0], 1, 1, 1)
        ray[:, 0] = (ray[:, 0] - cu) / fu
        ray[:, 1] = (ray[:, 1] - cv) / fv
        return ray[:, :2] if uv else F.normalize(ray, dim=1)

    def _refine(self, h, feat_map, normal, intrins, full_h, full_w, uv8, ray8):
        b, _, hh, ww = normal.shape
        scale_w, scale_h = ww / full_w, hh / full_h
        fu, cu = (intrins[:, 0, 0] * scale_w).view(-1, 1, 1, 1), (intrins[:, 0, 2] * scale_w).view(-1, 1, 1, 1)
        fv, cv = (intrins[:, 1, 1] * scale_h).view(-1, 1, 1, 1), (intrins[:, 1, 2] * scale_h).view(-1, 1, 1, 1)
        h = self.gru(h, feat_map)
        cond = torch.cat([h, uv8], 1)
        prob = torch.sigmoid(self.prob_head(cond)).unsqueeze(1)
        near = _neighbours(normal, PATCH)  # (B, 3, 25, h, w)
        xs, ys = torch.split(self.xy_head(cond), [PATCH * PATCH] * 2, dim=1)
        xy = F.normalize(torch.stack([xs, ys], 1), dim=1)
        angle = torch.sigmoid(self.angle_head(cond)).unsqueeze(1) * math.pi
        coords = _neighbours(_pixels(hh, ww, normal.device), PATCH)
        du, dv = xy[:, 0] / fu, xy[:, 1] / fv
        tu, tv = (coords[:, 0] + xy[:, 0] - cu) / fu, (coords[:, 1] + xy[:, 1] - cv) / fv
        nx, ny, nz = near[:, 0], near[:, 1], near[:, 2]
        num, den = -(du * nx + dv * ny), tu * nx + tv * ny + nz
        tiny = den.abs() < 1e-8
        den = torch.where(tiny, 1e-8 * torch.sign(den), den)
        dz = num / den
        axes = F.normalize(torch.stack([du + dz * tu, dv + dz * tv, dz], 1), dim=1)
        axes = torch.where(torch.isfinite(axes).all(dim=1, keepdim=True), axes, torch.zeros_like(axes))
        rot = rotation_matrices((axes * angle).permute(0, 2, 3, 4, 1))  # (B, 25, h, w, 3, 3)
        turned = (rot @ near.permute(0, 2, 3, 4, 1).unsqueeze(-1)).squeeze(-1).permute(0, 4, 1, 2, 3)
        turned = F.normalize(turned, dim=1)
        turned = torch.stack([ray_relu(turned[:, :, i], ray8) for i in range(turned.shape[2])], 2)
        normal = F.normalize((prob * turned).sum(2), dim=1)
        up = F.normalize(convex_upsample(normal, self.up_prob_head(torch.cat([h, uv8], 1)), DOWN), dim=1)
        return h, normal, up

    def forward(self, x: torch.Tensor, intrins: torch.Tensor) -> torch.Tensor:
        """The full-size normals [B, 3, H, W] after `self.iterations` refinements; `intrins` [B, 3, 3] in
        pixels of x (top-left pixel centre at 0)."""
        feats = self.encoder.original_model(x)
        _, _, full_h, full_w = x.shape
        intrins = intrins.clone()
        intrins[:, 0, 2] += 0.5
        intrins[:, 1, 2] += 0.5
        uv32, uv16, uv8 = (self._rays(intrins, full_h // s, full_w // s, full_h, full_w, True) for s in (32, 16, 8))
        ray8 = self._rays(intrins, full_h // 8, full_w // 8, full_h, full_w, False)
        normal, feat_map, h = self.decoder(feats, uv32, uv16, uv8)
        normal = ray_relu(normal, ray8)
        feat_map = torch.cat([feat_map, uv8], 1)
        up = F.normalize(convex_upsample(normal, self.up_prob_head(torch.cat([h, uv8], 1)), DOWN), dim=1)
        for _ in range(self.iterations):
            h, normal, up = self._refine(h, feat_map, normal, intrins, full_h, full_w, uv8, ray8)
        return up


def load(path: Path) -> DSINE:
    state = files.read_state_dict(path, nested="model")
    try:
        spec = encoder_spec_of(state)
        if "gru.convz.weight" not in state or not any(k.startswith(ENC) for k in state):
            raise KeyError("gru")
    except (KeyError, AttributeError, IndexError, TypeError):
        raise ModelLoadError(f"{path.name}: not a DSINE weight file (no EfficientNet encoder, decoder and"
                             " refinement GRU)") from None
    return files.load_strict(DSINE(spec), state, path, "DSINE (dsine.pt)")


def intrinsics(fov: float, h: int, w: int) -> torch.Tensor:
    """[1, 3, 3]: a camera with `fov` degrees across the longer side, principal point at the centre."""
    f = (max(h, w) / 2.0) / np.tan(np.deg2rad(fov / 2.0))
    return torch.tensor([[[f, 0, w / 2.0 - 0.5], [0, f, h / 2.0 - 0.5], [0, 0, 1]]], dtype=torch.float32)


def normals(net: DSINE, img: np.ndarray, size: tuple[int, int], fov: float) -> np.ndarray:
    """uint8 (n + 1) / 2 of a uint8 RGB picture (sides multiples of 32) whose top-left `size` (h, w) is the
    picture proper (the rest padding), at the padded size."""
    device = next(net.parameters()).device
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float().permute(2, 0, 1)[None] / 255.0
        n = net((x - mean) / std, intrinsics(fov, *size).to(device))[0].float()
        out = ((n + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (out * 255.0).clip(0, 255).astype(np.uint8)


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], fov: float = 60.0, iterations: int = 5,
           device: str | None = None) -> np.ndarray:
    """The normal_dsine map at the unit's resolution."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    net.iterations = max(1, int(iterations))
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return normals(net, padded, (h, w), fov)[:h, :w]
