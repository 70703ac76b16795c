"""3x3 convolutions on small maps as one matrix product over gathered patches.

oneDNN reorders a convolution's weight into its own blocked layout on every call. At a UNet's lowest
resolutions (8x8 and 16x16 at 512x512) that reorder costs as much as the arithmetic: a 1280-channel
3x3 conv on SD1.5's 8x8 CFG batch ran at a fraction of the matmul peak (benchmarks/README.md). Here
the input's 3x3 patches are gathered into a matrix [pixels, 9 * in] (at these sizes a few MB) and
multiplied with the weight read as [out, 9 * in], a view of the channels-last weight (no copy, so
merged LoRAs count), through oneDNN's matmul with the bias, and the resnet's residual where there is
one, in its epilogue. The same products summed in float32 and rounded once, as the conv does.
bf16 on the CPU only, where it was measured; everything else runs the conv as a module.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from darkroom.engine import conv_epilogue

__all__ = ["MAX_PIXELS", "forward", "pays"]

MAX_PIXELS = ((1280, 512), (0, 144))
"""(at least this many input channels, at most this many pixels over the batch): where the product beat
the conv per layer (benchmarks/gemm_conv_layers.py, 2-core Xeon, bf16): 1.1-1.8x with 1280-2560 input
channels up to 512 pixels (16x16 on a CFG batch of 2), 1.0-1.8x with 640 channels up to 144 (8x8 on 2,
12x12 on 1); slower above (640 channels at 16x16: 0.67-0.87x; 32x32: 0.52-1.01x)."""


def pays(conv: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv(x)` is done here: a plain 3x3 "same" conv with a channels-last bf16 weight, a
    channels-last bf16 input of few enough pixels, inference, nothing hooked on the conv (the last
    conditions are conv_epilogue's)."""
    return (conv_epilogue.fusible(conv, x, x) and x.dim() == 4
            and any(conv.in_channels >= channels and x.shape[0] * x.shape[2] * x.shape[3] <= most
                    for channels, most in MAX_PIXELS)
            and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1
            and x.shape[1] == conv.in_channels and x.is_contiguous(memory_format=torch.channels_last)
            and conv.weight.is_contiguous(memory_format=torch.channels_last) and _available())


def forward(conv: torch.nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None = None,
            into_residual: bool = False) -> torch.Tensor:
    """conv(x) [+ residual]: as a matrix product where `pays`, else the conv as a module, the residual
    then added in its epilogue where conv_epilogue can (`into_residual`: in place into `residual`, a
    tensor nothing else holds, as conv_epilogue.conv_add's `into_other`)."""
    if pays(conv, x) and (residual is None or (residual.shape == (x.shape[0], conv.out_channels, *x.shape[2:])
                                               and residual.dtype is x.dtype)):
        return _product(conv, x, residual)
    if residual is None:
        return conv(x)
    return conv_epilogue.conv_add(conv, x, residual, into_other=into_residual)


def _product(conv: torch.nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    n, channels, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [n, h + 2, w + 2, in]
    patches = torch.cat([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], dim=3)
    patches = patches.view(n * h * w, 9 * channels)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 9 * channels)  # a view: (out, dy, dx, in)
    if residual is None:
        y = torch.ops.mkldnn._linear_pointwise(patches, weight, conv.bias, "none", [], "")
    else:
        other = residual.permute(0, 2, 3, 1).reshape(n * h * w, conv.out_channels)
        y = torch.ops.mkldnn._linear_pointwise.binary(patches, other, weight, conv.bias, "add")
    return y.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)


@functools.cache
def _available() -> bool:
    """Whether this torch build's oneDNN matmul with a bias and an add epilogue gives conv(x) + other."""
    try:
        def values(*shape: int) -> torch.Tensor:  # fixed, varied values; the global RNG is left alone
            count = torch.tensor(shape).prod().item()
            return torch.sin(torch.arange(count, dtype=torch.float32)).view(shape).to(torch.bfloat16)

        conv = torch.nn.utils.skip_init(torch.nn.Conv2d, 4, 3, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(values(3, 4, 3, 3))
            conv.bias.copy_(values(3))
            conv.to(torch.bfloat16, memory_format=torch.channels_last)
            x = values(1, 4, 5, 6).contiguous(memory_format=torch.channels_last)
            other = values(1, 3, 5, 6).contiguous(memory_format=torch.channels_last)
            expected = conv(x).float()
            return (torch.allclose(_product(conv, x, None).float(), expected, rtol=0.02, atol=0.02)
                    and torch.allclose(_product(conv, x, other).float(), expected + other.float(),
                                       rtol=0.02, atol=0.02))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
