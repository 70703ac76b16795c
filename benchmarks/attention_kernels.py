"""Attention at the UNets' real shapes: torch's fused CPU kernel against query-sliced matmul + softmax.

Issue 17 asked whether an attention built from bf16 matmuls (which run on AMX tiles, near the matmul peak)
could beat `F.scaled_dot_product_attention`'s CPU flash kernel, whose softmax and online rescaling are vector
work. Both run in one process on the same random bf16 tensors; each time is the best of five calls after a
warm-up, and the error is against an fp32 SDPA. Prints one line per shape with the ratio (> 1: sliced faster).

Usage: .venv/bin/python benchmarks/attention_kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

# name, batch (the CFG pair), heads, query tokens, key tokens, head dim
SHAPES = [
    ("SD1.5 self-attention, 64x64 latent", 2, 8, 4096, 4096, 40),
    ("SD1.5 self-attention, 32x32 latent", 2, 8, 1024, 1024, 80),
    ("SD1.5 cross-attention, 64x64 latent", 2, 8, 4096, 77, 40),
    ("SDXL self-attention, 64x64 latent", 2, 10, 4096, 4096, 64),
    ("SDXL self-attention, 32x32 latent", 2, 20, 1024, 1024, 64),
]


def sliced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Softmax attention a block of queries at a time: two batched matmuls and a softmax per block."""
    out = torch.empty_like(q)
    kt = k.transpose(-1, -2)
    scale = q.shape[-1] ** -0.5
    for s in range(0, q.shape[-2], chunk):
        weights = torch.matmul(q[..., s:s + chunk, :] * scale, kt).softmax(-1)
        out[..., s:s + chunk, :] = torch.matmul(weights, v)
    return out


def best(fn, n: int = 5) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16")
    for name, b, h, n, m, d in SHAPES:
        q, k, v = (torch.randn(b, h, t, d, dtype=torch.bfloat16) for t in (n, m, m))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        fused = best(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        err = (F.scaled_dot_product_attention(q, k, v).float() - ref).abs().max().item()
        flops = 4 * b * h * n * m * d
        line = [f"{name}: SDPA {fused * 1e3:.1f} ms ({flops / fused / 1e9:.0f} GFLOP/s, max error {err:.2g})"]
        for chunk in (256, 1024):
            if chunk > n:
                continue
            t = best(lambda q=q, k=k, v=v, c=chunk: sliced(q, k, v, c))
            e = (sliced(q, k, v, chunk).float() - ref).abs().max().item()
            line.append(f"sliced by {chunk}: {t * 1e3:.1f} ms = {fused / t:.2f}x (error {e:.2g})")
        print("; ".join(line), flush=True)


if __name__ == "__main__":
    main()
