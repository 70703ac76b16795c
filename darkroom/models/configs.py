"""Diffusers configs for each component, inferred from tensor shapes.

Nothing is fetched: widths, depths and block layouts come from the checkpoint's own tensor
shapes; what shapes cannot tell (attention head counts, norm groups) comes from the family's
known values, or from a `darkroom_config` JSON entry in the file's `__metadata__` (how our
own small models record their non-standard head counts).
"""

from __future__ import annotations

import json
import re
from typing import Any

from darkroom.errors import ModelLoadError
from darkroom.models.families import FAMILIES, UNET
from darkroom.models.header import SafetensorsHeader

# What a file's `darkroom_config` metadata may set: only what shapes cannot tell.
METADATA_OVERRIDES = {
    "unet": {"attention_head_dim", "num_attention_heads", "norm_num_groups", "addition_time_embed_dim", "sample_size"},
    "vae": {"norm_num_groups", "scaling_factor", "sample_size", "force_upcast"},
    "text_encoder": {"num_attention_heads", "hidden_act", "layer_norm_eps"},
    "text_encoder_2": {"num_attention_heads", "hidden_act", "layer_norm_eps"},
}


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def metadata_overrides(h: SafetensorsHeader) -> dict[str, dict[str, Any]]:
    raw = h.metadata.get("darkroom_config")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except ValueError:
        raise ModelLoadError(f"{h.path.name}: its darkroom_config metadata is not valid JSON") from None
    return {
        comp: {k: v for k, v in (doc.get(comp) or {}).items() if k in allowed}
        for comp, allowed in METADATA_OVERRIDES.items()
    }


def unet_config(h: SafetensorsHeader, family: str, overrides: dict[str, Any] | None = None, *,
                v_prediction: bool = False) -> dict[str, Any]:
    keys = [k[len(UNET):] for k in h.tensors if k.startswith(UNET)]
    shape = lambda k: h.tensors[UNET + k].shape  # noqa: E731
    conv_in = shape("input_blocks.0.0.weight")
    in_channels = conv_in[1]
    n_input = len(_indices(keys, r"input_blocks\.(\d+)\."))
    downsamples = [i for i in _indices(keys, r"input_blocks\.(\d+)\.0\.op\.weight")]
    levels = len(downsamples) + 1
    layers = (n_input - 1 - len(downsamples)) // levels
    if layers < 1 or (n_input - 1 - len(downsamples)) % levels:
        raise ModelLoadError(f"{h.path.name}: UNet block layout not recognised")
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(shape(f"input_blocks.{first}.0.out_layers.3.weight")[0])
        depth = len(_indices(keys, rf"input_blocks\.{first}\.1\.transformer_blocks\.(\d+)\."))
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth)
    mid_depth = len(_indices(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    depths = [d or mid_depth for d in depths]
    up_types = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down_types)]
    attn_key = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.endswith(".proj_in.weight"))
    if family == "sd1":
        heads: Any = 8
    else:
        heads = [max(c // 64, 1) for c in channels]
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        # SD2 v-prediction models are the 768-pixel ones
        "sample_size": (96 if family == "sd2" and v_prediction else FAMILIES[family].native_size // 8),
        "in_channels": in_channels,
        "out_channels": shape("out.2.weight")[0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": shape(attn_key)[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(shape(proj_in)) == 2,
        "transformer_layers_per_block": depths,
        "norm_num_groups": 32,
    }
    if "label_emb.0.0.weight" in keys:
        cfg.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=shape("label_emb.0.0.weight")[1],
        )
    cfg.update(overrides or {})
    return cfg


def vae_config(h: SafetensorsHeader, family: str, prefix: str = "first_stage_model.",
               overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    keys = [k[len(prefix):] for k in h.tensors if k.startswith(prefix)]
    shape = lambda k: h.tensors[prefix + k].shape  # noqa: E731
    levels = _indices(keys, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelLoadError(f"{h.path.name}: VAE weights not found or not recognised")
    channels = [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels]
    layers = len(_indices(keys, r"encoder\.down\.0\.block\.(\d+)\."))
    cfg = vae_config_from(shape, channels, layers, family)
    cfg.update(overrides or {})
    return cfg


def vae_config_from(shape, channels: list[int], layers_per_block: int, family: str) -> dict[str, Any]:
    """An AutoencoderKL config from its widths; `shape(key)` reads the conv_in/conv_out shapes
    (those keys are the same in the LDM and diffusers layouts)."""
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "latent_channels": shape("decoder.conv_in.weight")[1],
        "norm_num_groups": 32,
        "sample_size": FAMILIES[family].native_size,
        "scaling_factor": FAMILIES[family].vae_scaling,
        "force_upcast": family.startswith("sdxl"),
    }


def text_encoder_config(h: SafetensorsHeader, prefix: str, layout: str, *, drop_last_layer: bool = False,
                        with_projection: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """CLIPTextConfig fields for an HF-layout CLIP or an OpenCLIP text tower."""
    keys = [k[len(prefix):] for k in h.tensors if k.startswith(prefix)]
    shape = lambda k: h.tensors[prefix + k].shape  # noqa: E731
    if layout == "hf":
        base = "text_model." if any(k.startswith("text_model.") for k in keys) else ""
        vocab, hidden = shape(base + "embeddings.token_embedding.weight")
        positions = shape(base + "embeddings.position_embedding.weight")[0]
        layers = len(_indices(keys, rf"{re.escape(base)}encoder\.layers\.(\d+)\."))
        intermediate = shape(base + "encoder.layers.0.mlp.fc1.weight")[0]
        act, projection = "quick_gelu", hidden
        if "text_projection.weight" in keys:
            projection = shape("text_projection.weight")[0]
    else:
        vocab, hidden = shape("token_embedding.weight")
        positions = shape("positional_embedding")[0]
        layers = len(_indices(keys, r"transformer\.resblocks\.(\d+)\."))
        intermediate = shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
        act = "gelu"
        projection = shape("text_projection")[1] if "text_projection" in keys else hidden
    if drop_last_layer:
        layers -= 1
    cfg: dict[str, Any] = {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 1),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "projection_dim": projection,
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    cfg.update(overrides or {})
    return cfg


def scheduler_config(v_prediction: bool) -> dict[str, Any]:
    """The training noise schedule shared by SD1, SD2 and SDXL."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if v_prediction else "epsilon",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "timestep_spacing": "leading",
    }
