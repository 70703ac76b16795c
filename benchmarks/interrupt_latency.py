"""How long Interrupt takes to answer on a full-size model: cancel set in the middle of a step.

    .venv/bin/python benchmarks/interrupt_latency.py CHECKPOINT [--size 1024] [--after 5] [--phase sample|decode]

Loads CHECKPOINT with Darkroom's default CPU path, starts a 2-step generation at SIZE x SIZE and
sets the cancel event AFTER seconds into the first step (`--phase sample`) or into the VAE decode
(`--phase decode`, with 1 step); prints how long `generate` took to return after that, next to how
long one whole step (or decode) takes, measured in the same process. A latency, not a ratio: it
depends on the machine's load only through the size of one UNet block (or VAE tile).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import darkroom  # noqa: F401  (offline first)
from darkroom.api import build_engine
from darkroom.home import Home
from darkroom.request import GenerationRequest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--after", type=float, default=5.0, help="seconds into the phase before cancel is set")
    ap.add_argument("--phase", choices=("sample", "decode"), default="sample")
    args = ap.parse_args()

    home = Home(Path(tempfile.mkdtemp())).ensure()
    engine = build_engine(home)
    steps = 1 if args.phase == "decode" else 2
    req = GenerationRequest(prompt="a lighthouse on a cliff", model=str(args.checkpoint.resolve()), steps=steps,
                            width=args.size, height=args.size, seed=1, sampler="Euler")
    t0 = time.perf_counter()
    engine.load(req)
    load_s = time.perf_counter() - t0

    # one whole run first: the length of a step and of the decode, to compare the latency with
    marks: list[float] = []
    start = time.perf_counter()
    full = engine.generate(req, on_step=lambda ev: marks.append(time.perf_counter()))
    total = time.perf_counter() - start
    step_s = marks[0] - start  # the first step (encoding included: negligible next to a step)
    decode_s = start + total - marks[-1]  # the decode and the PNG writing after the last step

    cancel = threading.Event()
    phase_started = threading.Event()
    set_at: list[float] = []

    def on_step(ev) -> None:
        if args.phase == "decode" and ev.step == ev.steps:
            phase_started.set()

    def canceller() -> None:
        if args.phase == "sample":
            time.sleep(args.after)  # the first step starts right after the prompt is encoded (milliseconds)
        else:
            phase_started.wait()
            time.sleep(args.after)
        set_at.append(time.perf_counter())
        cancel.set()

    threading.Thread(target=canceller, daemon=True).start()
    result = engine.generate(req, on_step=on_step, cancel=cancel)
    returned = time.perf_counter()
    out = {"checkpoint": args.checkpoint.name, "size": args.size, "phase": args.phase, "load_s": round(load_s, 1),
           "step_s": round(step_s, 2), "decode_s": round(decode_s, 2), "cancel_after_s": args.after,
           "latency_s": round(returned - set_at[0], 3), "interrupted": result.interrupted,
           "images_kept": len(result.images), "full_run_images": len(full.images),
           "threads": __import__("torch").get_num_threads(), "load_avg": os.getloadavg()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
