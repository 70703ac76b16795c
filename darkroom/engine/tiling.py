"""Seamless tiling: images whose left edge continues the right one and the top the bottom.

As the webui does it (modules/sd_hijack.py, `apply_circular`): every Conv2d of the model pads
circularly instead of with zeros, so each convolution sees the opposite edge beyond an edge,
and the UNet denoises, and the VAE decodes, a picture on a torus. Both axes, as in the webui
(an x-only mode is an extension there, not the webui's). The webui leaves the setting on the
model until the next generation changes it; here it holds for one generation only and the
padding is put back on exit, also when the generation fails or is interrupted, so the cached
model is the same before and after.

A VAE decode split into tiles for memory (darkroom/engine/vae_tiling.py, "auto" on very large
images) pads each tile on its own, so such a decode wraps within tiles; images that fit one
untiled decode, the usual case, wrap exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from darkroom.models.loader import LoadedModel


def _convs(*modules: torch.nn.Module | None) -> list[torch.nn.Conv2d]:
    seen: dict[int, torch.nn.Conv2d] = {}
    for module in modules:
        if module is not None:
            seen.update((id(m), m) for m in module.modules() if isinstance(m, torch.nn.Conv2d))
    return list(seen.values())


@contextmanager
def seamless(model: LoadedModel, enabled: bool = True) -> Iterator[int]:
    """Inside it, every Conv2d of `model`'s UNet and VAE pads circularly; yields how many were switched.

    Enter it after any VAE swap, so the VAE that decodes is the one switched."""
    if not enabled:
        yield 0
        return
    convs = _convs(model.unet, model.vae)
    before = [c.padding_mode for c in convs]
    try:
        for conv in convs:
            conv.padding_mode = "circular"
        yield len(convs)
    finally:
        for conv, mode in zip(convs, before, strict=True):
            conv.padding_mode = mode
