"""A/B of darkroom/engine/speed.py: s/step and VAE decode with and without the speed-ups, one process.

    .venv/bin/python benchmarks/speed_ab.py [CHECKPOINT] [--size 512] [--steps 3] [--rounds 2]
        [--compile unet] [--compile-cache DIR] [--fresh-cache] [--threads N]

Sides, each a Darkroom engine over the same file (its default CPU path, bf16 where the CPU has it):
A = as loaded (`cache.speedups = False`), B = the exact eager speed-ups (the default), and with
`--compile`, C = B plus torch.compile (inductor) with its cache in `--compile-cache`
(default benchmarks/out/torch-compile; `--fresh-cache` empties it first, so C's first step is a
cold compile; run again without it for the warm start of a new process). Rounds are interleaved
(A B C, then C B A, ...); s/step = median of steps 2..N over all rounds (StepEvent.elapsed),
decode = best round of `latents_to_images` on the final latents. Prints ratios A/B (and A/C),
the largest pixel difference between the sides' images, the load average around every run,
and writes benchmarks/out/speed_ab.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

HERE = Path(__file__).resolve().parent


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def pixels(image):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB"), dtype=np.int16)


def run(engine, req) -> dict:
    from darkroom.engine.generate import latents_to_images

    events = []
    before = load()
    t0 = time.perf_counter()
    result = engine.generate(req, on_step=events.append)
    total = time.perf_counter() - t0
    with torch.no_grad():
        t1 = time.perf_counter()
        latents_to_images(engine.cache.current, events[-1].latents)
        decode = time.perf_counter() - t1
    stamps = [e.elapsed for e in events]
    return {"steps": [b - a for a, b in zip(stamps, stamps[1:], strict=False)], "first_step": stamps[0],
            "decode": decode, "generate_total": total, "load_before": before, "load_after": load(),
            "image": pixels(result.images[0])}


def time_pairs(engines, order, size, n) -> dict:
    """UNet calls on the CFG batch and VAE decodes, sides alternating call by call (order flipped
    every pair); ratio A/side from the calls next to each other."""
    models = {name: engines[name].cache.current for name in order}
    g = torch.Generator().manual_seed(0)
    m0 = models[order[0]]
    cells = size // m0.vae_scale_factor
    x = torch.randn(2, m0.unet.config.in_channels, cells, cells, generator=g)
    ctx = torch.randn(2, 77, m0.unet.config.cross_attention_dim, generator=g)
    lat = torch.randn(1, m0.vae.config.latent_channels, cells, cells, generator=g)
    calls = {
        "unet": lambda m: m.unet(x.to(m.dtype), torch.tensor(500.0), encoder_hidden_states=ctx.to(m.dtype)).sample,
        "decode": lambda m: m.vae.decode(lat.to(m.vae_dtype)).sample,
    }
    out = {}
    for what, call in calls.items():
        times: dict[str, list[float]] = {name: [] for name in order}
        with torch.no_grad():
            for name in order:  # warm-up (kernels, compiled graphs)
                call(models[name])
            for i in range(n):
                for name in order if i % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    call(models[name])
                    times[name].append(time.perf_counter() - t0)
        out[what] = {}
        for name in order:
            ratios = sorted(a / b for a, b in zip(times[order[0]], times[name], strict=True))
            q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
            out[what][name] = {"median": statistics.median(times[name]), "times": times[name], "ratios": ratios,
                               "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2]}
        print(f"pairs {what} done, load {load()}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", default=HERE / "out" / "sd15-random-fp16.safetensors")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", choices=("unet",), default=None)
    parser.add_argument("--compile-cache", type=Path, default=HERE / "out" / "torch-compile")
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=0,
                        help="also time N single UNet calls (CFG batch) and N decodes per side, alternating "
                             "sides call by call: per-pair ratios are less hurt by a busy machine")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "speed_ab.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from darkroom.api import build_engine
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    home = Home(Path(tempfile.mkdtemp(prefix="speed_ab_"))).ensure()
    req = GenerationRequest(prompt="a photo of a cat", negative_prompt="blurry", steps=args.steps,
                            width=args.size, height=args.size, seed=1, sampler="Euler", cfg_scale=7.0,
                            model=str(args.checkpoint))
    sides = {"A (as loaded)": {"speedups": False}, "B (speed.py eager)": {"speedups": True}}
    if args.compile:
        if args.fresh_cache and args.compile_cache.exists():
            shutil.rmtree(args.compile_cache)
        sides[f"C (eager + compile {args.compile})"] = {"speedups": True, "compile_mode": args.compile}
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.compile_cache)  # speed.py keeps a variable already set
    engines, loads = {}, {}
    for name, attrs in sides.items():
        engine = build_engine(home, device="cpu")
        for k, v in attrs.items():
            setattr(engine.cache, k, v)
        t0 = time.perf_counter()
        engine.load(req)
        loads[name] = time.perf_counter() - t0
        engines[name] = engine
    results: dict[str, list[dict]] = {name: [] for name in sides}
    order = list(sides)
    print(f"threads {torch.get_num_threads()}, size {args.size}, steps {args.steps}, rounds {args.rounds}, "
          f"dtype {engines[order[0]].cache.current.dtype}, load avg {load()}", flush=True)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            res = run(engines[name], req)
            results[name].append(res)
            print(f"round {r + 1} {name}: steps {[round(s, 3) for s in res['steps']]} first {res['first_step']:.2f} "
                  f"decode {res['decode']:.3f}  load {res['load_before']} -> {res['load_after']}", flush=True)
    pairs = time_pairs(engines, order, args.size, args.pairs) if args.pairs else {}
    summary = {}
    ref_name = order[0]
    ref = results[ref_name]
    for name in order:
        steps = [s for res in results[name] for s in res["steps"]]
        summary[name] = {
            "s_per_step_median": statistics.median(steps), "s_per_step_all": steps,
            "decode_best": min(res["decode"] for res in results[name]),
            "first_step_first_run": results[name][0]["first_step"], "load_s": loads[name],
            "max_pixel_diff_vs_A": int(max(abs(a["image"] - b["image"]).max()
                                           for a, b in zip(ref, results[name], strict=True))),
        }
    base = summary[ref_name]
    print(f"\n{'side':34} {'s/step':>8} {'A/side':>7} {'decode s':>9} {'A/side':>7} {'1st step':>9} {'px diff':>7}")
    for name, s in summary.items():
        s["step_ratio_A_over_side"] = base["s_per_step_median"] / s["s_per_step_median"]
        s["decode_ratio_A_over_side"] = base["decode_best"] / s["decode_best"]
        print(f"{name:34} {s['s_per_step_median']:8.3f} {s['step_ratio_A_over_side']:7.3f} {s['decode_best']:9.3f} "
              f"{s['decode_ratio_A_over_side']:7.3f} {s['first_step_first_run']:9.2f} {s['max_pixel_diff_vs_A']:7d}")
    if args.compile:
        name = order[-1]
        print(f"compile: first step of C's first run {summary[name]['first_step_first_run']:.1f} s against "
              f"{base['first_step_first_run']:.1f} s for A (cache {args.compile_cache}, "
              f"{'fresh' if args.fresh_cache else 'as found'})")
    for what, per in pairs.items():
        for name, v in per.items():
            print(f"pairs {what:6} {name:34} median {v['median']:.3f} s, "
                  f"A/side per pair: median {v['ratio_median']:.3f}"
                  f" (quartiles {v['ratio_q1']:.3f}-{v['ratio_q3']:.3f}, n={len(v['ratios'])})")
    print(f"load avg at the end {load()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "pairs": pairs,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
