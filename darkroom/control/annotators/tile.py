"""tile_colorfix and tile_colorfix+sharp: the tile ControlNet's map is the picture itself (the extension's
`identity`, at the input size); what sets them apart from tile_resample happens while sampling, on the
latents, not in the map.

The extension (hook.py, "Post-processing for color fix") VAE-encodes the fitted control map once per pass
([0, 1] -> [-1, 1], scaled as the checkpoint's latents; the hires pass encodes its own map) and, after every
UNet call (also outside the unit's start/end window, which it does not check there), replaces the low
frequencies of the predicted clean latent x0 by those of that encoding: x0 - blur(x0) + blur(map latent),
where blur is a box filter of (2k+1)^2 latent pixels over a replicate-padded border and k is the Variation
slider (doubled in the hires pass). For +sharp, the negative prompt's rows are pulled towards their own
blur by Sharpness % (0.01 x the slider), so CFG pushes the prompt's rows away from blur. The new x0 goes back to a noise
prediction, mixed with the UNet's own by the unit's weight clamped to [0, 1]; the noise prediction is
linear in x0 at a fixed x_t, so mixing the two x0 by the same weight is the same step.
`fix_colours` is that step on x0. prepare.py encodes the maps (units whose module has `colour_fix`) and
apply.Control.fix_prediction runs it on every UNet output of both sampling paths, before CFG combines the rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_blur(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over the (2k+1)x(2k+1) square round each pixel, the border repeated outwards."""
    if k <= 0:
        return x
    padded = F.pad(x, (k, k, k, k), mode="replicate")
    return F.avg_pool2d(padded, 2 * k + 1, stride=1)


def fix_colours(denoised: torch.Tensor, map_latent: torch.Tensor, variation: float, *,
                sharpness: float | None = None, prompt_rows: torch.Tensor | None = None, weight: float = 1.0,
                hires: bool = False) -> torch.Tensor:
    """The predicted clean latents `denoised` [B, 4, h, w] with their colours (low frequencies) taken from
    `map_latent` (the VAE encoding of the control map, [1 or B, 4, h, w]).

    `sharpness` (tile_colorfix+sharp's slider; None for tile_colorfix) blurs the rows where `prompt_rows`
    ([B] bool) is False, the negative prompt's, by that many hundredths. `weight` is the unit's weight."""
    k = int(variation) * (2 if hires else 1)
    latent = map_latent.to(device=denoised.device, dtype=denoised.dtype)
    fixed = denoised - box_blur(denoised, k) + box_blur(latent, k)
    if sharpness is not None:
        detail = float(sharpness) * 0.01
        soft = detail * box_blur(fixed, k) + (1.0 - detail) * fixed
        if prompt_rows is None:  # no negative rows known: the extension then treats every row as the prompt's
            prompt_rows = torch.ones(denoised.shape[0], dtype=torch.bool)
        keep = prompt_rows.to(device=denoised.device).view(-1, 1, 1, 1)
        fixed = torch.where(keep, fixed, soft)
    w = min(max(float(weight), 0.0), 1.0)
    return w * fixed + (1.0 - w) * denoised
