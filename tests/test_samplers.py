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
])
def test_resolve(name, schedule, expected):
    spec, label = samplers.resolve(name, schedule)
    assert (spec.name, label) == expected


def test_unknown_sampler_lists_choices():
    with pytest.raises(InvalidRequest, match=r"unknown sampler 'Eulr'; choose one of: DPM\+\+ 2M"):
        samplers.resolve("Eulr")


def test_unsupported_combination_is_clear():
    with pytest.raises(InvalidRequest, match="'DDIM' does not support the Karras schedule"):
        samplers.resolve("DDIM", "Karras")
    with pytest.raises(InvalidRequest, match="unknown schedule type 'Sideways'"):
        samplers.resolve("Euler", "Sideways")


@pytest.mark.parametrize("spec", samplers.SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_and_schedule_builds(spec):
    for schedule in ("Automatic", *spec.schedules):
        s, label = samplers.resolve(spec.name, schedule)
        sched = samplers.make_scheduler(s, label, scheduler_config(False), seed=1)
        sched.set_timesteps(10)
        assert len(sched.timesteps) >= 10
