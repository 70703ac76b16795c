"""Where the time of one sampling step goes: torch.profiler over exactly one CFG step of
Darkroom's default CPU path, self time per aten op grouped into categories.

    .venv/bin/python benchmarks/profile_step.py [CHECKPOINT] [--size 512] [--step 2]

The profiler starts at the end of step `--step - 1` and stops at the end of step `--step`
(StepEvent callbacks), so the window holds one UNet call on the CFG batch of 2 plus the
scheduler step, nothing of the load, text encoding or decode. Self times (not totals) are
summed, so nothing is counted twice. Writes benchmarks/out/profile_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import darkroom  # noqa: F401  (offline first)

HERE = Path(__file__).resolve().parent

CATEGORIES = [  # first match wins; matched against the aten op name
    ("convolution", ("convolution", "conv2d", "mkldnn_convolution", "_convolution")),
    ("attention (SDPA kernel)", ("scaled_dot_product", "flash_attention", "efficient_attention")),
    ("attention (bmm/softmax path)", ("bmm", "baddbmm", "softmax")),
    ("linear / matmul", ("addmm", "aten::mm", "linear", "matmul")),
    ("GroupNorm", ("group_norm",)),
    ("LayerNorm", ("layer_norm",)),
    ("layout / dtype conversion", ("copy_", "_to_copy", "aten::to", "contiguous", "clone", "empty_like",
                                   "to_dense", "reorder", "permute", "transpose", "reshape", "view")),
    ("activations (SiLU/GELU)", ("silu", "gelu")),
    ("elementwise / other memory-bound", ("add", "mul", "div", "sub", "cat", "pow", "rsqrt", "exp", "chunk",
                                          "where", "fill", "zero", "neg", "sin", "cos", "arange", "upsample",
                                          "interpolate", "pad", "mean", "sum")),
]


def category(name: str) -> str:
    for label, needles in CATEGORIES:
        if any(n in name for n in needles):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", default=HERE / "out" / "sd15-random-fp16.safetensors")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--step", type=int, default=2, help="which step to profile (1 = the warm-up one)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "profile_step.json")
    args = parser.parse_args(argv)

    from darkroom.api import build_engine
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    tmp = tempfile.TemporaryDirectory()
    engine = build_engine(Home(Path(tmp.name)).ensure())
    req = GenerationRequest(model=str(args.checkpoint), prompt="a photo of a cat", negative_prompt="blurry",
                            steps=args.step + 1, width=args.size, height=args.size, cfg_scale=7.0, sampler="Euler",
                            seed=1)
    model = engine.load(req)
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
    window: dict[str, float] = {}

    def on_step(event) -> None:
        if event.step == args.step - 1 or (args.step == 1 and not window):
            window["t0"] = time.perf_counter()
            prof.start()
        elif "t0" in window and "t1" not in window:
            prof.stop()
            window["t1"] = time.perf_counter()

    load_before = os.getloadavg()
    engine.generate(req, on_step=on_step)
    wall = window["t1"] - window["t0"]
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    cats: dict[str, float] = {}
    for name, t, _ in rows:
        cats[category(name)] = cats.get(category(name), 0.0) + t
    print(f"{args.checkpoint.name}, {args.size}x{args.size}, step {args.step}: {wall:.2f} s wall,"
          f" {total:.2f} s op self time (summed over {torch.get_num_threads()} threads' dispatch: aten ops run"
          f" on the main thread, their intra-op work inside); dtype {model.dtype}; load average"
          f" {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"{'category':36s} {'s':>7s} {'%':>6s}")
    for label, t in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"{label:36s} {t:7.3f} {100 * t / total:6.1f}")
    print()
    print(f"{'top ops (self time)':48s} {'s':>7s} {'%':>6s} {'calls':>6s}")
    for name, t, n in sorted(rows, key=lambda r: -r[1])[:20]:
        print(f"{name[:48]:48s} {t:7.3f} {100 * t / total:6.1f} {n:6d}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "checkpoint": str(args.checkpoint), "size": args.size, "step": args.step, "wall_s": wall,
        "self_total_s": total, "categories": cats, "ops": [{"op": a, "self_s": b, "calls": c} for a, b, c in rows],
        "loadavg": [load_before, os.getloadavg()], "threads": torch.get_num_threads(), "dtype": str(model.dtype),
    }, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
