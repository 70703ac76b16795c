"""The denoising loop shared by txt2img, img2img, inpainting and the hires fix's second pass.

One function, `denoise`, runs the sampler over the UNet with classifier-free guidance: a
diffusers scheduler where it makes the schedule itself (or, for Euler, takes the webui's
sigmas), else one of our k-diffusion functions (ksamplers.py) over the webui's sigmas through
`KDenoiser` (samplers.runner decides: with the webui's GPU/NV noise sources always the latter, run as the
webui's KDiffusionSampler runs k-diffusion, see `_denoise_own`). img2img starts part-way (with the CPU source
int(steps x strength) steps are run, diffusers' convention; with GPU/NV the webui's t_enc + 1, see
`webui_img2img_sigmas`), from the init latents noised to that point; inpainting with a
normal checkpoint re-imposes the noised source outside the mask after every step, and a
9-channel inpainting checkpoint gets the mask and the masked image as extra input channels.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from darkroom.engine import ksamplers, samplers, schedules, vae_tiling
from darkroom.engine.interrupt import SKIPPED, Skipped, stoppable, units_of
from darkroom.engine.rng import BrownianNoise, Noise, slerp  # noqa: F401  (re-exported: Noise lives in rng)
from darkroom.errors import Interrupted
from darkroom.models.loader import LoadedModel
from darkroom.text.conditioning import Conditioning

if TYPE_CHECKING:
    from darkroom.control.apply import Control


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


def renumbered_batches(on_step: StepCallback | None, first: int, count: int) -> StepCallback | None:
    """`on_step` seeing one generation of a longer job (an SD upscale's tile, a ControlNet batch's run): its batches
    numbered from `first`, out of `count` in all, so a progress bar reads "batch 3 of 12" across the whole job."""
    if on_step is None:
        return None

    def step(event: StepEvent) -> None:
        on_step(replace(event, batch_index=first + event.batch_index, batch_count=count))

    return step


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
            cancel: threading.Event | None = None, skip: threading.Event | None = None, control: Control | None = None):
    """Sample one batch; returns latents, None when cancelled, or SKIPPED.

    Cancel and skip are checked between steps and, inside a step, before each block of the UNet
    and of the ControlNets (darkroom.engine.interrupt), so a long step is abandoned part-way.
    `control` (darkroom.control.apply) adds its ControlNets' residuals at every UNet call.
    """
    units = units_of(model.unet) + [u for m in (control.modules() if control else []) for u in units_of(m)]
    with _reference_hooks(model, control, noise.seeds), _lllite_hooks(model, control), _ipadapter_hooks(model, control):
        return stoppable(lambda: _denoise(model, spec, schedule, steps=steps, noise=noise, shape=shape,
                                          guidance=guidance, init=init, eta=eta, batch=batch, batch_count=batch_count,
                                          phase=phase, on_step=on_step, cancel=cancel, skip=skip, control=control),
                         units, cancel, skip)


def _reference_hooks(model: LoadedModel, control: Control | None, seeds):
    """The pass's reference units hooked into the UNet (darkroom.control.reference), or nothing to do."""
    if control is None or all(u.controlnet is not None for u in control.units):
        return contextlib.nullcontext()
    from darkroom.control.reference import hooked

    abar = 1 / (1 + schedules.model_sigmas(model.scheduler_config) ** 2)
    return hooked(control, model.unet, seeds, encode=lambda pixels: vae_tiling.encode(model, pixels), abar=abar,
                  sdxl=model.family.id.startswith("sdxl"))


def _lllite_hooks(model: LoadedModel, control: Control | None):
    """The pass's ControlNet-LLLite units hooked into the UNet (darkroom.control.lllite), or nothing to do."""
    if control is None or not any(getattr(u.controlnet, "is_lllite", False) for u in control.units):
        return contextlib.nullcontext()
    from darkroom.control.lllite import hooked

    return hooked(control, model.unet)


def _ipadapter_hooks(model: LoadedModel, control: Control | None):
    """The pass's IP-Adapter units hooked into the UNet's cross-attentions (darkroom.control.ipadapter)."""
    if control is None or not any(getattr(u.controlnet, "is_ipadapter", False) for u in control.units):
        return contextlib.nullcontext()
    from darkroom.control.ipadapter import hooked

    return hooked(control, model.unet)


def _lean(start_noise: torch.Tensor, model: LoadedModel, control: Control | None) -> torch.Tensor:
    """The starting noise, leaning towards an inpaint_only+lama unit's fill (Control.start_noise)."""
    if control is None or control.noise_latent is None:
        return start_noise
    abar = 1.0 / (1.0 + samplers.webui_train_sigmas(model.scheduler_config).double() ** 2)
    return control.start_noise(start_noise, abar)


def _denoise(model: LoadedModel, spec: samplers.Sampler, schedule: str, *, steps: int, noise: Noise,
             shape: tuple[int, int, int], guidance: Guidance, init: Init | None, eta: float | None, batch: int,
             batch_count: int, phase: str, on_step: StepCallback | None, cancel: threading.Event | None,
             skip: threading.Event | None, control: Control | None = None):
    how = samplers.runner(spec, schedule, noise.source)
    if how == "own":
        return _denoise_own(model, spec, schedule, steps=steps, noise=noise, shape=shape, guidance=guidance,
                            init=init, eta=eta, batch=batch, batch_count=batch_count, phase=phase, on_step=on_step,
                            cancel=cancel, skip=skip, control=control)
    device, n = model.device, len(noise.seeds)
    _, height, width = shape
    f = model.vae_scale_factor
    scheduler = samplers.make_scheduler(spec, schedule, model.scheduler_config, seed=noise.seeds[0])
    if how == "sigmas":  # the webui's schedule, run by the diffusers scheduler
        sigmas = _sigmas(model, spec, schedule, steps)
        scheduler.set_timesteps(sigmas=sigmas.tolist(), device=device)
        steps = len(sigmas) - 1
    else:
        scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    start_noise, rng = noise.start(shape)
    start_noise = _lean(start_noise.to(device), model, control)
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
    mask, channels9, inpaint_extra = _inpaint_inputs(model, init, n, height, width)
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
        x = x.to(model.dtype)
        residuals = {}
        if control is not None:
            context, extra = control.condition(context, extra, n=n, uncond=conditioning.uncond is not None, step=i,
                                               total=len(timesteps))
            residuals = control.residuals(x, t, context, extra, n=n, uncond=conditioning.uncond is not None, step=i,
                                          total=len(timesteps))
        pred = model.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=extra, **residuals).sample.float()
        if control is not None and control.fixes_colours:  # tile_colorfix, per row (float32 input: x0 is exact)
            pred = control.fix_prediction(pred, scheduler.scale_model_input(torch.cat([latents] * copies), t),
                                          _model_sigma(scheduler, t), v_prediction=model.v_prediction, n=n,
                                          uncond=conditioning.uncond is not None)
        pred = conditioning.combine(pred, n, weights)
        kwargs = {"generator": rng.generators} if spec.stochastic and spec.scheduler != "DPMSolverSDEScheduler" else {}
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


def _model_sigma(scheduler, t) -> torch.Tensor:
    """The noise level (k-diffusion sigma) a diffusers scheduler reads the UNet's output at for timestep `t`:
    its own sigma at the step (the one it turns the output into x0 with; DPM++ SDE's midpoint in its second
    stage), else, for the timestep schedulers (DDIM, PLMS, LCM, TCD), the one of alphas_cumprod[t]."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or not hasattr(scheduler, "index_for_timestep"):
        alpha = scheduler.alphas_cumprod[int(round(float(t)))]
        return ((1 - alpha) / alpha).sqrt()
    index = scheduler.step_index
    if index is None:  # before its first step: where step() will start
        index = scheduler.begin_index if scheduler.begin_index is not None else scheduler.index_for_timestep(t)
    if getattr(scheduler, "state_in_first_order", True) is False and hasattr(scheduler, "mid_point_sigma"):
        return torch.as_tensor(scheduler.mid_point_sigma)
    return sigmas[index]


def _train_sigmas(model: LoadedModel, webui: bool = False) -> torch.Tensor:
    config = model.scheduler_config
    return samplers.webui_train_sigmas(config) if webui else schedules.model_sigmas(config)


def _sigmas(model: LoadedModel, spec: samplers.Sampler, schedule: str, steps: int,
            webui: bool = False) -> torch.Tensor:
    return samplers.sigmas(spec, schedule, steps, _train_sigmas(model, webui),
                           sdxl=model.family.id.startswith("sdxl"))


def webui_img2img_sigmas(make: Callable[[int], torch.Tensor], steps: int, strength: float, *,
                         hires: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(the full schedule, the part img2img runs) as the webui's KDiffusionSampler.sample_img2img has them.

    Its `setup_img2img_steps`: img2img makes the schedule for `steps` and runs t_enc + 1 steps of it, t_enc =
    int(min(strength, 0.999) x steps); the hires fix's second pass (steps given) runs `steps` steps of a schedule
    made for int(steps / min(strength, 0.999)). Either way it is `sigmas[total - t_enc - 1:]`.
    `make(n)` gives the sampler's sigmas for n steps (next-to-last dropped where the sampler does)."""
    capped = min(strength, 0.999)
    if hires and strength <= 0:  # the webui's hires steps come out 0 here: nothing to run
        return make(steps), make(steps)[-1:]
    if hires:
        total, t_enc = (int(steps / capped) if strength > 0 else 0), steps - 1
    else:
        total, t_enc = steps, int(capped * steps)
    full = make(total)
    return full, full[max(total - t_enc - 1, 0):]


def _inpaint_inputs(model: LoadedModel, init: Init | None, n: int, height: int, width: int):
    """(latent mask or None, 9-channel model?, the extra input channels of a 9-channel model or None)."""
    device = model.device
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
    return mask, channels9, inpaint_extra


class KDenoiser:
    """The UNet as k-diffusion's denoiser D(x, sigma) -> x0 estimate (its CompVis wrappers' scalings).

    Input scaled by 1 / sqrt(sigma^2 + 1); the UNet sees the fractional training timestep of sigma
    (log-sigma interpolation); eps models give x - sigma * eps, v models x / (sigma^2 + 1) - v * sigma /
    sqrt(sigma^2 + 1). Conditioning is looked up by the call's index (prompt editing counts model calls,
    as the webui's CFGDenoiser does). For inpainting with a normal checkpoint the estimate outside the
    mask is the source (the webui's way), so every step is pulled back to it there. `control` adds
    ControlNet residuals; its window counts sampler steps (`step` of `total`, kept by the loop), not calls.
    """

    def __init__(self, model: LoadedModel, conditioning: StepConditioning, n: int, height: int, width: int,
                 train_sigmas: torch.Tensor, mask: torch.Tensor | None = None, source: torch.Tensor | None = None,
                 inpaint_extra: torch.Tensor | None = None, unet: Callable | None = None,
                 control: Control | None = None, total: int = 1):
        self.model, self.conditioning, self.n, self.height, self.width = model, conditioning, n, height, width
        self.train_sigmas, self.mask, self.source, self.inpaint_extra = train_sigmas, mask, source, inpaint_extra
        self.unet = unet or model.unet
        self.v_prediction = model.v_prediction
        self.calls = 0
        self.control, self.step, self.total = control, 0, total

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        f = self.model.vae_scale_factor
        context, extra, weights = self.conditioning.inputs(self.calls, self.n, self.height * f, self.width * f,
                                                           self.model.dtype)
        self.calls += 1
        copies = context.shape[0] // self.n
        scale = 1 / torch.sqrt(sigma ** 2 + 1)
        inp = torch.cat([x * scale] * copies)
        if self.inpaint_extra is not None:
            inp = torch.cat([inp, torch.cat([self.inpaint_extra] * copies)], dim=1)
        t = schedules.sigma_to_t(sigma.cpu(), self.train_sigmas).to(x.device)
        inp = inp.to(self.model.dtype)
        residuals = {}
        if self.control is not None:
            uncond = self.conditioning.uncond is not None
            context, extra = self.control.condition(context, extra, n=self.n, uncond=uncond, step=self.step,
                                                    total=self.total)
            residuals = self.control.residuals(inp, t, context, extra, n=self.n, step=self.step, total=self.total,
                                               uncond=uncond)
        out = self.unet(inp, t, encoder_hidden_states=context, added_cond_kwargs=extra, **residuals)
        pred = out.sample.float()
        if self.control is not None and self.control.fixes_colours:  # tile_colorfix, per row, at every call
            pred = self.control.fix_prediction(pred, torch.cat([x * scale] * copies), sigma, n=self.n,
                                               v_prediction=self.v_prediction,
                                               uncond=self.conditioning.uncond is not None)
        pred = self.conditioning.combine(pred, self.n, weights)
        if self.v_prediction:
            denoised = x * scale ** 2 - pred * sigma * scale
        else:
            denoised = x - pred * sigma
        if self.mask is not None and self.source is not None:
            denoised = (1 - self.mask) * self.source + self.mask * denoised
        return denoised


def _denoise_own(model: LoadedModel, spec: samplers.Sampler, schedule: str, *, steps: int, noise: Noise,
                 shape: tuple[int, int, int], guidance: Guidance, init: Init | None, eta: float | None, batch: int,
                 batch_count: int, phase: str, on_step: StepCallback | None, cancel: threading.Event | None,
                 skip: threading.Event | None, control: Control | None = None):
    """A k-diffusion sampler of ours (ksamplers.py) over the webui's sigmas, as the webui runs it.

    With the webui's GPU/NV sources it is the webui's KDiffusionSampler step for step: the sigma table of
    `samplers.webui_train_sigmas`, img2img and hires step counts of `webui_img2img_sigmas`, and for the
    SDE samplers a Brownian tree per image seed over the full schedule (rng.BrownianNoise, the webui's
    `create_noise_sampler`). With the CPU source it stays what Darkroom has always run (int(steps x strength)
    img2img steps; every step draw, SDE samplers included, from the seeds' generators)."""
    device, n = model.device, len(noise.seeds)
    _, height, width = shape
    webui = samplers.is_webui_source(noise.source)
    sigmas = _sigmas(model, spec, schedule, steps, webui).to(device)
    start_noise, rng = noise.start(shape)
    start_noise = _lean(start_noise.to(device), model, control)
    source = None
    full = sigmas
    if init is None:
        x = start_noise * sigmas[0]  # the webui's txt2img (its sgm_noise_multiplier option is off by default)
    elif webui:
        full, sigmas = webui_img2img_sigmas(lambda k: _sigmas(model, spec, schedule, k, True).to(device), steps,
                                            init.strength, hires=phase == "hires")
        source = init.latents.to(device).float().expand(n, -1, -1, -1)
        if len(sigmas) < 2:
            return source.clone()
        x = source + start_noise * sigmas[0]
    else:
        run = steps_to_run(len(sigmas) - 1, init.strength)
        source = init.latents.to(device).float().expand(n, -1, -1, -1)
        if run == 0:
            return source.clone()
        sigmas = sigmas[len(sigmas) - 1 - run:]
        x = source + start_noise * sigmas[0]
    fn = ksamplers.SAMPLERS[spec.kfunc]
    conditioning = guidance.schedule(ksamplers.model_calls(spec.kfunc, sigmas))
    mask, channels9, inpaint_extra = _inpaint_inputs(model, init, n, height, width)
    keep = mask if not channels9 else None
    total = len(sigmas) - 1
    denoiser = KDenoiser(model, conditioning, n, height, width, _train_sigmas(model, webui),
                         mask=keep, source=source, inpaint_extra=inpaint_extra, control=control, total=total)
    start = time.perf_counter()

    def step_done(i: int, latents: torch.Tensor, denoised: torch.Tensor) -> None:
        denoiser.step = i + 1
        if on_step is not None:
            on_step(StepEvent(batch, batch_count, i + 1, total, latents, time.perf_counter() - start,
                              denoised=denoised, model=model, phase=phase))
        if i + 1 < total:
            _raise_if_stopped(cancel, skip)

    _raise_if_stopped(cancel, skip)
    draw = (lambda sigma, sigma_next: rng.next().to(device)) if spec.stochastic else None
    if webui and spec.brownian:
        positive = full[full > 0]
        draw = BrownianNoise(noise.seeds, shape, positive.min().cpu(), full.max().cpu(), device=device)
    with torch.no_grad():
        x = fn(denoiser, x, sigmas, callback=step_done, noise=draw, eta=1.0 if eta is None else eta)
    if keep is not None:
        x = (1 - keep) * source + keep * x
    return x


def _raise_if_stopped(cancel: threading.Event | None, skip: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Interrupted("interrupted")
    if skip is not None and skip.is_set():
        raise Skipped()


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
