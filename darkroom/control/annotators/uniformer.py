"""ADE20K segmentation (seg_ufade20k) from upernet_global_small.pth: UniFormer-S with a UPerNet head, as the
extension runs it.

The file is an mmsegmentation checkpoint ({"meta", "state_dict"}) of the UniFormer authors' "global" small
model: a UniFormer-S backbone (`backbone.`: four stages of 64, 128, 320 and 512 channels at 1/4 to 1/32 of
the input, 3, 4, 8 and 3 blocks; the first two stages convolutional blocks, the last two global self-attention
over every position, 64 channels a head) and a UPerNet head (`decode_head.`: a pyramid pooling module over the
deepest stage, a top-down feature pyramid, 512 channels, 150 classes). `auxiliary_head.` (an FCN head used
only in training) is dropped. Drop-path and dropout are no-ops at inference, so they are not built.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) goes through
mmseg's test pipeline, which takes the array for BGR: it is rescaled (bilinear) as large as fits 2048 x 512
(long x short side) and "converted to RGB", so the network sees the picture's channels reversed, normalised
with ImageNet's RGB mean and deviation in 0-255. The logits come back to the input size (bilinear, twice as
mmseg does: to the rescaled size, then to the padded one), softmax, argmax, and each class is painted in
mmseg's ADE20K palette; the extension's two channel flips (to BGR for drawing, back to RGB) cancel, so the
map holds the palette's RGB colours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.control.annotators.palettes import ADE20K
from darkroom.errors import ModelLoadError, ModelNotFound

FILE, KIND = "upernet_global_small.pth", "uniformer"
MEAN = (123.675, 116.28, 103.53)  # the config's img_norm_cfg (RGB, 0-255)
STD = (58.395, 57.12, 57.375)
TEST_SCALE = (2048, 512)  # the ADE20K test pipeline's img_scale: long side at most 2048, short at most 512
DIMS, DEPTHS = (64, 128, 320, 512), (3, 4, 8, 3)  # UniFormer-S
HEAD_DIM = 64  # attention channels a head: the config's, not stored in the file
POOL_SCALES = (1, 2, 3, 6)
DROPPED = "auxiliary_head."


class _PatchEmbed(nn.Module):
    """A strided convolution (kernel = stride) then a LayerNorm over channels."""

    def __init__(self, cin: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, patch, patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _channels_norm(self.norm, self.proj(x))


def _channels_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class _Mlp(nn.Module):
    """fc1, GELU, fc2: Linear layers on tokens, or 1x1 convolutions on a feature map (`conv=True`)."""

    def __init__(self, dim: int, hidden: int, conv: bool):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1) if conv else nn.Linear(dim, hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1) if conv else nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _ConvBlock(nn.Module):
    """Stages 1-2: a depthwise 3x3 position term, then local relation aggregation (1x1, depthwise 5x5, 1x1)
    and a convolutional MLP, each after a batch norm, each added back."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = _Mlp(dim, hidden, conv=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.conv2(self.attn(self.conv1(self.norm1(x))))
        return x + self.mlp(self.norm2(x))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head width), as the original
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _AttnBlock(nn.Module):
    """Stages 3-4: the depthwise position term, then global self-attention and an MLP over all positions
    (pre-norm, LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, hidden: int, heads: int):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, hidden, conv=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class UniFormer(nn.Module):
    """The backbone: the four stages' features, each through its own LayerNorm (eps 1e-6)."""

    def __init__(self, dims: Sequence[int] = DIMS, depths: Sequence[int] = DEPTHS, mlp_ratio: int = 4,
                 head_dim: int = HEAD_DIM):
        super().__init__()
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True), 1):
            setattr(self, f"patch_embed{i}", _PatchEmbed(3 if i == 1 else dims[i - 2], dim, 4 if i == 1 else 2))
            hidden = dim * mlp_ratio
            blocks = [_ConvBlock(dim, hidden) if i <= 2 else _AttnBlock(dim, hidden, dim // head_dim)
                      for _ in range(depth)]
            setattr(self, f"blocks{i}", nn.ModuleList(blocks))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-6))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"blocks{i}"):
                x = block(x)
            features.append(_channels_norm(getattr(self, f"norm{i}"), x))
        return features


class _ConvBNReLU(nn.Module):
    """mmcv's ConvModule as the head builds it: a convolution without bias, batch norm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """UPerNet: pyramid pooling on the deepest stage, a top-down pyramid (1x1 laterals, each level plus the
    one above upsampled, then 3x3), all levels upsampled to 1/4 and fused, and 1x1 class logits."""

    def __init__(self, in_channels: Sequence[int] = DIMS, channels: int = 512, num_classes: int = 150,
                 pool_scales: Sequence[int] = POOL_SCALES):
        super().__init__()
        top = in_channels[-1]
        self.psp_modules = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), _ConvBNReLU(top, channels, 1))
                                         for s in pool_scales)
        self.bottleneck = _ConvBNReLU(top + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(_ConvBNReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(_ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = _ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        pooled = [top] + [_resize(m(top), top.shape[2:]) for m in self.psp_modules]
        levels = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1], strict=True)]
        levels.append(self.bottleneck(torch.cat(pooled, 1)))
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + _resize(levels[i], levels[i - 1].shape[2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, levels[:-1], strict=True)] + [levels[-1]]
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], 1)
        return self.conv_seg(self.fpn_bottleneck(fused))


class UPerNet(nn.Module):
    """Keys as in the file's `state_dict` (without `auxiliary_head.`); gives 1/4-size class logits."""

    def __init__(self, dims: Sequence[int] = DIMS, depths: Sequence[int] = DEPTHS, mlp_ratio: int = 4,
                 channels: int = 512, num_classes: int = 150, head_dim: int = HEAD_DIM):
        super().__init__()
        self.backbone = UniFormer(dims, depths, mlp_ratio, head_dim)
        self.decode_head = UPerHead(dims, channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))


def load(path: Path) -> UPerNet:
    state = {k: v for k, v in files.read_state_dict(path, nested="state_dict").items() if not k.startswith(DROPPED)}
    try:
        dims = [int(state[f"backbone.patch_embed{i}.proj.weight"].shape[0]) for i in range(1, 5)]
        depths = [1 + max(int(k.split(".")[2]) for k in state if k.startswith(f"backbone.blocks{i}."))
                  for i in range(1, 5)]
        mlp_ratio = int(state["backbone.blocks1.0.mlp.fc1.weight"].shape[0]) // dims[0]
        num_classes, channels = (int(n) for n in state["decode_head.conv_seg.weight"].shape[:2])
    except (KeyError, AttributeError, IndexError, ValueError, TypeError):
        raise ModelLoadError(f"{path.name}: not a UniFormer UPerNet weight file (no `backbone.patch_embed1..4`,"
                             " `backbone.blocks1..4` and `decode_head.conv_seg`)") from None
    if num_classes != len(ADE20K) or any(d % HEAD_DIM for d in dims[2:]):
        raise ModelLoadError(f"{path.name}: not the ADE20K UniFormer UPerNet ({num_classes} classes, stage widths"
                             f" {dims}; the file has 150 classes and attention widths a multiple of {HEAD_DIM})")
    net = UPerNet(dims, depths, mlp_ratio, channels, num_classes)
    return files.load_strict(net, state, path, "UniFormer UPerNet (upernet_global_small.pth)")


def rescaled_size(height: int, width: int) -> tuple[int, int]:
    """mmcv's imrescale size in the test pipeline: as large as fits TEST_SCALE, the aspect kept."""
    k = min(max(TEST_SCALE) / max(height, width), min(TEST_SCALE) / min(height, width))
    return int(height * k + 0.5), int(width * k + 0.5)


def network_input(img: np.ndarray) -> torch.Tensor:
    """mmseg's test pipeline on the extension's RGB array: rescaled, channels reversed (the pipeline takes
    it for BGR), normalised: a 1x3xHxW float tensor."""
    height, width = rescaled_size(*img.shape[:2])
    # cv2.resize(INTER_LINEAR) bit for bit (imageops): a float resize would move levels by one
    x = imageops.resize(img, width, height, imageops.LINEAR)[:, :, ::-1].astype(np.float32)
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def logits(net: UPerNet, img: np.ndarray) -> torch.Tensor:
    """Class logits (1x150xHxW) of a uint8 RGB picture at its size, brought back as mmseg's whole-image
    inference does: to the rescaled size, then to the picture's."""
    device = next(net.parameters()).device
    x = network_input(img).to(device)
    with torch.no_grad():
        out = _resize(net(x), x.shape[2:])
        return _resize(out, img.shape[:2]).float()


def labels(net: UPerNet, img: np.ndarray, rows: int = 256) -> np.ndarray:
    """The ADE20K class of each pixel (HxW int64): softmax first, as mmseg, so near-ties break alike; a band
    of rows at a time (at 2048 the logits alone are gigabytes: no second copy of them)."""
    scores = logits(net, img)[0]
    out = np.empty(scores.shape[1:], np.int64)
    for top in range(0, scores.shape[1], rows):
        out[top:top + rows] = scores[:, top:top + rows].softmax(0).argmax(0).cpu().numpy()
    return out


def colorize(classes: np.ndarray) -> np.ndarray:
    """Each class in its ADE20K palette colour (RGB, HxWx3 uint8)."""
    return np.array(ADE20K, np.uint8)[classes]


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """The seg_ufade20k map at the unit's resolution."""
    path = files.find(FILE, KIND, dirs)
    if path is None:
        raise ModelNotFound(f"seg_ufade20k needs {FILE}, e.g. in the extension's annotator/downloads/{KIND}",
                            hint="searched: " + ", ".join(str(d) for d in dirs))
    net = load(path).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return colorize(labels(net, padded))[:h, :w]
