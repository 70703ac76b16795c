"""A/B of the oneDNN epilogue fusions in darkroom/engine/speed.py, on one loaded model.

    .venv/bin/python benchmarks/fusions_ab.py [CHECKPOINT] [--size 512] [--pairs 8]
    .venv/bin/python benchmarks/fusions_ab.py benchmarks/out/sdxl-random-fp16.safetensors --size 1024 --pairs 4

One engine loads the file with Darkroom's default CPU path (all of speed.py). Side B is that;
side A is the same model with the fusions taken off again: the GEGLU feed-forwards
(`_geglu_fused`: two GEMMs with GELU and the gating product in their epilogues) and the linear
layers with the bias inside the GEMM (`_linear_fused_bias`) go back to diffusers' forwards, and
the resnets add their residual after conv2 instead of in its epilogue (`conv_epilogue`).
`--which conv-add` takes off only the last; `--which gemm-conv` only the small maps' convolutions as
matrix products (`gemm_conv`); `--which upsample` (with `--call decode`) only the VAE upsamplers' 2x2
phase convolutions (`upsample_conv`: nearest 2x + 3x3 conv as they
were). `--call decode` times VAE decodes (`vae_tiling.decode`) instead of UNet calls.
Single calls (UNet: on the CFG batch) alternate A, B, B, A, ... so each pair ran on the same
machine state; prints the per-pair ratio A/B (median and quartiles), the share of one call the
fusions saved, and how far B's output is from A's (relative to A's size). One model in memory,
so SDXL at 1024x1024 fits (about 9 GiB).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import one_model  # noqa: E402

from darkroom.engine import conv_epilogue, gemm_conv, speed, upsample_conv  # noqa: E402

_FUSED_CONV_AVAILABLE = conv_epilogue.available
_PHASE_MIN_PIXELS = upsample_conv.MIN_PIXELS
_GEMM_MAX_PIXELS = gemm_conv.MAX_PIXELS


def fused_modules(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    from darkroom.engine import speed

    found = []
    for mod in unet.modules():
        fwd = vars(mod).get("forward")
        if fwd is not None and getattr(fwd, "__func__", None) in (speed._geglu_fused, speed._linear_fused_bias):
            found.append((mod, fwd))
    return found


def set_fused(found, on: bool, conv_add: bool = True, phases: bool = False, gemm: bool = True) -> None:
    """Side B (on) or A (off); with `conv_add` A also adds the resnets' residual after conv2; with
    `phases` A upsamples and convolves where B runs upsample_conv's phase convolutions; with `gemm` A
    runs every convolution as a conv (no gemm_conv)."""
    for mod, fwd in found:
        if on:
            mod.forward = fwd
        else:
            vars(mod).pop("forward", None)
    conv_epilogue.available = _FUSED_CONV_AVAILABLE if on or not conv_add else (lambda: False)
    upsample_conv.MIN_PIXELS = _PHASE_MIN_PIXELS if on or not phases else {}
    gemm_conv.MAX_PIXELS = _GEMM_MAX_PIXELS if on or not gemm else ()


def main(argv: list[str] | None = None) -> int:
    parser = one_model.parser(__doc__, "fusions_ab.json", pairs=8)
    parser.add_argument("--fp32-reference", action="store_true",
                        help="also run an fp32 copy of the UNet (with --call decode: the VAE) and print both sides' "
                             "distance to it (needs 2x its bf16 size more memory: fine for SD1.5)")
    parser.add_argument("--which", choices=("all", "conv-add", "gemm-conv", "upsample"), default="all",
                        help="what side A takes off: every fusion (default), only the resnets' conv-add, only "
                             "the small maps' convs as matrix products, or only the VAE upsamplers' phase "
                             "convolutions")
    parser.add_argument("--call", choices=("unet", "decode"), default="unet")
    parser.add_argument("--peak", action="store_true",
                        help="also the peak RSS of each call (Linux: the peak is reset before each call)")
    args = parser.parse_args(argv)

    _, model = one_model.load(args.checkpoint, args.size, "fusions_ab_", args.precision)
    found = fused_modules(model.unet) if args.which == "all" else []
    conv_add, phases, gemm = args.which == "all", args.which == "upsample", args.which in ("all", "gemm-conv")
    conv_add = conv_add or args.which == "conv-add"
    kinds = {}
    for _, fwd in found:
        kinds[fwd.__func__.__name__] = kinds.get(fwd.__func__.__name__, 0) + 1
    kinds["conv_add"] = sum(any(getattr(vars(m).get(name), "__func__", None) is speed._resnet_forward
                                for name in ("forward", "_whole_forward"))  # under vae_bands' forward
                            for m in (model.unet if args.call == "unet" else model.vae).modules())
    print(f"{one_model.describe(args.checkpoint, args.size, model)}, fused modules {kinds}, "
          f"A takes off: {args.which}, timing: {args.call}", flush=True)
    if phases:
        if model.vae.dtype not in upsample_conv.MIN_PIXELS:
            print(f"no phase convolutions for a {model.vae.dtype} VAE: nothing to compare")
            return 1
    elif not _FUSED_CONV_AVAILABLE() or model.dtype is not torch.bfloat16:
        print("nothing fused on this model/CPU (bf16 with oneDNN only): nothing to compare")
        return 1
    if args.call == "unet":
        call = one_model.unet_call(model, args.size)
    else:
        from darkroom.engine import vae_tiling

        g = torch.Generator().manual_seed(1)
        cells = args.size // model.vae_scale_factor
        lat = torch.randn(1, model.vae.config.latent_channels, cells, cells, generator=g)
        call = lambda: vae_tiling.decode(model, lat)  # noqa: E731

    peaks: dict[str, list[float]] = {"A": [], "B": []}
    current = ["A"]

    def set_side(side: str) -> None:
        set_fused(found, side == "B", conv_add, phases, gemm)
        current[0] = side

    if args.peak:
        timed, call = call, lambda: one_model.peak_rss(timed, peaks[current[0]])  # noqa: E731

    outs = {}
    with torch.no_grad():
        for side in ("A", "B"):  # warm-up: oneDNN builds its kernels on the first call of each shape
            set_side(side)
            outs[side] = call().float()
        times = one_model.alternate(call, set_side, args.pairs)
        set_fused(found, True)
        ref_err = {}
        if args.fp32_reference and args.call == "unet":
            import copy

            x, ctx, kwargs = one_model.unet_inputs(model, args.size)
            unet32 = copy.deepcopy(model.unet).float()  # the patched forwards fall back to diffusers' on fp32
            ref = unet32(x.float(), torch.tensor(500.0), encoder_hidden_states=ctx.float(),
                         **{k: {n: t.float() for n, t in v.items()} for k, v in kwargs.items()}).sample
            del unet32
            ref_err = {side: ((outs[side] - ref).norm() / ref.norm()).item() for side in ("A", "B")}
        elif args.fp32_reference:
            import copy

            vae32 = copy.deepcopy(model.vae).float()
            set_fused(found, False, conv_add, phases, gemm)  # the reference upsamples as diffusers does
            ref = vae32.decode(lat / model.vae.config.scaling_factor).sample
            set_fused(found, True)
            del vae32
            ref_err = {side: ((outs[side] - ref).norm() / ref.norm()).item() for side in ("A", "B")}
    s = one_model.summary(times)
    rel = ((outs["B"] - outs["A"]).norm() / outs["A"].norm()).item()
    what = {"all": "diffusers' GEGLU, linear and residual adds, convs", "conv-add": "residual added after conv2",
            "gemm-conv": "every 3x3 conv as a conv", "upsample": "upsample, then the 3x3 conv"}[args.which]
    print(f"\nA ({what}): median {s['A']:.3f} s per {args.call} call")
    b_side = {"upsample": "phase convolutions", "gemm-conv": "small maps' convs as products"}.get(
        args.which, "fused epilogues")
    print(f"B ({b_side}, the default): median {s['B']:.3f} s per {args.call} call")
    print(f"{one_model.ratio_text(s)}; saved {100 * (1 - s['B'] / s['A']):.1f}% of a call")
    if args.peak:
        print("peak RSS per call (GiB): " + ", ".join(
            f"{side} {min(v) / 2**30:.2f}-{max(v) / 2**30:.2f}" for side, v in peaks.items() if v))
    print(f"output difference |B - A| / |A| = {rel:.2e} (rounding: the fused sums are rounded once, the phase "
          f"convolutions' summed taps once more)")
    if ref_err:
        print(f"distance to an fp32 {args.call} |side - fp32| / |fp32|: A {ref_err['A']:.2e}, B {ref_err['B']:.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "size": args.size, "times": times,
                                    "which": args.which, "call": args.call,
                                    "fp32_reference_error": ref_err,
                                    "ratios": s["ratios"], "relative_difference": rel, "fused": kinds,
                                    "peak_rss": peaks if args.peak else None,
                                    "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
