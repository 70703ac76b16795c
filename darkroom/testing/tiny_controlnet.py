"""Tiny random ControlNets matching the tiny SD1/SD2/SDXL UNets of darkroom.testing.tiny, for tests.

Written in every layout users have: the original single file (`control_model.*` keys, or
without the prefix, .safetensors or .pth, fp16 or fp32), a single file with diffusers keys
(how SDXL ControlNets and our starter ControlNet ship) and a diffusers folder. Every tensor
gets seeded noise, and the zero convolutions (zero at init in a real ControlNet) get enough of
it that the control visibly changes a tiny model's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers is imported)
from darkroom.control.keys import ORIGINAL_PREFIX, controlnet_to_original
from darkroom.testing.tiny import tiny_configs

LAYOUTS = ("single", "single-noprefix", "diffusers-single", "diffusers")
"""single: original keys with `control_model.`; single-noprefix: original keys without it;
diffusers-single: one file with diffusers keys and the config JSON in metadata "config";
diffusers: a folder (config.json + diffusion_pytorch_model[.fp16].safetensors)."""

_UNET_FIELDS = ("down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "use_linear_projection", "transformer_layers_per_block",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def tiny_controlnet_config(family: str = "sd1", hint_channels: int = 3) -> dict:
    """ControlNetModel kwargs copying the tiny `family` UNet's encoder (4 latent channels, an RGB hint unless
    `hint_channels` says otherwise)."""
    unet = tiny_configs(family)["unet"]
    cfg = {k: unet[k] for k in _UNET_FIELDS if k in unet}
    # The hint embedding halves the size once per step between its widths: the tiny VAE's factor is 2
    # (real: 8, with (16, 32, 96, 256)), so one step here.
    cfg.update(in_channels=4, conditioning_channels=hint_channels, conditioning_embedding_out_channels=(16, 32))
    return cfg


def build_tiny_controlnet(family: str = "sd1", *, seed: int = 0, hint_channels: int = 3):
    """A `ControlNetModel` in eval mode, deterministic in `seed`, without touching the global RNG."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7000 + seed)
        model = ControlNetModel(**tiny_controlnet_config(family, hint_channels)).eval()
    generator = torch.Generator().manual_seed(7100 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")) else 0.02
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


def _head_metadata(model) -> dict[str, str]:
    """Head counts and SDXL's time-id width cannot be read from shapes; tiny files record them as our tiny
    checkpoints do (the real values are what the loader assumes without it)."""
    fields = {"attention_head_dim": model.config.attention_head_dim}
    if model.config.addition_time_embed_dim:
        fields["addition_time_embed_dim"] = model.config.addition_time_embed_dim
    return {"darkroom_config": json.dumps({"controlnet": fields})}


def write_tiny_controlnet(folder: str | Path, name: str, family: str = "sd1", layout: str = "single", *,
                          dtype: torch.dtype = torch.float32, suffix: str = ".safetensors", seed: int = 0,
                          variant: str | None = None, hint_channels: int = 3) -> Path:
    """Write a tiny `family` ControlNet called `name` into `folder`; returns the file (or the diffusers folder).

    `layout` is one of LAYOUTS; `suffix` ".safetensors" or ".pth" for the single-file layouts;
    `variant` "fp16" names a diffusers folder's weights diffusion_pytorch_model.fp16.safetensors.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    model = build_tiny_controlnet(family, seed=seed, hint_channels=hint_channels).to(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        target = folder / name
        model.save_pretrained(str(target), safe_serialization=True, variant=variant)
        return target
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    metadata: dict[str, str] = {}
    if layout == "diffusers-single":
        metadata["config"] = json.dumps(json.loads(model.to_json_string()))
    else:
        prefix = ORIGINAL_PREFIX if layout == "single" else ""
        state = controlnet_to_original(state, model.config, prefix=prefix)
        metadata.update(_head_metadata(model))
    path = folder / f"{name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=metadata)
    elif suffix in (".pth", ".pt", ".ckpt"):
        torch.save(state, str(path))
    else:
        raise ValueError(f"unsupported suffix {suffix!r}")
    return path


def tiny_controlnet_state(family: str = "sd1", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """The diffusers-keyed tensors `write_tiny_controlnet` writes for (family, seed), for exact comparisons."""
    return {k: v.clone() for k, v in build_tiny_controlnet(family, seed=seed).to(dtype).state_dict().items()}
