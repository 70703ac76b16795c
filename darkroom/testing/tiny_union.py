"""Tiny random ControlNet Union models matching the tiny SDXL UNet of darkroom.testing.tiny, for tests.

Written as users have them: a diffusers folder (config.json `_class_name: ControlNetUnionModel`) and
a single .safetensors with diffusers keys (how xinsir ships `diffusion_pytorch_model_promax`). The
union layers' widths must equal the UNet's first block width (the hint features are added to it).
Every tensor gets seeded noise, the zero-initialised ones (output convolutions, `spatial_ch_projs`)
enough of it that the control, and the control type, visibly change a tiny model's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers is imported)
from darkroom.testing.tiny_controlnet import tiny_controlnet_config

LAYOUTS = ("single", "diffusers")
TRANS_HEADS = 2  # the tiny width (32) over xinsir's 8 heads would be 4-wide heads; any divisor works


def tiny_union_config(num_control_type: int = 8) -> dict:
    """ControlNetUnionModel kwargs: the tiny SDXL ControlNet plus union layers as wide as its first block."""
    cfg = tiny_controlnet_config("sdxl")
    width = cfg["block_out_channels"][0]
    cfg.update(num_control_type=num_control_type, num_trans_channel=width, num_trans_head=TRANS_HEADS,
               num_trans_layer=1, num_proj_channel=width)
    return cfg


def build_tiny_union(*, seed: int = 0, num_control_type: int = 8):
    """A `ControlNetUnionModel` in eval mode, deterministic in `seed`, without touching the global RNG."""
    from diffusers import ControlNetUnionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7200 + seed)
        model = ControlNetUnionModel(**tiny_union_config(num_control_type)).eval()
    generator = torch.Generator().manual_seed(7300 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                scale = 0.3
            elif name.startswith(("spatial_ch_projs", "control_add_embedding", "task_embedding")):
                scale = 0.1  # so the control type matters in a 3-step test
            else:
                scale = 0.02
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def write_tiny_union(folder: str | Path, name: str, layout: str = "single", *, seed: int = 0,
                     num_control_type: int = 8, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny union model called `name` into `folder`; returns the .safetensors file or the folder.

    A single file records in `darkroom_config` metadata what shapes cannot tell (head counts and SDXL's
    time-id width), as tiny ControlNets do; real files need none (the loader assumes the real values)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    model = build_tiny_union(seed=seed, num_control_type=num_control_type).to(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        target = folder / name
        model.save_pretrained(str(target), safe_serialization=True)
        return target
    from safetensors.torch import save_file

    fields = {"attention_head_dim": model.config.attention_head_dim,
              "addition_time_embed_dim": model.config.addition_time_embed_dim, "num_trans_head": TRANS_HEADS}
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"darkroom_config": json.dumps({"controlnet": fields})})
    return path


def tiny_union_state(*, seed: int = 0, num_control_type: int = 8) -> dict:
    """The tensors `write_tiny_union` writes for (seed, num_control_type), for exact comparisons."""
    return {k: v.clone() for k, v in build_tiny_union(seed=seed, num_control_type=num_control_type)
            .state_dict().items()}
