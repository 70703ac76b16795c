"""A/B of token merging (the webui's token_merging_ratio, darkroom/engine/token_merging.py) on one loaded model.

    .venv/bin/python benchmarks/token_merging_ab.py [CHECKPOINT] [--size 512] [--ratios 0.3 0.5] [--pairs 4]

One engine (Darkroom's default CPU path) loads the file; single UNet calls on the CFG batch alternate
between no merging (A) and each ratio (B), at the same timestep and inputs, so each pair ran on the same
machine state. Prints the per-pair ratio A/B with quartiles and how far each ratio's output is from A's
(relative to A's size). Token merging changes the picture: a few-percent output difference per call is
what a user trades for the time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import one_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = one_model.parser(__doc__, "token_merging_ab.json", pairs=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    args = parser.parse_args(argv)

    from darkroom.engine.token_merging import token_merging

    _, model = one_model.load(args.checkpoint, args.size, "tome_ab_", args.precision)
    unet = one_model.unet_call(model, args.size)
    print(one_model.describe(args.checkpoint, args.size, model), flush=True)
    record: dict = {"checkpoint": str(args.checkpoint), "size": args.size, "torch": torch.__version__}
    merging = {"B": 0.0, "now": 0.0}  # side B's ratio; the ratio of the next call

    def set_side(name: str) -> None:
        merging["now"] = merging["B"] if name == "B" else 0.0

    def call() -> torch.Tensor:
        with token_merging(model.unet, merging["now"]):
            return unet()

    with torch.no_grad():
        base = call().float()
        for ratio in args.ratios:
            merging["B"] = ratio
            set_side("B")
            rel = ((call().float() - base).norm() / base.norm()).item()  # warm-up, and the output to compare
            times = one_model.alternate(call, set_side, args.pairs, label=f"ratio {ratio} ")
            s = one_model.summary(times)
            print(f"ratio {ratio}: A {s['A']:.3f} s, B {s['B']:.3f} s per UNet call; {one_model.ratio_text(s)};"
                  f" output |B - A| / |A| = {rel:.3f}", flush=True)
            record[str(ratio)] = {"times": times, "ratios": s["ratios"], "relative_difference": rel}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
