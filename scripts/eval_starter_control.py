"""Judge the starter ControlNet: do objects appear where the control map draws them?

A held-out set of scenes (seeds from EVAL_SEED, a range training never draws) is drawn as clean outline maps
(darkroom.starter_training.control_maps.eval_map). Each map is generated once with diffusers'
StableDiffusionControlNetPipeline built from the starter's own modules, Darkroom's default sampler (DPM++ 2M,
schedule Automatic = Karras, over the starter's training noise schedule), 20 steps, CFG 7, seed = its index,
and a prompt that names only colour and shape ("a red circle", "a red circle and a blue square"): the map,
not the text, must say where things go. The judge then checks each object's position claim against the
scene's named position (judge.position_ok on the object's colour blob). The same prompts and seeds are also
generated without the ControlNet, as the baseline that shows the map is what places the objects.

Writes docs/starter-control-eval.json and a sample sheet docs/starter-control-eval.png (map | result pairs).

Usage: .venv/bin/python scripts/eval_starter_control.py [--control PATH] [--n 120] [--out docs/starter-control-eval]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import darkroom  # noqa: F401  (offline first)

# isort: split
import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file

from darkroom.engine.samplers import make_scheduler, resolve
from darkroom.models.configs import scheduler_config
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.models.starter import STARTER_FILE
from darkroom.starter_training import control_maps, scenes
from darkroom.starter_training.judge import judge
from darkroom.starter_training.scenes import Claims, ObjectClaim
from darkroom.text.tokenizer import load_clip_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CONTROL_FILE = ROOT / "darkroom" / "assets" / "controlnet" / "darkroom-starter-control.safetensors"
EVAL_SEED = 7772026  # scene seeds for evaluation; training draws from random.Random(20261205 + k), k < 10
TWO_OBJECT_SHARE = 0.3


def load_starter(path: Path = STARTER_FILE):
    """(unet, vae, text_encoder, tokenizer) of the starter model, float32 diffusers/transformers modules."""
    model = load_checkpoint(path, LoadOptions())
    unet, vae, text = model.unet.float().eval(), model.vae.float().eval(), model.text_encoders[0].model.float().eval()
    for m in (unet, vae, text):
        m.requires_grad_(False)
    return unet, vae, text, load_clip_tokenizer()


def load_control(path: Path = CONTROL_FILE) -> ControlNetModel:
    """The ControlNet from a single safetensors file whose metadata "config" holds its diffusers config."""
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    model = ControlNetModel.from_config(config)
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return model.float().eval().requires_grad_(False)


def default_scheduler():
    """Darkroom's default sampler (DPM++ 2M, Automatic -> Karras) as the engine makes it with the CPU source."""
    spec, label = resolve("DPM++ 2M", "Automatic")
    return make_scheduler(spec, label, scheduler_config(False))


def build_pipeline(starter, controlnet: ControlNetModel | None):
    unet, vae, text, tokenizer = starter
    common = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=default_scheduler(),
                  safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if controlnet is None:
        pipe = StableDiffusionPipeline(**common)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=controlnet, **common)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def eval_scenes(n: int, seed: int = EVAL_SEED) -> list[tuple[scenes.Scene, int]]:
    """(scene, jitter seed) pairs, fixed for the same arguments; 30% two-object scenes."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        two = (i * TWO_OBJECT_SHARE) % 1 >= 1 - TWO_OBJECT_SHARE - 1e-9
        out.append((scenes.sample_scene(rng, "train", 2 if two else 1), rng.randrange(1 << 30)))
    return out


def np_phrase(obj) -> str:
    text = f"{obj.colour} {obj.shape}"
    return ("an " if text[0] in "aeiou" else "a ") + text


def plain_prompt(scene: scenes.Scene) -> str:
    """Colour and shape of each object, no position words."""
    return " and ".join(np_phrase(o) for o in scene.objects)


def position_claims(scene: scenes.Scene) -> Claims:
    return Claims(tuple(ObjectClaim(o.shape, o.colour, None, o.position) for o in scene.objects))


@torch.no_grad()
def generate(pipe, prompts: list[str], maps: list[Image.Image] | None, seeds: list[int], steps: int = 20,
             cfg: float = 7.0, scale: float = 1.0) -> list[Image.Image]:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kwargs = dict(prompt=prompts, num_inference_steps=steps, guidance_scale=cfg, generator=gens, height=128,
                  width=128)
    if maps is not None:
        kwargs |= dict(image=maps, controlnet_conditioning_scale=scale)
    return pipe(**kwargs).images


def judge_positions(images, items) -> list[list[bool]]:
    """Per image, per object: found in its colour and in the place the map (the scene) puts it."""
    out = []
    for image, (scene, _) in zip(images, items, strict=True):
        verdict = judge(image, position_claims(scene))
        out.append([bool(o.position) for o in verdict.objects])
    return out


def swapped_ok(images, items) -> list[bool | None]:
    """Two-object scenes: both drawn places filled by the two colours the other way round (None: one object).

    A map of two outlines does not say which colour goes in which; only the outlines' shapes and the prompt's
    "a red circle and a blue square" bind them, and two objects of the same shape cannot be told apart at all.
    """
    out: list[bool | None] = []
    for image, (scene, _) in zip(images, items, strict=True):
        if len(scene.objects) != 2:
            out.append(None)
            continue
        a, b = scene.objects
        claims = Claims((ObjectClaim(a.shape, a.colour, None, b.position),
                         ObjectClaim(b.shape, b.colour, None, a.position)))
        out.append(all(bool(o.position) for o in judge(image, claims).objects))
    return out


def per_map(images, items, results, swapped) -> list[dict]:
    """One record per map, for reading the misses: the prompt, whether a pair shares its shape (a white outline
    map cannot say which colour goes in which), each object's verdict (colour found, centroid, placed) and
    whether the two colours filled the two places the other way round."""
    out = []
    for image, (scene, _), placed, sw in zip(images, items, results, swapped, strict=True):
        verdict = judge(image, position_claims(scene))
        out.append({"prompt": plain_prompt(scene), "same_shape": _same_shape(scene), "placed": placed, "swapped": sw,
                    "colour_found": [o.colour for o in verdict.objects],
                    "centroids": [None if o.centroid is None else [round(c, 1) for c in o.centroid]
                                  for o in verdict.objects]})
    return out


def rates(results: list[list[bool]], items, swapped: list[bool | None] | None = None) -> dict:
    objects = [ok for r in results for ok in r]
    single = [r[0] for r, (sc, _) in zip(results, items, strict=True) if len(sc.objects) == 1]
    pair_objects = [ok for r, (sc, _) in zip(results, items, strict=True) if len(sc.objects) == 2 for ok in r]
    pairs = [all(r) for r, (sc, _) in zip(results, items, strict=True) if len(sc.objects) == 2]
    frac = (lambda xs: round(sum(xs) / len(xs), 4) if xs else None)
    # Two outlines of one shape cannot say which of the prompt's two colours goes where: for such a pair, both
    # places filled by the two colours the other way round also puts each object where the map puts it.
    as_drawn = [ok for r, sw, (sc, _) in zip(results, swapped or [None] * len(items), items, strict=True)
                for ok in ([True] * len(r) if sw and _same_shape(sc) and not all(r) else r)]
    same = [all(r) or bool(sw) for r, sw, (sc, _) in zip(results, swapped or [None] * len(items), items, strict=True)
            if _same_shape(sc)]
    return {"objects": frac(objects), "n_objects": len(objects),
            "objects_either_order_same_shape": frac(as_drawn) if swapped is not None else None,
            "same_shape_pairs": len(same), "same_shape_pairs_filled": frac(same) if swapped is not None else None,
            "images_all_placed": frac([all(r) for r in results]),
            "single_object_scenes": frac(single), "n_single": len(single),
            "two_object_scenes_objects": frac(pair_objects), "two_object_scenes_both": frac(pairs),
            "n_two": len(pairs),
            # both places filled, by the right colours or by the two colours swapped (see swapped_ok)
            "two_object_scenes_layout": frac([all(r) or bool(sw) for r, sw, (sc, _) in
                                              zip(results, swapped or [None] * len(items), items, strict=True)
                                              if len(sc.objects) == 2]) if swapped is not None else None}


def _same_shape(scene: scenes.Scene) -> bool:
    return len(scene.objects) == 2 and scene.objects[0].shape == scene.objects[1].shape


MAP_STYLES = ("white", "coloured", "filled")


def eval_map(scene: scenes.Scene, jitter_seed: int, style: str = "white") -> Image.Image:
    """white: white outlines; coloured: each outline in its object's colour; filled: white outlines filled
    with the objects' colours."""
    return control_maps.eval_map(scene, jitter_seed, coloured=style == "coloured", filled=style == "filled")


def run(starter, controlnet, items, batch: int = 8, steps: int = 20, cfg: float = 7.0, scale: float = 1.0,
        style: str = "white"):
    """(images, per-object results) for `items`; controlnet None gives the baseline without a map.
    `style`: the maps' style (MAP_STYLES)."""
    pipe = build_pipeline(starter, controlnet)
    images = []
    for start in range(0, len(items), batch):
        chunk = items[start: start + batch]
        maps = [eval_map(sc, js, style) for sc, js in chunk] if controlnet is not None else None
        images += generate(pipe, [plain_prompt(sc) for sc, _ in chunk], maps,
                           list(range(start, start + len(chunk))), steps, cfg, scale)
    return images, judge_positions(images, items), swapped_ok(images, items)


def sheet(items, with_cn, without_cn, results, count: int = 24, style: str = "white") -> Image.Image:
    """Rows of (map | with ControlNet | without) triples, four per row, with the prompt and the verdict."""
    cell, per_row = 128, 4
    rows = (min(count, len(items)) + per_row - 1) // per_row
    out = Image.new("RGB", (per_row * 3 * cell + (per_row - 1) * 8, rows * (cell + 14)), "white")
    draw = ImageDraw.Draw(out)
    for k in range(min(count, len(items))):
        scene, js = items[k]
        x, y = (k % per_row) * (3 * cell + 8), (k // per_row) * (cell + 14)
        out.paste(eval_map(scene, js, style), (x, y))
        out.paste(with_cn[k].resize((cell, cell)), (x + cell, y))
        out.paste(without_cn[k].resize((cell, cell)), (x + 2 * cell, y))
        ok = all(results[k])
        draw.text((x + 2, y + cell), ("ok " if ok else "x  ") + plain_prompt(scene)[:44], fill="green" if ok else "red")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--control", type=Path, default=CONTROL_FILE)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale")
    ap.add_argument("--maps", choices=MAP_STYLES, default="white", help="the control maps' style")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--baseline-cache", type=Path, default=None, help="folder to keep/reuse the baseline's images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=EVAL_SEED,
                    help="first scene seed (another range than the report's picks a checkpoint without seeing it)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "starter-control-eval")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    starter = load_starter()
    items = eval_scenes(args.n, seed=args.seed)
    t0 = time.perf_counter()
    with_cn, res_cn, sw_cn = run(starter, load_control(args.control), items, steps=args.steps, cfg=args.cfg,
                          scale=args.scale, style=args.maps)
    seconds = time.perf_counter() - t0
    result = {
        "control": str(args.control.relative_to(ROOT) if args.control.is_relative_to(ROOT) else args.control),
        "n_maps": len(items), "eval_seed": args.seed, "steps": args.steps, "cfg": args.cfg,
        "sampler": "DPM++ 2M (Automatic = Karras), diffusers DPMSolverMultistepScheduler",
        "conditioning_scale": args.scale, "prompt": "colour + shape only, no position words", "maps": args.maps,
        "with_controlnet": rates(res_cn, items, sw_cn), "seconds_with_controlnet": round(seconds, 1),
    }
    records = per_map(with_cn, items, res_cn, sw_cn)
    without = [Image.new("RGB", (128, 128), "white")] * len(items)
    if not args.no_baseline:
        # the baseline does not depend on the ControlNet: --baseline-cache keeps its images for the next run
        tag = f"n{args.n}-steps{args.steps}-cfg{args.cfg}" + ("" if args.seed == EVAL_SEED else f"-seed{args.seed}")
        cache = args.baseline_cache / tag if args.baseline_cache else None
        if cache is not None and all((cache / f"{i}.png").exists() for i in range(len(items))):
            without = [Image.open(cache / f"{i}.png").convert("RGB") for i in range(len(items))]
            res_base, sw_base = judge_positions(without, items), swapped_ok(without, items)
        else:
            without, res_base, sw_base = run(starter, None, items, steps=args.steps, cfg=args.cfg)
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                for i, image in enumerate(without):
                    image.save(cache / f"{i}.png")
        result["without_controlnet"] = rates(res_base, items, sw_base)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_name(args.out.name + "-maps.json").write_text(json.dumps(records) + "\n")
    sheet(items, with_cn, without, res_cn, style=args.maps).quantize(256).save(args.out.with_suffix(".png"),
                                                                               optimize=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
