"""Train the starter model's built-in ControlNet on outline maps of drawn scenes (CPU, resumable).

The ControlNet is diffusers' `ControlNetModel.from_unet(starter_unet)`: a trainable copy of the starter UNet's
encoder and mid block (the standard recipe), zero-initialised output convolutions, and a conditioning
embedding that takes the 128 px RGB map down by 8 to the 16x16 latent grid (its channels reduced to
(16, 32, 64, 128) to keep it small). The starter's UNet, VAE and text encoder are frozen. Phases, each
resumable from its own file in --work:

  latents  render --pool training scenes (control_maps.placements: named places with a wider jitter) and keep
           their VAE latents (mean and std) and placements, so every step can redraw the map with new
           augmentation (line width 1-3 px, wobble, sometimes the canny-like edges of the picture itself)
  train    the standard eps-prediction loss on (noisy scene latents, caption, map); captions are empty for
           --empty-captions of samples, name only colour and shape for half the rest and are the scene
           generator's full captions (positions, relations) otherwise, so the map, not the text, decides
           where things go. --high-t of each batch is drawn from t >= 500, where layout is decided. A quick
           probe (8 held-out maps, 20 steps of DPM++ 2M) every --probe-every steps logs how often the object
           lands where the map puts it, so the ControlNets' "sudden convergence" shows in the log
  report   (alone) print the log as the markdown tables of docs/starter-control.md
  export   the EMA weights as darkroom/assets/controlnet/darkroom-starter-control.safetensors (fp16, diffusers
           ControlNetModel keys, its config JSON in the metadata under "config")

Every phase appends to --work/log.jsonl; `--until-minutes` stops training cleanly (checkpoint written).

Usage: .venv/bin/python scripts/train_starter_control.py all --work training/starter-control --steps 2400
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import darkroom  # noqa: F401  (offline first)

# isort: split
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DDPMScheduler
from safetensors.torch import load_file, save_file

from darkroom.models.configs import scheduler_config
from darkroom.starter_training import control_maps, scenes
from darkroom.starter_training.scenes import HELD_OUT

# isort: split
import eval_starter_control as ev  # scripts/ is on the path when this file runs as a script

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ev.CONTROL_FILE
SIZE = control_maps.SIZE
SEED = 20261205
COND_CHANNELS = (16, 32, 64, 128)


class Log:
    def __init__(self, work: Path):
        self.path = work / "log.jsonl"

    def write(self, **row) -> None:
        row["time"] = round(time.time(), 1)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=str) + "\n")


def save(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# --- phase 1: latents -----------------------------------------------------------------------------

@torch.no_grad()
def encode_pool(args, vae, log: Log) -> dict:
    path = args.work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = random.Random(SEED + 1)
    all_scenes, all_placed, latents = [], [], []
    t0 = time.time()
    for start in range(0, args.pool, 64):
        batch = [scenes.sample_scene(rng, "train") for _ in range(min(64, args.pool - start))]
        pairs = [control_maps.training_pair(sc, rng) for sc in batch]
        dist = vae.encode(to_tensor([p[0] for p in pairs])).latent_dist
        latents.append(torch.cat([dist.mean, dist.std], dim=1).half())
        all_scenes += batch
        all_placed += [p[1] for p in pairs]
        if start % 1024 == 0:
            print(f"latents {start}/{args.pool} {time.time() - t0:.0f}s", flush=True)
    twins = [-1] * len(all_scenes)
    if args.twins:  # each two-object scene of two shapes, again with its colours exchanged, same placements
        extra = [(i, sc) for i, sc in ((i, swapped(sc)) for i, sc in enumerate(all_scenes)) if sc is not None]
        for start in range(0, len(extra), 64):
            chunk = extra[start:start + 64]
            pictures = [control_maps.render_placements(sc, all_placed[i]) for i, sc in chunk]
            dist = vae.encode(to_tensor(pictures)).latent_dist
            latents.append(torch.cat([dist.mean, dist.std], dim=1).half())
            for i, sc in chunk:
                twins[i] = len(all_scenes)
                twins.append(i)
                all_scenes.append(sc)
                all_placed.append(all_placed[i])
    pool = {"scenes": all_scenes, "placements": all_placed, "latents": torch.cat(latents),
            "scale": vae.config.scaling_factor, "twins": twins}
    torch.save(pool, path)
    log.write(phase="latents", count=len(all_scenes), twins=sum(t >= 0 for t in twins) // 2,
              seconds=round(time.time() - t0, 1))
    return pool


def swapped(scene: scenes.Scene) -> scenes.Scene | None:
    """The scene with its two objects' colours exchanged (same shapes, sizes, places), or None where that
    teaches nothing (one object, two of one shape) or would draw a held-out (colour, shape) pair."""
    if len(scene.objects) != 2 or scene.objects[0].shape == scene.objects[1].shape:
        return None
    a, b = scene.objects
    objs = (dataclasses.replace(a, colour=b.colour), dataclasses.replace(b, colour=a.colour))
    if any((o.colour, o.shape) in HELD_OUT for o in objs):
        return None
    return dataclasses.replace(scene, objects=objs)


# --- phase 2: ControlNet --------------------------------------------------------------------------

def training_caption(scene: scenes.Scene, rng: random.Random, empty: float) -> str:
    """Empty (share `empty`), else colour and shape only, or the scene generator's caption (often with positions)."""
    r = rng.random()
    if r < empty:
        return ""
    if r < empty + (1 - empty) / 2:
        text = ev.plain_prompt(scene)
        if rng.random() < 0.3:
            text += f" on a {scene.background} background"
        return text if rng.random() < 0.7 else text.removeprefix("a ").removeprefix("an ")
    return scenes.caption(scene, rng)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def probe(starter, controlnet, items, style: str = "white") -> float:
    """Share of objects placed where the map puts them, on a few held-out maps (20 steps, CFG 7)."""
    controlnet.eval()
    _, results, _ = ev.run(starter, controlnet, items, batch=len(items), style=style)
    controlnet.train()
    flat = [ok for r in results for ok in r]
    return sum(flat) / len(flat)


def train(args, starter, pool: dict, log: Log, t0: float):
    unet, _, text, tokenizer = starter
    ckpt = args.work / "controlnet.pt"
    torch.manual_seed(SEED + 2)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    ema = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=COND_CHANNELS)
    opt = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    step, rng = 0, random.Random(SEED + 3)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        controlnet.load_state_dict(state["controlnet"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, rng = state["step"], state["rng"]
        torch.set_rng_state(state["torch_rng"])
    else:
        if args.init:  # go on from an exported file (its EMA weights); the optimiser starts afresh
            controlnet.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()})
        ema.load_state_dict(controlnet.state_dict())
    ema.requires_grad_(False)
    controlnet.train()
    alphas = DDPMScheduler.from_config(scheduler_config(False)).alphas_cumprod
    n, scale = len(pool["scenes"]), pool["scale"]
    probe_items = ev.eval_scenes(8, seed=ev.EVAL_SEED + 1)  # held out, but not the reported eval set
    if args.colour_maps or args.filled_maps:  # probe with pairs too: they are what colour maps are for
        probe_items = ev.eval_scenes(12, seed=ev.EVAL_SEED + 1)

    def checkpoint():
        save(ckpt, controlnet=controlnet.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), step=step,
             rng=rng, torch_rng=torch.get_rng_state())

    last = time.time()
    pairs = [i for i, sc in enumerate(pool["scenes"]) if len(sc.objects) == 2]
    singles = [i for i, sc in enumerate(pool["scenes"]) if len(sc.objects) == 1]

    def draw_index() -> int:
        if not args.two_objects:  # the pool's own mix (30% two-object scenes)
            return rng.randrange(n)
        return rng.choice(pairs) if rng.random() < args.two_objects else rng.choice(singles)

    twins = pool.get("twins") or [-1] * n

    def draw_batch() -> tuple[list[int], list[bool]]:
        """Indices, and whether each is the second of a twin pair (it then repeats the first's map, noise
        and t, and only the colours, in the caption and the picture, differ)."""
        idx, second = [], []
        while len(idx) < args.batch:
            i = draw_index()
            if twins[i] >= 0 and len(idx) + 2 <= args.batch and rng.random() < args.twin_share:
                idx += [i, twins[i]]
                second += [False, True]
            else:
                idx.append(i)
                second.append(False)
        return idx, second

    while step < args.steps and time.time() - t0 < (args.until_minutes or 1e9) * 60:
        idx, second = draw_batch()
        batch_scenes = [pool["scenes"][i] for i in idx]
        maps = []
        for k, (i, sc) in enumerate(zip(idx, batch_scenes, strict=True)):
            if second[k]:
                maps.append(maps[-1])
                continue
            placed = pool["placements"][i]
            # the canny-like variant needs the picture: re-render it from the stored placements (a few ms)
            picture = control_maps.render_placements(sc, placed) if rng.random() < args.edge_maps else None
            colours = control_maps.scene_colours(sc) if rng.random() < args.colour_maps else None
            fills = control_maps.scene_colours(sc) if args.filled_maps and rng.random() < args.filled_maps \
                else None
            maps.append(control_maps.training_map(placed, rng, picture, edge_share=1.0, colours=colours,
                                                  fills=fills))
        cond = torch.from_numpy(np.stack([control_maps.to_array(m) for m in maps]))
        captions: list[str] = []
        for k, sc in enumerate(batch_scenes):
            if second[k]:
                continue
            if k + 1 < len(idx) and second[k + 1]:  # a twin pair: both captions in the same form (same draws)
                state = rng.getstate()
                captions.append(training_caption(sc, rng, 0.0))
                rng.setstate(state)
                captions.append(training_caption(batch_scenes[k + 1], rng, 0.0))
                continue
            captions.append(training_caption(sc, rng, args.empty_captions if len(sc.objects) == 1
                                             else args.pair_empty_captions))
        stats = pool["latents"][idx].float()
        z0 = (stats[:, :4] + stats[:, 4:] * torch.randn_like(stats[:, :4])) * scale
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (len(idx),))
        high = torch.rand(len(idx)) < args.high_t
        t[high] = torch.randint(args.high_t_from, 1000, (int(high.sum()),))
        twin_rows = torch.tensor(second)
        if twin_rows.any():  # a twin shares its first's noise and t
            first_rows = torch.nonzero(twin_rows).view(-1) - 1
            noise[twin_rows] = noise[first_rows]
            t[twin_rows] = t[first_rows]
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with torch.no_grad():
            context = text(input_ids=tokenize(tokenizer, captions)).last_hidden_state
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        down, mid = controlnet(zt, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        pred = unet(zt, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
        if args.x0_weight > 1:  # more weight where colour and layout are decided (eps loss nearly ignores high t)
            per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
            w = ((1 - a.view(-1)) / a.view(-1)).clamp(1.0, args.x0_weight)
            loss = (w * per).sum() / w.sum()
        else:
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pl in zip(ema.parameters(), controlnet.parameters(), strict=True):
                pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)
        if step % 25 == 0:
            now = time.time()
            log.write(phase="train", step=step, loss=round(loss.item(), 5), lr=round(lr, 7),
                      sec_per_step=round((now - last) / 25, 3))
            print(f"train {step}/{args.steps} loss {loss.item():.4f} lr {lr:.2e} {(now - last) / 25:.2f}s/step",
                  flush=True)
            last = now
        if step % args.probe_every == 0:
            live, smooth = probe(starter, controlnet, probe_items), probe(starter, ema, probe_items)
            row = dict(placed_live=round(live, 3), placed_ema=round(smooth, 3))
            if args.colour_maps:
                row["placed_ema_colour"] = round(probe(starter, ema, probe_items, style="coloured"), 3)
            if args.filled_maps:
                row["placed_ema_filled"] = round(probe(starter, ema, probe_items, style="filled"), 3)
            log.write(phase="probe", step=step, **row)
            print(f"probe {step}: {row}", flush=True)
            last = time.time()
        if step % 250 == 0:
            checkpoint()
    checkpoint()
    return ema.eval(), step


# --- phase 3: export ------------------------------------------------------------------------------

def export(controlnet: ControlNetModel, out: Path, step: int, args) -> Path:
    config = {k: v for k, v in dict(controlnet.config).items() if not k.startswith("_")}
    config["_class_name"] = "ControlNetModel"
    metadata = {
        "config": json.dumps(config),
        "darkroom.base": "darkroom-starter",
        "description": "Darkroom's tiny demo ControlNet for the starter model: white outlines on black "
                       "(a scribble or canny map, 128 px) place the objects",
        "darkroom_train_steps": str(step + args.steps_before),
        "darkroom_control_type": "scribble/canny outlines",
    }
    weights = {k: v.detach().to(torch.float16).contiguous() for k, v in controlnet.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out), metadata=metadata)
    return out


def report(work: Path, every: int = 250) -> str:
    """Markdown tables of the log: the runs' arguments, mean loss per `every` steps, and the probes."""
    rows = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| run started (unix) | arguments |", "|---|---|"]
    lines += [f"| {r['time']} | `{json.dumps(r['argv'])}` |" for r in rows if r["phase"] == "start"]
    lines += ["", "| steps | mean loss | s/step (mean) | probe: objects placed (EMA) |", "|---|---|---|---|"]
    train = [r for r in rows if r["phase"] == "train"]
    probes = {r["step"]: r for r in rows if r["phase"] == "probe"}
    for end in range(every, max((r["step"] for r in train), default=0) + every, every):
        window = [r for r in train if end - every < r["step"] <= end]
        if not window:
            continue
        loss = sum(r["loss"] for r in window) / len(window)
        sec = sum(r["sec_per_step"] for r in window) / len(window)
        pr = probes.get(end)
        lines.append(f"| {end - every + 1}-{end} | {loss:.4f} | {sec:.2f} | {pr['placed_ema'] if pr else ''} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["all", "latents", "train", "export", "report"])
    ap.add_argument("--work", type=Path, default=ROOT / "training" / "starter-control")
    ap.add_argument("--out", type=Path, default=EXPORT)
    ap.add_argument("--pool", type=int, default=6000)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--empty-captions", type=float, default=0.5)
    ap.add_argument("--pair-empty-captions", type=float, default=0.5,
                    help="share of empty captions for two-object scenes (which colour goes in which outline "
                         "can only come from the caption)")
    ap.add_argument("--two-objects", type=float, default=0.0,
                    help="share of each batch drawn from two-object scenes (default: the pool's own 30%%)")
    ap.add_argument("--high-t", type=float, default=0.3, help="share of each batch drawn from t >= --high-t-from")
    ap.add_argument("--high-t-from", type=int, default=500)
    ap.add_argument("--edge-maps", type=float, default=0.2, help="share of maps that are the picture's own edges")
    ap.add_argument("--colour-maps", type=float, default=0.0,
                    help="share of outline maps drawn in the objects' own colours (colour maps)")
    ap.add_argument("--filled-maps", type=float, default=0.0,
                    help="share of outline maps whose shapes are filled with their objects' colours")
    ap.add_argument("--x0-weight", type=float, default=1.0,
                    help="weight each sample by (1-a)/a clamped to [1, X] (normalised): >1 favours high noise levels")
    ap.add_argument("--twins", action="store_true",
                    help="latents phase: also keep each two-shape pair with its colours exchanged (same places)")
    ap.add_argument("--twin-share", type=float, default=0.0,
                    help="chance that a drawn pair comes with its colour-swapped twin (same map, noise and t)")
    ap.add_argument("--init", type=Path, default=None, help="start from this exported ControlNet file")
    ap.add_argument("--steps-before", type=int, default=0,
                    help="export: steps the --init file had been trained for (added to darkroom_train_steps)")
    ap.add_argument("--probe-every", type=int, default=250)
    ap.add_argument("--until-minutes", type=float, default=None, help="stop training cleanly after this long")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.phase == "report":
        print(report(args.work))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    log = Log(args.work)
    t0 = time.time()
    log.write(phase="start", argv=vars(args) | {"work": str(args.work), "out": str(args.out)})
    starter = ev.load_starter()
    pool = encode_pool(args, starter[1], log)
    if args.phase == "latents":
        return
    controlnet, step = train(args, starter, pool, log, t0)
    if args.phase in ("all", "export"):
        path = export(controlnet, args.out, step, args)
        log.write(phase="export", path=str(path), step=step, bytes=path.stat().st_size)
        print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
