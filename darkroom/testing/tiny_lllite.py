"""Tiny random ControlNet-LLLite files in kohya's layout, for a given diffusers UNet (the tests' tiny SDXL one).

Each hooked projection gets a module named as the original UNet numbers its blocks
(`lllite_unet_input_blocks_{i}_1_transformer_blocks_{j}_attn1_to_q`, ...), with `conditioning1` convolutions
that shrink the map to that block's token grid (x16 for the second level, x32 for the third, as real files).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

PROJECTIONS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")  # what kohya's SDXL models hook
_PATH = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\."
                   r"(attn[12])\.to_([qkv])$|mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.(attn[12])\.to_([qkv])$")


def original_name(path: str, layers_per_block: int, levels: int) -> tuple[str, int] | None:
    """(LLLite module name, level) for a diffusers projection path, or None when it is not one."""
    m = _PATH.match(path)
    if m is None:
        return None
    kind, level, within, block, attn, proj, mid_block, mid_attn, mid_proj = m.groups()
    if kind is None:
        return f"lllite_unet_middle_block_1_transformer_blocks_{mid_block}_{mid_attn}_to_{mid_proj}", levels - 1
    level, within = int(level), int(within)
    if kind == "down_blocks":
        index, where, depth_level = level * (layers_per_block + 1) + within + 1, "input", level
    else:
        index, where, depth_level = level * (layers_per_block + 1) + within, "output", levels - 1 - level
    return f"lllite_unet_{where}_blocks_{index}_1_transformer_blocks_{block}_{attn}_to_{proj}", depth_level


def lllite_state(unet: torch.nn.Module, *, seed: int = 0, mlp_dim: int = 8, cond_dim: int = 8,
                 projections: tuple[str, ...] = PROJECTIONS, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Random weights (normal x `scale`) for every hooked projection of `unet` (a diffusers UNet)."""
    from darkroom.control.lllite import LLLiteModule

    cfg = unet.config
    levels = len(cfg.block_out_channels)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, layer in unet.named_modules():
        if not path.endswith(projections) or not isinstance(layer, torch.nn.Linear):
            continue
        named = original_name(path, int(cfg.layers_per_block), levels)
        if named is None:
            continue
        name, level = named
        module = LLLiteModule(layer.in_features, mlp_dim, cond_dim, depth=level + 1)  # level 1: x16, level 2: x32
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = torch.randn(value.shape, generator=g) * scale
    return state


def write_tiny_lllite(folder: Path, name: str, unet: torch.nn.Module, **kw) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in lllite_state(unet, **kw).items()}, str(path))
    return path
