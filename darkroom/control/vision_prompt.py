"""Units that steer through the prompt's conditioning with a picture's CLIP vision embedding, as the A1111
extension runs them: the T2I-Adapter style model and SDXL's ReVision.

- T2I-Adapter style (`t2iadapter_style_sd14v1.pth`, preprocessor `t2ia_style_clipvision`, key `clip_vision`):
  the picture's CLIP ViT-L/14 hidden states (257 x 1024, before the final LayerNorm) go through the adapter's
  three transformer layers with 8 learnt style tokens appended; the style tokens come out projected to the
  text width (768) and are appended to the prompt's context at every UNet call in the unit's window, times
  the unit's weight. The negative prompt's rows get the same number of zero tokens, as in the extension (its
  context rows must all have one length); the ControlNets of the same call see the longer context too.
- ReVision (`revision_clipvision`, `revision_ignore_prompt`; SDXL only, no model file): the picture's CLIP
  ViT-bigG/14 image embedding (1280, projected) replaces the SDXL pooled text embedding of the prompt's rows,
  summed over the active ReVision units, each times its weight; the negative's rows get zeros there.
  "Noise Augmentation" (threshold_a, 0-1) first noises the embedding to timestep int(a x 1000) of the
  low-scale model's schedule (scaled-linear betas 1e-4 to 2e-2). `revision_ignore_prompt`, or a request whose
  prompt and negative prompt are both empty, also zeroes the text context while a ReVision unit acts.
  Unlike the extension, whose noise is unseeded, the noise is drawn from the request's seed, so a result
  reruns exactly.

The CLIP vision towers are the user's files, found as the IP-Adapter towers are (darkroom.control.ipadapter):
`clip_vitl.pth` (OpenAI's whole CLIP ViT-L/14 model; its text tower is left out) and `clip_g.pth`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from darkroom.control.config import Kind, darkroom_fields
from darkroom.control.load import LoadedControlNet
from darkroom.errors import ModelLoadError

STYLE_LAYOUT = "t2i-style"
STYLE_MODULE = "clip_vision"  # the extension's key; its label is t2ia_style_clipvision
REVISION_MODULES = ("revision_clipvision", "revision_ignore_prompt")
TOWERS = {STYLE_MODULE: "l", "revision_clipvision": "g", "revision_ignore_prompt": "g"}
"""Each module's CLIP vision tower (keys of ipadapter.CLIP_FILES)."""
STYLE_HEADS = 8  # the extension's t2i_adapter_style_config: the file cannot tell its head count
_FAMILY_BY_CONTEXT = {768: "sd1", 1024: "sd2"}


# --- the style adapter -----------------------------------------------------------------------------------------


def style_kind(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> Kind:
    """The Kind of a T2I-Adapter style file (its keys hold `style_embedding`); family from its projection's width
    (our tiny test files, whose widths no family has, say it in `darkroom_config` {"t2i_style": {"family"}})."""
    try:
        context = int(shapes["proj"][-1])
        if int(shapes["style_embedding"][-1]) != int(shapes["proj"][0]):
            raise ValueError
    except (KeyError, IndexError, ValueError):
        return Kind(False, detail="a T2I-Adapter style model whose layout is not recognised")
    family = _FAMILY_BY_CONTEXT.get(context)
    if family is None:
        try:
            family = darkroom_fields(metadata, "t2i_style", {"family"}).get("family")
        except ValueError:
            family = None
    if family is None:
        return Kind(False, detail=f"a T2I-Adapter style model for a {context}-wide text context no SD family has")
    return Kind(True, STYLE_LAYOUT, family)


class _Block(nn.Module):
    """One of the adapter's transformer layers (CLIP's residual attention block, quick GELU); the file's names."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.Identity())  # quick GELU, applied in forward
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, N, D]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class StyleAdapterNet(nn.Module):
    """CLIP hidden states [N, 257, width] -> style tokens [N, tokens, context]."""

    def __init__(self, width: int, context: int, layers: int, tokens: int, heads: int = STYLE_HEADS):
        super().__init__()
        self.transformer_layes = nn.Sequential(*(_Block(width, heads) for _ in range(layers)))  # the file's spelling
        self.style_embedding = nn.Parameter(torch.zeros(1, tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, context))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tokens = self.style_embedding.shape[1]
        x = torch.cat([hidden, self.style_embedding.to(hidden).expand(hidden.shape[0], -1, -1)], dim=1)
        x = self.transformer_layes(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)
        return self.ln_post(x[:, -tokens:]) @ self.proj


@dataclass
class LoadedStyleAdapter(LoadedControlNet):
    """A T2I-Adapter style model (model: StyleAdapterNet), always run in float32: it runs once per request."""

    is_style: ClassVar[bool] = True
    noun: ClassVar[str] = "T2I-Adapter"


def load_style(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path, *,
               device) -> LoadedStyleAdapter:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    kind = style_kind(shapes, metadata)
    if not kind.supported:
        raise ModelLoadError(f"{path.name}: {kind.detail}")
    width, context = shapes["proj"]
    layers = 1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("transformer_layes.")), default=-1)
    try:
        with torch.device("meta"):
            net = StyleAdapterNet(width, context, layers, shapes["style_embedding"][1])
        net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True, assign=True)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{path.name}: the T2I-Adapter style weights do not fit their layout ({first})") from None
    net = net.to(device=device).eval()
    net.requires_grad_(False)
    return LoadedStyleAdapter(net, kind.family, path, torch.float32, torch.device(device))


def style_tokens(adapter: LoadedStyleAdapter, clip, pixels: torch.Tensor) -> torch.Tensor:
    """The adapter's tokens [1, tokens, context] for a picture (`pixels`: ipadapter.clip_pixels)."""
    tower = next(clip.parameters())
    with torch.no_grad():
        hidden = clip(pixels.to(device=tower.device, dtype=tower.dtype)).last_hidden_state
        return adapter.model(hidden.float().to(adapter.device))


# --- ReVision --------------------------------------------------------------------------------------------------


def revision_embedding(clip, pixels: torch.Tensor, noise_augmentation: float, seed: int) -> torch.Tensor:
    """The picture's CLIP image embedding [1, 1280] noised to timestep int(a x 1000) (clipped to 0-999) of the
    low-scale model's schedule, with noise from `seed`."""
    tower = next(clip.parameters())
    with torch.no_grad():
        embeds = clip(pixels.to(device=tower.device, dtype=tower.dtype)).image_embeds.float().cpu()
    step = min(max(int(noise_augmentation * 1000), 0), 999)
    betas = torch.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, 1000, dtype=torch.float64) ** 2
    kept = torch.cumprod(1 - betas, 0)[step]
    noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(int(seed)))
    return (kept.sqrt().float() * embeds + (1 - kept).sqrt().float() * noise)


# --- running ---------------------------------------------------------------------------------------------------


def condition(control, context: torch.Tensor, added: dict | None, *, n: int, uncond: bool, step: int,
              total: int) -> tuple[torch.Tensor, dict | None]:
    """(context, added_cond_kwargs) for a UNet call with `control`'s ReVision and style units applied (see the
    module doc); the inputs themselves when none acts. The batch is [negative x n, prompt parts x n] when
    `uncond`, else prompt parts only."""
    units = [u for u in control.units if u.vision is not None and u.covers(step, total)]
    if not units:
        return context, added
    batch = context.shape[0]
    prompt_rows = torch.ones(batch, dtype=context.dtype, device=context.device)
    if uncond:
        prompt_rows[:n] = 0
    revision = [u for u in units if u.module in REVISION_MODULES]
    if revision and added is not None and "text_embeds" in added:
        pooled = sum(u.vision.to(device=context.device, dtype=torch.float32) * u.weight for u in revision)
        embeds = added["text_embeds"]
        rows = (pooled * prompt_rows[:, None].float()).to(embeds.dtype)  # the pooled text embedding's width
        added = {**added, "text_embeds": torch.cat([rows, embeds[:, rows.shape[1]:]], dim=1)}
        if control.ignore_prompt:
            context = torch.zeros_like(context)
    for unit in units:
        if unit.module != STYLE_MODULE:
            continue
        tokens = unit.vision.to(device=context.device, dtype=context.dtype) * unit.weight
        context = torch.cat([context, tokens.expand(batch, -1, -1) * prompt_rows[:, None, None]], dim=1)
    return context, added
