"""Nearest 2x upsampling followed by a 3x3 convolution, as one 2x2 convolution per output phase.

An SD VAE decoder's upsamplers double the map (nearest) and convolve it: 28 % of a decode's
multiply-adds. But output pixel (2i+dy, 2j+dx) sees only 2x2 distinct input pixels through its 3x3
window, so the kernel's taps that land on the same input pixel can be summed beforehand: four 2x2
kernels, one per phase (dy, dx), each run on the map as it is, their outputs interleaved. That is 16
multiply-adds per input pixel and channel pair where the upsampled conv does 36 (2.25x fewer), and
the 4x-size upsampled copy is never made. oneDNN runs 2x2 kernels at about two thirds of its 3x3
rate, so in bf16 the layer is 1.3-1.7x faster on big maps and slower on small ones; in float32
(CPUs without native bf16) 1.4-2.2x (`MIN_PIXELS`; benchmarks/upsample_phases.py).

Same arithmetic up to rounding: the summed taps are computed in float32 and rounded once to the
weight's dtype. In float32 that is ~1e-6; a bf16 layer lands a little further from float32 than the
upsampled conv does (relative 3.3e-3 against 2.8e-3), a whole SD1.5 decode 1.51e-2 against 1.47e-2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from darkroom.engine import conv_epilogue

__all__ = ["MIN_PIXELS", "forward", "is_plain", "kernel", "pays", "rows"]

MIN_PIXELS = {torch.bfloat16: 96 * 96, torch.float32: 32 * 32}
"""Per dtype, the smallest input map done here: below it the phase convolutions do not pay. Measured
per layer with benchmarks/upsample_phases.py on a 2-core Xeon: bf16 (oneDNN/AMX) 0.46x at 32x32 x 512
channels, 1.01x at 64x64, 1.28x at 96x96, 1.64x at 128x128; float32 0.70x at 16x16, 1.39x at 32x32,
2.08x at 128x128 (there the 2.25x fewer multiply-adds count almost in full)."""

_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx); phase p = 2 * dy + dx


def is_plain(up: torch.nn.Module) -> bool:
    """Whether `up` (a diffusers Upsample2D) is a nearest 2x copy followed by its conv and nothing else
    (no norm, not a transposed conv): what vae_bands and the phases both compute."""
    return (getattr(up, "interpolate", False) and getattr(up, "use_conv", False)
            and not getattr(up, "use_conv_transpose", True) and getattr(up, "norm", None) is None
            and getattr(up, "name", "conv") == "conv")


def pays(up: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `up` doubling `x` is done here: `is_plain` with a 3x3 "same" conv, bf16 or float32 on the
    CPU, inference, a map of at least MIN_PIXELS, nothing hooked on the conv or replacing its forward
    (an offload or an extension would be bypassed)."""
    conv = getattr(up, "conv", None)
    limit = MIN_PIXELS.get(x.dtype)
    return (limit is not None and x.dim() == 4 and x.shape[2] * x.shape[3] >= limit and is_plain(up)
            and type(conv) is torch.nn.Conv2d
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.shape[1] == conv.in_channels and conv.weight.dtype is x.dtype and x.device.type == "cpu"
            and "forward" not in vars(conv) and not conv._forward_hooks and not conv._forward_pre_hooks
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not conv_epilogue.global_hooks())


def _halves(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3 taps along `dim` summed into the 2 input pixels that phase 0 (row/column above and at) and
    phase 1 (at and below) read: (w0, w1 + w2) and (w0 + w1, w2)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t0, t1 + t2), dim), torch.stack((t0 + t1, t2), dim)


def kernel(conv: torch.nn.Conv2d) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per phase (dy, dx) in _PHASES order, the (weight [out, in, 2, 2], bias) of its convolution; read
    from the conv at each call, so merged LoRAs are followed."""
    by_row = _halves(conv.weight.float(), 2)
    return [(_halves(by_row[dy], 3)[dx].to(conv.weight.dtype).contiguous(memory_format=torch.channels_last),
             conv.bias) for dy, dx in _PHASES]


def rows(x: torch.Tensor, kernels: list[tuple[torch.Tensor, torch.Tensor | None]], first: int, last: int,
         out: torch.Tensor) -> torch.Tensor:
    """Output rows 2*first .. 2*last of conv3x3(nearest2x(x)) written into `out` (those rows only, any
    memory format), from input rows first-1 .. last (zero beyond the image, as the conv's padding).

    One convolution per phase rather than one with 4x the output channels: oneDNN ran the four 1.1-1.3x
    faster on the decoders' big maps, and only a quarter of the phase outputs exists at a time."""
    _, _, h, w = x.shape
    lo, hi = max(0, first - 1), min(h, last + 1)
    # zero rows above and below only where the slice meets the image's own edge; phase row r then
    # covers input rows lo - pad + r and the one below
    pad = 0 if 0 < first and last < h else 1
    count = last - first
    base = first - 1 - lo + pad
    source = x[:, :, lo:hi]
    target = out.permute(0, 2, 3, 1).unflatten(1, (count, 2)).unflatten(3, (w, 2))  # [n, i, dy, j, dx, c]
    for (dy, dx), (weight, bias) in zip(_PHASES, kernels, strict=True):
        phase = F.conv2d(source, weight, bias, padding=(pad, 1))
        # out[:, :, 2i+dy, 2j+dx] = phase at row i + base + dy, column j + dx
        target[:, :, dy, :, dx].copy_(phase[:, :, base + dy:base + dy + count, dx:dx + w].permute(0, 2, 3, 1))
    return out


def forward(up: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`up(x)` for an upsampler where `pays`: the whole map at once."""
    n, _, h, w = x.shape
    out = torch.empty((n, up.conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    return rows(x, kernel(up.conv), 0, h, out)
