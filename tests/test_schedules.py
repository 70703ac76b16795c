"""The webui's twelve schedule types: names, labels, aliases and the sigmas each makes."""

from __future__ import annotations

import diffusers
import pytest
import torch

from darkroom.engine import samplers, schedules
from darkroom.errors import InvalidRequest
from darkroom.models.configs import scheduler_config

TRAIN = schedules.model_sigmas(scheduler_config(False))
LO, HI = float(TRAIN[0]), float(TRAIN[-1])


def test_table_is_the_webuis():
    assert [(s.name, s.label) for s in schedules.SCHEDULES] == [
        ("automatic", "Automatic"), ("uniform", "Uniform"), ("karras", "Karras"), ("exponential", "Exponential"),
        ("polyexponential", "Polyexponential"), ("sgm_uniform", "SGM Uniform"), ("kl_optimal", "KL Optimal"),
        ("align_your_steps", "Align Your Steps"), ("simple", "Simple"), ("normal", "Normal"), ("ddim", "DDIM"),
        ("beta", "Beta")]
    rho = {s.label: s.default_rho for s in schedules.SCHEDULES}
    assert rho["Karras"] == 7.0 and rho["Polyexponential"] == 1.0 and rho["Beta"] == -1
    inner = {s.label for s in schedules.SCHEDULES if s.need_inner_model}
    assert inner == {"Uniform", "SGM Uniform", "Simple", "Normal", "DDIM", "Beta"}


@pytest.mark.parametrize("text,label", [
    ("normal", "Normal"), ("Normal", "Normal"), ("karras", "Karras"), ("sgm_uniform", "SGM Uniform"),
    ("SGMUniform", "SGM Uniform"), ("simple", "Simple"), ("kl_optimal", "KL Optimal"),
    ("align_your_steps", "Align Your Steps"), ("ddim", "DDIM"), ("beta", "Beta"), ("uniform", "Uniform")])
def test_every_name_means_its_own_type(text, label):
    assert schedules.find(text).label == label
    assert samplers.resolve("Euler", text) == (samplers.resolve("Euler")[0], label)


def test_unknown_schedule_is_refused():
    assert schedules.find("Sideways") is None
    with pytest.raises(InvalidRequest, match="unknown schedule type 'Sideways'.*Align Your Steps"):
        samplers.resolve("Euler a", "Sideways")


def test_all_but_kl_optimal_end_in_zero_and_fall():
    for s in schedules.SCHEDULES[1:]:
        out = schedules.sigmas_for(s.label, 12, TRAIN)
        assert out.dtype == torch.float32
        assert (out[1:] <= out[:-1]).all(), s.label
        assert out[-1] == (LO if s.label == "KL Optimal" else 0.0), s.label


def test_karras_exponential_polyexponential():
    k = schedules.karras(4, LO, HI)
    ramp = torch.linspace(0, 1, 4)
    expected = (HI ** (1 / 7) + ramp * (LO ** (1 / 7) - HI ** (1 / 7))) ** 7
    assert torch.allclose(k[:-1], expected) and k[0] == pytest.approx(HI) and k[-2] == pytest.approx(LO)
    e = schedules.exponential(5, LO, HI)
    ratios = e[1:-1] / e[:-2]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))
    assert torch.allclose(schedules.polyexponential(5, LO, HI), e)  # rho 1
    assert not torch.allclose(schedules.polyexponential(5, LO, HI, rho=2.0), e)


def test_model_spacings_match_diffusers():
    """Uniform is the model's own linspace spacing (diffusers' Euler "linspace"); SGM Uniform is trailing."""
    def euler(n, spacing):
        sched = diffusers.EulerDiscreteScheduler.from_config({**scheduler_config(False), "timestep_spacing": spacing})
        sched.set_timesteps(n)
        return sched.sigmas

    for n in (10, 4):
        assert torch.allclose(schedules.sigmas_for("Uniform", n, TRAIN), euler(n, "linspace"), rtol=2e-3)
        # diffusers rounds trailing timesteps to integers, the webui keeps them fractional
        assert torch.allclose(schedules.sigmas_for("SGM Uniform", n, TRAIN), euler(n, "trailing"), rtol=1e-2)


def test_normal_simple_ddim_are_their_own():
    normal = schedules.sigmas_for("Normal", 10, TRAIN)
    assert normal[0] == pytest.approx(HI, rel=1e-4) and normal[-2] == pytest.approx(LO, rel=1e-3)
    simple = schedules.sigmas_for("Simple", 10, TRAIN)
    assert torch.equal(simple[:-1], TRAIN.flip(0)[::100])
    ddim = schedules.sigmas_for("DDIM", 10, TRAIN)
    assert torch.equal(ddim[:-1], TRAIN[1::100].flip(0))
    assert len(schedules.sigmas_for("DDIM", 30, TRAIN)) == 32  # 1000 // 30 = 33: 31 steps, as the webui


def test_kl_optimal_is_even_in_arctan():
    out = schedules.kl_optimal(6, LO, HI)
    angles = out.atan()
    assert len(out) == 7 and out[-1] == pytest.approx(LO)
    assert torch.allclose(angles[1:] - angles[:-1], (angles[1] - angles[0]).expand(6), atol=1e-6)


def test_align_your_steps_tables_and_interpolation():
    ten = schedules.align_your_steps(11, LO, HI)  # the published table as is
    assert ten[:-1].tolist() == pytest.approx(schedules.AYS_SD1) and ten[-1] == 0
    assert schedules.align_your_steps(11, LO, HI, sdxl=True)[:-1].tolist() == pytest.approx(schedules.AYS_SDXL)
    twenty = schedules.align_your_steps(20, LO, HI)
    assert len(twenty) == 21 and twenty[0] == pytest.approx(14.615) and twenty[-2] == pytest.approx(0.029)
    logs = twenty[:-1].log()  # log-linear between table points: every 19/10-th point is a table value
    assert not torch.allclose(logs[1:] - logs[:-1], (logs[1] - logs[0]).expand(19))
    assert not torch.allclose(schedules.sigmas_for("Align Your Steps", 8, TRAIN, sdxl=True),
                              schedules.sigmas_for("Align Your Steps", 8, TRAIN))


def test_beta_uses_the_beta_quantiles():
    from scipy import stats

    out = schedules.beta(8, LO, HI)
    q = stats.beta.ppf(1 - torch.linspace(0, 1, 8).double().numpy(), 0.6, 0.6)
    assert torch.allclose(out[:-1], torch.tensor(LO + q * (HI - LO), dtype=torch.float32))
    assert out[0] == pytest.approx(HI) and out[-2] == pytest.approx(LO)


def test_dpm2_drops_the_next_to_last_sigma():
    spec, label = samplers.resolve("DPM2")
    assert label == "Karras"
    out = samplers.sigmas(spec, label, 10, TRAIN)
    full = schedules.karras(11, LO, HI)
    assert len(out) == 11 and torch.equal(out, torch.cat([full[:-2], full[-1:]]))
    euler = samplers.sigmas(samplers.resolve("Euler")[0], "Karras", 10, TRAIN)
    assert torch.equal(euler, schedules.karras(10, LO, HI))


def test_sigma_t_round_trip():
    t = torch.tensor([0.0, 10.5, 500.25, 999.0])
    assert torch.allclose(schedules.sigma_to_t(schedules.t_to_sigma(t, TRAIN), TRAIN), t, atol=1e-3)
