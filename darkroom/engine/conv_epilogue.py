"""A convolution with a tensor added in its epilogue (oneDNN's binary post-op), for residual connections.

`conv(x) + other` as diffusers writes it is a convolution, then a separate pass that reads its output and
`other` and writes the sum: at a VAE's 512x512 x 128 channels that pass is a third of the convolution's
time (57 -> 39 ms fused). Used by darkroom.engine.speed (the resnets' residual) and vae_bands (the same
residual, band by band). bf16 on the CPU only, like the GEGLU epilogues: the sum is rounded to bf16 once
instead of twice, so not the same bits as diffusers' (and no further from fp32). Anything else (fp32,
grad, hooks on the conv, an extension's forward, torch.compile tracing, an unusual conv) gets conv(x)
called as a module, then the add.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["available", "conv_add", "fusible", "global_hooks"]


def global_hooks() -> bool:
    """Whether any global module forward (pre-)hook is set: then every module must run as a module."""
    from torch.nn.modules import module as nn_module

    return bool(nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN's convolution with an add epilogue, giving conv + other."""
    try:
        x = torch.ones(1, 4, 6, 6, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(torch.bfloat16, memory_format=torch.channels_last)
        other = torch.full((1, 4, 6, 6), 2.0, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
        with torch.no_grad():
            out = torch.ops.mkldnn._convolution_pointwise(x, other, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1],
                                                          1, "add", 1.0, None, [], None)
            return torch.allclose(out.float(), (conv(x) + other).float(), rtol=0.02, atol=0.02)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def fusible(conv: torch.nn.Module, x: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether conv_add would fuse: a plain bf16 nn.Conv2d on the CPU, no grad, no hooks, no tracing."""
    return (type(conv) is torch.nn.Conv2d and x.dtype is torch.bfloat16 and conv.weight.dtype is torch.bfloat16
            and other.dtype is torch.bfloat16 and x.device.type == "cpu" and "forward" not in vars(conv)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and not torch.is_grad_enabled() and not conv._forward_hooks and not conv._forward_pre_hooks
            and not torch.compiler.is_compiling() and not global_hooks() and available())


def conv_add(conv: torch.nn.Conv2d, x: torch.Tensor, other: torch.Tensor, into_other: bool = False,
             padding: tuple[int, int] | None = None) -> torch.Tensor:
    """conv(x) + other, the sum in the convolution's epilogue where `fusible`. `into_other`: `other` is a
    tensor nothing else holds, and takes the sum in place (no new output: no more memory alive than
    computing conv(x) and adding it). `padding` replaces the conv's own (vae_bands: no padding across
    a band's edge rows, which are real rows); only where it fuses: the caller checks `fusible` first."""
    if fusible(conv, x, other):
        pad = list(padding if padding is not None else conv.padding)
        args = (x, conv.weight, conv.bias, pad, list(conv.stride), list(conv.dilation), conv.groups,
                "add", 1.0, None, [], None)
        if into_other and other.is_contiguous(memory_format=torch.channels_last) and other.shape[0] == x.shape[0]:
            return torch.ops.mkldnn._convolution_pointwise_(other, *args)
        if other.is_contiguous(memory_format=torch.channels_last) or other.is_contiguous():  # not a strided view
            out = torch.ops.mkldnn._convolution_pointwise(args[0], other, *args[1:])
            if out.shape == other.shape:
                return out
    y = conv(x) if padding is None else torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, padding,
                                                                   conv.dilation, conv.groups)
    if torch.is_grad_enabled() and (y.requires_grad or other.requires_grad):
        return y + other
    return y.add_(other)
