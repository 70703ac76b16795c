"""The webui's schedule types (v1.10 `modules/sd_schedulers.py`): sigma schedules as small pure functions.

Each function takes (n, sigma_min, sigma_max, model_sigmas) and returns a 1-D float32 tensor of
noise levels, highest first. `n` is the number of sampler steps asked for (the caller adds one
for samplers that drop the next-to-last sigma). `model_sigmas` is the model's training noise
levels, lowest first (k-diffusion's `DiscreteSchedule.sigmas`), for the schedules the webui
marks `need_inner_model`; sigma_min/sigma_max are its ends.

Definitions follow the webui exactly, quirks included, so a pasted infotext gets the same sigmas:
- KL Optimal ends at sigma_min, not 0 (n + 1 values, the last step stops at the lowest noise).
- Align Your Steps uses NVIDIA's published 10-step tables; other step counts interpolate them
  log-linearly to n values then append 0, while n == 11 (the table's length) uses it unchanged.
- DDIM takes every (1000 // n)-th training sigma from index 1, so it can give more than n steps
  (31 at 30 steps), as the webui does.
- Beta uses the beta distribution's quantiles with alpha = beta = 0.6 (the webui's defaults).
Every other schedule ends in 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

BETA_ALPHA = 0.6  # the webui's beta_dist_alpha / beta_dist_beta defaults
BETA_BETA = 0.6

# Align Your Steps, 10 steps (11 sigmas), from https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


def train_betas(scheduler_config: dict) -> torch.Tensor:
    """The training betas (float64) of a diffusers scheduler config: scaled_linear or linear."""
    steps = scheduler_config.get("num_train_timesteps", 1000)
    start, end = scheduler_config.get("beta_start", 0.00085), scheduler_config.get("beta_end", 0.012)
    kind = scheduler_config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
    if kind == "linear":
        return torch.linspace(start, end, steps, dtype=torch.float64)
    raise ValueError(f"beta_schedule {kind!r} has no sigma table here (expected scaled_linear or linear)")


def model_sigmas(scheduler_config: dict) -> torch.Tensor:
    """The training noise levels sqrt((1 - abar) / abar) of a diffusers scheduler config, lowest first."""
    abar = torch.cumprod(1.0 - train_betas(scheduler_config), dim=0)
    return ((1 - abar) / abar).sqrt().float()


def sigma_to_t(sigma: torch.Tensor | float, sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of a noise level: linear in log sigma between neighbours (k-diffusion's)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    log_sigma, log_sigmas = sigma.reshape(-1).log(), sigmas.log()
    low = (log_sigma[None, :] - log_sigmas[:, None]).ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(sigmas) - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def t_to_sigma(t: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level at a fractional timestep: log sigma interpolated linearly."""
    t = torch.as_tensor(t, dtype=torch.float32)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    log_sigmas = sigmas.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def _zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1).float()])


def uniform(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor) -> torch.Tensor:
    """n timesteps evenly from the last training step to 0 (the model's own spacing)."""
    return _zero(t_to_sigma(torch.linspace(len(sigmas) - 1, 0, n), sigmas))


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor) -> torch.Tensor:
    """n + 1 timesteps evenly between sigma_max's and sigma_min's, the last dropped (trailing spacing)."""
    start, end = sigma_to_t(sigma_max, sigmas), sigma_to_t(sigma_min, sigmas)
    return _zero(t_to_sigma(torch.linspace(float(start), float(end), n + 1)[:-1], sigmas))


def normal(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor) -> torch.Tensor:
    """n timesteps evenly between sigma_max's and sigma_min's, both ends included."""
    start, end = sigma_to_t(sigma_max, sigmas), sigma_to_t(sigma_min, sigmas)
    return _zero(t_to_sigma(torch.linspace(float(start), float(end), n), sigmas))


def simple(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Every (len / n)-th training sigma counted down from the top (ComfyUI's "simple")."""
    stride = len(sigmas) / n
    return _zero(torch.stack([sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor) -> torch.Tensor:
    """Every (len // n)-th training sigma from index 1 upwards, highest first (DDIM's leading spacing)."""
    stride = max(len(sigmas) // n, 1)
    return _zero(sigmas[1::stride].flip(0))


def karras(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor | None = None,
           rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022): evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor | None = None,
                    rho: float = 1.0) -> torch.Tensor:
    """Log sigma along a power ramp (rho = 1 is Exponential)."""
    ramp = torch.linspace(1, 0, n) ** rho
    return _zero(torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)))


def kl_optimal(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024); n + 1 values ending at sigma_min, as the webui."""
    i = torch.arange(n + 1, dtype=torch.float32) / n
    return torch.tan(i * math.atan(sigma_min) + (1.0 - i) * math.atan(sigma_max)).float()


def align_your_steps(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor | None = None, *,
                     sdxl: bool = False) -> torch.Tensor:
    """NVIDIA's Align Your Steps table for the family, log-linearly resampled to n values, then 0."""
    table = AYS_SDXL if sdxl else AYS_SD1
    if n == len(table):
        return _zero(torch.tensor(table))
    xs = np.linspace(0, 1, len(table))
    ys = np.log(np.array(table[::-1]))
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy()
    return _zero(torch.from_numpy(resampled))


def beta(n: int, sigma_min: float, sigma_max: float, sigmas: torch.Tensor | None = None,
         alpha: float = BETA_ALPHA, beta_: float = BETA_BETA) -> torch.Tensor:
    """Beta-distribution quantiles of 1 - linspace(0, 1, n) mapped onto [sigma_min, sigma_max]
    ("Beta Sampling is All You Need", Lee et al. 2024)."""
    from scipy import stats

    q = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta_)
    return _zero(torch.from_numpy(sigma_min + q * (sigma_max - sigma_min)))


@dataclass(frozen=True)
class Schedule:
    """One schedule type as the webui's /sdapi/v1/schedulers lists it."""

    name: str  # the webui's internal name, what API clients send as `scheduler`
    label: str  # what the UI and the infotext show
    function: Callable[..., torch.Tensor] | None
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


SCHEDULES: tuple[Schedule, ...] = (
    Schedule("automatic", "Automatic", None),
    Schedule("uniform", "Uniform", uniform, need_inner_model=True),
    Schedule("karras", "Karras", karras, default_rho=7.0),
    Schedule("exponential", "Exponential", exponential),
    Schedule("polyexponential", "Polyexponential", polyexponential, default_rho=1.0),
    Schedule("sgm_uniform", "SGM Uniform", sgm_uniform, aliases=("SGMUniform",), need_inner_model=True),
    Schedule("kl_optimal", "KL Optimal", kl_optimal),
    Schedule("align_your_steps", "Align Your Steps", align_your_steps),
    Schedule("simple", "Simple", simple, need_inner_model=True),
    Schedule("normal", "Normal", normal, need_inner_model=True),
    Schedule("ddim", "DDIM", ddim, need_inner_model=True),
    Schedule("beta", "Beta", beta, need_inner_model=True),
)
LABELS: tuple[str, ...] = tuple(s.label for s in SCHEDULES)
_BY_KEY = {k.lower(): s for s in SCHEDULES for k in (s.name, s.label, *s.aliases)}


def find(text: str) -> Schedule | None:
    """The schedule a name, label or alias means (any case): "karras", "Karras", "sgm_uniform", "SGMUniform"."""
    return _BY_KEY.get(text.strip().lower())


def by_label(label: str) -> Schedule:
    return _BY_KEY[label.lower()]


def sigmas_for(label: str, n: int, train_sigmas: torch.Tensor, *, sdxl: bool = False) -> torch.Tensor:
    """The schedule `label` over n steps for a model with these training sigmas (lowest first)."""
    schedule = by_label(label)
    if schedule.function is None:
        raise ValueError("Automatic is resolved to the sampler's own schedule before sigmas are made")
    sigma_min, sigma_max = float(train_sigmas[0]), float(train_sigmas[-1])
    if schedule.function is align_your_steps:
        return align_your_steps(n, sigma_min, sigma_max, train_sigmas, sdxl=sdxl)
    return schedule.function(n, sigma_min, sigma_max, train_sigmas)


def drop_penultimate(sigmas: torch.Tensor) -> torch.Tensor:
    """The webui's `discard_next_to_last_sigma` (DPM2, DPM2 a, DPM++ 3M SDE): made for n + 1 steps, run n."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])
