"""Judge the starter model on the fixed held-out evaluation set, through the ordinary engine.

Each of the eval captions is generated once (seed = its index, default sampler, 20 steps,
CFG 7) with Darkroom's normal loader and engine, and the judge checks colour, position and
shape against what the caption claims. Prints the accuracies and writes them as JSON (and a
contact sheet of the first 48 images) into --out.

"relations_swapped" is the share of relations with both objects found that were drawn the other way
round ("a red circle above a blue square" with the square on top). --seed-offset draws the same captions
with other seeds, to tell a real difference between two models from chance (about +-5 points at n=200).

Usage: .venv/bin/python scripts/eval_starter.py [--model PATH] [--n 200] [--seed-offset 0] [--out training/starter/eval]
"""

import argparse
import io
import json
import time
from pathlib import Path

import darkroom  # noqa: F401  (offline first)

# isort: split
from PIL import Image, ImageDraw

from darkroom.api import build_engine
from darkroom.home import Home
from darkroom.models.starter import STARTER_FILE
from darkroom.request import GenerationRequest
from darkroom.starter_training.judge import judge, relation_ok, summarise, vae_round_trip
from darkroom.starter_training.scenes import eval_set, has_held_out

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=STARTER_FILE)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--seed-offset", type=int, default=0, help="seed of caption i is i + this")
    ap.add_argument("--out", type=Path, default=ROOT / "training" / "starter" / "eval")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    engine = build_engine(Home(args.out / "home").ensure())
    examples = eval_set()[: args.n]
    verdicts, held, sheet, swapped = [], [], [], []
    t0 = time.perf_counter()
    for i, ex in enumerate(examples):
        req = GenerationRequest(prompt=ex.text, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                                seed=i + args.seed_offset, model=str(args.model))
        image = Image.open(io.BytesIO(engine.generate(req).images[0].png)).convert("RGB")
        v = judge(image, ex)
        verdicts.append(v)
        held.append(has_held_out(ex.scene))
        if v.relation is False and all(o.colour for o in v.objects):
            a, b = (o.centroid for o in v.objects)
            swapped.append(relation_ok(ex.asserted.relation, b, a))
        elif v.relation:
            swapped.append(False)
        if len(sheet) < 48:
            sheet.append((image, ex.text, v.passed))
    seconds = time.perf_counter() - t0
    result = {
        "model": str(args.model), "n": len(examples), "steps": args.steps, "cfg": args.cfg, "sampler": args.sampler,
        "seed_offset": args.seed_offset,
        "all": summarise(verdicts),
        "relations_swapped": sum(swapped) / len(swapped) if swapped else None,
        "held_out_pairs": summarise([v for v, h in zip(verdicts, held, strict=True) if h]),
        "seen_pairs": summarise([v for v, h in zip(verdicts, held, strict=True) if not h]),
        "seconds": round(seconds, 1),
        # the same captions' drawn scenes through the model's own VAE: what the decoder lets any picture score
        "vae_round_trip": vae_round_trip(engine.cache.get(args.model).vae, examples),
    }
    (args.out / "eval.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    cell = 128
    grid = Image.new("RGB", (cell * 8, (cell + 14) * ((len(sheet) + 7) // 8)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (image, text, ok) in enumerate(sheet):
        x, y = (k % 8) * cell, (k // 8) * (cell + 14)
        grid.paste(image.resize((cell, cell)), (x, y))
        draw.text((x + 2, y + cell), ("ok " if ok else "x  ") + text[:22], fill="green" if ok else "red")
    grid.save(args.out / "sheet.png")


if __name__ == "__main__":
    main()
