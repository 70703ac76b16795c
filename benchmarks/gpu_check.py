"""GPU check: Darkroom vs diffusers on full-size random SD1.5 and SDXL, and SDXL under 4/6 GB VRAM caps.

How to run (from the repository root, on a machine with one CUDA GPU; nothing is downloaded):

    python benchmarks/gpu_check.py              # the real check, about 3-6 min on an H100, hard budget 540 s
    python benchmarks/gpu_check.py --dry-run    # the same logic on the CPU with tiny models (< 2 min)

`python` is any Python 3.10+ whose packages include torch (CUDA build), diffusers, transformers,
accelerate, safetensors, pydantic, pillow and numpy (Darkroom's own dependencies); the repository
is put on sys.path, so Darkroom needs no install. Results: one line per check on stdout, and a JSON
file at $OUT/gpu_check.json (when $OUT is set) or --json PATH. Every part runs in its own
try/except and prints `FAIL <part>: <error>` instead of stopping the rest; parts that would start
after the time budget print `SKIP`. Exit status 0 when every part that ran passed.

What it does (weights are random, torch default init, built on the GPU in fp16 and written as
real single-file LDM checkpoints by darkroom.testing.ldm_export):

1. sd15 / sdxl parity: the same modules run as diffusers' StableDiffusion(XL)Pipeline (fp16, SDXL VAE
   fp32 as diffusers upcasts it) and as Darkroom loading the file (`build_engine(vram="high")`), Euler,
   same seed and prompts, CFG 7: s/step (median, first step dropped), peak VRAM
   (torch.cuda.max_memory_allocated), images finite, and pixel difference to diffusers (mean/max on
   0..255; pass: mean <= 4).
2. sdxl-cap-6GB / sdxl-cap-4GB: SDXL 1024x1024 in a fresh engine with vram=auto after
   torch.cuda.set_per_process_memory_fraction(cap / total): the plan chosen, s/step, peak VRAM
   (pass: under the cap, image finite, close to the uncapped image: mean diff <= 4).
3. sdxl-cap-4GB-fp8: the same at 4 GB with fp8 weight storage (reported, pass: finite, under the cap).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]  # darkroom without an install; step_time.py for the SD1.5 configs

PROMPT = "a photo of a cat sitting on a windowsill, soft morning light, 35mm film, highly detailed"
NEGATIVE = "blurry, low quality, watermark"
SEED, CFG = 1, 7.0
GiB = 2**30

SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_TE2 = {
    "architectures": ["CLIPTextModelWithProjection"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1280, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 5120, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 20, "num_hidden_layers": 32, "pad_token_id": 1,
    "projection_dim": 1280, "vocab_size": 49408,
}

RESULTS: dict = {"parts": {}}


def log(msg: str) -> None:
    print(msg, flush=True)


def configs(family: str, tiny: bool) -> dict:
    """{unet, vae, text_encoder, text_encoder_2} config dicts: the real SD1.5/SDXL ones, or Darkroom's tiny ones."""
    if tiny:
        from darkroom.testing.tiny import tiny_configs

        return tiny_configs(family)
    from step_time import TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG  # benchmarks/step_time.py

    if family == "sd1":
        return {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG, "text_encoder_2": None}
    vae = {**VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
    return {"unet": SDXL_UNET, "vae": vae, "text_encoder": TEXT_ENCODER_CONFIG, "text_encoder_2": SDXL_TE2}


def build(family: str, path: Path, device, dtype, tiny: bool) -> dict:
    """Random modules built on `device` in `dtype` (seeded), written to `path` as a single-file checkpoint."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from darkroom.testing.ldm_export import pipeline_to_ldm, save_ldm_checkpoint

    cfg = configs(family, tiny)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg["unet"]).eval().to(dtype)
        vae = AutoencoderKL(**cfg["vae"]).eval().to(dtype)
        te = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).eval().to(dtype)
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])).eval().to(dtype)
               if cfg["text_encoder_2"] else None)
    for m in (unet, vae, te, te2):
        if m is not None:
            m.requires_grad_(False)
    cpu = lambda m: None if m is None else {k: v.detach().cpu() for k, v in m.state_dict().items()}
    ldm = pipeline_to_ldm(family, unet=cpu(unet), unet_config=dict(unet.config), vae=cpu(vae),
                          text_encoder=cpu(te), text_encoder_2=cpu(te2))
    meta_cfg = {"unet": json.loads(unet.to_json_string()), "vae": json.loads(vae.to_json_string()),
                "text_encoder": json.loads(te.config.to_json_string(use_diff=False)),
                "text_encoder_2": None if te2 is None else json.loads(te2.config.to_json_string(use_diff=False))}
    save_ldm_checkpoint(path, ldm, dtype=dtype, configs=meta_cfg)
    del ldm
    log(f"  built {family} {path.stat().st_size / GiB:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    return {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / GiB, 3) if device.type == "cuda" else None


def step_seconds(stamps: list[float]) -> float | None:
    d = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return round(statistics.median(d), 4) if d else None


def to_array(image):
    import numpy as np

    return np.asarray(image.convert("RGB")).astype(np.int16)


def compare(a, b) -> dict:
    import numpy as np

    d = np.abs(a - b)
    return {"mean_abs_diff": round(float(d.mean()), 3), "max_abs_diff": int(d.max())}


def make_scheduler_factory():
    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config

    spec, schedule = samplers.resolve("Euler", "Automatic")
    return lambda: samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=SEED)


def run_diffusers(family: str, modules: dict, device, steps: int, size: int, vae_dtype) -> dict:
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from darkroom.testing.tiny import clip_tokenizer

    scheduler = make_scheduler_factory()()
    if family == "sd1":
        pipe = StableDiffusionPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                                       tokenizer=clip_tokenizer(), unet=modules["unet"], scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                                         text_encoder_2=modules["text_encoder_2"], tokenizer=clip_tokenizer(),
                                         tokenizer_2=clip_tokenizer("!"), unet=modules["unet"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    stamps: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    reset_peak(device)
    with torch.no_grad():
        latents = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG,
                       width=size, height=size, generator=torch.Generator("cpu").manual_seed(SEED),
                       output_type="latent", callback_on_step_end=on_step_end).images
        vae = pipe.vae
        decoded = vae.decode((latents / vae.config.scaling_factor).to(vae_dtype), return_dict=False)[0]
        image = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
    sync(device)
    return {"s_per_step": step_seconds(stamps), "peak_vram_gib": peak_gib(device),
            "finite": bool(torch.isfinite(latents).all() and torch.isfinite(decoded).all()), "image": image}


def run_darkroom(engine, path: Path, device, steps: int, size: int) -> dict:
    import numpy as np
    from PIL import Image

    from darkroom.request import GenerationRequest

    stamps: list[float] = []

    def on_step(_event) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    req = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG, sampler="Euler",
                            seed=SEED, width=size, height=size, model=str(path))
    reset_peak(device)
    t0 = time.perf_counter()
    result = engine.generate(req, on_step=on_step)
    sync(device)
    image = Image.open(io.BytesIO(result.images[0].png))
    model = engine.cache.current
    placed = getattr(model, "placement", None)
    return {"s_per_step": step_seconds(stamps), "peak_vram_gib": peak_gib(device),
            "seconds": round(time.perf_counter() - t0, 2),
            "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "finite": bool(np.isfinite(to_array(image)).all()), "image": image,
            "plan": placed.plan.describe() if placed is not None else "full (no placement installed)"}


def strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "image"}


class Check:
    def __init__(self, args):
        import torch

        self.args = args
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.dtype = torch.float32 if args.dry_run else torch.float16
        self.tiny = args.dry_run
        self.steps = args.steps or (3 if args.dry_run else 12)
        self.work = Path(tempfile.mkdtemp(prefix="darkroom-gpu-check-"))
        self.files: dict[str, Path] = {}
        self.reference: dict[str, object] = {}
        self.deadline = time.monotonic() + args.budget

    def size(self, family: str) -> int:
        if self.tiny:
            return 64
        return 512 if family == "sd1" else 1024

    def engine(self, vram: str, fp8: bool = False):
        from darkroom.api import build_engine
        from darkroom.home import Home

        precision = "fp32" if self.tiny else "fp16"
        home = Home(self.work / f"home-{vram}-{int(fp8)}").ensure()
        return build_engine(home, device=str(self.device), precision=precision, vram=vram, fp8=fp8)

    def parity(self, family: str) -> dict:
        import torch

        path = self.work / f"{family}-random.safetensors"
        modules = build(family, path, self.device, self.dtype, self.tiny)
        self.files[family] = path
        size = self.size(family)
        vae_dtype = torch.float32 if family == "sdxl" or self.tiny else self.dtype
        modules["vae"].to(vae_dtype)
        theirs = run_diffusers(family, modules, self.device, self.steps, size, vae_dtype)
        del modules
        reset_peak(self.device)
        engine = self.engine("high")
        ours = run_darkroom(engine, path, self.device, self.steps, size)
        self.reference[family] = ours["image"]
        diff = compare(to_array(ours["image"]), to_array(theirs["image"]))
        engine.cache.unload()
        del engine
        ok = ours["finite"] and theirs["finite"] and diff["mean_abs_diff"] <= 4
        return {"ok": ok, "size": size, "steps": self.steps, "darkroom": strip(ours), "diffusers": strip(theirs),
                "vs_diffusers": diff}

    def capped(self, cap_gib: float, fp8: bool = False) -> dict:
        import torch

        from darkroom.engine import memory

        if "sdxl" not in self.files:
            raise RuntimeError("no SDXL file (the sdxl part failed or was skipped)")
        size = self.size("sdxl")
        reset_peak(self.device)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            memory.note_memory_fraction(min(1.0, cap_gib * GiB / total), self.device.index or 0)
            vram = "auto"
        else:  # no CUDA: the same logic with the cap scaled to the tiny model as a budget
            vram = f"{max(1, int(cap_gib * 2))}MB"
        try:
            engine = self.engine(vram, fp8=fp8)
            ours = run_darkroom(engine, self.files["sdxl"], self.device, self.steps, size)
            engine.cache.unload()
            del engine
        finally:
            if self.device.type == "cuda":
                memory.note_memory_fraction(1.0, self.device.index or 0)
        out = {"cap_gib": cap_gib, "fp8": fp8, "size": size, "darkroom": strip(ours)}
        under = ours["peak_vram_gib"] is None or ours["peak_vram_gib"] <= cap_gib
        out["under_cap"] = under
        if "sdxl" in self.reference:
            out["vs_uncapped"] = compare(to_array(ours["image"]), to_array(self.reference["sdxl"]))
        close = fp8 or "vs_uncapped" not in out or out["vs_uncapped"]["mean_abs_diff"] <= 4
        out["ok"] = bool(ours["finite"] and under and close)
        return out

    def run(self) -> int:
        import torch

        RESULTS["environment"] = {
            "python": sys.version.split()[0], "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu (dry run)",
            "dry_run": self.args.dry_run, "steps": self.steps,
        }
        try:
            import diffusers
            import transformers

            RESULTS["environment"].update(diffusers=diffusers.__version__, transformers=transformers.__version__)
        except Exception:  # reported by the parts that need them
            pass
        log(f"environment: {RESULTS['environment']}")
        parts = [("sd15", lambda: self.parity("sd1"), 60), ("sdxl", lambda: self.parity("sdxl"), 150),
                 ("sdxl-cap-6GB", lambda: self.capped(6), 60), ("sdxl-cap-4GB", lambda: self.capped(4), 80),
                 ("sdxl-cap-4GB-fp8", lambda: self.capped(4, fp8=True), 80)]
        failed = 0
        for name, fn, need in parts:
            left = self.deadline - time.monotonic()
            if left < (5 if self.tiny else need):
                log(f"SKIP {name}: {left:.0f} s of the time budget left, it needs about {need} s")
                RESULTS["parts"][name] = {"ok": None, "skipped": f"time budget ({left:.0f} s left)"}
                continue
            t0 = time.perf_counter()
            try:
                res = fn()
                res["seconds"] = round(time.perf_counter() - t0, 1)
                RESULTS["parts"][name] = res
                log(f"{'PASS' if res['ok'] else 'FAIL'} {name}: {json.dumps(res)}")
                failed += not res["ok"]
            except Exception as e:  # one part's failure must not stop the others
                failed += 1
                RESULTS["parts"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc()[-3000:]}
                log(f"FAIL {name}: {type(e).__name__}: {e}")
                traceback.print_exc()
            finally:
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", "--tiny", dest="dry_run", action="store_true",
                   help="CPU with tiny models: checks the script's logic without a GPU")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all parts (default 540)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 12; 3 in a dry run)")
    p.add_argument("--json", type=Path, default=None, help="where to write the results (default $OUT/gpu_check.json)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    try:
        import torch

        import darkroom  # noqa: F401  (offline: sets the HF stack offline and installs the network guard)
    except Exception as e:
        log(f"FAIL setup: cannot import torch/darkroom ({type(e).__name__}: {e}); run with a Python that has"
            " torch, diffusers, transformers, accelerate, safetensors, pydantic, pillow and numpy")
        return 2
    torch.set_num_threads(min(8, os.cpu_count() or 1))
    if not args.dry_run and not torch.cuda.is_available():
        log("FAIL setup: this PyTorch sees no CUDA GPU; use --dry-run to check the script on a CPU")
        return 2
    failed = Check(args).run()
    RESULTS["total_seconds"] = round(time.perf_counter() - start, 1)
    RESULTS["failed_parts"] = failed
    target = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    if target is not None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(RESULTS, indent=2, default=str), encoding="utf-8")
            log(f"results written to {target}")
        except OSError as e:
            log(f"could not write {target}: {e}")
    log(f"done in {RESULTS['total_seconds']} s: {failed} part(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
