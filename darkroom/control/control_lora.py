"""Control-LoRAs (Stability AI's control-lora-canny-rank128, -depth-rank256, recolor, sketch): a ControlNet
stored as low-rank differences from the UNet it is used with, built on the checkpoint of each generation.

The file layout (what Stability's control_lora_create writes and ComfyUI and the sd-webui-controlnet
extension read), original LDM names without a `control_model.` prefix:

- `lora_controlnet`: an empty tensor that marks the file.
- every encoder weight of 2+ dims the UNet has (convs, linears, time and label embeddings):
  `<module>.up` [out, r] ([out, r, 1, 1] for a conv) and `<module>.down` [r, in] ([r, in, kh, kw]); the
  ControlNet's weight is the UNet's plus up.flatten(1) @ down.flatten(1), reshaped to the weight's shape.
- 1-dim encoder tensors (biases, norms) and a full `.weight` where one is given: the ControlNet's own
  values, replacing the UNet's.
- the parts the UNet lacks (input_hint_block, zero_convs, middle_block_out): full weights.
An encoder tensor the file does not name is the UNet's own, as in both tools.

The base is the UNet of the checkpoint being generated with as it is at that moment, LoRAs merged (ComfyUI
builds on its patched model the same way); the ControlNet's architecture is that UNet's, with the hint
block's widths and input channels read from the file. A built Control-LoRA is cached per base (`BaseUNet.key`):
one built on checkpoint A is never used for checkpoint B.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from darkroom.control.config import FAMILY_LABELS, Kind, family_of
from darkroom.control.keys import original_to_diffusers
from darkroom.control.load import LoadedControlNet
from darkroom.errors import InvalidRequest, ModelLoadError

MARKER = "lora_controlnet"
LAYOUT = "control-lora"
_OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def full_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The file's shapes with each up/down pair as the `.weight` it stands for (marker dropped)."""
    out: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if key == MARKER or key.endswith(".up"):
            continue
        if key.endswith(".down"):
            stem = key[: -len(".down")]
            up = shapes.get(stem + ".up")
            if up is None:
                raise ValueError(f"{key} has no {stem}.up")
            out[stem + ".weight"] = (tuple(up)[0], *tuple(shape)[1:])
        else:
            out[key] = tuple(shape)
    return out


def classify_control_lora(shapes: Mapping[str, tuple[int, ...]]) -> Kind:
    """A Control-LoRA's kind: its family from the weights its pairs stand for (SDXL: the label embedding)."""
    try:
        family = family_of(original_to_diffusers(full_shapes(shapes)))
    except (ValueError, KeyError, StopIteration, IndexError):
        return Kind(False, detail="a Control-LoRA whose block layout is not recognised")
    return Kind(True, LAYOUT, family)


def parameter_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Parameters of the ControlNet a Control-LoRA builds (what it holds in memory, not the file's)."""
    return sum(math.prod(shape) for shape in full_shapes(shapes).values())


@dataclass(frozen=True)
class BaseUNet:
    """The checkpoint a Control-LoRA is built on: its UNet, read when one is built, and `key`, what
    identifies those weights (the file, this load of it, the LoRAs merged into it) for the cache."""

    unet: Any  # diffusers UNet2DConditionModel
    key: tuple
    name: str
    family: str


def base_of(model, loras: Iterable = ()) -> BaseUNet:
    """The base a Control-LoRA gets from a loaded checkpoint and the LoRA uses merged into it (LoraUse)."""
    path = Path(model.path)
    try:
        st = path.stat()
        stamp: tuple = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = ()
    merged = []
    for use in loras:
        weight = float(getattr(use, "unet", 0) or 0)
        if weight:
            lora_path = Path(use.lora.path)
            try:
                lora_stamp = lora_path.stat().st_mtime_ns
            except OSError:
                lora_stamp = 0
            merged.append((str(lora_path), lora_stamp, weight))
    # id(unet): this load of the file (a reload, e.g. with other placement or fp8 settings, is a new object)
    key = (str(path.resolve()), *stamp, id(model.unet), str(model.dtype), tuple(merged))
    return BaseUNet(model.unet, key, model.name, model.family.id)


def controlnet_config(unet_config: Mapping[str, Any], hint: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The ControlNetModel config of a Control-LoRA: the base UNet's (as diffusers' `from_unet` copies it),
    with the conditioning embedding's input channels and widths from the file's hint block."""
    from diffusers import ControlNetModel

    accepted = inspect.signature(ControlNetModel.__init__).parameters
    cfg = {k: v for k, v in dict(unet_config).items() if k in accepted and not k.startswith("_")}
    blocks = sorted(int(k.split(".")[2]) for k in hint if k.startswith("controlnet_cond_embedding.blocks.")
                    and k.endswith(".weight"))
    conv_in = hint["controlnet_cond_embedding.conv_in.weight"]
    widths = [conv_in[0]] + [hint[f"controlnet_cond_embedding.blocks.{j}.weight"][0] for j in blocks if j % 2 == 1]
    cfg.update(conditioning_channels=conv_in[1], conditioning_embedding_out_channels=tuple(widths),
               global_pool_conditions=False)
    return cfg


def build_control_lora(path: Path, tensors: dict[str, torch.Tensor], family: str, base: BaseUNet | None, *,
                       dtype: torch.dtype, device: str | torch.device = "cpu") -> LoadedControlNet:
    """The ControlNet of the Control-LoRA at `path` (its `tensors`, original names) on `base`'s UNet, in `dtype`
    on `device`, loaded strictly. Each weight is made once, straight in `dtype` (the delta added in float32,
    one layer at a time): no second full-precision copy of the encoder exists at any point."""
    from diffusers import ControlNetModel

    if base is None:
        raise InvalidRequest(f"{path.name} is a Control-LoRA: it is built on the checkpoint it is used with, so it"
                             " can only run in a generation")
    tensors = {k: v for k, v in tensors.items() if k != MARKER}
    try:
        named = original_to_diffusers(tensors)
    except ValueError as e:
        raise ModelLoadError(f"{path.name}: {e}") from None
    del tensors
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, value in named.items():
        stem, _, leaf = key.rpartition(".")
        if leaf in ("up", "down"):
            pairs.setdefault(stem + ".weight", {})[leaf] = value
        else:
            full[key] = value
    del named
    broken = [k for k, pair in pairs.items() if len(pair) != 2]
    if broken:
        raise ModelLoadError(f"{path.name}: the Control-LoRA's {broken[0]} has an up or a down factor but not both")
    try:
        config = controlnet_config(base.unet.config, {k: tuple(v.shape) for k, v in full.items()
                                                      if k.startswith("controlnet_cond_embedding.")})
        with torch.device("meta"):
            model = ControlNetModel(**config)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path.name}: the Control-LoRA's hint block is not recognised ({e})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted((set(full) | set(pairs)) - set(expected))
    if extra:
        raise ModelLoadError(f"{path.name}: the Control-LoRA has tensors its ControlNet does not ({extra[:3]})")
    base_state = base.unet.state_dict()
    target = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, shape in expected.items():
            given = full.pop(name, None)
            pair = pairs.pop(name, None)
            if given is not None:
                weight = given
            elif name.startswith(_OWN) or name not in base_state:
                raise ModelLoadError(f"{path.name}: the Control-LoRA has no {name}")
            else:
                weight = base_state[name]
            if tuple(weight.shape) != shape:
                raise _misfit(path, base, name, tuple(weight.shape), shape, given is None)
            if pair is None:
                # contiguous like any loaded ControlNet (the UNet's convs may be channels_last)
                state[name] = weight.to(device=target, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
                continue
            up = pair["up"].to(device=target, dtype=torch.float32).flatten(1)
            down = pair["down"].to(device=target, dtype=torch.float32).flatten(1)
            if up.shape[1] != down.shape[0] or up.shape[0] * down.shape[1] != weight.numel():
                raise _misfit(path, base, name, (up.shape[0], *pair["down"].shape[1:]), shape, False)
            delta = (up @ down).reshape(shape)
            del up, down, pair
            # out of place: `weight` may be the UNet's own tensor (same device and float32)
            state[name] = (weight.to(device=target, dtype=torch.float32) + delta).to(dtype).contiguous()
            del delta
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{path.name}: the Control-LoRA's weights do not fit its ControlNet ({first})") from None
    model.eval().requires_grad_(False)
    return LoadedControlNet(model, family, path, dtype, target, base_key=base.key)


def _misfit(path: Path, base: BaseUNet, name: str, got: tuple, want: tuple, from_unet: bool) -> InvalidRequest:
    """A Control-LoRA whose shapes do not fit the checkpoint's UNet: the user's pairing, not a damaged file."""
    label = FAMILY_LABELS.get(base.family, base.family)
    what = f"the checkpoint's {name} is {list(got)}" if from_unet else f"its {name} is {list(got)}"
    return InvalidRequest(f"{path.name} is a Control-LoRA that does not fit the checkpoint {base.name} ({label}):"
                          f" {what} where its ControlNet needs {list(want)}; use it with the SDXL checkpoint"
                          " it was made for (an inpainting UNet has other shapes)")
