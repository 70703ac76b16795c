"""inpaint_only and inpaint_only+lama: what the extension does beyond giving the inpaint ControlNet its map.

The map is inpaint_global_harmonious's (the picture, -1 where masked). On top of it the extension:

1. VAE-encodes the unit's picture once per pass (for +lama: the picture with LaMa's fill in the mask) and,
   after every UNet call, keeps the predicted clean latent x0 only inside the mask: x0 = x0 m + picture (1 - m)
   with m the pixel mask max-pooled onto the latent grid (10 x 10 windows, stride 8, padding 1), mixed with
   the UNet's own prediction by the unit's weight clamped to [0, 1] (hook.py, "Post-processing for restore";
   like tile_colorfix's step, it does not look at the unit's start/end window). `restore_x0` is that step.
2. After decoding, puts the picture back outside the mask: image m' + picture (1 - m'), m' the mask dilated by
   a 7 x 7 square and box-blurred 7 x 7 (its `control_net_inpaint_blur_sigma`, 7), at the last pass's size
   (`RestoreImage`).
3. For +lama only, starts txt2img (and img2img's noise) from the fill: the first pass's starting noise becomes
   sqrt(abar) x0 + sqrt(1 - abar) noise at the model's last training timestep (999), x0 the fill's latent
   (its HackedImageRNG; the hires pass's noise, of another size, is left alone). `lama_noise` is that.

With an img2img inpainting mask of its own, an inpaint_only unit falls back to inpaint_global_harmonious, as
the extension does ("A1111 inpaint and ControlNet inpaint duplicated"); +lama does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

RESTORE_BLUR = 7
MODULES = ("inpaint_only", "inpaint_only+lama")


def latent_mask(mask: np.ndarray, factor: int = 8) -> torch.Tensor:
    """A bool HxW pixel mask on the latent grid of a VAE that shrinks by `factor`, [1, 1, H/f, W/f] float
    (1: repaint): max-pooled over windows one pixel wider than a latent cell each way (10 x 10 at stride 8)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.max_pool2d(m, factor + 2, stride=factor, padding=1)


def restore_x0(x0: torch.Tensor, picture: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Predicted clean latents `x0` [B, 4, h, w] kept inside `mask` and the `picture`'s latent outside."""
    picture = picture.to(device=x0.device, dtype=x0.dtype)
    mask = mask.to(device=x0.device, dtype=x0.dtype)
    kept = x0 * mask + picture * (1 - mask)
    w = min(max(float(weight), 0.0), 1.0)
    return w * kept + (1.0 - w) * x0


def blend_mask(mask: np.ndarray, size: int = RESTORE_BLUR) -> np.ndarray:
    """The paste-back weight of the generated image: the mask dilated by a size x size square, then box-blurred
    size x size (OpenCV's dilate and blur with their default borders), float32 HxW."""
    grown = ndimage.grey_dilation(mask.astype(np.float32), size=(size, size), mode="nearest")
    return ndimage.uniform_filter(grown, size=size, mode="mirror")


@dataclass
class RestoreImage:
    """The picture to put back outside the mask of a unit's last pass, and the blend weight."""

    picture: np.ndarray  # float32 HxWx3 in [0, 1]
    weight: np.ndarray  # float32 HxW in [0, 1]: 1 keeps the generated pixel

    def apply(self, image: Image.Image) -> Image.Image:
        if image.size != (self.picture.shape[1], self.picture.shape[0]):
            return image  # another size (a script changed it): left alone, as the extension does
        x = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        m = self.weight[:, :, None]
        y = (m * x + (1 - m) * self.picture).clip(0, 1)
        return Image.fromarray((y * 255.0).astype(np.uint8))


def restore(image: Image.Image, restores: list[RestoreImage]) -> Image.Image:
    """`image` after each unit's paste-back, in the units' order."""
    for r in restores:
        image = r.apply(image)
    return image


def lama_noise(noise: torch.Tensor, latent: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The starting noise [B, 4, h, w] moved towards LaMa's fill (`latent`, [1, 4, h, w]) as the extension's
    q_sample at t = 999; noise of another size is returned unchanged."""
    if noise.shape[-2:] != latent.shape[-2:]:
        return noise
    abar = alphas_cumprod[-1].to(torch.float64)
    latent = latent.to(device=noise.device, dtype=noise.dtype)
    return (float(abar.sqrt()) * latent + float((1 - abar).sqrt()) * noise).to(noise.dtype)

