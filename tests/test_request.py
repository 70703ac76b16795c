"""Request validation: clear messages for out-of-range input."""

import pytest
from pydantic import ValidationError

from darkroom.request import GenerationRequest


def test_width_not_multiple_of_8():
    with pytest.raises(ValidationError, match="width 513 is not a multiple of 8.*use 512 or 520"):
        GenerationRequest(width=513)


def test_defaults_and_ranges():
    r = GenerationRequest(prompt="x")
    assert (r.steps, r.cfg_scale, r.width, r.height, r.seed, r.sampler) == (20, 7.0, None, None, -1, "DPM++ 2M")
    with pytest.raises(ValidationError):
        GenerationRequest(steps=0)
    with pytest.raises(ValidationError):
        GenerationRequest(unknown_field=1)
