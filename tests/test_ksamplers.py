"""Our k-diffusion samplers (darkroom/engine/ksamplers.py) against diffusers' schedulers on the same sigmas.

The model is analytic: data ~ N(mu, s^2) per element has the exact denoiser
D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), so no UNet is needed and the two loops
see the same function. diffusers works on x / sqrt(1 + sigma^2) (variance preserving) and
takes eps: the adapter converts, and the starting point is converted the same way.
"""

from __future__ import annotations

import diffusers
import pytest
import torch

from darkroom.engine import ksamplers, schedules
from darkroom.models.configs import scheduler_config

MU, S = 0.3, 0.5
SHAPE = (1, 4, 8, 8)


def exact_denoiser(x, sigma):
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return (S ** 2 * x + sigma ** 2 * MU) / (S ** 2 + sigma ** 2)


def run_diffusers(scheduler, x_ve: torch.Tensor, generator=None) -> torch.Tensor:
    """Step a diffusers scheduler with the exact eps model; returns the final latents."""
    sigmas = scheduler.sigmas
    vp = scheduler.init_noise_sigma == 1.0  # DPM-Solver family: variance-preserving latents
    x = x_ve / (1 + sigmas[0] ** 2).sqrt() if vp else x_ve.clone()
    for t in scheduler.timesteps:
        sigma = sigmas[scheduler.step_index if scheduler.step_index is not None else scheduler.index_for_timestep(t)]
        x_in = x * (1 + sigma ** 2).sqrt() if vp else x
        eps = (x_in - exact_denoiser(x_in, sigma)) / sigma
        kwargs = {"generator": generator} if generator is not None else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def make(cls, **config):
    sched = getattr(diffusers, cls).from_config({**scheduler_config(False), "timestep_spacing": "linspace", **config})
    sched.set_timesteps(8)
    return sched


def start(sigma0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigma0


CASES = [  # (our function, diffusers scheduler, its config, how to read the plain sigmas off it)
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, None),
    ("lms", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, None),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "interleaved"),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}, None),
]


def _plain(sched, how):
    if how == "interleaved":  # second-order schedulers repeat each sigma: s0, s1, s1, s2, s2, ..., 0
        return torch.unique_consecutive(sched.sigmas)
    return sched.sigmas


@pytest.mark.parametrize("name,cls,config,how", CASES, ids=[c[0] for c in CASES])
def test_deterministic_matches_diffusers(name, cls, config, how):
    sched = make(cls, **config)
    sigmas = _plain(sched, how)
    x0 = start(sigmas[0])
    ours = ksamplers.SAMPLERS[name](exact_denoiser, x0.clone(), sigmas)
    theirs = run_diffusers(sched, x0)
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()
    assert not torch.allclose(ours, x0)


def test_stochastic_matches_diffusers_with_the_same_draws():
    """Euler a and DPM++ 2M SDE take their step noise from the stream: same draws, same latents."""
    for name, cls, config in (("euler_ancestral", "EulerAncestralDiscreteScheduler", {}),
                              ("dpmpp_2m_sde", "DPMSolverMultistepScheduler",
                               {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True})):
        sched = make(cls, **config)
        x0 = start(sched.sigmas[0])
        g = torch.Generator().manual_seed(9)
        ours = ksamplers.SAMPLERS[name](exact_denoiser, x0.clone(), sched.sigmas,
                                        noise=lambda *_, g=g: torch.randn(SHAPE, generator=g))
        theirs = run_diffusers(sched, x0, generator=torch.Generator().manual_seed(9))
        assert torch.allclose(ours, theirs, atol=2e-4), (name, (ours - theirs).abs().max())
        other_g = torch.Generator().manual_seed(1)
        other = ksamplers.SAMPLERS[name](exact_denoiser, x0.clone(), sched.sigmas,
                                         noise=lambda *_, g=other_g: torch.randn(SHAPE, generator=g))
        assert not torch.allclose(ours, other, atol=1e-3)  # the noise really is used


def test_every_sampler_solves_the_exact_problem():
    """For Gaussian data the probability-flow ODE has a closed form: x_0 = mu + (x_T - mu) * s / sqrt(s^2 + sigma_T^2).
    The deterministic samplers must land on it; the stochastic ones on the data's mean and spread.
    Checked on several of the webui's schedules, since most of ours have no diffusers twin there."""
    train = schedules.model_sigmas(scheduler_config(False))
    x = torch.randn((64, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    for name, fn in ksamplers.SAMPLERS.items():
        for label in ("Karras", "Exponential", "Align Your Steps"):
            sigmas = schedules.sigmas_for(label, 40, train)
            g = torch.Generator().manual_seed(5)
            xt = x * sigmas[0]
            out = fn(exact_denoiser, xt, sigmas, noise=lambda *_, g=g: torch.randn(x.shape, generator=g))
            if name in ("euler", "heun", "dpm_2", "lms", "dpmpp_2m"):
                exact = MU + (xt - MU) * S / (S ** 2 + sigmas[0] ** 2).sqrt()
                assert (out - exact).abs().mean() < 0.02, (name, label, (out - exact).abs().mean())
            else:
                assert abs(out.mean().item() - MU) < 0.03, (name, label, out.mean().item())
                assert abs(out.std().item() - S) < 0.08, (name, label, out.std().item())


def test_callback_sees_each_step_and_can_stop():
    seen = []
    sigmas = schedules.karras(5, 0.03, 14.6)
    ksamplers.heun(exact_denoiser, start(sigmas[0]), sigmas, callback=lambda i, x, d: seen.append(i))
    assert seen == [0, 1, 2, 3, 4]

    class Stop(Exception):
        pass

    def stop(i, x, d):
        if i == 1:
            raise Stop

    with pytest.raises(Stop):
        ksamplers.dpmpp_2m(exact_denoiser, start(sigmas[0]), sigmas, callback=stop)


def test_model_calls_counts_second_order_steps():
    sigmas = schedules.karras(6, 0.03, 14.6)
    calls = []
    ksamplers.heun(lambda x, s: calls.append(s) or exact_denoiser(x, s), start(sigmas[0]), sigmas)
    assert len(calls) == ksamplers.model_calls("heun", sigmas) == 11
    assert ksamplers.model_calls("euler", sigmas) == 6


def test_stochastic_sampler_without_noise_is_a_clear_error():
    sigmas = schedules.karras(3, 0.03, 14.6)
    with pytest.raises(ValueError, match="stochastic"):
        ksamplers.euler_ancestral(exact_denoiser, start(sigmas[0]), sigmas)


# --- through the engine: our samplers in the real loop ----------------------------------------------------

def _req(tiny_model, **kw):
    from darkroom.request import GenerationRequest

    base = dict(prompt="a red circle", negative_prompt="ugly", model=str(tiny_model("sd1")["path"]), steps=4,
                width=64, height=64, seed=11, cfg_scale=5.0, sampler="Euler a", schedule="Karras")
    return GenerationRequest(**{**base, **kw})


def _latents(engine, req, **kw):
    seen = []
    result = engine.generate(req, on_step=lambda e: seen.append(e), **kw)
    return result, seen


def test_engine_own_sampler_batch_equals_single_runs_and_previews(engine, tiny_model):
    batch, seen = _latents(engine, _req(tiny_model, batch_size=2))
    assert [e.step for e in seen] == [1, 2, 3, 4] and all(e.denoised is not None for e in seen)
    single, seen1 = _latents(engine, _req(tiny_model, seed=12))
    assert torch.allclose(seen[-1].latents[1], seen1[-1].latents[0], atol=1e-5)
    assert "Schedule type: Karras" in batch.images[0].infotext


def test_engine_own_sampler_v_prediction_and_img2img(engine, tiny_model):
    result = engine.generate(_req(tiny_model, model=str(tiny_model("sd2-v")["path"]), sampler="DPM2"))
    assert len(result.images) == 1
    import io

    from PIL import Image

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    _, seen = _latents(engine, _req(tiny_model, init_image=buf.getvalue(), denoising_strength=0.5, steps=6))
    assert len(seen) == 3  # int(6 x 0.5) steps, started part-way


def test_engine_own_sampler_cancel_between_steps(engine, tiny_model):
    import threading

    cancel = threading.Event()
    seen = []

    def on_step(e):
        seen.append(e.step)
        cancel.set()

    result = engine.generate(_req(tiny_model, sampler="LMS", schedule="Beta"), on_step=on_step, cancel=cancel)
    assert result.interrupted and seen == [1]
