"""The sampler table: names users type, legacy combined names, schedules, clear errors."""

import pytest

from darkroom.engine import samplers
from darkroom.errors import InvalidRequest
from darkroom.models.configs import scheduler_config

REQUIRED = ["Euler", "Euler a", "Heun", "LMS", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ SDE", "DDIM",
            "PLMS", "UniPC", "LCM"]


def test_required_samplers_present():
    assert set(REQUIRED) <= set(samplers.sampler_names())


@pytest.mark.parametrize("name,schedule,expected", [
    ("DPM++ 2M", "Automatic", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M Karras", "Automatic", ("DPM++ 2M", "Karras")),
    ("dpm++ 2m sde karras", "Automatic", ("DPM++ 2M SDE", "Karras")),
    ("Euler a", "Automatic", ("Euler a", "Uniform")),
    ("k_euler_a", "Automatic", ("Euler a", "Uniform")),
    ("Euler", "SGM Uniform", ("Euler", "SGM Uniform")),
    ("Euler Exponential", "Automatic", ("Euler", "Exponential")),
    ("DPM++ 2M SDE", "Automatic", ("DPM++ 2M SDE", "Exponential")),
    ("UniPC", "karras", ("UniPC", "Karras")),
    ("Euler a", "Karras", ("Euler a", "Karras")),
    ("DPM2", "Automatic", ("DPM2", "Karras")),
    ("DPM2 a", "Automatic", ("DPM2 a", "Karras")),
    ("DPM++ 3M SDE", "Automatic", ("DPM++ 3M SDE", "Exponential")),
    ("Heun", "normal", ("Heun", "Normal")),
    ("DPM++ 2M Beta", "Automatic", ("DPM++ 2M", "Beta")),
    ("Euler align_your_steps", "Automatic", ("Euler", "Align Your Steps")),
])
def test_resolve(name, schedule, expected):
    spec, label = samplers.resolve(name, schedule)
    assert (spec.name, label) == expected


def test_unknown_sampler_lists_choices():
    with pytest.raises(InvalidRequest, match=r"unknown sampler 'Eulr'; choose one of: DPM\+\+ 2M"):
        samplers.resolve("Eulr")


def test_unsupported_combination_is_clear():
    with pytest.raises(InvalidRequest, match="'DDIM' does not support the Karras schedule .DDIM picks its own"):
        samplers.resolve("DDIM", "Karras")
    with pytest.raises(InvalidRequest, match="'LCM' does not support the Beta schedule"):
        samplers.resolve("LCM", "Beta")
    with pytest.raises(InvalidRequest, match="unknown schedule type 'Sideways'"):
        samplers.resolve("Euler", "Sideways")


def test_k_diffusion_samplers_take_every_schedule():
    every = set(samplers.SCHEDULE_NAMES)
    for spec in samplers.SAMPLERS:
        if spec.kfunc is not None:
            assert {"Automatic", *spec.schedules} == every, spec.name
    assert len(every) == 12


@pytest.mark.parametrize("name,schedule,how", [
    ("DPM++ 2M", "Karras", "diffusers"), ("Euler a", "Automatic", "diffusers"), ("Euler", "Beta", "sigmas"),
    ("Euler a", "Karras", "own"), ("DPM2", "Uniform", "own"), ("LMS", "KL Optimal", "own"), ("DDIM", "Uniform",
                                                                                             "diffusers")])
def test_runner(name, schedule, how):
    assert samplers.runner(*samplers.resolve(name, schedule)) == how


@pytest.mark.parametrize("spec", samplers.SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_and_schedule_builds(spec):
    from darkroom.engine import schedules

    train = schedules.model_sigmas(scheduler_config(False))
    for schedule in ("Automatic", *spec.schedules):
        s, label = samplers.resolve(spec.name, schedule)
        if samplers.runner(s, label) == "diffusers":
            sched = samplers.make_scheduler(s, label, scheduler_config(False), seed=1)
            sched.set_timesteps(10)
            assert len(sched.timesteps) >= 10
        else:
            assert len(samplers.sigmas(s, label, 10, train)) >= 11


def test_a_pasted_schedule_the_sampler_ignores_becomes_automatic(tmp_path):
    """The webui ignores the schedule type for DDIM/PLMS/UniPC (Forge writes one anyway): such an image reruns
    with Automatic, while a schedule the sampler does take (Euler a + Karras) is kept, and a request that asks
    for DDIM + Karras itself is still refused."""
    from PIL import Image

    from darkroom.api import request_from_png
    from darkroom.metadata.images import encode_png

    def png(params: str):
        path = tmp_path / f"{abs(hash(params))}.png"
        path.write_bytes(encode_png(Image.new("RGB", (8, 8)), f"a cat\n{params}"))
        return request_from_png(path)

    assert png("Steps: 20, Sampler: DDIM, Schedule type: Karras, CFG scale: 7, Seed: 1").schedule == "Automatic"
    assert png("Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1").schedule == "Karras"
    assert png("Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1").schedule == "Karras"
    with pytest.raises(InvalidRequest, match="DDIM"):
        samplers.resolve("DDIM", "Karras")
