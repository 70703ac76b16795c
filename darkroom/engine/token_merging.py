"""Token merging (ToMe for SD): the webui's `token_merging_ratio` options, applied as the webui applies them.

Self-attention at the UNet's full latent resolution is a third of an SD1.5 512x512 step on a CPU, and its
cost grows with the square of the token count. ToMe merges that share of the tokens that are most alike
before the self-attention and copies the result back to them afterwards, so a ratio of 0.5 runs those
attentions on half the tokens. It changes the picture (a little at 0.3, visibly at 0.6 and above), so it is
off unless asked for: `token_merging_ratio` (the first pass; img2img takes the webui's
`token_merging_ratio_img2img` option instead) and `token_merging_ratio_hr` (the hires pass; 0 = the first
pass's ratio), as request fields, the webui's options and `override_settings`, or `--token-merging`.

Like the webui (modules/sd_models.py `apply_token_merging`) this uses the `tomesd` package with its
defaults, no random perturbation (`use_rand=False`: deterministic, safe with every sampler), merging for the
self-attention only (`merge_attn`; cross-attention and the feed-forward see every token), and only at the
UNet's full latent resolution (`max_downsample=1`). SDXL has no attention at that resolution, so the
options change nothing there, as in the webui. The patch swaps each BasicTransformerBlock's class for the
time of one pass; leaving the block puts the classes back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def token_merging(unet: torch.nn.Module, ratio: float) -> Iterator[bool]:
    """Merge `ratio` of the full-resolution self-attention tokens of `unet` inside the block; yields whether
    anything was patched (False for 0, or a UNet without transformer blocks at full resolution)."""
    if not ratio:
        yield False
        return
    import tomesd

    tomesd.apply_patch(unet, ratio=float(ratio), max_downsample=1, sx=2, sy=2, use_rand=False,
                       merge_attn=True, merge_crossattn=False, merge_mlp=False)
    try:
        yield any(type(m).__name__ == "ToMeBlock" for m in unet.modules())
    finally:
        tomesd.remove_patch(unet)  # the classes back and its size hook removed
        for module in unet.modules():
            vars(module).pop("_tome_info", None)
