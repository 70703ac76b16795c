"""ControlNet Union (xinsir's ControlNet++ for SDXL, and its promax variant): one model, many control types.

A union model is an SDXL ControlNet plus a few layers that are told which kind of map the hint is
(`task_embedding`, `control_add_embedding`, `transformer_layes`, `spatial_ch_projs`); diffusers runs it
as `ControlNetUnionModel`, whose forward takes a list of hints, their type indices and a 0/1 vector of
the types in use. Files come as diffusers folders (config.json `_class_name: ControlNetUnionModel`) or
as the single diffusers-keyed .safetensors users keep in models/ControlNet; the config is read from the
shapes as for plain ControlNets (darkroom.control.config) and the weights are loaded strictly.

Which type a unit asks for: its `union_control_type` (the extension's names, darkroom.control_unit),
or, left "Unknown", the type its preprocessor makes (canny -> Hard Edge, depth_* -> Depth, ...). The
extension runs an "Unknown" API unit with no type at all, which the model was not trained for; we pick
the type from the preprocessor, and refuse (naming the types) when the preprocessor does not say.
The extension writes no union type into infotexts, so neither do we.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from darkroom.control.config import Kind, controlnet_config, darkroom_fields, family_of
from darkroom.control.keys import ORIGINAL_MARKERS, ORIGINAL_PREFIX, original_to_diffusers
from darkroom.control_unit import UNION_CONTROL_TYPES, UNION_UNKNOWN
from darkroom.errors import InvalidRequest, ModelLoadError

UNION_CLASS = "ControlNetUnionModel"
UNION_PREFIXES = ("task_embedding", "control_type_proj", "control_add_embedding", "spatial_ch_projs",
                  "transformer_layes")
"""Tensors only a union model has (same names in diffusers' and the extension's layouts)."""
TRANS_HEADS = 8  # xinsir's value: head counts cannot be read from shapes (a darkroom_config may set it)

# preprocessor name prefixes -> the union type they make (first match wins); the others (none, invert,
# shuffle, color, recolor, threshold, reference) do not say which type their map is
_MODULE_TYPES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("openpose", "dw_openpose", "animal_openpose", "densepose"), "OpenPose"),
    (("depth",), "Depth"),
    (("softedge", "hed", "pidi", "scribble", "ted", "sketch"), "Soft Edge"),
    (("canny", "lineart", "mlsd"), "Hard Edge"),
    (("normal",), "Normal Map"),
    (("seg", "anime_face_segment"), "Segmentation"),
    (("tile", "blur"), "Tile"),
    (("inpaint",), "Inpaint"),
)


def is_union_keys(keys) -> bool:
    """Whether tensor names (any `control_model.` prefix removed) are a union model's."""
    return any(k.startswith(UNION_PREFIXES) for k in keys)


def _split(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the plain ControlNet's entries, the union layers' entries), prefix removed."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in state):
        state = {k[len(ORIGINAL_PREFIX):]: v for k, v in state.items() if k.startswith(ORIGINAL_PREFIX)}
    base = {k: v for k, v in state.items() if not k.startswith(UNION_PREFIXES)}
    extra = {k: v for k, v in state.items() if k.startswith(UNION_PREFIXES)}
    return base, extra


def diffusers_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """`state` (tensors or shapes) under `ControlNetUnionModel` names: an original-layout ControlNet part is
    renamed (the extension keeps the union layers' names as diffusers has them); ValueError if it cannot be."""
    base, extra = _split(state)
    if any(k.startswith(ORIGINAL_MARKERS) for k in base):
        base = original_to_diffusers(base)
    return {**base, **extra}


def union_kind(shapes: Mapping[str, tuple[int, ...]]) -> Kind:
    """The Kind of a file whose tensors are a union model's: supported for SDXL (the only family xinsir
    trained), with the layout of its ControlNet part."""
    base, _ = _split(shapes)
    layout = "original" if any(k.startswith(ORIGINAL_MARKERS) for k in base) else "diffusers"
    try:
        family = family_of(diffusers_state(shapes))
    except (ValueError, KeyError, StopIteration):
        return Kind(False, detail="a ControlNet Union model whose block layout is not recognised")
    if family != "sdxl":
        return Kind(False, detail="a ControlNet Union model that is not for SDXL")
    return Kind(True, layout, family, union=True)


def union_config(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> dict:
    """A `ControlNetUnionModel` config from diffusers-named `shapes`: the ControlNet part as config.py reads
    it, the union layers' widths and counts from their shapes; a full config in the metadata wins."""
    metadata = metadata or {}
    base = {k: v for k, v in shapes.items() if not k.startswith(UNION_PREFIXES)}
    cfg = controlnet_config(base, "sdxl", metadata)
    if metadata.get("config") and "num_control_type" in cfg:
        return cfg
    types, width = shapes["task_embedding"]
    layers = {m.group(1) for k in shapes if (m := re.match(r"transformer_layes\.(\d+)\.", k))}
    cfg.update(num_control_type=types, num_trans_channel=width, num_trans_layer=len(layers),
               num_proj_channel=shapes["spatial_ch_projs.weight"][0], num_trans_head=TRANS_HEADS,
               # the type vector's sinusoidal width: control_add_embedding takes it once per type
               addition_time_embed_dim=shapes["control_add_embedding.linear_1.weight"][1] // types)
    extra = darkroom_fields(metadata, "controlnet", ("num_trans_head",))
    if "num_trans_head" in extra:
        cfg["num_trans_head"] = int(extra["num_trans_head"])
    cfg.pop("global_pool_conditions", None)  # no union model pools (and a plain metadata flag must not leak)
    return cfg


def build_union(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str], name: str):
    """A `ControlNetUnionModel` from a single file's tensors, built on the meta device and loaded strictly."""
    from diffusers import ControlNetUnionModel

    try:
        state = diffusers_state(tensors)
        config = union_config({k: tuple(v.shape) for k, v in state.items()}, metadata)
    except (ValueError, KeyError, StopIteration) as e:
        raise ModelLoadError(f"{name}: the ControlNet Union model's layout is not recognised ({e})") from None
    try:
        with torch.device("meta"):
            model = ControlNetUnionModel(**config)
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{name}: the ControlNet Union model's weights do not fit its inferred layout"
                             f" ({first})") from None
    return model


def _folder_config(folder: Path) -> dict:
    try:
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def is_union_folder(folder: Path) -> bool:
    """A diffusers folder holding a union model: its class says so, or (configs saved as ControlNetModel)
    its config has the union fields."""
    cfg = _folder_config(folder)
    return cfg.get("_class_name") == UNION_CLASS or "num_control_type" in cfg


def load_union_folder(folder: Path, dtype: torch.dtype, variant: str | None):
    from diffusers import ControlNetUnionModel

    try:
        return ControlNetUnionModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                                    variant=variant, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:  # TypeError: a config missing fields
        raise ModelLoadError(f"{folder.name}: the diffusers ControlNet Union model could not be loaded ({e})") \
            from None


def is_union_model(model) -> bool:
    return type(model).__name__ == UNION_CLASS


def union_type_count(path: Path) -> int | None:
    """How many control types the union model at `path` knows (6, or 8 for promax), from its config or
    header; None when it is not a union model or cannot tell without loading (a pickle)."""
    path = Path(path)
    if path.is_dir():
        return _folder_config(path).get("num_control_type", 6) if is_union_folder(path) else None
    if path.suffix.lower() != ".safetensors":
        return None
    from darkroom.models.header import read_header

    tensors = read_header(path).tensors
    for key in ("task_embedding", ORIGINAL_PREFIX + "task_embedding"):
        if key in tensors:
            return int(tensors[key].shape[0])
    return None


def module_type(module: str) -> str | None:
    """The union type a preprocessor's map is (None: the preprocessor does not say)."""
    name = module.strip().lower()
    for prefixes, kind in _MODULE_TYPES:
        if name.startswith(prefixes):
            return kind
    return None


def type_index(requested: str, module: str, count: int, where: str, model: str) -> int:
    """The index of the control type a unit asks a union model for; InvalidRequest naming `where` when it
    is "Unknown" and its preprocessor does not say, or the model does not know that type."""
    kind = requested if requested != UNION_UNKNOWN else module_type(module)
    known = UNION_CONTROL_TYPES[:count]
    if kind is None:
        raise InvalidRequest(f"{where}: {model} is a ControlNet Union model and its preprocessor {module!r} does"
                             f" not say which control type the image is; set union_control_type to one of"
                             f" {', '.join(known)}")
    index = UNION_CONTROL_TYPES.index(kind)
    if index >= count:
        raise InvalidRequest(f"{where}: {model} knows {count} control types ({', '.join(known)}), not {kind}"
                             + (" (the promax variant adds Tile and Inpaint)" if count <= 6 else ""))
    return index


def union_index(loaded, requested: str, module: str, where: str, name: str) -> int | None:
    """The control type index a unit runs a loaded model with; None for a plain ControlNet (which, as in the
    extension, ignores the unit's union_control_type)."""
    if not is_union_model(loaded.model):
        return None
    return type_index(requested, module, int(loaded.model.config.num_control_type), where, name)


def check_union_unit(path: Path, requested: str, module: str, where: str, name: str) -> None:
    """A request's early check (before queueing): InvalidRequest when the unit's model is a union model and
    its control type is missing or unknown to it."""
    count = union_type_count(path)
    if count is not None:
        type_index(requested, module, count, where, name)


def run_union(model, type_index: int, sample: torch.Tensor, t, *, context: torch.Tensor, hint: torch.Tensor,
              guess_mode: bool, added: dict | None):
    """One union model call for one hint of type `type_index`: the residuals (down list, mid), unscaled
    (conditioning scale 1: the caller applies the unit's weight and mode, as for ControlNets)."""
    control_type = torch.zeros((sample.shape[0], model.config.num_control_type), dtype=sample.dtype,
                               device=sample.device)
    control_type[:, type_index] = 1
    return model(sample, t, encoder_hidden_states=context, controlnet_cond=[hint], control_type=control_type,
                 control_type_idx=[type_index], conditioning_scale=1.0, guess_mode=guess_mode,
                 added_cond_kwargs=added, return_dict=False)
