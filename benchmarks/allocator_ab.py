"""A/B of `darkroom.engine.memory.keep_large_allocations` (glibc's mallopt), on one loaded model.

    .venv/bin/python benchmarks/allocator_ab.py [CHECKPOINT] [--size 512] [--pairs 6]
    .venv/bin/python benchmarks/allocator_ab.py benchmarks/out/sdxl-random-fp16.safetensors --size 1024 --pairs 3

One engine (Darkroom's default CPU path) loads the file. Side A puts glibc's thresholds back where
its defaults settle (blocks above 32 MiB mmapped and unmapped on free; the heap trimmed above
64 MiB free); side B is Darkroom's setting (big blocks from the heap, kept for reuse). Single UNet
calls on the CFG batch, then VAE decodes, alternate A, B, B, A, ... on the main thread; prints
the per-pair ratios A/B with quartiles. The values computed are the same on both sides (only where
the memory comes from differs): checked. The decode is called directly here, to show what keeping
freed blocks would give it; a generation's decode runs lean (`memory.lean_allocations`), because
the heap's holes raise its peak, the generation's peak (SD1.5 512x512 3.04 -> 3.2-3.4 GiB).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from fusions_ab import unet_inputs  # noqa: E402

MIB = 1 << 20
GLIBC_SETTLED = {-3: 32 * MIB, -1: 64 * MIB}  # M_MMAP_THRESHOLD's dynamic maximum, and twice it for M_TRIM
DARKROOM = {-3: 2**31 - 1, -1: 2**31 - 1}


def set_malloc(params: dict[int, int]) -> None:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    for param, value in params.items():
        if mallopt(param, value) != 1:
            raise SystemExit(f"mallopt({param}, {value}) refused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", default=HERE / "out" / "sd15-random-fp16.safetensors")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--only", choices=("unet", "decode"), default=None)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "allocator_ab.json")
    args = parser.parse_args(argv)

    from darkroom.api import build_engine
    from darkroom.engine import memory
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    home = Home(Path(tempfile.mkdtemp(prefix="allocator_ab_"))).ensure()
    engine = build_engine(home, device="cpu")
    if not memory.keep_large_allocations():
        raise SystemExit("keep_large_allocations() did not apply here (not glibc, or DARKROOM_MALLOC=default)")
    engine.load(GenerationRequest(prompt="x", model=str(args.checkpoint), width=args.size, height=args.size))
    model = engine.cache.current
    x, ctx, kwargs = unet_inputs(model, args.size)
    g = torch.Generator().manual_seed(1)
    cells = args.size // model.vae_scale_factor
    lat = torch.randn(1, model.vae.config.latent_channels, cells, cells, generator=g).to(model.vae_dtype)
    calls = {
        "unet": lambda: model.unet(x, torch.tensor(500.0), encoder_hidden_states=ctx, **kwargs).sample,
        "decode": lambda: model.vae.decode(lat).sample,
    }
    if args.only:
        calls = {args.only: calls[args.only]}
    sides = {"A": GLIBC_SETTLED, "B": DARKROOM}
    print(f"{args.checkpoint.name}, {args.size}x{args.size}, dtype {model.dtype}, threads {torch.get_num_threads()}",
          flush=True)
    record: dict = {"checkpoint": str(args.checkpoint), "size": args.size, "threads": torch.get_num_threads(),
                    "torch": torch.__version__}
    with torch.no_grad():
        for what, call in calls.items():
            times: dict[str, list[float]] = {"A": [], "B": []}
            outs = {}
            for side in ("A", "B"):  # warm-up, and the outputs to compare
                set_malloc(sides[side])
                outs[side] = call()
            same = torch.equal(outs["A"], outs["B"])
            del outs
            for i in range(args.pairs):
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    set_malloc(sides[side])
                    memory.return_freed_memory()
                    t0 = time.perf_counter()
                    call()
                    times[side].append(time.perf_counter() - t0)
                print(f"{what} pair {i + 1}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
            ratios = sorted(a / b for a, b in zip(times["A"], times["B"], strict=True))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            a_med, b_med = statistics.median(times["A"]), statistics.median(times["B"])
            print(f"{what}: A median {a_med:.3f} s, B median {b_med:.3f} s;"
                  f" A/B per pair median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, "
                  f"n={len(ratios)}); outputs identical: {same}", flush=True)
            record[what] = {"times": times, "ratios": ratios, "identical": same}
    set_malloc(DARKROOM)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
