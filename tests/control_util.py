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


def diffusers_ip_adapter_pipeline(work, checkpoint, flat: dict, name: str, weight: float, kw: dict):
    """diffusers' StableDiffusionPipeline of the tiny SD1 `checkpoint` with an IP-Adapter loaded by its own
    `load_ip_adapter` from `flat` (our `image_proj.*` / `ip_adapter.*` keys, nested as the authors' .bin), at
    scale `weight`, with Darkroom's scheduler for kw["sampler"] and kw["seed"]; `work`: a scratch folder."""
    import shutil

    import diffusers
    import torch

    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config
    from darkroom.testing.tiny import save_diffusers_folder

    config = save_diffusers_folder(work / "cfg-sd1", "sd1", seed=1)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    pipe = diffusers.StableDiffusionPipeline.from_single_file(str(checkpoint), config=str(config),
                                                              local_files_only=True, torch_dtype=torch.float32)
    shutil.rmtree(config)
    nested = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
              for part in ("image_proj", "ip_adapter")}
    pipe.load_ip_adapter(nested, subfolder="", weight_name=name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(weight)
    spec, schedule = samplers.resolve(kw["sampler"], "Automatic")
    pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=kw["seed"])
    return pipe
