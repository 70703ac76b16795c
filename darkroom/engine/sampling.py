"""The denoising loop shared by txt2img, img2img, inpainting and the hires fix's second pass.

One function, `denoise`, runs a diffusers scheduler over the UNet with classifier-free
guidance. img2img starts part-way (the webui's and diffusers' convention: int(steps x
strength) steps are run, from the init latents noised to that point); inpainting with a
normal checkpoint re-imposes the noised source outside the mask after every step, and a
9-channel inpainting checkpoint gets the mask and the masked image as extra input channels.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from darkroom.engine import samplers, vae_tiling
from darkroom.engine.interrupt import SKIPPED, stoppable, units_of
from darkroom.models.loader import LoadedModel
from darkroom.text.conditioning import Conditioning


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
    phase: str = "sample"  # "sample", or "hires" for the hires fix's second pass


StepCallback = Callable[[StepEvent], None]


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation per image, as the webui mixes seed and variation-seed noise."""
    out = []
    for x, y in zip(a, b, strict=True):
        xn, yn = x / x.norm(), y / y.norm()
        dot = (xn * yn).sum().clamp(-1.0, 1.0)
        if dot.abs() > 0.9995:
            out.append((1 - t) * x + t * y)
            continue
        omega = torch.acos(dot)
        so = torch.sin(omega)
        out.append(torch.sin((1.0 - t) * omega) / so * x + torch.sin(t * omega) / so * y)
    return torch.stack(out)


@dataclass
class Noise:
    """Per-image CPU generators: identical on every device and in any batch.

    The same generators then feed the ancestral/SDE steps, so each image's whole noise
    sequence depends on its own seed only (as the webui's per-image RNG does).
    """

    seeds: list[int]
    subseeds: list[int] = field(default_factory=list)
    subseed_strength: float = 0.0

    def start(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[torch.Generator]]:
        generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        if self.subseed_strength > 0 and self.subseeds:
            sub = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s))
                               for s in self.subseeds])
            noise = slerp(self.subseed_strength, noise, sub)
        return noise, generators


class Guidance:
    """Prompt and negative prompt, scheduled per step, combined with classifier-free guidance.

    The webui's prompt syntax decides what conditions each step: prompt editing
    `[from:to:when]` and alternation `[a|b]` change the text at given steps (the negative
    prompt too), and `a :1.2 AND b :0.8` conditions on several prompts at once, combined as
    the webui does: uncond + sum_i w_i * cfg * (cond_i - uncond). Each distinct text is
    encoded once per request. `added` builds SDXL's micro-conditioning for a conditioning.
    """

    def __init__(self, prompt: str, negative: str | None, cfg_scale: float,
                 encode: Callable[[str], Conditioning], encode_negative: Callable[[str], Conditioning],
                 added: Callable[[Conditioning, int, int, int], dict[str, torch.Tensor]] | None = None):
        self.prompt, self.negative, self.cfg_scale, self.added = prompt, negative, cfg_scale, added
        self._encode, self._encode_negative = encode, encode_negative
        self._cache: dict[tuple[bool, str], Conditioning] = {}
        self.empty: Conditioning | None = None

    def _get(self, text: str, negative: bool) -> Conditioning:
        key = (negative, text)
        if key not in self._cache:
            self._cache[key] = (self._encode_negative if negative else self._encode)(text)
        return self._cache[key]

    def schedule(self, total_steps: int) -> StepConditioning:
        """Conditioning for a sampling run of `total_steps` model calls (step index 0-based)."""
        from darkroom.text.schedule import ConditioningSchedule

        cond = ConditioningSchedule(self.prompt, total_steps, lambda t: self._get(t, False))
        uncond = None
        if self.negative is not None:
            uncond = ConditioningSchedule(self.negative, total_steps, lambda t: self._get(t, True), composable=False)
        lengths = {c.context.shape[1] for c in self._cache.values()}
        if len(lengths) > 1 and self.empty is None:
            self.empty = self._encode("")
        return StepConditioning(self, cond, uncond)


class StepConditioning:
    """What one sampling run feeds the UNet at each step (contexts batched, all padded to one length)."""

    def __init__(self, guidance: Guidance, cond, uncond):
        self.guidance, self.cond, self.uncond = guidance, cond, uncond
        self._last: tuple | None = None

    def inputs(self, step: int, n: int, height: int, width: int, dtype: torch.dtype):
        """(context for the whole batch x parts, added cond or None, weights) at `step`."""
        parts = self.cond.parts_at(step)
        neg = self.uncond.parts_at(step)[0][1] if self.uncond is not None else None
        key = (tuple(id(c) for _, c in parts), id(neg))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        conds = [c for _, c in parts] + ([neg] if neg is not None else [])
        length = max(c.context.shape[1] for c in conds)
        empty = self.guidance.empty

        def padded(c: Conditioning) -> torch.Tensor:
            missing = (length - c.context.shape[1]) // empty.context.shape[1] if empty is not None else 0
            return torch.cat([c.context] + [empty.context] * missing, dim=1) if missing > 0 else c.context

        order = ([neg] if neg is not None else []) + [c for _, c in parts]  # uncond first, as the loop splits it
        context = torch.cat([padded(c).expand(n, -1, -1) for c in order]).to(dtype)
        extra = None
        if self.guidance.added is not None:
            pieces = [self.guidance.added(c, n, height, width) for c in order]
            extra = {k: torch.cat([p[k] for p in pieces]).to(dtype) for k in pieces[0]}
        weights = [w for w, _ in parts]
        self._last = (key, (context, extra, weights))
        return context, extra, weights

    def combine(self, pred: torch.Tensor, n: int, weights: list[float]) -> torch.Tensor:
        chunks = pred.split(n)
        if self.uncond is None:
            if len(weights) == 1:
                return chunks[0]
            total = sum(weights) or 1.0
            return sum(w * c for w, c in zip(weights, chunks, strict=True)) / total
        uncond, conds = chunks[0], chunks[1:]
        cfg = self.guidance.cfg_scale
        if len(weights) == 1 and weights[0] == 1.0:
            return uncond + cfg * (conds[0] - uncond)
        return uncond + sum(w * cfg * (c - uncond) for w, c in zip(weights, conds, strict=True))


@dataclass
class Init:
    """img2img's starting point: scaled latents, strength, and for inpainting the latent mask (1 = repaint)."""

    latents: torch.Tensor
    strength: float
    mask: torch.Tensor | None = None
    masked_image_latents: torch.Tensor | None = None  # for 9-channel inpainting checkpoints


def steps_to_run(steps: int, strength: float) -> int:
    """img2img runs int(steps x strength) of the schedule's steps (the webui's and diffusers' rule)."""
    return min(int(steps * strength), steps)


def denoise(model: LoadedModel, spec: samplers.Sampler, schedule: str, *, steps: int, noise: Noise,
            shape: tuple[int, int, int], guidance: Guidance, init: Init | None = None, eta: float | None = None,
            batch: int = 0, batch_count: int = 1, phase: str = "sample", on_step: StepCallback | None = None,
            cancel: threading.Event | None = None, skip: threading.Event | None = None):
    """Sample one batch; returns latents, None when cancelled, or SKIPPED.

    Cancel and skip are checked between steps and, inside a step, before each block of the UNet
    (darkroom.engine.interrupt), so a long step is abandoned part-way.
    """
    return stoppable(lambda: _denoise(model, spec, schedule, steps=steps, noise=noise, shape=shape, guidance=guidance,
                                      init=init, eta=eta, batch=batch, batch_count=batch_count, phase=phase,
                                      on_step=on_step, cancel=cancel, skip=skip),
                     units_of(model.unet), cancel, skip)


def _denoise(model: LoadedModel, spec: samplers.Sampler, schedule: str, *, steps: int, noise: Noise,
             shape: tuple[int, int, int], guidance: Guidance, init: Init | None, eta: float | None, batch: int,
             batch_count: int, phase: str, on_step: StepCallback | None, cancel: threading.Event | None,
             skip: threading.Event | None):
    device, n = model.device, len(noise.seeds)
    _, height, width = shape
    f = model.vae_scale_factor
    scheduler = samplers.make_scheduler(spec, schedule, model.scheduler_config, seed=noise.seeds[0])
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    start_noise, generators = noise.start(shape)
    start_noise = start_noise.to(device)
    if init is None:
        latents = start_noise * scheduler.init_noise_sigma
        init_latents = None
    else:
        run = steps_to_run(steps, init.strength)
        init_latents = init.latents.to(device).float().expand(n, -1, -1, -1)
        if run == 0:
            return init_latents.clone()
        t_start = (steps - run) * scheduler.order
        timesteps = timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        latents = scheduler.add_noise(init_latents, start_noise, timesteps[:1].repeat(n))
    conditioning = guidance.schedule(len(scheduler.timesteps))
    mask = None if init is None or init.mask is None else init.mask.to(device).float()
    channels9 = model.unet.config.in_channels == 9
    inpaint_extra = None
    if channels9:
        if init is not None and init.masked_image_latents is not None:
            m = mask if mask is not None else torch.ones((1, 1, height, width), device=device)
            inpaint_extra = torch.cat([m.expand(n, -1, -1, -1),
                                       init.masked_image_latents.to(device).float().expand(n, -1, -1, -1)], dim=1)
        else:
            inpaint_extra = _gray_inpaint_extra(model, n, height, width)
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        if cancel is not None and cancel.is_set():
            return None
        if skip is not None and skip.is_set():
            return SKIPPED
        context, extra, weights = conditioning.inputs(i, n, height * f, width * f, model.dtype)
        copies = context.shape[0] // n
        x = torch.cat([latents] * copies)
        x = scheduler.scale_model_input(x, t)
        if inpaint_extra is not None:
            x = torch.cat([x, torch.cat([inpaint_extra] * copies)], dim=1)
        pred = model.unet(x.to(model.dtype), t, encoder_hidden_states=context, added_cond_kwargs=extra).sample.float()
        pred = conditioning.combine(pred, n, weights)
        kwargs = {"generator": generators} if spec.stochastic and spec.scheduler != "DPMSolverSDEScheduler" else {}
        if eta is not None and spec.scheduler in ("DDIMScheduler", "TCDScheduler"):  # TCD: eta is its gamma
            kwargs["eta"] = eta
        with _quiet_brownian_tree() if spec.scheduler == "DPMSolverSDEScheduler" else contextlib.nullcontext():
            out = scheduler.step(pred, t, latents, **kwargs)
        latents = out.prev_sample
        if mask is not None and not channels9:
            # outside the mask, put back the source noised to where the sampler now is
            if i + 1 < len(timesteps):
                proper = scheduler.add_noise(init_latents, start_noise, timesteps[i + 1:i + 2].repeat(n))
            else:
                proper = init_latents
            latents = (1 - mask) * proper + mask * latents
        if on_step is not None:
            on_step(StepEvent(batch, batch_count, i + 1, len(timesteps), latents, time.perf_counter() - start,
                              denoised=getattr(out, "pred_original_sample", None), model=model, phase=phase))
    return latents


@contextlib.contextmanager
def _quiet_brownian_tree():
    """DPM++ SDE's Brownian tree (torchsde) warns when float32 rounding puts a step a hair before the
    tree's start (ta=0.0291675, t0=0.029168); the noise is unaffected, so the console stays quiet. Only
    around that sampler's steps: catch_warnings swaps process-wide state."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Should have ta>=t0", category=UserWarning)
        yield


def _gray_inpaint_extra(model: LoadedModel, n: int, height: int, width: int) -> torch.Tensor:
    """txt2img on an inpainting checkpoint, as the webui does: everything masked, masked image mid-gray."""
    f = model.vae_scale_factor
    gray = torch.zeros((1, 3, height * f, width * f), device=model.device, dtype=model.vae_dtype)
    gray_latent = vae_tiling.encode(model, gray)
    mask = torch.ones((n, 1, height, width), device=model.device)
    return torch.cat([mask, gray_latent.expand(n, -1, -1, -1)], dim=1)
