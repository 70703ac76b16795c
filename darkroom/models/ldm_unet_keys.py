"""Diffusers UNet key names -> the single-file "LDM" (CompVis/SGM) names, `model.diffusion_model.*`.

LoRAs trained with kohya's scripts name UNet layers by their LDM path (`lora_unet_input_blocks_4_1_...`),
so matching one against a loaded diffusers UNet needs this mapping at run time
(darkroom.engine.lora_formats). The test builders' LDM export (darkroom.testing.ldm_export) uses
it too, for the other direction of the round trip the loader is tested on.

Indices are computed from the key structure and the UNet's `layers_per_block`, not from
hard-coded SD1 block counts, so any number of levels, resnets per level and transformer
depths work. A key the mapping does not know raises `ValueError`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")

UNET_PREFIX = "model.diffusion_model."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL "text_time" and SD2-unCLIP "projection" embeddings share LDM's label_emb.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",  # upscaler: nn.Embedding(num_class_embeds)
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def rename_first(rest: str, table: Mapping[str, str], key: str) -> str:
    """Rename the leading module path of `rest` (e.g. "norm1.weight") through `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    raise ValueError(f"no LDM name known for {key!r}")


def _per_level(value: int | list[int] | tuple[int, ...], levels: int) -> list[int]:
    return [value] * levels if isinstance(value, int) else list(value)


def unet_to_ldm(
    state_dict: Mapping[str, V], config: Mapping, prefix: str = UNET_PREFIX
) -> dict[str, V]:
    """Map a `UNet2DConditionModel` state dict to `model.diffusion_model.*` keys.

    LDM numbers the UNet's modules as one flat `input_blocks` list (conv_in, then per
    level `layers_per_block` resnet[+attention] blocks and a downsampler) and one flat
    `output_blocks` list (per level `layers_per_block + 1` blocks, the last also holding
    the upsampler at position 1, or 2 when the block has an attention). The indices are
    derived from `config["block_out_channels"]` and `config["layers_per_block"]`.
    """
    levels = len(config["block_out_channels"])
    down_layers = _per_level(config["layers_per_block"], levels)
    up_layers = [n + 1 for n in reversed(down_layers)]
    down_start, start = [], 1
    for i, n in enumerate(down_layers):
        down_start.append(start)
        start += n + (1 if i < levels - 1 else 0)
    up_start, start = [], 0
    for n in up_layers:
        up_start.append(start)
        start += n
    up_attn = re.compile(r"up_blocks\.(\d+)\.attentions\.")
    up_has_attn = {int(m.group(1)) for k in state_dict if (m := up_attn.match(k))}
    mid_has_attn = any(k.startswith("mid_block.attentions.") for k in state_dict)

    out: dict[str, V] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and parts[2] in ("resnets", "attentions"):
            level, kind, j = int(parts[1]), parts[2], int(parts[3])
            rest = ".".join(parts[4:])
            if parts[0] == "down_blocks":
                block = f"input_blocks.{down_start[level] + j}"
            else:
                block = f"output_blocks.{up_start[level] + j}"
            if kind == "resnets":
                new = f"{block}.0.{rename_first(rest, _UNET_RESNET, key)}"
            else:
                new = f"{block}.1.{rest}"
        elif parts[0] == "down_blocks" and parts[2:5] == ["downsamplers", "0", "conv"]:
            level = int(parts[1])
            new = f"input_blocks.{down_start[level] + down_layers[level]}.0.op.{parts[5]}"
        elif parts[0] == "up_blocks" and parts[2:5] == ["upsamplers", "0", "conv"]:
            level = int(parts[1])
            block = up_start[level] + up_layers[level] - 1
            new = f"output_blocks.{block}.{2 if level in up_has_attn else 1}.conv.{parts[5]}"
        elif parts[0] == "mid_block" and parts[1] in ("resnets", "attentions"):
            j, rest = int(parts[2]), ".".join(parts[3:])
            if parts[1] == "resnets":
                index = 2 * j if mid_has_attn else j
                new = f"middle_block.{index}.{rename_first(rest, _UNET_RESNET, key)}"
            else:
                new = f"middle_block.{2 * j + 1}.{rest}"
        else:
            new = rename_first(key, _UNET_TOP, key)
        out[prefix + new] = value
    if len(out) != len(state_dict):
        raise ValueError("two UNet tensors mapped to the same LDM key")
    return out
