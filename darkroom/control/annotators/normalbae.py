"""Surface normals (the extension's `normal_bae`) from Bae et al.'s scannet.pt ("Estimating and exploiting
the aleatoric uncertainty in surface normal estimation", ICCV 2021).

Encoder: EfficientNet-B5 (the TensorFlow-ported AdvProp weights, as geffnet builds tf_efficientnet_b5_ap):
a stride-2 3x3 stem to 48 channels, seven stages of mobile inverted bottlenecks (3, 5, 5, 7, 7, 9, 3 blocks;
24, 40, 64, 128, 176, 304, 512 channels; the first stage without expansion), each with squeeze-and-excite
on a quarter of the block's input width, swish, batch norm with eps 1e-3, TensorFlow "same" padding (a
stride-2 convolution pads by what the input size needs, more on the right and bottom), then a 1x1 head to
2048. The decoder takes the head's output before its batch norm and the outputs of stages 1, 2, 3 and 5:
a 1x1, four upsample-and-merge steps (bilinear with corner alignment, two 3x3 + BN + leaky ReLU, to 1024,
512, 256, 128 channels), a 3x3 to 4 channels at 1/8 size, then at 1/4, 1/2 and full size a per-pixel MLP
(1x1 convolutions) on the upsampled features and the previous estimate. The 4 channels are a normal,
scaled to unit length, and a concentration (unused here). At inference every pixel is refined (the
uncertainty-guided sampling is for training only).

Input: RGB in [0, 1] normalised with the ImageNet mean and deviation; output (n + 1) / 2 as RGB. The
file is {"model": state dict} with "module." prefixes; the block shapes are read from it, so the tests'
tiny file builds the same network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

FILE, KIND = "scannet.pt", "normal_bae"
STRIDES = (1, 2, 2, 2, 1, 2, 1)  # the first block's stride in each of the seven stages
SKIPS = (0, 1, 2, 4)  # the stages whose outputs the decoder merges (1/2, 1/4, 1/8, 1/16)
BN_EPS = 1e-3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ENC, DEC = "encoder.original_model.", "decoder."


def _divisible(v: float, divisor: int = 8) -> int:
    """geffnet's channel rounding: to the nearest multiple of `divisor`, never more than 10 % down."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * v else out


@dataclass(frozen=True)
class Block:
    cin: int
    cout: int
    mid: int  # the expanded width (cin for the first stage's blocks, which do not expand)
    kernel: int
    stride: int
    reduced: int  # the squeeze-and-excite width
    expand: bool


@dataclass(frozen=True)
class Spec:
    stem: int
    stages: tuple[tuple[Block, ...], ...]
    head: int
    ups: tuple[int, int, int, int]
    mlp: int


def b5() -> Spec:
    """The released network's shapes (geffnet's B5 rules: width x 1.6, depth x 2.2 rounded up)."""
    arch = ((1, 3, 1, 16), (2, 3, 6, 24), (2, 5, 6, 40), (3, 3, 6, 80), (3, 5, 6, 112), (4, 5, 6, 192), (1, 3, 6, 320))
    cin, stages = _divisible(32 * 1.6), []
    stem = cin
    for (repeats, kernel, ratio, width), stride in zip(arch, STRIDES, strict=True):
        cout, blocks = _divisible(width * 1.6), []
        for i in range(math.ceil(repeats * 2.2)):
            mid = _divisible(cin * ratio) if ratio != 1 else cin
            blocks.append(Block(cin, cout, mid, kernel, stride if i == 0 else 1, _divisible(cin * 0.25, 1), ratio != 1))
            cin = cout
        stages.append(tuple(blocks))
    return Spec(stem, tuple(stages), _divisible(1280 * 1.6), (1024, 512, 256, 128), 128)


def spec_of(state: dict) -> Spec:
    """The shapes of a scannet.pt-layout state dict."""
    encoder = encoder_spec_of(state)
    ups = tuple(int(state[f"{DEC}up{i}._net.0.weight"].shape[0]) for i in range(1, 5))
    return Spec(encoder.stem, encoder.stages, encoder.head, ups, int(state[f"{DEC}out_conv_res4.0.weight"].shape[0]))


def encoder_spec_of(state: dict) -> Spec:
    """The EfficientNet's shapes of a state dict with it under `encoder.original_model.` (the decoder's left
    at 0: normal_dsine has another decoder)."""
    stages = []
    for s in range(len(STRIDES)):
        blocks, b = [], 0
        while f"{ENC}blocks.{s}.{b}.conv_dw.weight" in state:
            p = f"{ENC}blocks.{s}.{b}."
            expand = f"{p}conv_pwl.weight" in state
            dw = state[f"{p}conv_dw.weight"]
            out = state[f"{p}conv_pwl.weight" if expand else f"{p}conv_pw.weight"]
            cin = int(state[f"{p}conv_pw.weight"].shape[1]) if expand else int(dw.shape[0])
            blocks.append(Block(cin, int(out.shape[0]), int(dw.shape[0]), int(dw.shape[-1]),
                                STRIDES[s] if b == 0 else 1, int(state[f"{p}se.conv_reduce.weight"].shape[0]), expand))
            b += 1
        if not blocks:
            raise KeyError(f"stage {s}")
        stages.append(tuple(blocks))
    return Spec(int(state[f"{ENC}conv_stem.weight"].shape[0]), tuple(stages),
                int(state[f"{ENC}conv_head.weight"].shape[0]), (0, 0, 0, 0), 0)


class _SameConv(nn.Conv2d):
    """A bias-free convolution with TensorFlow's "same" padding (worked out per input for stride 2)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=0 if stride > 1 else k // 2, groups=groups, bias=False)

    def forward(self, x):
        if self.stride[0] > 1:
            pads = []
            for size in (x.shape[3], x.shape[2]):
                need = max((math.ceil(size / self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - size, 0)
                pads += [need // 2, need - need // 2]
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(width: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(width, eps=BN_EPS)


class _SqueezeExcite(nn.Module):
    def __init__(self, width: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(width, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, width, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class _MBBlock(nn.Module):
    """geffnet's InvertedResidual (expand) or DepthwiseSeparableConv (no expansion), keys as theirs."""

    def __init__(self, b: Block):
        super().__init__()
        self.expand = b.expand
        self.residual = b.stride == 1 and b.cin == b.cout
        if b.expand:
            self.conv_pw, self.bn1 = _SameConv(b.cin, b.mid, 1), _bn(b.mid)
            self.conv_dw, self.bn2 = _SameConv(b.mid, b.mid, b.kernel, b.stride, groups=b.mid), _bn(b.mid)
            self.se = _SqueezeExcite(b.mid, b.reduced)
            self.conv_pwl, self.bn3 = _SameConv(b.mid, b.cout, 1), _bn(b.cout)
        else:
            self.conv_dw, self.bn1 = _SameConv(b.cin, b.cin, b.kernel, b.stride, groups=b.cin), _bn(b.cin)
            self.se = _SqueezeExcite(b.cin, b.reduced)
            self.conv_pw, self.bn2 = _SameConv(b.cin, b.cout, 1), _bn(b.cout)

    def forward(self, x):
        if self.expand:
            h = F.silu(self.bn2(self.conv_dw(F.silu(self.bn1(self.conv_pw(x))))))
            h = self.bn3(self.conv_pwl(self.se(h)))
        else:
            h = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))
        return h + x if self.residual else h


class _EfficientNet(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.conv_stem, self.bn1 = _SameConv(3, spec.stem, 3, 2), _bn(spec.stem)
        self.blocks = nn.Sequential(*[nn.Sequential(*[_MBBlock(b) for b in stage]) for stage in spec.stages])
        self.conv_head = _SameConv(spec.stages[-1][-1].cout, spec.head, 1)
        self.bn2 = _bn(spec.head)  # in the file; the decoder reads the head before it

    def forward(self, x) -> list[torch.Tensor]:
        h = F.silu(self.bn1(self.conv_stem(x)))
        skips = []
        for i, stage in enumerate(self.blocks):
            h = stage(h)
            if i in SKIPS:
                skips.append(h)
        return [*skips, self.conv_head(h)]


class _Encoder(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        self.original_model = _EfficientNet(spec)


class _UpMerge(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self._net = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU())

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return self._net(torch.cat([x, skip], 1))


def _mlp(cin: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, width, 1), nn.ReLU(), nn.Conv1d(width, width, 1), nn.ReLU(),
                         nn.Conv1d(width, width, 1), nn.ReLU(), nn.Conv1d(width, 4, 1))


def _unit_normal(x: torch.Tensor) -> torch.Tensor:
    """The first three channels scaled to unit length (the fourth, the concentration, as the net learned it)."""
    n, kappa = x[:, :3], x[:, 3:]
    return torch.cat([n / (n.pow(2).sum(1, keepdim=True).sqrt() + 1e-10), F.elu(kappa) + 1.01], 1)


class _Decoder(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        skips = [spec.stages[i][-1].cout for i in SKIPS]
        self.conv2 = nn.Conv2d(spec.head, spec.head, 1)
        widths = (spec.head, *spec.ups)
        for i in range(4):
            setattr(self, f"up{i + 1}", _UpMerge(widths[i] + skips[3 - i], widths[i + 1]))
        self.out_conv_res8 = nn.Conv2d(spec.ups[1], 4, 3, padding=1)
        self.out_conv_res4 = _mlp(spec.ups[1] + 4, spec.mlp)
        self.out_conv_res2 = _mlp(spec.ups[2] + 4, spec.mlp)
        self.out_conv_res1 = _mlp(spec.ups[3] + 4, spec.mlp)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        s0, s1, s2, s4, head = feats
        d1 = self.up1(self.conv2(head), s4)
        d2 = self.up2(d1, s2)
        d3 = self.up3(d2, s1)
        d4 = self.up4(d3, s0)
        out = _unit_normal(self.out_conv_res8(d2))
        for features, mlp in ((d2, self.out_conv_res4), (d3, self.out_conv_res2), (d4, self.out_conv_res1)):
            both = torch.cat([F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
                              for t in (features, out)], 1)
            b, c, h, w = both.shape
            out = _unit_normal(mlp(both.view(b, c, h * w))).view(b, 4, h, w)
        return out


class NormalBae(nn.Module):
    """Keys as in scannet.pt: encoder.original_model.* (geffnet's names), decoder.*"""

    def __init__(self, spec: Spec | None = None):
        super().__init__()
        spec = spec or b5()
        self.encoder = _Encoder(spec)
        self.decoder = _Decoder(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder.original_model(x))


def load(path: Path) -> NormalBae:
    state = files.read_state_dict(path, nested="model")
    try:
        spec = spec_of(state)
    except (KeyError, AttributeError, IndexError, TypeError):
        raise ModelLoadError(f"{path.name}: not a normal_bae (NNET) weight file (no EfficientNet encoder and"
                             " decoder)") from None
    return files.load_strict(NormalBae(spec), state, path, "normal_bae (NNET)")


def normals(net: NormalBae, img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3: (normal + 1) / 2 of a uint8 RGB picture whose sides are multiples of 32."""
    device = next(net.parameters()).device
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float().permute(2, 0, 1)[None] / 255.0
        n = net((x - mean) / std)[0, :3].float()
        out = ((n + 1.0) * 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (out * 255.0).clip(0, 255).astype(np.uint8)


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """The `normal_bae` map, the short side at `res` (padded to 64 while estimating)."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return normals(net, padded)[:h, :w]
