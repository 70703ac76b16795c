"""A/B of the oneDNN epilogue fusions in darkroom/engine/speed.py, on one loaded model.

    .venv/bin/python benchmarks/fusions_ab.py [CHECKPOINT] [--size 512] [--pairs 8]
    .venv/bin/python benchmarks/fusions_ab.py benchmarks/out/sdxl-random-fp16.safetensors --size 1024 --pairs 4

One engine loads the file with Darkroom's default CPU path (all of speed.py). Side B is that;
side A is the same model with the fusions taken off again: the GEGLU feed-forwards
(`_geglu_fused`: two GEMMs with GELU and the gating product in their epilogues) and the linear
layers with the bias inside the GEMM (`_linear_fused_bias`) go back to diffusers' forwards.
Single UNet calls on the CFG batch alternate A, B, B, A, ... so each pair ran on the same
machine state; prints the per-pair ratio A/B (median and quartiles), the share of one call the
fusions saved, and how far B's output is from A's (relative to A's size). One model in memory,
so SDXL at 1024x1024 fits (about 9 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

HERE = Path(__file__).resolve().parent


def fused_modules(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    from darkroom.engine import speed

    found = []
    for mod in unet.modules():
        fwd = vars(mod).get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) in (speed._geglu_fused, speed._linear_fused_bias):
            found.append((mod, fwd))
    return found


def set_fused(found, on: bool) -> None:
    for mod, fwd in found:
        if on:
            mod.forward = fwd
        else:
            vars(mod).pop("forward", None)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, nargs="?", default=HERE / "out" / "sd15-random-fp16.safetensors")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--fp32-reference", action="store_true",
                        help="also run an fp32 copy of the UNet and print both sides' distance to it "
                             "(needs 2x the UNet's bf16 size more memory: fine for SD1.5)")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "fusions_ab.json")
    args = parser.parse_args(argv)

    from darkroom.api import build_engine
    from darkroom.home import Home
    from darkroom.request import GenerationRequest

    home = Home(Path(tempfile.mkdtemp(prefix="fusions_ab_"))).ensure()
    engine = build_engine(home, device="cpu")
    engine.load(GenerationRequest(prompt="x", model=str(args.checkpoint), width=args.size, height=args.size))
    model = engine.cache.current
    found = fused_modules(model.unet)
    kinds = {}
    for _, fwd in found:
        kinds[fwd.__func__.__name__] = kinds.get(fwd.__func__.__name__, 0) + 1
    print(f"{args.checkpoint.name}, {args.size}x{args.size}, dtype {model.dtype}, threads {torch.get_num_threads()}, "
          f"fused modules {kinds}", flush=True)
    if not found:
        print("nothing fused on this model/CPU (bf16 only): nothing to compare")
        return 1
    x, ctx, kwargs = unet_inputs(model, args.size)

    def call():
        return model.unet(x, torch.tensor(500.0), encoder_hidden_states=ctx, **kwargs).sample

    times = {"A": [], "B": []}
    outs = {}
    with torch.no_grad():
        for side in ("A", "B"):  # warm-up: oneDNN builds its kernels on the first call of each shape
            set_fused(found, side == "B")
            outs[side] = call().float()
        for i in range(args.pairs):
            for side in ("A", "B") if i % 2 == 0 else ("B", "A"):
                set_fused(found, side == "B")
                t0 = time.perf_counter()
                call()
                times[side].append(time.perf_counter() - t0)
            print(f"pair {i + 1}: A {times['A'][-1]:.3f} s, B {times['B'][-1]:.3f} s, load {os.getloadavg()[0]:.2f}",
                  flush=True)
        set_fused(found, True)
        ref_err = {}
        if args.fp32_reference:
            import copy

            unet32 = copy.deepcopy(model.unet).float()  # the patched forwards fall back to diffusers' on fp32
            ref = unet32(x.float(), torch.tensor(500.0), encoder_hidden_states=ctx.float(),
                         **{k: {n: t.float() for n, t in v.items()} for k, v in kwargs.items()}).sample
            del unet32
            ref_err = {side: ((outs[side] - ref).norm() / ref.norm()).item() for side in ("A", "B")}
    ratios = sorted(a / b for a, b in zip(times["A"], times["B"], strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    rel = ((outs["B"] - outs["A"]).norm() / outs["A"].norm()).item()
    a_med, b_med = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"\nA (diffusers' GEGLU and linear forwards): median {a_med:.3f} s per UNet call")
    print(f"B (fused epilogues, the default):          median {b_med:.3f} s per UNet call")
    print(f"A/B per pair: median {statistics.median(ratios):.3f} (quartiles {q[0]:.3f}-{q[2]:.3f}, n={len(ratios)}); "
          f"saved {100 * (1 - b_med / a_med):.1f}% of a call")
    print(f"output difference |B - A| / |A| = {rel:.2e} (bf16 rounding: the product is rounded once instead of "
          f"three times)")
    if ref_err:
        print(f"distance to an fp32 UNet |side - fp32| / |fp32|: A {ref_err['A']:.2e}, B {ref_err['B']:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "size": args.size, "times": times,
                                    "fp32_reference_error": ref_err,
                                    "ratios": ratios, "relative_difference": rel, "fused": kinds,
                                    "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
