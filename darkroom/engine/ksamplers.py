"""k-diffusion's samplers as small pure functions over a sigma schedule (the webui's samplers).

Each sampler has the shape `fn(denoiser, x, sigmas, *, callback=None, noise=None, eta=1.0) -> x`:
- `denoiser(x, sigma) -> denoised` is the model's estimate of the clean latents at noise level
  sigma (classifier-free guidance, eps/v conversion and inpainting live in the caller's wrapper);
- `x` starts at noise level sigmas[0] (noise * sigmas[0], or the init latents plus that for img2img);
- `callback(i, x, denoised)` runs after step i with the new x and the step's first estimate
  (previews, progress, cancel: raise to stop);
- `noise(sigma, sigma_next) -> Tensor` gives the step's per-image unit Gaussian noise for the stochastic
  samplers, called with the same two noise levels as k-diffusion's `noise_sampler` (the webui's ImageRNG.next
  ignores them; its Brownian tree for the SDE samplers, rng.BrownianNoise, needs them); the deterministic
  ones never call it.
They are written from the published algorithms (Karras et al. 2022; Lu et al., DPM-Solver++), with
the same step rules as k-diffusion: second-order samplers fall back to Euler on a step to sigma 0,
multistep samplers take a plain denoising step there. Used where a diffusers scheduler cannot take
the schedule (see samplers.py); their agreement with diffusers' schedulers is tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None] | None
NoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


def _d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically down to sigma_down, then add sigma_up of fresh noise,
    so the marginal lands on sigma_to. eta = 0 is deterministic."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - up ** 2), up


def _done(callback: Callback, i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def _draw(noise: NoiseFn, x: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    if noise is None:
        raise ValueError("this sampler is stochastic: pass noise=, the per-image noise source")
    return noise(sigma, sigma_next).to(x.device, x.dtype)


def euler(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None, eta: float = 1.0):
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        x = x + _d(x, s, denoised) * (s_next - s)
        _done(callback, i, x, denoised)
    return x


def euler_ancestral(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None,
                    eta: float = 1.0):
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        down, up = ancestral_step(float(s), float(s_next), eta)
        x = x + _d(x, s, denoised) * (down - s)
        if s_next > 0:
            x = x + _draw(noise, x, s, s_next) * up
        _done(callback, i, x, denoised)
    return x


def heun(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None, eta: float = 1.0):
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        d = _d(x, s, denoised)
        dt = s_next - s
        if s_next == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = _d(x2, s_next, denoiser(x2, s_next))
            x = x + (d + d2) / 2 * dt
        _done(callback, i, x, denoised)
    return x


def _log_midpoint(a, b):
    return torch.exp((torch.as_tensor(a).log() + torch.as_tensor(b).log()) / 2)


def dpm_2(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None, eta: float = 1.0):
    """DPM-Solver-2 (Karras et al.'s variant): derivative taken at the log-midpoint of the step."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        d = _d(x, s, denoised)
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            mid = _log_midpoint(s, s_next)
            x2 = x + d * (mid - s)
            x = x + _d(x2, mid, denoiser(x2, mid)) * (s_next - s)
        _done(callback, i, x, denoised)
    return x


def dpm_2_ancestral(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None,
                    eta: float = 1.0):
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        down, up = ancestral_step(float(s), float(s_next), eta)
        d = _d(x, s, denoised)
        if down == 0:
            x = x + d * (down - s)
        else:
            mid = _log_midpoint(s, down)
            x2 = x + d * (mid - s)
            x = x + _d(x2, mid, denoiser(x2, mid)) * (down - s)
            x = x + _draw(noise, x, s, s_next) * up
        _done(callback, i, x, denoised)
    return x


def lms_coefficient(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial of the j-th latest point
    (exact: the integrand is a polynomial)."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly *= np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = poly.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def lms(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None, eta: float = 1.0,
        order: int = 4):
    """Linear multistep: the ODE integrated over a polynomial through the last `order` derivatives."""
    points = sigmas.detach().cpu().double().numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        denoised = denoiser(x, s)
        ds = [*ds[-(order - 1):], _d(x, s, denoised)] if order > 1 else [_d(x, s, denoised)]
        current = min(i + 1, order)
        coeffs = [lms_coefficient(current, points, i, j) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
        _done(callback, i, x, denoised)
    return x


def dpmpp_2m(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None, eta: float = 1.0):
    """DPM-Solver++(2M): second order from the previous step's estimate; first order at the ends."""
    old = None
    h_last = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()  # step in lambda = -log sigma
            estimate = denoised
            if old is not None:
                r = h_last / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - torch.expm1(-h) * estimate
            h_last = h
        old = denoised
        _done(callback, i, x, denoised)
    return x


def dpmpp_sde(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None, eta: float = 1.0,
              r: float = 0.5):
    """DPM-Solver++ SDE: two model calls per step (at the log-midpoint, then the end), noise after each."""
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        if s_next == 0:
            x = x + _d(x, s, denoised) * (s_next - s)
        else:
            t, t_next = -s.log(), -s_next.log()
            mid = (-(t + (t_next - t) * r)).exp()
            down, up = ancestral_step(float(s), float(mid), eta)
            x2 = (down / s) * x - torch.expm1(t + math.log(down)) * denoised
            x2 = x2 + _draw(noise, x, (-t).exp(), mid) * up
            denoised2 = denoiser(x2, mid)
            down, up = ancestral_step(float(s), float(s_next), eta)
            fac = 1 / (2 * r)
            mixed = (1 - fac) * denoised + fac * denoised2
            x = (down / s) * x - torch.expm1(t + math.log(down)) * mixed
            x = x + _draw(noise, x, (-t).exp(), (-t_next).exp()) * up
        _done(callback, i, x, denoised)
    return x


def dpmpp_2m_sde(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None,
                 eta: float = 1.0):
    """DPM-Solver++(2M) SDE, midpoint variant (the webui's "DPM++ 2M SDE")."""
    old = None
    h_last = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            eta_h = eta * h
            x = s_next / s * torch.exp(-eta_h) * x - torch.expm1(-h - eta_h) * denoised
            if old is not None:
                x = x - 0.5 * torch.expm1(-h - eta_h) * (h / h_last) * (denoised - old)
            if eta:
                x = x + _draw(noise, x, s, s_next) * s_next * torch.sqrt(-torch.expm1(-2 * eta_h))
            h_last = h
        old = denoised
        _done(callback, i, x, denoised)
    return x


def dpmpp_3m_sde(denoiser: Denoiser, x, sigmas, *, callback: Callback = None, noise: NoiseFn = None,
                 eta: float = 1.0):
    """DPM-Solver++(3M) SDE: third order from the two previous estimates."""
    den1 = den2 = None
    h1 = h2 = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, s)
        if s_next == 0:
            x = denoised
        else:
            h = s.log() - s_next.log()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x - torch.expm1(-h_eta) * denoised
            phi_2 = torch.expm1(-h_eta) / h_eta + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                d1_0 = (denoised - den1) / r0
                d1_1 = (den1 - den2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h1 is not None:
                x = x + phi_2 * (denoised - den1) / (h1 / h)
            if eta:
                x = x + _draw(noise, x, s, s_next) * s_next * torch.sqrt(-torch.expm1(-2 * h * eta))
            h1, h2 = h, h1
        den1, den2 = denoised, den1
        _done(callback, i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler, "euler_ancestral": euler_ancestral, "heun": heun, "dpm_2": dpm_2,
    "dpm_2_ancestral": dpm_2_ancestral, "lms": lms, "dpmpp_2m": dpmpp_2m, "dpmpp_sde": dpmpp_sde,
    "dpmpp_2m_sde": dpmpp_2m_sde, "dpmpp_3m_sde": dpmpp_3m_sde,
}
SECOND_ORDER = frozenset({"heun", "dpm_2", "dpm_2_ancestral", "dpmpp_sde"})


def model_calls(name: str, sigmas: torch.Tensor) -> int:
    """How many times `name` calls the denoiser over `sigmas` (prompt editing counts calls, as the webui)."""
    steps = len(sigmas) - 1
    if name not in SECOND_ORDER:
        return steps
    return steps + sum(1 for s in sigmas[1:] if float(s) > 0)
