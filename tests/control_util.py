"""Helpers the ControlNet-family tests share: control images as a unit takes them, and one generation with
units that also gives back the last step's latents (what the parity checks compare)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from darkroom.request import GenerationRequest


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A random RGB picture: a control map every pixel of which matters."""
    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8))


def generate_with_units(engine, model, units, *, cancel=None, **request):
    """(the last step's latents or None, the result) of one generation of `model` with ControlNet `units`."""
    seen = []
    req = GenerationRequest(model=str(model), controlnet=list(units), **request)
    result = engine.generate(req, on_step=lambda e: seen.append(e.latents), cancel=cancel)
    return (seen[-1] if seen else None), result
