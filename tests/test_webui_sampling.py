"""The webui's sampling (randn_source GPU/NV) against k-diffusion itself, the library the webui calls.

k-diffusion 0.0.16 (the webui v1.10's pinned commit; requirements-dev-nodeps.txt) is installed without its
dependencies: its package __init__ imports torchvision, clean-fid, wandb and more, so only its `sampling.py`
and `external.py` are loaded here, from their files, under a stand-in parent package whose `utils` has the one
helper they use (`append_dims`, written here). Same denoiser, same sigmas, same noise -> same latents.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from darkroom.engine import ksamplers, samplers, sampling, schedules
from darkroom.engine.rng import BrownianNoise, Philox
from darkroom.models.configs import scheduler_config

SHAPE = (2, 4, 8, 8)
MU, S = 0.3, 0.5


@pytest.fixture(scope="module")
def kd():
    """k-diffusion's sampling and external modules, loaded from the installed files (skip if not installed)."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (scripts/setup --dev installs it with --no-deps)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    name = "_kdiffusion_reference"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    utils = types.ModuleType(f"{name}.utils")

    def append_dims(x, target_dims):
        return x[(...,) + (None,) * (target_dims - x.ndim)]

    utils.append_dims = append_dims
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, name, package)
        mp.setitem(sys.modules, f"{name}.utils", utils)
        if importlib.util.find_spec("torchdiffeq") is None:  # only its log_likelihood uses odeint
            mp.setitem(sys.modules, "torchdiffeq", SimpleNamespace(odeint=None))
        loaded = {}
        for part in ("sampling", "external"):
            mspec = importlib.util.spec_from_file_location(f"{name}.{part}", folder / f"{part}.py")
            module = importlib.util.module_from_spec(mspec)
            mp.setitem(sys.modules, f"{name}.{part}", module)
            setattr(package, part, module)
            mspec.loader.exec_module(module)
            loaded[part] = module
        yield SimpleNamespace(**loaded)


def exact_denoiser(x, sigma):
    """D(x, sigma) for data ~ N(MU, S^2): analytic, so both loops see the same function (sigma scalar or batch)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if sigma.ndim:
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (S ** 2 * x + sigma ** 2 * MU) / (S ** 2 + sigma ** 2)


def ldm_alphas_cumprod() -> torch.Tensor:
    """SD1.5's alphas_cumprod as the webui's LDM model registers it (float64 cumprod, kept as float32)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64).numpy() ** 2
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


def draws(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *_: torch.randn(SHAPE, generator=g)


PLAIN = ("euler", "heun", "dpm_2", "lms", "dpmpp_2m")
ANCESTRAL = ("euler_ancestral", "dpm_2_ancestral")
SDE = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde")


def _sigma_sets():
    train = samplers.webui_train_sigmas(scheduler_config(False))
    return {"karras": schedules.karras(10, float(train[0]), float(train[-1])),
            "uniform": schedules.uniform(10, 0, 0, train),
            "dropped": schedules.drop_penultimate(schedules.exponential(11, float(train[0]), float(train[-1])))}


@pytest.mark.filterwarnings("ignore:Should have t")  # k-diffusion's own tree, queried a float32 hair outside
@pytest.mark.parametrize("which", ["karras", "uniform", "dropped"])
@pytest.mark.parametrize("name", PLAIN + ANCESTRAL + SDE)
def test_own_samplers_equal_k_diffusion(kd, name, which):
    sigmas = _sigma_sets()[which]
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    theirs_fn = getattr(kd.sampling, f"sample_{name}")
    kwargs, ours_kwargs = {}, {}
    if name in ANCESTRAL:
        kwargs["noise_sampler"], ours_kwargs["noise"] = draws(9), draws(9)
    elif name in SDE:
        lo, hi = sigmas[sigmas > 0].min(), sigmas.max()
        kwargs["noise_sampler"] = kd.sampling.BrownianTreeNoiseSampler(x0, lo, hi, seed=[5, 6])
        ours_kwargs["noise"] = BrownianNoise([5, 6], SHAPE[1:], lo, hi, gpu=False)
    theirs = theirs_fn(exact_denoiser, x0.clone(), sigmas, disable=True, **kwargs)
    ours = ksamplers.SAMPLERS[name](exact_denoiser, x0.clone(), sigmas, **ours_kwargs)
    assert (ours - theirs).abs().max() < 1e-5, (name, which, (ours - theirs).abs().max())


@pytest.mark.filterwarnings("ignore:Should have t")
def test_brownian_noise_is_k_diffusions_tree_and_a_batch_equals_singles(kd):
    lo, hi = torch.tensor(0.0292), torch.tensor(14.6146)
    x = torch.zeros(SHAPE)
    theirs = kd.sampling.BrownianTreeNoiseSampler(x, lo, hi, seed=[5, 6])
    ours = BrownianNoise([5, 6], SHAPE[1:], lo, hi, gpu=False)
    single = BrownianNoise([6], SHAPE[1:], lo, hi, gpu=False)
    for a, b in ((hi, torch.tensor(3.0)), (torch.tensor(3.0), torch.tensor(0.5)), (torch.tensor(0.5), lo)):
        assert torch.equal(ours(a, b), theirs(a, b))
        assert torch.equal(single(a, b)[0], ours(a, b)[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the tree draws with CUDA's own generator")
def test_brownian_noise_draws_gpu_numbers_without_cuda():
    """The webui's trees live on its GPU: without CUDA their draws are Philox's (NVIDIA's numbers)."""
    lo, hi = 0.0292, 14.6146
    tree = BrownianNoise([1234], SHAPE[1:], lo, hi)
    w_seed = np.random.SeedSequence(entropy=1234, pool_size=24).generate_state(3)[0]
    whole = tree(torch.tensor(lo), torch.tensor(hi))[0]  # the top increment W / sqrt(t1 - t0)
    assert torch.allclose(whole, Philox(int(w_seed)).randn(SHAPE[1:]), atol=1e-5)
    assert not torch.allclose(whole, BrownianNoise([1234], SHAPE[1:], lo, hi, gpu=False)(lo, hi)[0], atol=1e-2)


def test_compvis_denoiser_sigmas_and_timesteps_equal_k_diffusion(kd):
    fake = SimpleNamespace(alphas_cumprod=ldm_alphas_cumprod())
    wrap = kd.external.CompVisDenoiser(fake)
    train = samplers.webui_train_sigmas(scheduler_config(False))
    assert torch.equal(train, wrap.sigmas)
    probe = torch.cat([train[::37], torch.tensor([0.05, 0.7, 1.0, 3.3, 14.0])])
    assert torch.allclose(schedules.sigma_to_t(probe, train), wrap.sigma_to_t(probe), atol=1e-4, rtol=0)
    t = torch.tensor([0.0, 0.5, 17.25, 500.0, 998.9, 999.0])
    assert torch.allclose(schedules.t_to_sigma(t, train), wrap.t_to_sigma(t), rtol=1e-6)
    for n in (1, 4, 20, 33):  # the webui's Automatic/Uniform sigmas: k-diffusion's get_sigmas
        assert torch.equal(schedules.uniform(n, 0, 0, train), wrap.get_sigmas(n))


@pytest.mark.parametrize("v", [False, True])
def test_kdenoiser_equals_k_diffusions_compvis_wrappers(kd, v):
    """Our KDenoiser (input scaling, fractional timestep, eps/v conversion) against CompVis(V)Denoiser."""

    def unet_out(x, t):
        return torch.sin(x * 1.7) + t.reshape(-1, 1, 1, 1) / 997.0

    fake = SimpleNamespace(alphas_cumprod=ldm_alphas_cumprod(), apply_model=lambda x, t, cond=None: unet_out(x, t))
    wrap = (kd.external.CompVisVDenoiser if v else kd.external.CompVisDenoiser)(fake)

    class Cond:
        def inputs(self, step, n, h, w, dtype):
            return torch.zeros(n, 1, 1), None, [1.0]

        def combine(self, pred, n, weights):
            return pred

    model = SimpleNamespace(vae_scale_factor=8, dtype=torch.float32, v_prediction=v)
    ours = sampling.KDenoiser(model, Cond(), 2, 8, 8, samplers.webui_train_sigmas(scheduler_config(v)),
                              unet=lambda x, t, **kw: SimpleNamespace(sample=unet_out(x, t.expand(x.shape[0]))))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)) * 3
    for sigma in (14.6, 5.0, 0.9, 0.05):
        theirs = wrap(x, torch.full((2,), sigma), cond=None)
        assert torch.allclose(ours(x, torch.tensor(sigma)), theirs, atol=1e-5), sigma


def test_webui_img2img_and_hires_step_counts():
    """The webui's setup_img2img_steps: t_enc + 1 steps for img2img; hires runs its steps of a longer schedule."""
    made = []

    def make(n):
        made.append(n)
        return torch.cat([torch.linspace(14.0, 0.1, n), torch.zeros(1)])

    full, run = sampling.webui_img2img_sigmas(make, 20, 0.5)
    assert made[-1] == 20 and len(run) - 1 == 11 and torch.equal(run, full[9:])
    full, run = sampling.webui_img2img_sigmas(make, 20, 0.7, hires=True)
    assert made[-1] == 28 and len(run) - 1 == 20 and torch.equal(run, full[8:])
    full, run = sampling.webui_img2img_sigmas(make, 10, 1.0)  # strength capped at 0.999: the whole schedule
    assert torch.equal(run, full)


def test_runner_rule_webui_sources_run_own():
    for spec in samplers.SAMPLERS:
        for label in ("Uniform", "Karras"):
            if label not in spec.schedules:
                continue
            for source in ("GPU", "NV", "nv"):
                want = "own" if spec.kfunc is not None else samplers.runner(spec, label)
                assert samplers.runner(spec, label, source) == want, (spec.name, label, source)
    euler_a = samplers.resolve("Euler a")[0]
    assert samplers.runner(euler_a, "Uniform", "CPU") == "diffusers"  # CPU keeps today's path
    assert samplers.runner(samplers.resolve("DPM++ 2M")[0], "Karras") == "diffusers"


# --- through the engine ------------------------------------------------------------------------------------


def _req(tiny_model, **kw):
    from darkroom.request import GenerationRequest

    base = dict(prompt="a red circle", negative_prompt="ugly", model=str(tiny_model("sd1")["path"]), steps=4,
                width=64, height=64, seed=11, cfg_scale=5.0, sampler="Euler a", randn_source="NV")
    return GenerationRequest(**{**base, **kw})


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE"])
def test_engine_nv_runs_own_path_and_a_batch_equals_singles(engine, tiny_model, monkeypatch, sampler):
    ran = []
    real = sampling._denoise_own

    def spy(*args, **kwargs):
        ran.append(kwargs["noise"].source)
        return real(*args, **kwargs)

    trees = []

    class Recorded(BrownianNoise):
        def __init__(self, seeds, *args, **kwargs):
            trees.append(list(seeds))
            super().__init__(seeds, *args, **kwargs)

    monkeypatch.setattr(sampling, "_denoise_own", spy)
    monkeypatch.setattr(sampling, "BrownianNoise", Recorded)
    seen = []
    engine.generate(_req(tiny_model, sampler=sampler, batch_size=2, eta_noise_seed_delta=7),
                    on_step=seen.append)
    assert ran == ["NV"]
    # the SDE samplers' step noise: Brownian trees seeded with the image seeds (not the ENSD-shifted ones)
    assert trees == ([[11, 12]] if sampler == "DPM++ 2M SDE" else [])
    single = []
    engine.generate(_req(tiny_model, sampler=sampler, seed=12, eta_noise_seed_delta=7), on_step=single.append)
    assert torch.allclose(seen[-1].latents[1], single[-1].latents[0], atol=1e-5)
    cpu = []
    engine.generate(_req(tiny_model, sampler=sampler, randn_source="CPU"), on_step=cpu.append)
    assert ran == ["NV", "NV"]  # Automatic (Uniform / Exponential) with CPU: diffusers, as before


def test_engine_nv_img2img_runs_the_webuis_step_count(engine, tiny_model):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    seen = []
    engine.generate(_req(tiny_model, init_image=buf.getvalue(), denoising_strength=0.5, steps=6),
                    on_step=seen.append)
    assert [e.step for e in seen] == [1, 2, 3, 4]  # t_enc + 1 = int(0.5 x 6) + 1
    cpu = []
    engine.generate(_req(tiny_model, init_image=buf.getvalue(), denoising_strength=0.5, steps=6,
                         randn_source="CPU", schedule="Karras"), on_step=cpu.append)
    assert len(cpu) == 3  # CPU keeps Darkroom's int(steps x strength)
