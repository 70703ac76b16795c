"""The compute floor of a step: the model's FLOPs over this machine's measured bf16 matmul peak.

FLOPs come from the configs alone: the modules are built on the meta device (no weights, no
memory) and one forward is traced under `torch.utils.flop_counter.FlopCounterMode`, which
counts matmuls, convolutions and attention (2 FLOPs per multiply-add). Norms, activations
and other elementwise work count 0: they are memory-bound, and the floor is what the
multiply-adds alone would take at the best rate this CPU reaches.

The peak is measured, not taken from a datasheet: the best of several large bf16 matmuls
(`torch.mm`, 4096 x 4096 x 4096 by default) on the same torch threads as the benchmark.
"""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` over `repeats` timed runs (after one warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def count_flops(fn) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of `fn()`."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    per_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), per_op


def unet_step_flops(unet_config: dict, size: int, batch: int = 2, context: tuple[int, int] = (77, 768),
                    added_cond: dict | None = None) -> tuple[int, dict[str, int]]:
    """FLOPs of one UNet call on the CFG batch (`batch` = 2: uncond + cond) at `size` pixels."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).eval()
        latent = size // 8
        x = torch.empty(batch, unet_config.get("in_channels", 4), latent, latent)
        t = torch.full((batch,), 500.0)
        ctx = torch.empty(batch, *context)
        kwargs = {}
        if added_cond:
            kwargs["added_cond_kwargs"] = {k: torch.empty(batch, *shape) for k, shape in added_cond.items()}
        return count_flops(lambda: unet(x, t, encoder_hidden_states=ctx, **kwargs))


def vae_decode_flops(vae_config: dict, size: int) -> tuple[int, dict[str, int]]:
    """FLOPs of decoding one image's latents at `size` pixels."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_config).eval()
        z = torch.empty(1, vae_config.get("latent_channels", 4), size // 8, size // 8)
        return count_flops(lambda: vae.decode(z))
