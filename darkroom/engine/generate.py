"""txt2img: GenerationRequest -> GenerationResult, with progress, previews and interrupt.

Steps mirror a diffusers pipeline: (1) check inputs, (2) load the model, (3) encode the
prompts, (4) per batch: noise from per-image CPU generators seeded s, s+1, ... (so a batch
of N equals N single runs and images do not depend on the device), (5) denoise with the
chosen scheduler and classifier-free guidance, (6) decode and write PNGs with infotext.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import darkroom
from darkroom.engine import samplers
from darkroom.engine.cache import ModelCache
from darkroom.errors import InvalidRequest
from darkroom.infotext import build_infotext
from darkroom.models.library import ModelLibrary
from darkroom.models.loader import LoadedModel
from darkroom.pngmeta import encode_png
from darkroom.request import GeneratedImage, GenerationRequest, GenerationResult
from darkroom.text.conditioning import Conditioning, PromptEncoder, pad_to_same_length


@dataclass
class StepEvent:
    """What a progress callback sees after each sampling step."""

    batch_index: int
    batch_count: int
    step: int
    steps: int
    latents: torch.Tensor
    elapsed: float
    denoised: torch.Tensor | None = None  # the scheduler's x0 estimate, when it gives one (for previews)
    model: LoadedModel | None = None


StepCallback = Callable[[StepEvent], None]
ImageCallback = Callable[[GeneratedImage], None]
_SKIPPED = object()


def random_seed() -> int:
    return random.SystemRandom().randrange(4294967294)


def initial_noise(generators: list[torch.Generator], shape: tuple[int, int, int]) -> torch.Tensor:
    """Per-image noise from CPU generators: identical on every device and in any batch.

    The same generators then feed the ancestral/SDE steps, so each image's whole noise
    sequence depends on its own seed only (as the webui's per-image RNG does).
    """
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


def latents_to_images(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    vae = model.vae
    scaled = latents / vae.config.scaling_factor
    decoded = vae.decode(scaled.to(model.device, model.vae_dtype)).sample
    arr = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class Engine:
    """Generates images; holds the model cache and the library it resolves names with."""

    def __init__(self, library: ModelLibrary, cache: ModelCache, *, default_model: Callable[[], Path] | None = None):
        self.library = library
        self.cache = cache
        self.default_model = default_model
        self._lock = threading.Lock()

    def check_inputs(self, req: GenerationRequest) -> tuple[samplers.Sampler, str]:
        return samplers.resolve(req.sampler, req.schedule)

    def model_path(self, req: GenerationRequest) -> Path:
        if req.model:
            return self.library.resolve(req.model)
        entries = [e for e in self.library.scan()
                   if e.error is None and (e.detection is None or e.detection.kind == "checkpoint")]
        if entries:
            return entries[0].path
        if self.default_model is not None:
            return self.default_model()
        raise InvalidRequest("no model given and none found; put a checkpoint in the models folder or pass --model")

    def load(self, req: GenerationRequest) -> LoadedModel:
        return self.cache.get(self.model_path(req))

    @torch.no_grad()
    def generate(self, req: GenerationRequest, *, on_step: StepCallback | None = None,
                 cancel: threading.Event | None = None, output_dir: Path | None = None,
                 skip: threading.Event | None = None, on_image: ImageCallback | None = None) -> GenerationResult:
        """Run `req`. `cancel` stops (finished images kept); `skip` abandons the current batch only.

        `on_image` sees each image as soon as it is written, so a caller (the job queue)
        can index it before the next batch starts: a crash loses at most the batch in progress.
        """
        spec, schedule = self.check_inputs(req)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with self._lock:
            model = self.load(req)
            timings["load"] = time.perf_counter() - t0
            if req.width is None or req.height is None:
                size = model.native_size
                req = req.model_copy(update={"width": req.width or size, "height": req.height or size})
            model_hash = self.library.short_hash(self.library.describe(model.path))
            base_seed = random_seed() if req.seed == -1 else req.seed
            result = GenerationResult(request=req, model_name=model.name, model_hash=model_hash)
            t1 = time.perf_counter()
            encoder = PromptEncoder(model, req.clip_skip)
            cond = encoder.encode(req.prompt)
            use_cfg = req.cfg_scale > 1.0
            uncond = None
            if use_cfg:
                uncond = encoder.encode(req.negative_prompt, zero_if_empty=True)
                if uncond.context.shape[1] != cond.context.shape[1]:
                    cond, uncond = pad_to_same_length(cond, uncond, encoder.encode(""))
            timings["encode"] = time.perf_counter() - t1
            sampling = 0.0
            for batch in range(req.n_iter):
                seeds = [base_seed + batch * req.batch_size + i for i in range(req.batch_size)]
                t2 = time.perf_counter()
                latents = self._sample(model, req, spec, schedule, seeds, cond, uncond, batch, on_step, cancel, skip)
                sampling += time.perf_counter() - t2
                if latents is None:
                    result.interrupted = True
                    break
                if latents is _SKIPPED:
                    skip.clear()
                    continue
                for seed, image in zip(seeds, latents_to_images(model, latents), strict=True):
                    done = self._finish(req, seed, image, model, model_hash, schedule, output_dir)
                    result.images.append(done)
                    if on_image is not None:
                        on_image(done)
            timings["sampling"] = sampling
            timings["total"] = time.perf_counter() - t0
            result.timings = timings
            result.info = {"schedule": schedule, "device": str(model.device),
                           "dtype": str(model.dtype).replace("torch.", "")}
            return result

    def _sample(self, model: LoadedModel, req: GenerationRequest, spec: samplers.Sampler, schedule: str,
                seeds: list[int], cond: Conditioning, uncond: Conditioning | None, batch: int,
                on_step: StepCallback | None, cancel: threading.Event | None,
                skip: threading.Event | None = None) -> torch.Tensor | None:
        device, n = model.device, len(seeds)
        scheduler = samplers.make_scheduler(spec, schedule, model.scheduler_config, seed=seeds[0])
        scheduler.set_timesteps(req.steps, device=device)
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        f = model.vae_scale_factor
        shape = (model.unet.config.out_channels, req.height // f, req.width // f)
        latents = initial_noise(generators, shape).to(device) * scheduler.init_noise_sigma
        context = cond.context.expand(n, -1, -1)
        extra = self._added_cond(model, req, cond, n)
        if uncond is not None:
            context = torch.cat([uncond.context.expand(n, -1, -1), context])
            if extra:
                neg = self._added_cond(model, req, uncond, n)
                extra = {k: torch.cat([neg[k], extra[k]]) for k in extra}
        inpaint_extra = None
        if model.unet.config.in_channels == 9:
            # as the webui does for txt2img on an inpainting model: mask all, masked image = mid gray
            gray = torch.zeros((1, 3, req.height, req.width), device=device, dtype=model.vae_dtype)
            gray_latent = model.vae.encode(gray).latent_dist.mode().float() * model.vae.config.scaling_factor
            mask = torch.ones((n, 1, *latents.shape[-2:]), device=device)
            inpaint_extra = torch.cat([mask, gray_latent.expand(n, -1, -1, -1)], dim=1)
        start = time.perf_counter()
        timesteps = scheduler.timesteps
        for i, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                return None
            if skip is not None and skip.is_set():
                return _SKIPPED
            x = torch.cat([latents] * 2) if uncond is not None else latents
            x = scheduler.scale_model_input(x, t)
            if inpaint_extra is not None:
                x = torch.cat([x, torch.cat([inpaint_extra] * (2 if uncond is not None else 1))], dim=1)
            noise = model.unet(
                x.to(model.dtype), t, encoder_hidden_states=context.to(model.dtype),
                added_cond_kwargs={k: v.to(model.dtype) for k, v in extra.items()} if extra else None,
            ).sample.float()
            if uncond is not None:
                noise_uncond, noise_cond = noise.chunk(2)
                noise = noise_uncond + req.cfg_scale * (noise_cond - noise_uncond)
            kwargs = {"generator": generators} if spec.stochastic and spec.scheduler != "DPMSolverSDEScheduler" else {}
            if req.eta is not None and spec.scheduler == "DDIMScheduler":
                kwargs["eta"] = req.eta
            out = scheduler.step(noise, t, latents, **kwargs)
            latents = out.prev_sample
            if on_step is not None:
                on_step(StepEvent(batch, req.n_iter, i + 1, len(timesteps), latents, time.perf_counter() - start,
                                  denoised=getattr(out, "pred_original_sample", None), model=model))
        return latents

    @staticmethod
    def _added_cond(model: LoadedModel, req: GenerationRequest, cond: Conditioning, n: int) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning as the webui sets it: original = target = image size, crop 0,0."""
        if not model.family.id.startswith("sdxl"):
            return {}
        h, w = req.height, req.width
        if model.family.id == "sdxl-refiner":
            ids = [h, w, 0, 0, 6.0]  # aesthetic score 6 (the webui's default for the positive side)
        else:
            ids = [h, w, 0, 0, h, w]
        time_ids = torch.tensor([ids], dtype=torch.float32, device=model.device).expand(n, -1)
        return {"text_embeds": cond.pooled.expand(n, -1), "time_ids": time_ids}

    def _finish(self, req: GenerationRequest, seed: int, image: Image.Image, model: LoadedModel, model_hash: str,
                schedule: str, output_dir: Path | None) -> GeneratedImage:
        infotext = build_infotext(
            req, seed=seed, model_name=model.name, model_hash=model_hash, schedule_label=schedule,
            extra={"RNG": "CPU"}, version=darkroom.__version__,
        )
        png = encode_png(image, infotext)
        path = None
        if output_dir is not None:
            path = str(write_numbered(output_dir, seed, png))
        return GeneratedImage(seed=seed, infotext=infotext, png=png, path=path)


def write_numbered(folder: Path, seed: int, data: bytes) -> Path:
    """Write `NNNNN-seed.png` atomically (temp file, then rename) with the next free number."""
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name.split("-", 1)[0]) for p in folder.glob("*.png") if p.name.split("-", 1)[0].isdigit()]
    number = max(numbers, default=-1) + 1
    while True:
        target = folder / f"{number:05d}-{seed}.png"
        if not target.exists():
            break
        number += 1
    tmp = folder / f".{target.name}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
    tmp.replace(target)
    return target
