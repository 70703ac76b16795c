"""LDM single-file state dict -> diffusers/transformers state dicts, per component.

UNet and VAE use diffusers' own converters (the mapping the whole field relies on); the
text encoders are mapped here because diffusers' OpenCLIP converter assumes the real
widths (it splits q/k/v by the projection width and drops resblock 23 by index).

Every value of the returned dicts is an input tensor or a view of one (renamed, sliced,
transposed; never copied): the loader runs these on meta stand-ins of a file's tensors and
reads each real tensor only when it fills it in (darkroom.models.loader._FileTensors).
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

Tensors = dict[str, torch.Tensor]


def unet_state_dict(ckpt: Tensors, config: dict) -> Tensors:
    return convert_ldm_unet_checkpoint(ckpt, config)


def vae_state_dict(ckpt: Tensors, config: dict, prefix: str = "first_stage_model.") -> Tensors:
    if prefix != "first_stage_model.":
        ckpt = {"first_stage_model." + k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
    return convert_ldm_vae_checkpoint(ckpt, config)


def hf_clip_state_dict(ckpt: Tensors, prefix: str) -> Tensors:
    """HF-layout CLIP under `prefix`, as `text_model.*` keys (old files lack `text_model.`)."""
    out: Tensors = {}
    for key, value in ckpt.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.endswith("position_ids"):
            continue
        if not name.startswith(("text_model.", "text_projection")):
            name = "text_model." + name
        out[name] = value
    return out


_OPENCLIP_RESBLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_state_dict(ckpt: Tensors, prefix: str, num_layers: int) -> Tensors:
    """OpenCLIP text tower -> HF CLIPTextModel(WithProjection) keys, first `num_layers` blocks."""
    out: Tensors = {}
    block = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
    hidden = ckpt[prefix + "token_embedding.weight"].shape[1]
    for key, value in ckpt.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif name == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif name.startswith("ln_final."):
            out["text_model.final_layer_norm." + name.split(".", 1)[1]] = value
        elif name == "text_projection":
            out["text_projection.weight"] = value.T  # a view: the loader copies it contiguous as it loads
        elif m := block.match(name):
            index, rest = int(m.group(1)), m.group(2)
            if index >= num_layers:
                continue
            base = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight or bias
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{base}self_attn.{proj}.{kind}"] = value[i * hidden:(i + 1) * hidden]  # views, as above
            else:
                for old, new in _OPENCLIP_RESBLOCK.items():
                    if rest.startswith(old + "."):
                        out[base + new + rest[len(old):]] = value
                        break
    return out


def fit_text_keys(model: torch.nn.Module, sd: Tensors) -> Tensors:
    """Match `text_model.` prefixes to what this transformers version's model expects."""
    wants_prefix = any(k.startswith("text_model.") for k in model.state_dict())
    if wants_prefix:
        return sd
    return {(k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in sd.items()}
