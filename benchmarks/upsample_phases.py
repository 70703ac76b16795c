"""One upsampler layer (nearest 2x + 3x3 conv): diffusers' Upsample2D against darkroom's phase convolutions.

    .venv/bin/python benchmarks/upsample_phases.py [--rounds 5]

For each shape an SD VAE decoder has (and smaller ones, where the phases stop paying) and each CPU
dtype (bf16 where the CPU has it, float32): the layer as diffusers runs it (interpolate, then the
conv) and as `darkroom.engine.upsample_conv` does (four 2x2 kernels on the map as it is), alternating
in one process, best of `--rounds`; prints the ratio and each side's distance to a float32 layer.
This is what `upsample_conv.MIN_PIXELS` was set from.
"""

from __future__ import annotations

import argparse
import time

import torch

import darkroom  # noqa: F401  (offline first)
from darkroom.engine import memory, upsample_conv

SHAPES = ((512, 16), (512, 32), (512, 64), (512, 96), (512, 128), (256, 256), (128, 256), (512, 256))


def main(argv: list[str] | None = None) -> int:
    from diffusers.models.upsampling import Upsample2D

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=("bf16", "fp32", "both"), default="both")
    args = parser.parse_args(argv)
    memory.keep_large_allocations()  # as Darkroom runs its VAE
    dtypes = {"bf16": [torch.bfloat16], "fp32": [torch.float32], "both": [torch.bfloat16, torch.float32]}[args.dtype]
    if torch.bfloat16 in dtypes and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        dtypes.remove(torch.bfloat16)
        print("this CPU has no native bf16: float32 only")
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}")
    print("dtype    channels  input   diffusers ms  phases ms  ratio  error diffusers  error phases")
    every = dict.fromkeys(dtypes, 1)
    with torch.no_grad():
        for dtype in dtypes:
            for channels, size in SHAPES:
                torch.manual_seed(0)
                up32 = Upsample2D(channels, use_conv=True).eval()
                up = Upsample2D(channels, use_conv=True).eval()
                up.load_state_dict(up32.state_dict())
                up = up.to(dtype, memory_format=torch.channels_last)
                x32 = torch.randn(1, channels, size, size).contiguous(memory_format=torch.channels_last)
                x = x32.to(dtype)
                saved, upsample_conv.MIN_PIXELS = upsample_conv.MIN_PIXELS, every
                try:
                    sides = {"diffusers": lambda up=up, x=x: up(x),
                             "phases": lambda up=up, x=x: upsample_conv.forward(up, x)}
                    best = {}
                    out = {name: f().float() for name, f in sides.items()}  # warm-up: kernels built
                    for _ in range(args.rounds):
                        for name, f in sides.items():
                            t0 = time.perf_counter()
                            f()
                            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
                finally:
                    upsample_conv.MIN_PIXELS = saved
                exact = up32(x32)
                err = {name: ((y - exact).norm() / exact.norm()).item() for name, y in out.items()}
                print(f"{str(dtype).removeprefix('torch.'):8} {channels:8}  {size:3}x{size:<3} "
                      f"{1e3 * best['diffusers']:12.1f} {1e3 * best['phases']:10.1f} "
                      f"{best['diffusers'] / best['phases']:6.2f}  {err['diffusers']:15.2e} {err['phases']:13.2e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
