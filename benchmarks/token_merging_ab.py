"""A/B of token merging (the webui's token_merging_ratio, darkroom/engine/token_merging.py) on one loaded model.

    .venv/bin/python benchmarks/token_merging_ab.py [CHECKPOINT] [--size 512] [--ratios 0.3 0.5] [--pairs 4]

One engine (Darkroom's default CPU path) loads the file; single UNet calls on the CFG batch alternate
between no merging (A) and each ratio (B), at the same timestep and inputs, so each pair ran on the same
machine state. Prints the per-pair ratio A/B with quartiles and how far each ratio's output is from A's
(relative to A's size). Token merging changes the picture: a few-percent output difference per call is
what a user trades for the time.
"""

from __future__ import annotations

import argparse
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", default=HERE / "out" / "sd15-random-fp16.safetensors")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "token_merging_ab.json")
    args = parser.parse_args(argv)

    from darkroom.api import build_engine
    from darkroom.engine.token_merging import token_merging
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    home = Home(Path(tempfile.mkdtemp(prefix="tome_ab_"))).ensure()
    engine = build_engine(home, device="cpu")
    engine.load(GenerationRequest(prompt="x", model=str(args.checkpoint), width=args.size, height=args.size))
    model = engine.cache.current
    x, ctx, kwargs = unet_inputs(model, args.size)

    def call(ratio: float) -> torch.Tensor:
        with token_merging(model.unet, ratio):
            return model.unet(x, torch.tensor(500.0), encoder_hidden_states=ctx, **kwargs).sample

    print(f"{args.checkpoint.name}, {args.size}x{args.size}, dtype {model.dtype}, threads {torch.get_num_threads()}",
          flush=True)
    record: dict = {"checkpoint": str(args.checkpoint), "size": args.size, "torch": torch.__version__}
    with torch.no_grad():
        base = call(0.0).float()
        for ratio in args.ratios:
            out = call(ratio).float()  # warm-up, and the output to compare
            rel = ((out - base).norm() / base.norm()).item()
            times: dict[str, list[float]] = {"A": [], "B": []}
            for i in range(args.pairs):
                for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                    t0 = time.perf_counter()
                    call(ratio if side == "B" else 0.0)
                    times[side].append(time.perf_counter() - t0)
            ratios = sorted(a / b for a, b in zip(times["A"], times["B"], strict=True))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            print(f"ratio {ratio}: A {statistics.median(times['A']):.3f} s, B {statistics.median(times['B']):.3f} s"
                  f" per UNet call; A/B per pair median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-"
                  f"{q[2]:.3f}, n={len(ratios)}); output |B - A| / |A| = {rel:.3f}", flush=True)
            record[str(ratio)] = {"times": times, "ratios": ratios, "relative_difference": rel}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
