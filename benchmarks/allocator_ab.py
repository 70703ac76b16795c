"""A/B of `darkroom.engine.memory.keep_large_allocations` (glibc's mallopt), on one loaded model.

    .venv/bin/python benchmarks/allocator_ab.py [CHECKPOINT] [--size 512] [--pairs 6]
    .venv/bin/python benchmarks/allocator_ab.py benchmarks/out/sdxl-random-fp16.safetensors --size 1024 --pairs 3

One engine (Darkroom's default CPU path) loads the file. Side A puts glibc's thresholds back where
its defaults settle (blocks above 32 MiB mmapped and unmapped on free; the heap trimmed above
64 MiB free); side B is Darkroom's setting (big blocks from the heap, kept for reuse). Single UNet
calls on the CFG batch, then VAE decodes, alternate A, B, B, A, ... on the main thread; prints
the per-pair ratios A/B with quartiles. The values computed are the same on both sides (only where
the memory comes from differs): checked. The decode is a generation's (`vae_tiling.decode`, which
hands the freed heap back before each upsampler and banded resnet, so that kept blocks do not raise
the generation's peak); its trims run on both sides.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import one_model  # noqa: E402

MIB = 1 << 20
GLIBC_SETTLED = {-3: 32 * MIB, -1: 64 * MIB}  # M_MMAP_THRESHOLD's dynamic maximum, and twice it for M_TRIM
DARKROOM = {-3: 2**31 - 1, -1: 2**31 - 1}


def set_malloc(params: dict[int, int]) -> None:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    for param, value in params.items():
        if mallopt(param, value) != 1:
            raise SystemExit(f"mallopt({param}, {value}) refused")


def main(argv: list[str] | None = None) -> int:
    parser = one_model.parser(__doc__, "allocator_ab.json", pairs=6)
    parser.add_argument("--only", choices=("unet", "decode"), default=None)
    args = parser.parse_args(argv)

    from darkroom.engine import memory, vae_tiling

    _, model = one_model.load(args.checkpoint, args.size, "allocator_ab_", args.precision)
    if not memory.keep_large_allocations():
        raise SystemExit("keep_large_allocations() did not apply here (not glibc, or DARKROOM_MALLOC=default)")
    g = torch.Generator().manual_seed(1)
    cells = args.size // model.vae_scale_factor
    lat = torch.randn(1, model.vae.config.latent_channels, cells, cells, generator=g).to(model.vae_dtype)
    calls = {"unet": one_model.unet_call(model, args.size), "decode": lambda: vae_tiling.decode(model, lat)}
    if args.only:
        calls = {args.only: calls[args.only]}
    sides = {"A": GLIBC_SETTLED, "B": DARKROOM}

    def set_side(side: str) -> None:
        set_malloc(sides[side])
        memory.return_freed_memory()

    print(one_model.describe(args.checkpoint, args.size, model), flush=True)
    record: dict = {"checkpoint": str(args.checkpoint), "size": args.size, "threads": torch.get_num_threads(),
                    "torch": torch.__version__}
    with torch.no_grad():
        for what, call in calls.items():
            outs = {}
            for side in ("A", "B"):  # warm-up, and the outputs to compare
                set_malloc(sides[side])
                outs[side] = call()
            same = torch.equal(outs["A"], outs["B"])
            del outs
            times = one_model.alternate(call, set_side, args.pairs, label=f"{what} ")
            s = one_model.summary(times)
            print(f"{what}: A median {s['A']:.3f} s, B median {s['B']:.3f} s; {one_model.ratio_text(s)};"
                  f" outputs identical: {same}", flush=True)
            record[what] = {"times": times, "ratios": s["ratios"], "identical": same}
    set_malloc(DARKROOM)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
