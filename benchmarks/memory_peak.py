"""Peak resident memory of a generation per phase, against darkroom.engine.memory's estimate.

Each size runs in a fresh child process (so peaks never carry over), on the full-size
random SD1.5 checkpoint that `step_time.py` builds (`--keep` reuses it):

    .venv/bin/python benchmarks/step_time.py --build-only --out benchmarks/out   # once, ~20 s
    .venv/bin/python benchmarks/memory_peak.py 512x512x1 512x512x2 768x768x1 512x512x1@cfg1
    .venv/bin/python benchmarks/memory_peak.py --table   # measured vs memory.py's current estimate

A run is WxHxB (batch size B, CFG 7) with an optional @cfg1 (no negative pass). The child
samples VmRSS every 5 ms and reports the peaks of: the load, the UNet phase (prompt encoding
and sampling) and the VAE decode, plus ru_maxrss. The estimate is the engine's own (memory.py)
with no tiling (the untiled decode is what is measured here).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "out" / "sd15-random-fp16.safetensors"


def rss() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(spec: str) -> dict:
    import darkroom  # noqa: F401  (offline guard first)
    from darkroom.api import build_engine
    from darkroom.engine import generate as gen
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    size, _, opt = spec.partition("@")
    w, h, b = (int(v) for v in size.split("x"))
    cfg = 1.0 if opt == "cfg1" else 7.0
    peaks: dict[str, int] = {}
    phase = ["start"]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            r = rss()
            peaks[phase[0]] = max(peaks.get(phase[0], 0), r)
            time.sleep(0.005)

    base = rss()
    threading.Thread(target=watch, daemon=True).start()
    engine = build_engine(Home(Path(tempfile.mkdtemp())))
    req = GenerationRequest(prompt="a cat", model=str(CHECKPOINT), width=w, height=h, batch_size=b, cfg_scale=cfg,
                            steps=2, sampler="Euler", seed=1)
    phase[0] = "load"
    model = engine.load(req)
    time.sleep(0.05)
    loaded = rss()
    original = gen.latents_to_images

    def decode(m, latents, *args, **kwargs):
        phase[0] = "vae"
        try:
            return original(m, latents, *args, **kwargs)
        finally:
            phase[0] = "after"

    gen.latents_to_images = decode
    phase[0] = "unet"
    t0 = time.perf_counter()
    engine.generate(req)
    seconds = time.perf_counter() - t0
    time.sleep(0.05)
    stop.set()
    from darkroom.engine.memory import estimate_for_model

    est = estimate_for_model(model, req, tiled_vae=False)
    gib = lambda n: round(n / 2**30, 2)  # noqa: E731
    return {"run": spec, "dtype": str(model.dtype), "seconds": round(seconds, 1), "base": gib(base),
            "load_peak": gib(peaks.get("load", 0)), "loaded": gib(loaded), "unet_peak": gib(peaks.get("unet", 0)),
            "vae_peak": gib(peaks.get("vae", 0)),
            "maxrss": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "est_weights": gib(est.weights), "est_unet": gib(est.weights + est.unet),
            "est_vae": gib(est.weights + est.vae), "est_peak": gib(est.peak)}


def table(rows: list[dict]) -> str:
    """Measured (peak RSS minus the RSS before loading: what a fresh process must find free) against the
    estimate with the current constants of memory.py, per phase and overall, in GiB."""
    import torch

    from darkroom.engine import memory
    from darkroom.request import GenerationRequest

    arch = memory.read_arch(CHECKPOINT)
    out = ["| run (WxHxbatch) | UNet batch | measured UNet phase | est. | measured VAE phase | est. (untiled) |"
           " measured peak | est. peak | est./measured |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size, _, opt = row["run"].partition("@")
        w, h, b = (int(v) for v in size.split("x"))
        req = GenerationRequest(width=w, height=h, batch_size=b, cfg_scale=1.0 if opt == "cfg1" else 7.0)
        e = memory.estimate(arch, req, dtype=torch.bfloat16, vae_dtype=torch.bfloat16, tiled_vae=False)
        base = e.weights + e.overhead + e.results
        gib = lambda n: n / 2**30  # noqa: E731
        unet, vae, peak = (row[k] - row["base"] for k in ("unet_peak", "vae_peak", "maxrss"))
        out.append(f"| {row['run']} | {b * (1 if opt == 'cfg1' else 2)} | {unet:.2f} | {gib(base + e.unet):.2f} |"
                   f" {vae:.2f} | {gib(base + e.vae):.2f} | {peak:.2f} | {gib(e.peak):.2f} |"
                   f" {gib(e.peak) / peak:.2f} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(child(argv[1])), flush=True)
        return 0
    if argv[:1] == ["--table"]:
        print(table(json.loads((HERE / "out" / "memory_peak.json").read_text())))
        return 0
    if not CHECKPOINT.is_file():
        raise SystemExit(f"{CHECKPOINT} missing: run benchmarks/step_time.py --build-only --out benchmarks/out")
    rows = []
    for spec in argv or ["512x512x1", "512x512x2", "768x768x1", "512x512x1@cfg1"]:
        out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "memory_peak.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
