"""ControlNet key names: the original (lllyasviel / sd-webui-controlnet) single-file layout <-> diffusers.

The original ControlNet is a copy of the LDM UNet's encoder (`input_blocks`, `middle_block`,
`time_embed`, SDXL's `label_emb`) plus three parts of its own: `input_hint_block` (the
conditioning image's small conv stack, diffusers' `controlnet_cond_embedding`), `zero_convs`
(one 1x1 conv per encoder block, `controlnet_down_blocks`) and `middle_block_out`
(`controlnet_mid_block`). The UNet part reuses darkroom.models.ldm_unet_keys' tables, so the
ControlNet and the checkpoint loader can never disagree on a block's name.

Files name these keys with or without a `control_model.` prefix (the 1.0 release files also
hold a whole SD model under `model.diffusion_model.`, which is ignored).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from darkroom.models.ldm_unet_keys import _UNET_RESNET, _UNET_TOP, rename_first, unet_to_ldm

V = TypeVar("V")

ORIGINAL_PREFIX = "control_model."
# Parts only the original layout has: one of them present means an original-layout file.
ORIGINAL_MARKERS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
DIFFUSERS_MARKERS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")

_TOP_BACK = {v: k for k, v in _UNET_TOP.items() if not k.startswith("class_embedding")}
_RESNET_BACK = {v: k for k, v in _UNET_RESNET.items()}


def _hint_layers(config: Mapping) -> int:
    """How many convs the conditioning embedding has: conv_in, two per width step, conv_out."""
    return 2 * (len(config.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)) - 1) + 2


def controlnet_to_original(state_dict: Mapping[str, V], config: Mapping, prefix: str = ORIGINAL_PREFIX) -> dict[str, V]:
    """A diffusers `ControlNetModel` state dict -> the original layout (what the test builders write)."""
    unet_part: dict[str, V] = {}
    out: dict[str, V] = {}
    last_hint = 2 * (_hint_layers(config) - 1)
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "controlnet_down_blocks":
            out[f"{prefix}zero_convs.{parts[1]}.0.{parts[2]}"] = value
        elif parts[0] == "controlnet_mid_block":
            out[f"{prefix}middle_block_out.0.{parts[1]}"] = value
        elif parts[0] == "controlnet_cond_embedding":
            if parts[1] == "conv_in":
                index = 0
            elif parts[1] == "conv_out":
                index = last_hint
            else:  # blocks.j
                index = 2 * (int(parts[2]) + 1)
            out[f"{prefix}input_hint_block.{index}.{parts[-1]}"] = value
        else:
            unet_part[key] = value
    out.update(unet_to_ldm(unet_part, config, prefix=prefix))
    if len(out) != len(state_dict):
        raise ValueError("two ControlNet tensors mapped to the same original key")
    return out


def strip_original_prefix(keys: Mapping[str, V]) -> dict[str, V]:
    """The ControlNet's own keys without `control_model.`; a full SD model's other tensors are dropped."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in keys.items() if k.startswith(ORIGINAL_PREFIX)}
    return dict(keys)


def original_layers_per_block(keys) -> int:
    """Resnets per level of an original-layout encoder: input blocks (less conv_in and the
    downsamplers) over the levels (downsamplers + 1)."""
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    downs = {int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))}
    levels = len(downs) + 1
    resnets = len(blocks) - 1 - len(downs)
    if resnets < 1 or resnets % levels:
        raise ValueError("the ControlNet's input block layout is not recognised")
    return resnets // levels


def original_to_diffusers(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Original-layout keys (prefix already stripped) -> diffusers `ControlNetModel` keys.

    Block indices follow from the file's own structure (levels from its downsamplers, resnets
    per level from its block count), so any width or depth maps. Unknown keys raise ValueError.
    """
    layers = original_layers_per_block(state_dict)
    hint = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"input_hint_block\.(\d+)\.", k))})
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        head = parts[0]
        if head == "zero_convs":
            new = f"controlnet_down_blocks.{parts[1]}.{parts[3]}"
        elif head == "middle_block_out":
            new = f"controlnet_mid_block.{parts[2]}"
        elif head == "input_hint_block":
            index = int(parts[1])
            if index == hint[0]:
                name = "conv_in"
            elif index == hint[-1]:
                name = "conv_out"
            else:
                name = f"blocks.{index // 2 - 1}"
            new = f"controlnet_cond_embedding.{name}.{parts[-1]}"
        elif head == "input_blocks" and parts[1] == "0":
            new = "conv_in." + ".".join(parts[3:])
        elif head == "input_blocks":
            index = int(parts[1]) - 1
            level, j = divmod(index, layers + 1)
            rest = ".".join(parts[3:])
            if j == layers:  # the level's downsampler: input_blocks.k.0.op
                new = f"down_blocks.{level}.downsamplers.0.conv.{parts[-1]}"
            elif parts[2] == "0":
                new = f"down_blocks.{level}.resnets.{j}.{rename_first(rest, _RESNET_BACK, key)}"
            else:
                new = f"down_blocks.{level}.attentions.{j}.{rest}"
        elif head == "middle_block":
            index, rest = int(parts[1]), ".".join(parts[2:])
            if index == 1:
                new = f"mid_block.attentions.0.{rest}"
            else:
                new = f"mid_block.resnets.{index // 2}.{rename_first(rest, _RESNET_BACK, key)}"
        else:
            new = rename_first(key, _TOP_BACK, key)
        if new in out:
            raise ValueError(f"two ControlNet tensors map to {new!r}")
        out[new] = value
    return out
