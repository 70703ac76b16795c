"""Seconds per sampling step and VAE decode: Darkroom's default CPU path vs plain diffusers.

Both run on the same full-size SD1.5 checkpoint (random weights, real single-file LDM
layout, fp16 on disk, about 2 GB), in one process, interleaved (A B, then B A, ...), with
the same Euler scheduler, size, steps, CFG scale and prompts:

- Darkroom: `build_engine(Home(tmp))` with device/precision on auto (bf16 on a CPU with
  AVX512-BF16/AMX), `engine.generate(...)`; per-step times come from the StepEvents'
  `elapsed`, the decode from timing `latents_to_images` on the final latents.
- diffusers: `StableDiffusionPipeline.from_single_file(path, config=<configs and tokenizer
  only>, local_files_only=True)` in fp32, per-step times from `callback_on_step_end`, the
  decode from timing `vae.decode` + `image_processor.postprocess` on the final latents;
- diffusers bf16 + channels-last: the same pipeline loaded in bf16, UNet and VAE moved to
  channels-last by hand.

Each side's time is also divided by the floor (benchmarks/floor.py: the model's FLOPs from
its config over the measured bf16 matmul peak). `--family sdxl`: Darkroom alone against the
SDXL floor at 1024x1024 (benchmarks/sdxl_file.py writes the random file).

The first step of every run is dropped (oneDNN primitive creation, caches). Machines are
noisy, so the number to read is the ratio diffusers/Darkroom measured in the same run
(higher = Darkroom faster). Nothing touches the network: `darkroom` is imported first.

    .venv/bin/python benchmarks/step_time.py [--steps 3] [--rounds 2] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import darkroom  # noqa: F401  (sets the HF stack offline and installs the network guard first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from floor import matmul_peak, unet_step_flops, vae_decode_flops  # noqa: E402  (benchmarks/floor.py)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOKENIZER_DIR = REPO / "darkroom" / "assets" / "tokenizer"
CHECKPOINT_NAME = "sd15-random-fp16.safetensors"
MARKER = {"darkroom_benchmark": "random-weight SD1.5 (benchmarks/step_time.py)"}

PROMPT = "a photo of a cat sitting on a windowsill, soft morning light, 35mm film, highly detailed"
NEGATIVE = "blurry, low quality, watermark"
SAMPLER = "Euler"
CFG_SCALE = 7.0
SEED = 1

# The configs of runwayml/stable-diffusion-v1-5 (unet/, vae/, text_encoder/ config.json).
UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssMonitor:
    """Samples this process's resident memory every `interval` s; peak per named phase."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._phase = "between phases"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._note()

    def _note(self) -> None:
        rss = rss_bytes()
        if rss > self.peaks.get(self._phase, 0):
            self.peaks[self._phase] = rss

    def start(self) -> RssMonitor:
        self._thread.start()
        return self

    @contextlib.contextmanager
    def phase(self, name: str):
        self._note()
        previous, self._phase = self._phase, name
        try:
            yield
        finally:
            self._note()
            self._phase = previous

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def gib(n: float) -> float:
    return round(n / 2**30, 2)


# --------------------------------------------------------------------------- checkpoint


def build_checkpoint(path: Path, seed: int = 0) -> None:
    """Random-weight SD1.5 (torch default init) exported by Darkroom's own LDM exporter, fp16."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from darkroom.testing.ldm_export import pipeline_to_ldm, save_ldm_checkpoint

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    # Built and cast one at a time so that at most one fp32 copy of the UNet is alive.
    unet = UNet2DConditionModel(**UNET_CONFIG).eval().half()
    vae = AutoencoderKL(**VAE_CONFIG).eval().half()
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG)).eval().half()
    t1 = time.perf_counter()
    ldm = pipeline_to_ldm(
        "sd1",
        unet=unet.state_dict(),
        unet_config=dict(unet.config),
        vae=vae.state_dict(),
        text_encoder=text_encoder.state_dict(),
    )
    partial = path.with_name(path.name + ".partial")
    save_ldm_checkpoint(partial, ldm, dtype=torch.float16, metadata=MARKER)
    partial.replace(path)
    print(
        f"built {path} ({path.stat().st_size / 2**30:.2f} GiB, {len(ldm)} tensors):"
        f" init {t1 - t0:.1f} s, export+write {time.perf_counter() - t1:.1f} s",
        flush=True,
    )


def checkpoint_ok(path: Path) -> bool:
    """A file this script wrote (marker metadata) with a full SD1 UNet, VAE and CLIP in it."""
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            meta, keys = fh.metadata() or {}, list(fh.keys())
    except Exception:  # a truncated or foreign file: rebuild it
        return False
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")
    return meta.get("darkroom_benchmark") == MARKER["darkroom_benchmark"] and all(
        any(k.startswith(p) for k in keys) for p in prefixes
    )


def ensure_checkpoint(out: Path, keep: bool) -> tuple[Path, dict]:
    """The checkpoint path; built in a child process so its memory never counts here."""
    path = out / CHECKPOINT_NAME
    info = {"path": str(path), "reused": False}
    if keep and checkpoint_ok(path):
        info["reused"] = True
        print(f"reusing {path}", flush=True)
        return path, info
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--build-only", "--out", str(out)], check=True)
    info["build_seconds"] = round(time.perf_counter() - t0, 1)
    info["build_peak_rss_gib"] = gib(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
    if not checkpoint_ok(path):
        raise SystemExit(f"{path}: the build did not produce a usable checkpoint")
    return path, info


def write_config_folder(folder: Path, scheduler) -> Path:
    """A diffusers SD1.5 folder with configs, scheduler and tokenizer only (no weights)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTokenizer

    version = diffusers.__version__
    for name, cls, config in (("unet", "UNet2DConditionModel", UNET_CONFIG), ("vae", "AutoencoderKL", VAE_CONFIG)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        body = {"_class_name": cls, "_diffusers_version": version, **config}
        (folder / name / "config.json").write_text(json.dumps(body, indent=2), encoding="utf-8")
    CLIPTextConfig(**TEXT_ENCODER_CONFIG).save_pretrained(str(folder / "text_encoder"))
    scheduler.save_config(str(folder / "scheduler"))
    tokenizer = CLIPTokenizer(
        vocab=str(TOKENIZER_DIR / "vocab.json"),
        merges=str(TOKENIZER_DIR / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": version,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(scheduler).__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".ckpt", ".pt")]
    if weights:
        raise SystemExit(f"config folder unexpectedly holds weights: {weights}")
    return folder


# --------------------------------------------------------------------------- inspection


class InputFormat:
    """Forward pre-hook on a UNet's conv_in: remembers the dtype/memory format of what it is fed."""

    def __init__(self, unet):
        self.seen: set[str] = set()
        unet.conv_in.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        x = args[0]
        fmt = "contiguous" if x.is_contiguous() else "other"
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            fmt = "channels_last"
        self.seen.add(f"{str(x.dtype).replace('torch.', '')} {fmt}")


def describe_unet(unet) -> dict:
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    cl = sum(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous() for m in convs)
    processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    return {
        "class": type(unet).__name__,
        "dtype": str(next(unet.parameters()).dtype).replace("torch.", ""),
        "channels_last_conv_weights": f"{cl}/{len(convs)}",
        "attention_processors": processors,
    }


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "?"
    for line in text.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "?"


# --------------------------------------------------------------------------- runs


def step_durations(stamps: list[float]) -> list[float]:
    """Durations of steps 2..N from the end-of-step timestamps (step 1 is warm-up)."""
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def cpu_utilisation(wall: list[float], cpu: list[float]) -> float:
    """Process CPU seconds per wall second over steps 2..N: about the thread count when nothing
    else competes for the cores."""
    elapsed = wall[-1] - wall[0]
    return round((cpu[-1] - cpu[0]) / elapsed, 2) if elapsed > 0 else float("nan")


def run_darkroom(engine, req, monitor: RssMonitor) -> dict:
    from darkroom.engine.generate import latents_to_images

    events, cpu = [], []

    def on_step(event) -> None:
        cpu.append(time.process_time())
        events.append(event)

    with monitor.phase("darkroom run"):
        result = engine.generate(req, on_step=on_step)
    latents = events[-1].latents
    with monitor.phase("darkroom run"), torch.no_grad():
        t0 = time.perf_counter()
        images = latents_to_images(engine.cache.current, latents)
        decode = time.perf_counter() - t0
    assert images and images[0].size == (req.width, req.height)
    return {
        "step_seconds": step_durations([e.elapsed for e in events]),
        "first_step_seconds": events[0].elapsed,
        "decode_seconds": decode,
        "engine_timings": {k: round(v, 3) for k, v in result.timings.items()},
        "latents_finite": bool(torch.isfinite(latents).all()),
        "cpu_utilisation": cpu_utilisation([e.elapsed for e in events], cpu),
    }


def run_diffusers(pipe, make_scheduler, steps: int, size: int, monitor: RssMonitor, phase: str) -> dict:
    stamps: list[float] = []
    cpu: list[float] = []

    def on_step_end(_pipe, _i, _t, kwargs):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        return kwargs

    pipe.scheduler = make_scheduler()
    from darkroom.engine.memory import lean_allocations

    # glibc's own thresholds, as diffusers runs in a process of its own (Darkroom's engine, built first,
    # changed them for this whole process: darkroom.engine.memory.keep_large_allocations)
    with monitor.phase(f"{phase} run"), lean_allocations():
        t0 = time.perf_counter()
        latents = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=steps,
            guidance_scale=CFG_SCALE,
            width=size,
            height=size,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="latent",
            callback_on_step_end=on_step_end,
        ).images
        call = time.perf_counter() - t0
        with torch.no_grad():
            t1 = time.perf_counter()
            decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            images = pipe.image_processor.postprocess(decoded, output_type="pil")
            decode = time.perf_counter() - t1
    assert images and images[0].size == (size, size)
    return {
        "step_seconds": step_durations(stamps),
        "first_step_plus_encode_seconds": stamps[0] - t0,
        "decode_seconds": decode,
        "call_seconds": call,
        "latents_finite": bool(torch.isfinite(latents).all()),
        "cpu_utilisation": cpu_utilisation(stamps, cpu),
    }


def summarize(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["step_seconds"]]
    decodes = [r["decode_seconds"] for r in runs]
    return {
        "s_per_step": statistics.median(steps) if steps else float("nan"),
        "s_per_step_min": min(steps) if steps else float("nan"),
        "decode_s": min(decodes),
        "decode_s_first": decodes[0],
        "steps_measured": len(steps),
    }


def main_sdxl(args) -> int:
    """SDXL: Darkroom's default path against the floor (the diffusers sides are left out: its fp32
    pipeline alone is 14 GB, next to Darkroom's 7 GB bf16 model). The random file is written
    tensor by tensor by benchmarks/sdxl_file.py (about 80 s, 6.5 GiB on disk, little memory)."""
    import sdxl_file

    from darkroom.api import build_engine
    from darkroom.home import Home
    from darkroom.offline.guard import process_guard
    from darkroom.request import GenerationRequest

    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is warm-up)")
    size = 1024 if args.size == 512 else args.size
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / sdxl_file.CHECKPOINT_NAME
    if not (args.keep and sdxl_file.checkpoint_ok(ckpt)):
        sdxl_file.write_checkpoint(ckpt)
    load_before = os.getloadavg()
    unet_flops, unet_ops = unet_step_flops(sdxl_file.UNET_CONFIG, size, context=sdxl_file.CONTEXT,
                                           added_cond=sdxl_file.ADDED_COND)
    vae_flops, vae_ops = vae_decode_flops(sdxl_file.VAE_CONFIG, size)
    monitor = RssMonitor().start()
    tmp = tempfile.TemporaryDirectory(prefix="darkroom-bench-home-")
    engine = build_engine(Home(Path(tmp.name)).ensure())
    req = GenerationRequest(model=str(ckpt), prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, width=size,
                            height=size, cfg_scale=CFG_SCALE, sampler=SAMPLER, seed=SEED)
    with monitor.phase("darkroom load"):
        t0 = time.perf_counter()
        model = engine.load(req)
        load_s = time.perf_counter() - t0
    peak_before = matmul_peak()
    runs = []
    for r in range(args.rounds):
        gc.collect()
        res = run_darkroom(engine, req, monitor)
        runs.append(res)
        print(f"round {r + 1} darkroom: steps 2..{args.steps} [{', '.join(f'{x:.2f}' for x in res['step_seconds'])}] s,"
              f" decode {res['decode_seconds']:.2f} s, {res['cpu_utilisation']:.2f} cores busy", flush=True)
    monitor.stop()
    peak = max(peak_before, matmul_peak())
    dr = summarize(runs)
    floor_step, floor_decode = unet_flops / peak, vae_flops / peak
    report = {
        "family": "sdxl", "size": size, "steps": args.steps, "rounds": args.rounds, "load_seconds": round(load_s, 1),
        "dtype": str(model.dtype), "vae_dtype": str(model.vae_dtype), **dr, "runs": runs,
        "floor": {"unet_cfg_step_flops": unet_flops, "vae_decode_flops": vae_flops, "unet_flops_per_op": unet_ops,
                  "vae_flops_per_op": vae_ops, "bf16_matmul_flops_per_s": peak, "step_s": floor_step,
                  "decode_s": floor_decode, "targets": {"step": 1.5}},
        "ratio_to_floor": {"step": dr["s_per_step"] / floor_step, "decode": dr["decode_s"] / floor_decode},
        "peak_rss_gib": {phase: gib(v) for phase, v in monitor.peaks.items()},
        "machine": {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "network_attempts": len(process_guard().attempts),
    }
    tmp.cleanup()
    print(f"\nSDXL random weights, {size}x{size}, {SAMPLER}, CFG {CFG_SCALE:g}; {report['machine']['cpu']},"
          f" torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"floor (FLOPs / bf16 matmul peak {peak / 1e9:.0f} GFLOP/s): step {floor_step:.2f} s"
          f" ({unet_flops / 1e12:.2f} TFLOP), decode {floor_decode:.2f} s ({vae_flops / 1e12:.2f} TFLOP)")
    print(f"Darkroom {str(model.dtype).replace('torch.', '')}: {dr['s_per_step']:.2f} s/step"
          f" ({report['ratio_to_floor']['step']:.2f}x floor, target 1.5x), decode {dr['decode_s']:.2f} s"
          f" ({report['ratio_to_floor']['decode']:.2f}x floor)")
    print("peak RSS (GiB): " + ", ".join(f"{k} {v}" for k, v in report["peak_rss_gib"].items()))
    print(f"load average before/after: {load_before[0]:.2f}/{os.getloadavg()[0]:.2f};"
          f" network attempts: {report['network_attempts']}")
    (out / "step_time_sdxl.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="sampling steps per run (the first is dropped)")
    parser.add_argument("--size", type=int, default=512, help="width = height in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each (A B, B A, ...)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="checkpoint, config folder, JSON")
    parser.add_argument("--keep", action="store_true", help="reuse a checkpoint already in --out")
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15",
                        help="sdxl: Darkroom alone against the floor, 1024x1024 unless --size says otherwise")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.family == "sdxl":
        return main_sdxl(args)
    out = args.out.resolve()
    if args.build_only:
        build_checkpoint(out / CHECKPOINT_NAME)
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")

    started = time.perf_counter()
    ckpt, ckpt_info = ensure_checkpoint(out, args.keep)

    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    from darkroom.api import build_engine
    from darkroom.engine import samplers
    from darkroom.home import Home
    from darkroom.models.configs import scheduler_config
    from darkroom.offline.guard import process_guard
    from darkroom.request import GenerationRequest

    diffusers_logging.disable_progress_bar()
    load_before = os.getloadavg()
    spec, schedule = samplers.resolve(SAMPLER, "Automatic")
    make_scheduler = lambda: samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=SEED)
    config_dir = write_config_folder(out / "sd15-config", make_scheduler())

    monitor = RssMonitor().start()
    tmp = tempfile.TemporaryDirectory(prefix="darkroom-bench-home-")
    engine = build_engine(Home(Path(tmp.name)).ensure())
    req = GenerationRequest(
        model=str(ckpt), prompt=PROMPT, negative_prompt=NEGATIVE, steps=args.steps, width=args.size,
        height=args.size, cfg_scale=CFG_SCALE, sampler=SAMPLER, seed=SEED,
    )
    with monitor.phase("darkroom load"):
        t0 = time.perf_counter()
        model = engine.load(req)
        darkroom_load = time.perf_counter() - t0
    darkroom_fmt = InputFormat(model.unet)
    darkroom_info = {
        "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
        "vae_dtype": str(model.vae_dtype).replace("torch.", ""), "reason": engine.cache.device.reason,
        "load_seconds": round(darkroom_load, 1), "unet": describe_unet(model.unet),
    }

    with monitor.phase("diffusers load"):
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(
            str(ckpt), config=str(config_dir), local_files_only=True, torch_dtype=torch.float32,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        diffusers_load = time.perf_counter() - t0
    pipe.set_progress_bar_config(disable=True)
    # What a user could do by hand: the same pipeline in bf16 with channels-last UNet/VAE weights.
    with monitor.phase("diffusers bf16 load"):
        t0 = time.perf_counter()
        pipe16 = StableDiffusionPipeline.from_single_file(
            str(ckpt), config=str(config_dir), local_files_only=True, torch_dtype=torch.bfloat16,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe16.unet.to(memory_format=torch.channels_last)
        pipe16.vae.to(memory_format=torch.channels_last)
        diffusers16_load = time.perf_counter() - t0
    pipe16.set_progress_bar_config(disable=True)
    diffusers16_info = {"dtype": "bfloat16", "load_seconds": round(diffusers16_load, 1),
                        "unet": describe_unet(pipe16.unet)}
    ids = pipe.tokenizer("a photo of a cat").input_ids
    if ids != CAT_IDS:
        raise SystemExit(f"tokenizer mismatch: {ids} != {CAT_IDS}")
    diffusers_fmt = InputFormat(pipe.unet)
    diffusers_info = {
        "dtype": str(pipe.unet.dtype).replace("torch.", ""), "vae_dtype": str(pipe.vae.dtype).replace("torch.", ""),
        "text_encoder_dtype": str(pipe.text_encoder.dtype).replace("torch.", ""),
        "load_seconds": round(diffusers_load, 1), "unet": describe_unet(pipe.unet),
    }
    # Same schedule on both sides (the pipeline gets a fresh copy of Darkroom's scheduler per run).
    ours, theirs = make_scheduler(), pipe.scheduler
    ours.set_timesteps(args.steps)
    theirs.set_timesteps(args.steps)
    if not torch.equal(ours.timesteps, theirs.timesteps) or not torch.allclose(ours.sigmas, theirs.sigmas):
        raise SystemExit(f"schedules differ: {ours.timesteps} vs {theirs.timesteps}")

    # The floor: the model's FLOPs (from its config, on the meta device) over the measured bf16
    # matmul peak on these threads (measured before and after the runs; the better one is used).
    unet_flops, unet_ops = unet_step_flops(UNET_CONFIG, args.size)
    vae_flops, vae_ops = vae_decode_flops(VAE_CONFIG, args.size)
    peak_before = matmul_peak()
    print(f"floor: UNet CFG step {unet_flops / 1e12:.3f} TFLOP, VAE decode {vae_flops / 1e12:.3f} TFLOP;"
          f" bf16 matmul peak {peak_before / 1e9:.0f} GFLOP/s", flush=True)

    runs: dict[str, list[dict]] = {"darkroom": [], "diffusers": [], "diffusers_bf16": []}
    order = ["darkroom", "diffusers", "diffusers_bf16"]
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            gc.collect()
            if name == "darkroom":
                res = run_darkroom(engine, req, monitor)
            elif name == "diffusers":
                res = run_diffusers(pipe, make_scheduler, args.steps, args.size, monitor, "diffusers")
            else:
                res = run_diffusers(pipe16, make_scheduler, args.steps, args.size, monitor, "diffusers bf16")
            runs[name].append(res)
            steps_txt = ", ".join(f"{s:.2f}" for s in res["step_seconds"])
            print(f"round {r + 1} {name:14s}: steps 2..{args.steps} [{steps_txt}] s,"
                  f" decode {res['decode_seconds']:.2f} s, {res['cpu_utilisation']:.2f} cores busy while stepping",
                  flush=True)
    monitor.stop()
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)
    floor = {
        "unet_cfg_step_flops": unet_flops, "vae_decode_flops": vae_flops,
        "unet_flops_per_op": unet_ops, "vae_flops_per_op": vae_ops,
        "bf16_matmul_flops_per_s": {"before": peak_before, "after": peak_after, "used": peak},
        "step_s": unet_flops / peak, "decode_s": vae_flops / peak,
        "targets": {"step": 1.25, "decode": 1.3},
    }

    dr, df = summarize(runs["darkroom"]), summarize(runs["diffusers"])
    d16 = summarize(runs["diffusers_bf16"])
    darkroom_info["unet_input"] = sorted(darkroom_fmt.seen)
    diffusers_info["unet_input"] = sorted(diffusers_fmt.seen)
    report = {
        "settings": {
            "steps": args.steps, "size": args.size, "rounds": args.rounds, "sampler": SAMPLER,
            "schedule": schedule, "cfg_scale": CFG_SCALE, "seed": SEED, "prompt": PROMPT, "negative_prompt": NEGATIVE,
            "statistic": "s/step = median of steps 2..N over all rounds; decode = best round",
        },
        "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "checkpoint": ckpt_info,
        "darkroom": {**darkroom_info, **dr, "runs": runs["darkroom"]},
        "diffusers": {**diffusers_info, **df, "runs": runs["diffusers"]},
        "diffusers_bf16_channels_last": {**diffusers16_info, **d16, "runs": runs["diffusers_bf16"]},
        "floor": floor,
        "ratio_step": df["s_per_step"] / dr["s_per_step"],
        "ratio_decode": df["decode_s"] / dr["decode_s"],
        "ratio_step_bf16": d16["s_per_step"] / dr["s_per_step"],
        "ratio_decode_bf16": d16["decode_s"] / dr["decode_s"],
        "ratio_to_floor": {
            name: {"step": v["s_per_step"] / floor["step_s"], "decode": v["decode_s"] / floor["decode_s"]}
            for name, v in (("darkroom", dr), ("diffusers", df), ("diffusers_bf16", d16))
        },
        "peak_rss_gib": {phase: gib(v) for phase, v in monitor.peaks.items()},
        "peak_rss_gib_process": gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
        "network_attempts": len(process_guard().attempts),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    tmp.cleanup()

    m = report["machine"]
    print()
    print(f"CPU: {m['cpu']} ({m['cores']} cores), torch {m['torch']} ({m['torch_threads']} threads),"
          f" diffusers {m['diffusers']}, transformers {m['transformers']}")
    print(f"SD1.5 random weights, {args.size}x{args.size}, {SAMPLER}, CFG {CFG_SCALE:g}, {args.steps} steps"
          f" x {args.rounds} rounds (step 1 of each run dropped)")
    print()
    fl = report["ratio_to_floor"]
    print(f"floor (FLOPs / bf16 matmul peak {peak / 1e9:.0f} GFLOP/s): step {floor['step_s']:.2f} s"
          f" ({unet_flops / 1e12:.3f} TFLOP), decode {floor['decode_s']:.2f} s ({vae_flops / 1e12:.3f} TFLOP)")
    print(f"{'':32s} {'dtype':>8s} {'s/step':>8s} {'x floor':>8s} {'decode s':>9s} {'x floor':>8s}"
          f" {'step: x DR':>10s} {'decode: x DR':>12s}")
    for label, dtype, v, key in (
        ("Darkroom (engine, auto)", darkroom_info["dtype"], dr, "darkroom"),
        ("diffusers fp32 (from_single_file)", diffusers_info["dtype"], df, "diffusers"),
        ("diffusers bf16 + channels-last", "bfloat16", d16, "diffusers_bf16"),
    ):
        print(f"{label:32s} {dtype:>8s} {v['s_per_step']:8.2f} {fl[key]['step']:8.2f} {v['decode_s']:9.2f}"
              f" {fl[key]['decode']:8.2f} {v['s_per_step'] / dr['s_per_step']:10.2f}"
              f" {v['decode_s'] / dr['decode_s']:12.2f}")
    print(f"targets: Darkroom step within {floor['targets']['step']}x of the floor, decode within"
          f" {floor['targets']['decode']}x; 'x DR' = time / Darkroom's time (higher = Darkroom faster)")
    print()
    print(f"Darkroom: {darkroom_info['reason']}; UNet input {darkroom_info['unet_input']},"
          f" channels_last conv weights {darkroom_info['unet']['channels_last_conv_weights']}")
    print(f"diffusers: UNet input {diffusers_info['unet_input']},"
          f" channels_last conv weights {diffusers_info['unet']['channels_last_conv_weights']}")
    peaks = ", ".join(f"{k} {v}" for k, v in report["peak_rss_gib"].items())
    print(f"peak RSS (GiB): {peaks}; process {report['peak_rss_gib_process']}")
    utils = [r["cpu_utilisation"] for rs in runs.values() for r in rs]
    print(f"load average before/after: {m['loadavg_before'][0]:.2f}/{m['loadavg_after'][0]:.2f};"
          f" while stepping this process kept {min(utils):.2f}-{max(utils):.2f} of {m['torch_threads']} threads busy")
    if min(utils) < 0.8 * m["torch_threads"]:
        print("warning: the runs got less CPU than threads asked for (other load, or fewer real cores than"
              " vCPUs): absolute times are inflated, compare the ratios")
    print(f"network attempts: {report['network_attempts']}; total {report['total_seconds']} s")
    (out / "step_time.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'step_time.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
