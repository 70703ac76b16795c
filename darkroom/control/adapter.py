"""T2I-Adapters: small networks that turn a control map into features added inside the UNet's encoder.

An adapter runs once per control map, not at every step: its features depend on the map alone (not on
the latents, timestep or prompt), so a pass computes them once (the hires fix's pass again, from the map
at its size) and each UNet call adds them, scaled, as diffusers' `down_intrablock_additional_residuals`.

Layouts, all built as a diffusers `T2IAdapter` from a config read off the tensors' shapes:
- TencentARC's original files (the A1111 extension's `t2iadapter_*_sd14v1.pth`, `*_sd15v2`, zoedepth,
  `coadapter-{canny,sketch,depth,color}`): the full `Adapter` (`conv_in`, a flat `body.k` of resnet
  blocks, `nums_rb` per level, `in_conv` where the width changes; 1x1 `block2`, no skip convs, pooling
  without weights) and `Adapter_light` (color: `body.i.{in_conv,body.j,out_conv}`).
- diffusers' keys (`adapter.conv_in`, `adapter.body.i.resnets.j...`) in one file or in a folder with
  config.json (TencentARC/t2i-adapter-*-sdxl-1.0, t2iadapter_*_sd15v2).
The style adapter (its input is the CLIP vision tokens of a picture) is darkroom.control.vision_prompt's.
Refused with a reason: the CoAdapter fuser (it mixes several adapters' features; it takes no map), and
original variants diffusers' blocks cannot hold (3x3 `block2`, `skep` skip convs, strided-conv downsampling).

Family: the first conv's input width is channels x unshuffle factor^2: 64 or 192 (factor 8, SD1's full
and light adapters), 256 or 768 (factor 16, SDXL's FullAdapterXL, whose keys are otherwise SD1's). Our
tiny test files, whose widths no real file has, say factor and type in `darkroom_config` metadata.

Running follows the sd-webui-controlnet extension: both CFG halves get the features times the unit's
weight; soft injection ("My prompt is more important", or canny/mlsd in the hires pass) scales the
features by (0.25, 0.62, 0.825, 1.0) x weight; "ControlNet is more important" gives them to the prompt
half only; 1-channel adapters (sketch, canny) read the map's first channel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from darkroom.control.config import RUNS, Kind, darkroom_fields, metadata_config
from darkroom.control.load import LoadedControlNet
from darkroom.errors import InvalidRequest, ModelLoadError

ORIGINAL = "t2i-original"
DIFFUSERS = "t2i-diffusers"
ADAPTER_CLASSES = ("T2IAdapter",)
SOFT_SCALES = (0.25, 0.62, 0.825, 1.0)
"""The extension's per-feature factors of soft injection for adapters (shallow features damped most)."""
METADATA_FIELDS = ("downscale_factor", "adapter_type", "num_res_blocks")
"""What a `darkroom_config` {"t2i_adapter": {...}} entry may set: what shapes cannot tell (tiny files)."""
_FACTORS = {8: "sd1", 16: "sdxl"}
_TYPES = {"full_adapter": "sd1", "light_adapter": "sd1", "full_adapter_xl": "sdxl"}
FUSER = "a CoAdapter fuser (it mixes several CoAdapters' features and takes no control map)"
_CONTROLNET_MARKERS = ("controlnet_cond_embedding.", "input_hint_block.", "control_model.", "down_blocks.",
                       "input_blocks.", "lora_controlnet")
_PARTS = re.compile(r"(adapter\.)?body\.\d+\.(in_conv|out_conv|block1|block2|skep|down_opt|resnets|body\.\d+\.block)")
"""An adapter block's parts (an ESRGAN upscaler's `body.N.rdb1...` is not one)."""


def looks_like_adapter(keys) -> bool:
    """Whether tensor names are a T2I-Adapter's (any layout, style and fuser included), not a ControlNet's."""
    keys = list(keys)
    if any(k.startswith(_CONTROLNET_MARKERS) for k in keys):
        return False
    return any(k.startswith(("adapter.", "style_embedding", "fuser.", "spatial_feat_mapping.")) or _PARTS.match(k)
               for k in keys)


def _darkroom_fields(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        return darkroom_fields(metadata, "t2i_adapter", METADATA_FIELDS)
    except ValueError:  # only tiny test files carry it: a broken one is read by its shapes alone
        return {}


# --- key layouts ----------------------------------------------------------------------------------------------


def _indices(keys, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def is_light_original(keys) -> bool:
    return any(re.match(r"body\.\d+\.(body\.\d+\.|out_conv\.)", k) for k in keys)


def original_blocks_per_level(keys) -> int:
    """`nums_rb` of an original full adapter: level 0 keeps its width, so the first block with an
    `in_conv` (a width change) opens level 1. All released files have 2 (the fallback)."""
    changes = [k for k in _indices(keys, r"body\.(\d+)\.in_conv\.") if k > 0]
    return changes[0] if changes else 2


def original_to_diffusers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Original `Adapter` / `Adapter_light` keys -> diffusers `T2IAdapter` keys; ValueError for a variant
    diffusers' blocks cannot hold (named), or an unknown key."""
    out: dict[str, Any] = {}
    if is_light_original(state):
        for key, value in state.items():
            m = re.match(r"body\.(\d+)\.(?:(in_conv|out_conv)|body\.(\d+)\.(block1|block2))\.(weight|bias)$", key)
            if not m:
                raise ValueError(f"unexpected tensor {key!r} in a light T2I-Adapter")
            level, conv, j, block, what = m.groups()
            new = (f"adapter.body.{level}.{conv}.{what}" if conv
                   else f"adapter.body.{level}.resnets.{j}.{block}.{what}")
            out[new] = value
        return out
    if any(".skep." in k for k in state):
        raise ValueError("it has skip convolutions (`skep`, an Adapter trained with sk=False), which diffusers'"
                         " T2IAdapter does not have")
    if any(".down_opt." in k for k in state):
        raise ValueError("it downsamples with strided convolutions (use_conv=True), which diffusers'"
                         " T2IAdapter does not have")
    per_level = original_blocks_per_level(state)
    for key, value in state.items():
        if key.startswith("conv_in."):
            out[f"adapter.{key}"] = value
            continue
        m = re.match(r"body\.(\d+)\.(in_conv|block1|block2)\.(weight|bias)$", key)
        if not m:
            raise ValueError(f"unexpected tensor {key!r} in a T2I-Adapter")
        index, part, what = int(m.group(1)), m.group(2), m.group(3)
        level, r = divmod(index, per_level)
        if part == "in_conv":
            if r:
                raise ValueError(f"{key!r}: a width change inside a level, not a layout diffusers can hold")
            out[f"adapter.body.{level}.in_conv.{what}"] = value
        else:
            out[f"adapter.body.{level}.resnets.{r}.{part}.{what}"] = value
    return out


def diffusers_to_original(state: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """diffusers `T2IAdapter` keys -> the original layout (what the tiny test builders write)."""
    out: dict[str, Any] = {}
    light = config.get("adapter_type") == "light_adapter"
    per_level = int(config.get("num_res_blocks", 2))
    for key, value in state.items():
        rest = key.removeprefix("adapter.")
        m = re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.*)$", rest)
        if m is None:
            m2 = re.match(r"body\.(\d+)\.in_conv\.(.*)$", rest)
            new = f"body.{int(m2.group(1)) * per_level}.in_conv.{m2.group(2)}" if m2 and not light else rest
        elif light:
            new = f"body.{m.group(1)}.body.{m.group(2)}.{m.group(3)}"
        else:
            new = f"body.{int(m.group(1)) * per_level + int(m.group(2))}.{m.group(3)}"
        out[new] = value
    return out


# --- config and kind -------------------------------------------------------------------------------------------


def _factor(width: int, fields: Mapping[str, Any]) -> tuple[int, int]:
    """(unshuffle factor, map channels) from the first conv's input width (channels x factor^2)."""
    if "downscale_factor" in fields:
        factor = int(fields["downscale_factor"])
        if factor < 1 or width % (factor * factor):
            raise ValueError(f"input width {width} does not fit downscale factor {factor}")
        return factor, width // (factor * factor)
    for factor in (16, 8):
        if width % (factor * factor) == 0 and width // (factor * factor) in (1, 3):
            return factor, width // (factor * factor)
    raise ValueError(f"its input width {width} is none of a real adapter's (64/192: SD1, 256/768: SDXL)")


def adapter_config(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None
                   ) -> tuple[dict[str, Any], str]:
    """(`T2IAdapter` kwargs, family) from diffusers-named `shapes`; a whole config in the metadata wins."""
    full = metadata_config(metadata)
    if full is not None:
        family = _TYPES.get(full.get("adapter_type", "full_adapter"))
        if family is None:
            raise ValueError(f"unknown adapter_type {full.get('adapter_type')!r}")
        return full, family
    fields = _darkroom_fields(metadata)
    keys = list(shapes)
    levels = _indices(keys, r"adapter\.body\.(\d+)\.")
    if not levels:
        raise ValueError("no adapter blocks found")
    per_level = len(_indices(keys, r"adapter\.body\.0\.resnets\.(\d+)\."))
    if "adapter.conv_in.weight" in shapes:
        factor, channels_in = _factor(shapes["adapter.conv_in.weight"][1], fields)
        channels = [shapes[f"adapter.body.{i}.resnets.0.block1.weight"][0] for i in levels]
        kind = fields.get("adapter_type") or ("full_adapter_xl" if factor == 16 else "full_adapter")
        block2 = shapes[f"adapter.body.{levels[0]}.resnets.0.block2.weight"]
        if len(block2) == 4 and tuple(block2[2:]) != (1, 1):
            raise ValueError(f"its resnet blocks end in {block2[2]}x{block2[3]} convolutions (an Adapter with"
                             " ksize 3), which diffusers' T2IAdapter does not have")
    elif "adapter.body.0.out_conv.weight" in shapes:
        factor, channels_in = _factor(shapes["adapter.body.0.in_conv.weight"][1], fields)
        outs = [shapes[f"adapter.body.{i}.out_conv.weight"][0] for i in levels]
        if len(outs) < 2 or outs[-1] != outs[-2]:
            raise ValueError("its last two light blocks differ in width")
        channels, kind = outs[:-1], fields.get("adapter_type") or "light_adapter"
    else:
        raise ValueError("neither a full adapter's conv_in nor a light adapter's blocks found")
    family = _TYPES.get(kind) if "downscale_factor" in fields or "adapter_type" in fields else _FACTORS.get(factor)
    if family is None:
        raise ValueError(f"adapter type {kind!r} with downscale factor {factor} is not a known family's")
    return {"in_channels": channels_in, "channels": channels, "num_res_blocks": per_level,
            "downscale_factor": factor, "adapter_type": kind}, family


def diffusers_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`shapes` under diffusers names, whichever layout they are in (ValueError for an unknown one)."""
    if any(k.startswith("adapter.") for k in shapes):
        return dict(shapes)
    return original_to_diffusers(dict(shapes))


def adapter_kind(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> Kind | None:
    """The Kind of a T2I-Adapter file (the style model: darkroom.control.vision_prompt; a fuser: refused, with
    why); None when it is not an adapter."""
    keys = set(shapes)
    if not looks_like_adapter(keys):
        return None
    if "style_embedding" in keys:
        from darkroom.control.vision_prompt import style_kind  # vision_prompt.py builds on config, which imports us

        return style_kind(shapes, metadata)
    if any(k.startswith(("fuser.", "spatial_feat_mapping.", "task_embedding")) for k in keys):
        return Kind(False, detail=FUSER)
    layout = DIFFUSERS if any(k.startswith("adapter.") for k in keys) else ORIGINAL
    try:
        _, family = adapter_config(diffusers_shapes(shapes), metadata)
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return Kind(False, detail=f"a T2I-Adapter whose layout is not recognised ({e})")
    return Kind(True, layout, family)


def folder_kind(folder: Path) -> Kind:
    """The Kind of a diffusers T2IAdapter folder, from its config.json."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Kind(False, detail="a T2I-Adapter folder without a readable config.json")
    family = _TYPES.get(cfg.get("adapter_type", "full_adapter")) if isinstance(cfg, dict) else None
    if family is None:
        return Kind(False, detail="a T2I-Adapter of an unknown adapter_type")
    return Kind(True, DIFFUSERS, family)


# --- loading ---------------------------------------------------------------------------------------------------


@dataclass
class LoadedAdapter(LoadedControlNet):
    """A T2I-Adapter ready to run (model: a diffusers `T2IAdapter`); its features come from `features`."""

    is_adapter: ClassVar[bool] = True
    noun: ClassVar[str] = "T2I-Adapter"

    @property
    def in_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def downscale_factor(self) -> int:
        return int(self.model.config.downscale_factor)

    def features(self, hint: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
        """The adapter's features of `hint` ([1, 3, H, W] in [0, 1], at the pass's pixel size): a 1-channel
        adapter reads the first channel (the extension's rule); a side that is not a multiple of the unshuffle
        factor is padded (edge pixels repeated), so the features still have the UNet's (ceil-divided) sizes."""
        hint = hint.to(device=device, dtype=self.dtype)[:, :self.in_channels]
        f = self.downscale_factor
        pad_h, pad_w = -hint.shape[-2] % f, -hint.shape[-1] % f
        if pad_h or pad_w:
            hint = torch.nn.functional.pad(hint, (0, pad_w, 0, pad_h), mode="replicate")
        with torch.no_grad():
            return list(self.model(hint))


def _build(config: dict, state: Mapping[str, torch.Tensor], name: str):
    from diffusers import T2IAdapter

    try:
        with torch.device("meta"):
            model = T2IAdapter(**config)
        model.load_state_dict(dict(state), strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{name}: the T2I-Adapter's weights do not fit its inferred layout ({first})") from None
    return model


def refusal(name: str, detail: str) -> InvalidRequest:
    return InvalidRequest(f"{name} is {detail}; {RUNS}")


def load_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: Path, *,
                 dtype: torch.dtype, device) -> LoadedAdapter:
    """A LoadedAdapter from a single file's tensors (either layout) and metadata."""
    kind = adapter_kind({k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if kind is None or not kind.supported:
        raise refusal(path.name, kind.detail if kind else "not a T2I-Adapter")
    try:
        state = dict(tensors) if kind.layout == DIFFUSERS else original_to_diffusers(tensors)
        config, family = adapter_config({k: tuple(v.shape) for k, v in state.items()}, metadata)
    except (ValueError, KeyError, IndexError) as e:
        raise ModelLoadError(f"{path.name}: the T2I-Adapter's layout is not recognised ({e})") from None
    model = _build(config, state, path.name)
    return _ready(model, family, path, dtype, device)


def load_folder(folder: Path, *, dtype: torch.dtype, device, weight_names: tuple[str, ...]) -> LoadedAdapter:
    """A LoadedAdapter from a diffusers T2IAdapter folder (fp16 variant weights when only those are there)."""
    from diffusers import T2IAdapter

    kind = folder_kind(folder)
    if not kind.supported:
        raise refusal(folder.name, kind.detail)
    variant = None
    if not (folder / weight_names[0]).is_file() and (folder / weight_names[1]).is_file():
        variant = "fp16"
    try:
        model = T2IAdapter.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, variant=variant,
                                           use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{folder.name}: the diffusers T2I-Adapter could not be loaded ({e})") from None
    return _ready(model, kind.family, folder, dtype, device)


def _ready(model, family: str, path: Path, dtype: torch.dtype, device) -> LoadedAdapter:
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LoadedAdapter(model, family, path, dtype, torch.device(device))


# --- running ---------------------------------------------------------------------------------------------------


def unit_features(unit, device: torch.device) -> list[torch.Tensor]:
    """The unit's adapter features, computed once per pass (cached on the unit run; the hires pass's run is
    a new object with its own map)."""
    cached = getattr(unit, "_adapter_features", None)
    if cached is None or cached[0].device != device:
        cached = unit.controlnet.features(unit.hint, device)
        unit._adapter_features = cached
    return cached


def residuals(unit, x: torch.Tensor, *, n: int, uncond: bool, soft: bool) -> list[torch.Tensor]:
    """The unit's `down_intrablock_additional_residuals` for a UNet input `x` of the CFG batch layout
    (negative rows first when `uncond`): features x weight (x the soft factors when `soft`), every row, or
    the prompt rows only (zeros for the negative) for prompt-only units."""
    features = unit_features(unit, x.device)
    if unit.advanced is not None:  # advanced_weighting: the extension's factors in place of weight and mode
        scales = list(unit.advanced[:len(features)])
    else:
        scales = [unit.weight * s for s in SOFT_SCALES] if soft else []
        scales += [unit.weight] * (len(features) - len(scales))
    first = n if (unit.prompt_only and uncond) else 0
    rows = x.shape[0]
    out = []
    for feature, scale in zip(features, scales, strict=False):
        scaled = unit.in_region(feature * scale).to(x.dtype)  # effective_region_mask
        steered = scaled.expand(rows - first, -1, -1, -1)
        if first:
            steered = torch.cat([torch.zeros((first, *scaled.shape[1:]), dtype=x.dtype, device=x.device), steered])
        out.append(steered)
    return out
