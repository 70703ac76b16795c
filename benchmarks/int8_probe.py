"""Would an int8 UNet pay on this CPU? Dynamic int8 linears and/or 3x3 convolutions, A/B on one loaded model.

    .venv/bin/python benchmarks/int8_probe.py [CHECKPOINT] [--size 512] [--pairs 4] [--layers linear|conv|both]

Issue 17 welcomes an opt-in int8 path (AVX512-VNNI and AMX-INT8 double the bf16 matmul peak) if it is
worth it. This measures whether it is, before any of it goes into the engine. Side B swaps the UNet's
big layers for oneDNN's quantized kernels, the way PyTorch's own x86 int8 path computes them:
- linears (input width >= 320): weights int8 per output channel, activations int8 per tensor with the
  scale taken from each call's own max |x| (dynamic: no calibration set), `onednn.qlinear_pointwise`
  with a bf16 output and the bias fused;
- 3x3 convolutions (>= 320 input channels): weights int8 per output channel, activations uint8 per
  tensor with a zero point from each call's min and max, `onednn.qconv2d_pointwise`, bf16 output.
The GEGLU feed-forwards' projections keep Darkroom's fused bf16 GEMMs (they read the weight directly).
Side A is Darkroom's default bf16 path. Prints the swapped layer count, B's relative error against A
on one UNet call, and the per-pair A/B time ratios (`one_model.py`). Random weights have no outlier
channels, so a real model's int8 error would be larger than the one printed here, not smaller.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

import darkroom  # noqa: F401  (offline first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import one_model  # noqa: E402

onednn = torch.ops.onednn


def _per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weights and their float32 scale per output channel (symmetric)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-8) / 127
    return torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).to(torch.int8), scale


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        wq, self.w_scale = _per_channel(linear.weight)
        self.packed = onednn.qlinear_prepack(wq, None)
        self.w_zp = torch.zeros(wq.shape[0], dtype=torch.int64)
        self.b = None if linear.bias is None else linear.bias.detach().float()
        self.weight, self.bias = linear.weight, linear.bias  # what other code reads off a linear
        self.in_features = linear.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        lo, hi = torch.aminmax(flat)
        scale = (torch.maximum(hi, -lo).float() / 127).clamp(min=1e-12)
        xq = torch.round(flat * (1 / scale)).to(torch.int8)
        y = onednn.qlinear_pointwise(xq, scale.item(), 0, self.packed, self.w_scale, self.w_zp, self.b,
                                     1.0, 0, torch.bfloat16, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])


class Int8Conv(nn.Module):
    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.wq, self.w_scale = _per_channel(conv.weight)
        self.w_zp = torch.zeros(self.wq.shape[0], dtype=torch.int64)
        self.b = None if conv.bias is None else conv.bias.detach().float()
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.packed = onednn.qconv_prepack(self.wq, self.w_scale, 1.0, 0, *self.geometry, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x)
        lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
        scale = ((hi - lo) / 255).clamp(min=1e-12)
        zp = int(torch.round(-lo / scale).item())
        xq = torch.clamp(torch.round(x * (1 / scale)) + zp, 0, 255).to(torch.uint8)
        xq = xq.contiguous(memory_format=torch.channels_last)
        return onednn.qconv2d_pointwise(xq, scale.item(), zp, self.packed, self.w_scale, self.w_zp, self.b,
                                        *self.geometry, 1.0, 0, torch.bfloat16, "none", [], "")


def int8_swaps(unet: nn.Module, layers: str) -> list[tuple[nn.Module, str, nn.Module, nn.Module]]:
    """(parent, name, original, int8 replacement) for each layer the probe quantizes."""
    swaps = []
    for parent in unet.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and layers in ("linear", "both") and child.in_features >= 320:
                swaps.append((parent, name, child, Int8Linear(child)))
            elif (isinstance(child, nn.Conv2d) and layers in ("conv", "both") and child.in_channels >= 320
                  and child.kernel_size == (3, 3)):
                swaps.append((parent, name, child, Int8Conv(child)))
    return swaps


def main(argv: list[str] | None = None) -> int:
    parser = one_model.parser(__doc__, "int8_probe.json", pairs=4)
    parser.add_argument("--layers", choices=("linear", "conv", "both"), default="both")
    args = parser.parse_args(argv)
    _, model = one_model.load(args.checkpoint, args.size, "int8_probe_", args.precision)
    swaps = int8_swaps(model.unet, args.layers)
    call = one_model.unet_call(model, args.size)

    def set_side(side: str) -> None:
        for parent, name, original, int8 in swaps:
            setattr(parent, name, int8 if side == "B" else original)

    print(one_model.describe(args.checkpoint, args.size, model), f"| int8 {args.layers}: {len(swaps)} layers",
          flush=True)
    with torch.no_grad():
        set_side("A")
        a = call().float()
        set_side("B")
        b = call().float()
        error = ((b - a).norm() / a.norm()).item()
        print(f"B against A (one UNet call): relative error {error:.2e}", flush=True)
        s = one_model.summary(one_model.alternate(call, set_side, args.pairs))
    set_side("A")
    print(f"UNet call: A (bf16) median {s['A']:.3f} s, B (int8 {args.layers}) median {s['B']:.3f} s; "
          f"{one_model.ratio_text(s)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
