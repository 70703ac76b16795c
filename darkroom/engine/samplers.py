"""The sampler table: AUTOMATIC1111 names -> how each runs, and which schedule types it takes.

One table drives the CLI choices, validation, the infotext and the APIs' sampler lists. The
schedule types are the webui's twelve (darkroom/engine/schedules.py); "Automatic" resolves to
the sampler's own default as in the webui v1.10 (Karras for DPM++ 2M, DPM++ SDE, DPM2 and
DPM2 a; Exponential for DPM++ 2M/3M SDE; Uniform for the rest).

How a sampler runs with a schedule and a noise source (`runner`):
- "own" whenever the request's randn_source is "GPU" or "NV", the webui's sources (no RNG key in
  an infotext means GPU): every k-diffusion sampler then runs as the webui's KDiffusionSampler
  does (darkroom/engine/sampling.py `_denoise_own`): its sigmas over the model's float32
  alphas_cumprod (`webui_train_sigmas`), the CompVis denoiser (eps and v), step noise from the
  source's own next draws, a Brownian tree seeded with the image seeds for the SDE samplers, and
  the webui's img2img and hires step counts. A webui image reruns with its own sampling.
With the CPU source (Darkroom's default; what existing images and the diffusers parity use):
- "diffusers": its diffusers scheduler makes the schedule itself (the combinations Darkroom has
  always run that way, e.g. DPM++ 2M Karras, Euler a Uniform): images stay identical to
  diffusers' own pipelines, which tests/test_diffusers_parity.py checks.
- "sigmas": Euler's diffusers scheduler takes the webui's sigmas (`set_timesteps(sigmas=...)`).
- "own": every other k-diffusion combination runs our k-diffusion-style function over the
  webui's sigmas (darkroom/engine/ksamplers.py). DPM2, DPM2 a and DPM++ 3M SDE always do, since
  the webui makes their schedule for steps + 1 and drops the next-to-last sigma.

DDIM, PLMS and UniPC pick their own timesteps; the webui ignores the schedule type for them
(its `sd_samplers_timesteps`), so only the spacings their diffusers schedulers honour are
accepted and any other label is refused with that reason, rather than silently ignored.

The consistency samplers (LCM, TCD) pick their timesteps themselves: "Uniform" is their own
schedule (evenly spaced indices into the distillation schedule, as diffusers does), and
"SGM Uniform" gives them trailing timesteps (999, 749, 499, 249 at 4 steps: what DMD2 was
trained on), which diffusers' LCMScheduler/TCDScheduler would ignore as a config value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import diffusers
import numpy as np
import torch

from darkroom.engine import schedules
from darkroom.errors import InvalidRequest

# schedule label -> diffusers scheduler kwargs, for the schedules diffusers makes itself
SCHEDULES: dict[str, dict[str, Any]] = {
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "Exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
SCHEDULE_NAMES: tuple[str, ...] = schedules.LABELS  # "Automatic" first, then the webui's eleven
ALL_SCHEDULES: tuple[str, ...] = SCHEDULE_NAMES[1:]
# every lower-case name and alias the webui knows -> label ("karras" -> "Karras", "normal" -> "Normal")
SCHEDULE_ALIASES: dict[str, str] = {k.lower(): s.label for s in schedules.SCHEDULES for k in (s.name, *s.aliases)}
SIGMA_SCHEDULES = ("Uniform", "Karras", "Exponential", "SGM Uniform")
SPACING_ONLY = ("Uniform", "SGM Uniform")


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default_schedule: str = "Uniform"
    schedules: tuple[str, ...] = ALL_SCHEDULES  # concrete labels accepted ("Automatic" always is)
    stochastic: bool = False  # draws fresh noise each step (ancestral / SDE)
    kfunc: str | None = None  # ksamplers.SAMPLERS name: a k-diffusion sampler, as in the webui
    native: tuple[str, ...] = SIGMA_SCHEDULES  # schedules its diffusers scheduler makes itself
    takes_sigmas: bool = False  # its diffusers scheduler accepts set_timesteps(sigmas=...)
    discard_penultimate: bool = False  # the webui's discard_next_to_last_sigma
    webui_scheduler: str | None = None  # the webui's options["scheduler"] (its default schedule's name)
    brownian: bool = False  # the webui's "brownian_noise": its step noise comes from a Brownian tree (SDE samplers)


def _k(name, scheduler, options, aliases, kfunc, default="Uniform", **kw) -> Sampler:
    webui = schedules.by_label(default).name if default != "Uniform" else None
    return Sampler(name, scheduler, options, aliases, default_schedule=default, kfunc=kfunc, webui_scheduler=webui,
                   **kw)


SAMPLERS: tuple[Sampler, ...] = (
    _k("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
       ("k_dpmpp_2m", "dpmpp_2m", "dpm++2m"), "dpmpp_2m", "Karras"),
    _k("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde", "dpmpp_sde"), "dpmpp_sde", "Karras",
       stochastic=True, brownian=True),
    _k("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
       ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), "dpmpp_2m_sde", "Exponential", stochastic=True, brownian=True),
    _k("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
       ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), "dpmpp_3m_sde", "Exponential", stochastic=True, native=(),
       discard_penultimate=True, brownian=True),
    _k("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral", "euler_a",
       "euler_ancestral"), "euler_ancestral", stochastic=True, native=SPACING_ONLY),
    _k("Euler", "EulerDiscreteScheduler", {}, ("k_euler", "euler"), "euler", takes_sigmas=True),
    _k("LMS", "LMSDiscreteScheduler", {}, ("k_lms", "lms"), "lms"),
    _k("Heun", "HeunDiscreteScheduler", {}, ("k_heun", "heun"), "heun"),
    _k("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2", "dpm_2", "dpm2"), "dpm_2", "Karras", native=(),
       discard_penultimate=True),
    _k("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a", "dpm_2_ancestral", "dpm2_a"),
       "dpm_2_ancestral", "Karras", stochastic=True, native=(), discard_penultimate=True),
    Sampler("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, ("ddim",), schedules=SPACING_ONLY,
            native=SPACING_ONLY),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms", "pndm"), schedules=SPACING_ONLY,
            native=SPACING_ONLY),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, ("uni_pc", "unipc"), schedules=SIGMA_SCHEDULES),
    Sampler("LCM", "LCMScheduler", {}, ("k_lcm", "lcm"), schedules=SPACING_ONLY, stochastic=True,
            native=SPACING_ONLY),
    # TCD's gamma is the request's eta (default 0.3, the scheduler's own and the TCD LoRAs' recommendation)
    Sampler("TCD", "TCDScheduler", {}, ("tcd",), schedules=SPACING_ONLY, stochastic=True, native=SPACING_ONLY),
)
_BY_NAME = {s.name.lower(): s for s in SAMPLERS} | {a.lower(): s for s in SAMPLERS for a in s.aliases}
_OWN_TIMESTEPS = ("DDIM", "PLMS", "UniPC")


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def _canonical_schedule(schedule: str) -> str:
    found = schedules.find(schedule)
    if found is None:
        raise InvalidRequest(f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULE_NAMES)}"
                             " (or the webui's names: " + ", ".join(s.name for s in schedules.SCHEDULES) + ")")
    return found.label


def _split_legacy(name: str) -> tuple[Sampler, str] | None:
    """"DPM++ 2M Karras" -> (DPM++ 2M, "Karras"): the webui's combined names, any schedule name or alias."""
    keys = sorted(((k, s.label) for s in schedules.SCHEDULES[1:] for k in (s.label, s.name, *s.aliases)),
                  key=lambda kv: len(kv[0]), reverse=True)
    for key, label in keys:
        if name.lower().endswith(" " + key.lower()) and name[: -len(key) - 1].lower() in _BY_NAME:
            return _BY_NAME[name[: -len(key) - 1].lower()], label
    return None


def as_the_webui_reads(sampler: str, schedule: str | None) -> str:
    """The schedule to use for what a webui client sent or an image recorded.

    The webui ignores the schedule type for DDIM, PLMS and UniPC, and clients send one anyway
    (SillyTavern's defaults are sampler DDIM with scheduler "normal"): for those samplers a schedule
    they do not take becomes Automatic, which is what the webui runs. Any other pair is left as
    it is, so a schedule a sampler cannot honour is still refused by `resolve`.
    """
    schedule = schedule or "Automatic"
    spec = _BY_NAME.get(sampler.strip().lower())
    if spec is None or spec.name not in _OWN_TIMESTEPS:
        return schedule
    try:
        resolve(spec.name, schedule)
    except InvalidRequest:
        return "Automatic"
    return schedule


def resolve(sampler: str, schedule: str = "Automatic") -> tuple[Sampler, str]:
    """(sampler, concrete schedule label); accepts legacy names such as "DPM++ 2M Karras"."""
    name = sampler.strip()
    spec = _BY_NAME.get(name.lower())
    if spec is None:
        legacy = _split_legacy(name)
        if legacy is not None:
            spec = legacy[0]
            schedule = legacy[1] if schedule in ("Automatic", "automatic", "", None) else schedule
    if spec is None:
        raise InvalidRequest(f"unknown sampler {sampler!r}; choose one of: {', '.join(sampler_names())}")
    label = _canonical_schedule(schedule or "Automatic")
    if label == "Automatic":
        label = spec.default_schedule
    if label not in spec.schedules:
        why = ""
        if spec.name in _OWN_TIMESTEPS:
            why = (f" ({spec.name} picks its own timesteps; the webui ignores the schedule type for it, Darkroom"
                   " refuses rather than ignore it)")
        elif spec.name in ("LCM", "TCD"):
            why = f" ({spec.name} picks its own timesteps from the distillation schedule)"
        raise InvalidRequest(
            f"sampler {spec.name!r} does not support the {label} schedule{why}; use one of: "
            f"{', '.join(('Automatic', *spec.schedules))}"
        )
    return spec, label


WEBUI_SOURCES = ("GPU", "NV")  # noise sources that mean "as the webui samples" (see the module docstring)


def runner(spec: Sampler, label: str, source: str = "CPU") -> str:
    """How `spec` runs the schedule `label` with noise from `source`: "diffusers", "sigmas" (diffusers over
    our sigmas) or "own" (always, for a k-diffusion sampler with the webui's GPU or NV source)."""
    if spec.kfunc is not None and is_webui_source(source):
        return "own"
    if spec.kfunc is None or label in spec.native:
        return "diffusers"
    return "sigmas" if spec.takes_sigmas else "own"


def sigmas(spec: Sampler, label: str, steps: int, train_sigmas, *, sdxl: bool = False):
    """The webui's sigmas for `spec` over `steps` steps: made for steps + 1 then the next-to-last dropped
    where the webui does (DPM2, DPM2 a, DPM++ 3M SDE)."""
    n = steps + 1 if spec.discard_penultimate else steps
    out = schedules.sigmas_for(label, n, train_sigmas, sdxl=sdxl)
    return schedules.drop_penultimate(out) if spec.discard_penultimate else out


def is_webui_source(source: str) -> bool:
    return str(source).strip().upper() in WEBUI_SOURCES


def webui_train_sigmas(scheduler_config: dict) -> torch.Tensor:
    """The model's noise levels as the webui's k-diffusion wrapper holds them, lowest first.

    The webui's (CompVis/sgm) models compute alphas_cumprod in float64, keep it as float32, and k-diffusion's
    CompVisDenoiser takes sqrt((1 - abar) / abar) of that float32 tensor; schedules.model_sigmas stays in
    float64 to the end (up to 1.3e-5 apart at the low end), so this is used for the webui's sources only."""
    betas = schedules.train_betas(scheduler_config)
    abar = torch.from_numpy(np.cumprod(1.0 - betas.numpy(), axis=0)).float()
    return ((1 - abar) / abar) ** 0.5


def trailing_timesteps(steps: int, train_timesteps: int = 1000) -> list[int]:
    """diffusers' "trailing" spacing (as DDIM/Euler compute it): 999, 749, 499, 249 for 4 of 1000."""
    return (np.round(np.arange(train_timesteps, 0, -train_timesteps / steps)) - 1).astype(np.int64).tolist()


class _ConsistencyTimesteps:
    """LCM/TCD timesteps: trailing when the config asks for it ("SGM Uniform"), else the scheduler's own."""

    def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
        if num_inference_steps is None or kwargs:  # custom timesteps or strength: diffusers' own handling
            return super().set_timesteps(num_inference_steps, device, **kwargs)
        total = self.config.num_train_timesteps
        if self.config.timestep_spacing == "trailing":
            # original_inference_steps=total: every integer timestep is on the "distillation schedule",
            # which only silences diffusers' warning about custom timesteps off a 50-step grid
            return super().set_timesteps(device=device, original_inference_steps=total,
                                         timesteps=trailing_timesteps(num_inference_steps, total))
        original = self.config.original_inference_steps
        if num_inference_steps > original:
            raise InvalidRequest(
                f"{num_inference_steps} steps is more than the Uniform schedule of a consistency sampler allows"
                f" ({original}); use fewer steps (few-step models want 1-8) or the SGM Uniform schedule")
        return super().set_timesteps(num_inference_steps, device)


class LCMScheduler(_ConsistencyTimesteps, diffusers.LCMScheduler):
    pass


class TCDScheduler(_ConsistencyTimesteps, diffusers.TCDScheduler):
    pass


_OWN_SCHEDULERS = {"LCMScheduler": LCMScheduler, "TCDScheduler": TCDScheduler}


def make_scheduler(spec: Sampler, schedule: str, base_config: dict[str, Any], *, seed: int | None = None):
    """A fresh scheduler instance (schedulers are stateful: one per generation).

    For a schedule diffusers does not make itself (runner "sigmas"), the caller passes the sigmas
    to set_timesteps."""
    cls = _OWN_SCHEDULERS.get(spec.scheduler) or getattr(diffusers, spec.scheduler)
    config = dict(base_config)
    config.update(SCHEDULES.get(schedule, SCHEDULES["Uniform"]))
    config.update(spec.options)
    if spec.scheduler == "DPMSolverSDEScheduler" and seed is not None:
        config["noise_sampler_seed"] = seed
    return cls.from_config(config)
