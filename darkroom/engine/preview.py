"""Live previews during sampling: what the image is becoming, cheaply.

A full VAE decode of a 512x512 SD1.5 latent costs more than a sampling step on a CPU,
so for real-size models the preview is a linear map from the 4 latent channels to RGB
(the same idea as the webui's "Approx cheap" preview; the factors below are the widely
published least-squares fits for the SD1/SD2 and SDXL latent spaces). Small VAEs (the
built-in starter model) are decoded for real: that costs milliseconds and is exact.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from darkroom.models.loader import LoadedModel

# rows: latent channel 0..3, columns: R, G, B
_SD_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
               (-0.2120, -0.2616, -0.7177))
_SDXL_FACTORS = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                 (-0.3165, -0.2492, -0.2188))
SMALL_VAE_PARAMS = 5_000_000  # decode for real below this many decoder parameters
MAX_SIDE = 256


def _decoder_params(model: LoadedModel) -> int:
    cached = getattr(model, "_preview_decoder_params", None)
    if cached is None:
        cached = sum(p.numel() for p in model.vae.decoder.parameters())
        try:
            model._preview_decoder_params = cached
        except AttributeError:  # slotted dataclass: just recount next time
            pass
    return cached


@torch.no_grad()
def preview_image(model: LoadedModel, latents: torch.Tensor, denoised: torch.Tensor | None = None) -> Image.Image:
    """An RGB preview of the first image of the batch (x0 estimate when the sampler gives one)."""
    z = (denoised if denoised is not None else latents)[:1].float()
    if _decoder_params(model) < SMALL_VAE_PARAMS:
        decoded = model.vae.decode((z / model.vae.config.scaling_factor).to(model.device, model.vae_dtype)).sample
        rgb = ((decoded[0].float().clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
    else:
        factors = _SDXL_FACTORS if model.family.id.startswith("sdxl") else _SD_FACTORS
        weight = torch.tensor(factors, dtype=torch.float32, device=z.device)
        # the fits map the sampler's (scaled) latents straight to RGB in -1..1
        rgb = (torch.einsum("chw,cr->hwr", z[0], weight).clamp(-1, 1) + 1) * 127.5
    arr = np.ascontiguousarray(rgb.round().to(torch.uint8).cpu().numpy())
    image = Image.fromarray(arr)
    if max(image.size) < 128:
        image = image.resize((image.width * 4, image.height * 4), Image.NEAREST)
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image
