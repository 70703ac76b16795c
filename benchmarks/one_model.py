"""What the one-model A/B benchmarks share (fusions_ab.py, allocator_ab.py, token_merging_ab.py).

Each loads one file with Darkroom's default CPU path, then alternates two sides call by call (A, B, then
B, A, ...) so that each pair ran on the same machine state, and reports the per-pair ratio A/B: a busy,
shared machine moves both sides of a pair alike, where it would skew two separate runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

HERE = Path(__file__).resolve().parent


def parser(doc: str, out_name: str, pairs: int) -> argparse.ArgumentParser:
    """checkpoint (default: step_time.py's SD1.5 file), --size, --pairs, --out, --precision; the script
    adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, nargs="?", default=HERE / "out" / "sd15-random-fp16.safetensors")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--pairs", type=int, default=pairs)
    p.add_argument("--out", type=Path, default=HERE / "out" / out_name)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="the engine's CPU precision (auto: bf16 where the CPU has it, as Darkroom runs)")
    return p


def load(checkpoint: Path, size: int, prefix: str, precision: str = "auto"):
    """(engine, loaded model): a Darkroom engine over a fresh temporary home, the file loaded."""
    from darkroom.api import build_engine
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    engine = build_engine(Home(Path(tempfile.mkdtemp(prefix=prefix))).ensure(), device="cpu",
                          precision=None if precision == "auto" else precision)
    engine.load(GenerationRequest(prompt="x", model=str(checkpoint), width=size, height=size))
    return engine, engine.cache.current


def describe(checkpoint: Path, size: int, model) -> str:
    return f"{checkpoint.name}, {size}x{size}, dtype {model.dtype}, threads {torch.get_num_threads()}"


def unet_inputs(model, size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Random latents, text context and (SDXL) added conditioning for one CFG-batch UNet call."""
    g = torch.Generator().manual_seed(0)
    cells = size // model.vae_scale_factor
    x = torch.randn(2, model.unet.config.in_channels, cells, cells, generator=g).to(model.dtype)
    ctx = torch.randn(2, 77, model.unet.config.cross_attention_dim, generator=g).to(model.dtype)
    kwargs = {}
    if model.unet.config.get("addition_embed_type") == "text_time":  # SDXL: pooled text + size conditioning
        pooled = model.unet.config.projection_class_embeddings_input_dim - 6 * model.unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g).to(model.dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=model.dtype)}
    return x, ctx, kwargs


def unet_call(model, size: int) -> Callable[[], torch.Tensor]:
    """One UNet call on the CFG batch at timestep 500, the same inputs every time."""
    x, ctx, kwargs = unet_inputs(model, size)
    return lambda: model.unet(x, torch.tensor(500.0), encoder_hidden_states=ctx, **kwargs).sample


def alternate(call: Callable[[], object], set_side: Callable[[str], None], pairs: int,
              label: str = "") -> dict[str, list[float]]:
    """Seconds of `call()` on each side, A and B alternating (A B, B A, ...); `set_side(side)` switches
    before each call. Prints each pair as it goes."""
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(pairs):
        for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
            set_side(side)
            t0 = time.perf_counter()
            call()
            times[side].append(time.perf_counter() - t0)
        print(f"{label}pair {i + 1}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
    return times


def peak_rss(call: Callable[[], object], into: list[float]) -> object:
    """`call()`, appending the process's peak RSS during it (bytes) to `into`: Linux resets the peak
    (VmHWM) when "5" is written to /proc/self/clear_refs. Elsewhere nothing is appended."""
    import re

    from darkroom.engine import memory

    memory.return_freed_memory()  # each call starts from the same trimmed heap
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return call()
    out = call()
    found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if found:
        into.append(int(found.group(1)) * 1024)
    return out


def summary(times: dict[str, list[float]]) -> dict:
    """Each side's median, the per-pair ratios A/B (sorted) and their median and quartiles."""
    ratios = sorted(a / b for a, b in zip(times["A"], times["B"], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"A": statistics.median(times["A"]), "B": statistics.median(times["B"]), "ratios": ratios,
            "median": statistics.median(ratios), "q1": q[0], "q3": q[2]}


def ratio_text(s: dict) -> str:
    return f"A/B per pair median {s['median']:.3f} (quartiles {s['q1']:.3f}-{s['q3']:.3f}, n={len(s['ratios'])})"
