"""The sampler table: AUTOMATIC1111 names -> diffusers schedulers, and the schedule types.

One table drives the CLI choices, validation, the infotext and (later) the APIs' sampler
lists. Each sampler lists the schedules it supports; "Automatic" resolves to the
sampler's own default as the webui does (e.g. Karras for DPM++ 2M).

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

from darkroom.errors import InvalidRequest

# schedule label -> scheduler kwargs
SCHEDULES: dict[str, dict[str, Any]] = {
    "Uniform": {"timestep_spacing": "linspace"},
    "Karras": {"use_karras_sigmas": True, "timestep_spacing": "linspace"},
    "Exponential": {"use_exponential_sigmas": True, "timestep_spacing": "linspace"},
    "SGM Uniform": {"timestep_spacing": "trailing"},
}
SCHEDULE_ALIASES = {"normal": "Uniform", "simple": "SGM Uniform", "sgm_uniform": "SGM Uniform"}
SIGMA_SCHEDULES = ("Uniform", "Karras", "Exponential", "SGM Uniform")
SPACING_ONLY = ("Uniform", "SGM Uniform")


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default_schedule: str = "Uniform"
    schedules: tuple[str, ...] = SIGMA_SCHEDULES
    stochastic: bool = False  # draws fresh noise each step (ancestral / SDE)


SAMPLERS: tuple[Sampler, ...] = (
    Sampler("DPM++ 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
            ("k_dpmpp_2m", "dpmpp_2m", "dpm++2m"), default_schedule="Karras"),
    Sampler("DPM++ SDE", "DPMSolverSDEScheduler", {}, ("k_dpmpp_sde", "dpmpp_sde"), default_schedule="Karras",
            stochastic=True),
    Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
            ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), default_schedule="Exponential", stochastic=True),
    Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
            ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), default_schedule="Exponential", stochastic=True),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral", "euler_a",
            "euler_ancestral"), schedules=SPACING_ONLY, stochastic=True),
    Sampler("Euler", "EulerDiscreteScheduler", {}, ("k_euler", "euler")),
    Sampler("LMS", "LMSDiscreteScheduler", {}, ("k_lms", "lms")),
    Sampler("Heun", "HeunDiscreteScheduler", {}, ("k_heun", "heun")),
    Sampler("DPM2", "KDPM2DiscreteScheduler", {}, ("k_dpm_2", "dpm_2", "dpm2")),
    Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", {}, ("k_dpm_2_a", "dpm_2_ancestral", "dpm2_a"),
            stochastic=True),
    Sampler("DDIM", "DDIMScheduler", {"set_alpha_to_one": False}, ("ddim",), default_schedule="Uniform",
            schedules=SPACING_ONLY),
    Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, ("plms", "pndm"), schedules=SPACING_ONLY),
    Sampler("UniPC", "UniPCMultistepScheduler", {}, ("uni_pc", "unipc")),
    Sampler("LCM", "LCMScheduler", {}, ("k_lcm", "lcm"), schedules=SPACING_ONLY, stochastic=True),
    # TCD's gamma is the request's eta (default 0.3, the scheduler's own and the TCD LoRAs' recommendation)
    Sampler("TCD", "TCDScheduler", {}, ("tcd",), schedules=SPACING_ONLY, stochastic=True),
)
_BY_NAME = {s.name.lower(): s for s in SAMPLERS} | {a.lower(): s for s in SAMPLERS for a in s.aliases}
SCHEDULE_NAMES = ("Automatic", *SIGMA_SCHEDULES)


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def _canonical_schedule(schedule: str) -> str:
    for name in SCHEDULE_NAMES:
        if schedule.lower() == name.lower():
            return name
    if schedule.lower() in SCHEDULE_ALIASES:
        return SCHEDULE_ALIASES[schedule.lower()]
    raise InvalidRequest(f"unknown schedule type {schedule!r}; choose one of: {', '.join(SCHEDULE_NAMES)}")


def resolve(sampler: str, schedule: str = "Automatic") -> tuple[Sampler, str]:
    """(sampler, concrete schedule label); accepts legacy names such as "DPM++ 2M Karras"."""
    name = sampler.strip()
    spec = _BY_NAME.get(name.lower())
    if spec is None:
        for label in sorted(SCHEDULE_NAMES, key=len, reverse=True):
            if name.lower().endswith(" " + label.lower()) and name[: -len(label) - 1].lower() in _BY_NAME:
                spec = _BY_NAME[name[: -len(label) - 1].lower()]
                schedule = label if schedule in ("Automatic", "", None) else schedule
                break
    if spec is None:
        raise InvalidRequest(f"unknown sampler {sampler!r}; choose one of: {', '.join(sampler_names())}")
    label = _canonical_schedule(schedule or "Automatic")
    if label == "Automatic":
        label = spec.default_schedule
    if label not in spec.schedules:
        raise InvalidRequest(
            f"sampler {spec.name!r} does not support the {label} schedule; use one of: "
            f"{', '.join(('Automatic', *spec.schedules))}"
        )
    return spec, label


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
    """A fresh scheduler instance (schedulers are stateful: one per generation)."""
    cls = _OWN_SCHEDULERS.get(spec.scheduler) or getattr(diffusers, spec.scheduler)
    config = dict(base_config)
    config.update(SCHEDULES[schedule])
    config.update(spec.options)
    if spec.scheduler == "DPMSolverSDEScheduler" and seed is not None:
        config["noise_sampler_seed"] = seed
    return cls.from_config(config)
