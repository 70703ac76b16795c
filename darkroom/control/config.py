"""What a ControlNet file is, and its diffusers config, from tensor names and shapes alone.

Nothing is fetched and no weights are read: the layout (original or diffusers keys), the
family (SD1/SD2/SDXL) and every width and depth come from the header (or, for a pickle, from
the tensors' shapes once loaded). What shapes cannot tell comes from the family's known values
(SD1 uses 8 attention heads, SD2/SDXL 64-channel heads, SDXL 256-wide time ids), or from the
file's metadata: a full diffusers config under "config" (our starter ControlNet), or the few
fields of a `darkroom_config` entry {"controlnet": {...}} (our tiny test files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from darkroom.control.keys import DIFFUSERS_MARKERS, ORIGINAL_MARKERS, ORIGINAL_PREFIX, original_to_diffusers

Shapes = Mapping[str, tuple[int, ...]]

FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL-refiner"}
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
METADATA_FIELDS = {"attention_head_dim", "num_attention_heads", "norm_num_groups", "addition_time_embed_dim",
                   "global_pool_conditions", "conditioning_channels"}
"""What a `darkroom_config` entry may set: what shapes cannot tell."""

RUNS = "only ControlNets, T2I-Adapters, ControlNet-LLLite models and IP-Adapters are supported"
"""The end of every refusal of a control model."""

# (detail, probe on the key names) for control models this version does not run; first match wins.
UNSUPPORTED: list[tuple[str, Any]] = [
    # marked Control-LoRAs are built (control_lora.py); up/down pairs without the marker are a LoRA or a damaged one
    ("a Control-LoRA without its 'lora_controlnet' marker",
     lambda keys: any(k.endswith((".up", ".down")) for k in keys)),
    ("a 'difference' ControlNet (it must be merged into its base model first)", lambda keys: "difference" in keys),
]


@dataclass(frozen=True)
class Kind:
    """What a file holds: `supported` ControlNets have a `layout` ("original"/"diffusers"; T2I-Adapters
    "t2i-original"/"t2i-diffusers", darkroom.control.adapter) and a family."""

    supported: bool
    layout: str | None = None
    family: str | None = None
    detail: str = ""
    union: bool = False  # a ControlNet Union model (darkroom.control.union)

    @property
    def label(self) -> str:
        if not self.supported:
            return self.detail
        return f"{FAMILY_LABELS.get(self.family or '', '?')} {self.noun}"

    @property
    def noun(self) -> str:
        """What messages call it: ControlNet, T2I-Adapter, ControlNet-LLLite or IP-Adapter."""
        if (self.layout or "").startswith("t2i-"):
            return "T2I-Adapter"
        return {"lllite": "ControlNet-LLLite", "ip-adapter": "IP-Adapter"}.get(self.layout or "", "ControlNet")


def own_keys(keys) -> list[str]:
    """The ControlNet's keys with any `control_model.` prefix removed (other tensors dropped)."""
    keys = list(keys)
    if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
        return [k[len(ORIGINAL_PREFIX):] for k in keys if k.startswith(ORIGINAL_PREFIX)]
    return keys


def classify(shapes: Shapes, metadata: Mapping[str, str] | None = None) -> Kind:
    """The kind of control model `shapes` (every tensor name -> shape of a file) describe; `metadata` (the
    file's) only tells our tiny T2I-Adapters' unshuffle factor, which no real adapter needs."""
    from darkroom.control.adapter import adapter_kind  # adapter.py builds on this module

    adapter = adapter_kind(shapes, metadata)  # first: the style adapter and CoAdapter fuser share union names
    if adapter is not None:
        return adapter
    keys = own_keys(shapes)
    names = set(keys)
    from darkroom.control.union import is_union_keys, union_kind  # union.py builds on this module

    if is_union_keys(names):
        return union_kind(shapes)
    from darkroom.control.ipadapter import ipadapter_kind  # ipadapter.py builds on this module
    from darkroom.control.lllite import lllite_kind  # lllite.py builds on this module

    for probe in (lllite_kind(shapes), ipadapter_kind(shapes, metadata)):
        if probe is not None:
            return probe
    if "lora_controlnet" in names:  # a Control-LoRA: low-rank differences from the checkpoint's UNet
        from darkroom.control.control_lora import classify_control_lora  # control_lora.py builds on this module

        return classify_control_lora(shapes)
    for detail, probe in UNSUPPORTED:
        if probe(names):
            return Kind(False, detail=detail)
    if any(k.startswith(ORIGINAL_MARKERS) for k in keys):
        layout = "original"
    elif any(k.startswith(DIFFUSERS_MARKERS) for k in keys):
        layout = "diffusers"
    else:
        return Kind(False, detail="not a ControlNet")
    try:
        family = family_of(diffusers_shapes(shapes, layout))
    except (ValueError, KeyError, StopIteration):
        return Kind(False, detail="a ControlNet whose block layout is not recognised")
    return Kind(True, layout, family)


def diffusers_shapes(shapes: Shapes, layout: str) -> dict[str, tuple[int, ...]]:
    """`shapes` under diffusers `ControlNetModel` names (original names renamed, prefix removed)."""
    if layout == "diffusers":
        return dict(shapes)
    own = {k[len(ORIGINAL_PREFIX):]: v for k, v in shapes.items() if k.startswith(ORIGINAL_PREFIX)}
    return original_to_diffusers(own or dict(shapes))


def family_of(shapes: Shapes) -> str:
    """SDXL has the text-time `add_embedding`; otherwise the text context width says SD1 (768) or SD2
    (1024), and for other widths (tiny test models) the projection does: SD2's is linear, SD1's a conv."""
    if "add_embedding.linear_1.weight" in shapes:
        return "sdxl"
    context = next(v for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))[1]
    if context in _CONTEXT_FAMILY:
        return _CONTEXT_FAMILY[context]
    proj_in = next(v for k, v in shapes.items() if k.endswith(".proj_in.weight"))
    return "sd2" if len(proj_in) == 2 else "sd1"


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def metadata_config(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """A diffusers config stored whole in a file's "config" metadata (our diffusers-keyed single files, the
    starter ControlNet), without its private `_` fields; None when there is none."""
    raw = (metadata or {}).get("config")
    if not raw:
        return None
    try:
        full = json.loads(raw)
    except ValueError:
        raise ValueError("its 'config' metadata is not valid JSON") from None
    if not isinstance(full, dict):
        raise ValueError("its 'config' metadata is not a JSON object")
    return {k: v for k, v in full.items() if not k.startswith("_")}


def darkroom_fields(metadata: Mapping[str, str] | None, section: str, allowed) -> dict[str, Any]:
    """The `allowed` fields of a tiny test file's `darkroom_config` {section: {...}} metadata: what its
    shapes cannot tell (real files have none)."""
    raw = (metadata or {}).get("darkroom_config")
    if not raw:
        return {}
    try:
        extra = (json.loads(raw) or {}).get(section) or {}
    except (ValueError, AttributeError):
        raise ValueError("its darkroom_config metadata is not valid JSON") from None
    return {k: v for k, v in extra.items() if k in allowed}


def controlnet_config(shapes: Shapes, family: str, metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A `ControlNetModel` config from diffusers-named `shapes`; a full config in the metadata wins."""
    metadata = metadata or {}
    full = metadata_config(metadata)
    if full is not None:
        return full
    keys = list(shapes)
    levels = _indices(keys, r"down_blocks\.(\d+)\.")
    if not levels:
        raise ValueError("no down blocks found")
    layers = len(_indices(keys, r"down_blocks\.0\.resnets\.(\d+)\."))
    channels, down_types, depths = [], [], []
    for level in levels:
        channels.append(shapes[f"down_blocks.{level}.resnets.0.conv2.weight"][0])
        depth = len(_indices(keys, rf"down_blocks\.{level}\.attentions\.0\.transformer_blocks\.(\d+)\."))
        down_types.append("CrossAttnDownBlock2D" if depth else "DownBlock2D")
        depths.append(depth)
    mid_depth = len(_indices(keys, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")) or 1
    depths = [d or mid_depth for d in depths]
    attn_key = next(k for k in keys if k.endswith("attn2.to_k.weight"))
    proj_in = next(k for k in keys if k.endswith(".proj_in.weight"))
    hint = _indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    hint_channels = [shapes["controlnet_cond_embedding.conv_in.weight"][0]]
    hint_channels += [shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0] for j in hint if j % 2 == 1]
    cfg: dict[str, Any] = {
        "in_channels": shapes["conv_in.weight"][1],
        "conditioning_channels": shapes["controlnet_cond_embedding.conv_in.weight"][1],
        "conditioning_embedding_out_channels": hint_channels,
        "down_block_types": down_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": shapes[attn_key][1],
        "attention_head_dim": 8 if family == "sd1" else [max(c // 64, 1) for c in channels],
        "use_linear_projection": len(shapes[proj_in]) == 2,
        "transformer_layers_per_block": depths,
        "norm_num_groups": 32,
    }
    if "add_embedding.linear_1.weight" in shapes:
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                   projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    cfg.update(darkroom_fields(metadata, "controlnet", METADATA_FIELDS))
    return cfg


def yaml_global_pooling(text: str) -> bool:
    """Whether an original ControlNet's .yaml beside it asks for global average pooling (the shuffle model)."""
    return bool(re.search(r"global_average_pooling:\s*(true|True)", text))
