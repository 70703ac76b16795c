"""Peak resident memory of one generation, per phase: load, encode + sampling, VAE decode.

Each measurement runs in a fresh child process (nothing cached, nothing left from another
run). In the child, the kernel's peak-RSS counter is reset at the start of each phase
(`echo 5 > /proc/self/clear_refs`) and read at its end (VmHWM in /proc/self/status), so each
phase's number is that phase's own peak, not a running maximum; the process's peak is the
largest of the three. (`getrusage(RUSAGE_SELF).ru_maxrss` is the same kernel counter, reset
by clear_refs too, but it also keeps the peak noted whenever a thread exited, which the reset
does not clear; it is kept in the JSON only.)

    .venv/bin/python benchmarks/load_memory.py CHECKPOINT [--size 512] [--steps 3]
        [--root DIR ...]   # darkroom source trees to compare (default: this checkout)

`--root` takes a folder holding a `darkroom/` package: e.g. a `git archive HEAD darkroom`
extract for the "before" numbers. Peaks are a ratio-free absolute here, but they do not
depend on machine load (only timings do).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, resource, sys, tempfile, time
sys.path.insert(0, os.environ["DARKROOM_ROOT"])
from pathlib import Path

def reset():
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def peak():  # the kernel's peak RSS since the last reset (ru_maxrss also keeps exited threads' peaks)
    return status("VmHWM")

def rss():
    return status("VmRSS")

import darkroom, torch
from darkroom.api import build_engine
from darkroom.home import Home
from darkroom.request import GenerationRequest

args = json.loads(sys.argv[1])
assert Path(darkroom.__file__).resolve().is_relative_to(Path(os.environ["DARKROOM_ROOT"]).resolve()), darkroom.__file__
out = {"darkroom": str(Path(darkroom.__file__).parent), "threads": torch.get_num_threads()}
out["baseline"] = rss()
tmp = tempfile.TemporaryDirectory()
engine = build_engine(Home(Path(tmp.name)).ensure())
req = GenerationRequest(model=args["model"], prompt="a photo of a cat", negative_prompt="blurry", steps=args["steps"],
                        width=args["size"], height=args["size"], cfg_scale=7.0, sampler="Euler", seed=1)
reset()
t0 = time.perf_counter()
model = engine.load(req)
out["load_s"] = time.perf_counter() - t0
out["load"] = peak()
out["after_load"] = rss()
out["dtype"] = str(model.dtype)
params = [p for m in (model.unet, model.vae, *[s.model for s in model.text_encoders]) for p in m.parameters()]
out["weights"] = sum(p.numel() * p.element_size() for p in params)
out["unet_conv_nhwc"] = all(m.weight.is_contiguous(memory_format=torch.channels_last)
                            for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d))
def on_step(event):  # each step's own peak; what follows the last step's end is the decode
    out["sampling"] = max(out.get("sampling", 0), peak())
    reset()
reset()
result = engine.generate(req, on_step=on_step)
out["decode"] = peak()
out["overall"] = max(out["load"], out["sampling"], out["decode"])
out["ru_maxrss_at_end"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out["timings"] = result.timings
print("RESULT " + json.dumps(out))
"""


def measure(root: Path, model: Path, size: int, steps: int) -> dict:
    env = {**os.environ, "DARKROOM_ROOT": str(root)}
    args = json.dumps({"model": str(model), "size": size, "steps": steps})
    proc = subprocess.run([sys.executable, "-c", CHILD, args], capture_output=True, text=True, env=env, cwd=str(root))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"measurement failed ({root}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--root", type=Path, action="append", help="folder holding a darkroom/ package")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    roots = args.root or [REPO]
    gib = lambda n: f"{n / 2**30:6.2f}"  # noqa: E731
    results = []
    print(f"{args.model.name}, {args.size}x{args.size}, {args.steps} steps; load average {os.getloadavg()[0]:.2f}")
    print(f"{'darkroom tree':40s} {'weights':>7s} {'load':>6s} {'sample':>6s} {'decode':>6s} {'peak':>6s}"
          f" {'load s':>6s}  (GiB; peak RSS of each phase)")
    for root in roots:
        r = measure(root.resolve(), args.model.resolve(), args.size, args.steps)
        results.append({"root": str(root), **r})
        print(f"{str(root)[-40:]:40s} {gib(r['weights']):>7s} {gib(r['load'])} {gib(r['sampling'])}"
              f" {gib(r['decode'])} {gib(r['overall'])} {r['load_s']:6.1f}  ({r['dtype']},"
              f" UNet convs NHWC: {r['unet_conv_nhwc']})", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
