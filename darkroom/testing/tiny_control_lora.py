"""Tiny Control-LoRAs for tests: a tiny ControlNet whose encoder is a tiny checkpoint's UNet plus exact
low-rank differences, written in the real Control-LoRA layout (darkroom/control/control_lora.py).

The factors are rounded to the file's dtype before the ControlNet's weights are made from them, and every
full tensor is rounded the same way, so the full ControlNet returned is exactly what a correct loader builds
from the file in float32: tests can compare tensor by tensor and image by image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers is imported)
from darkroom.control.keys import controlnet_to_original
from darkroom.testing.tiny_controlnet import build_tiny_controlnet

MARKER = "lora_controlnet"
_OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


def build_tiny_control_lora(base_unet: Mapping[str, torch.Tensor], family: str = "sdxl", *, seed: int = 0,
                            rank: int = 4, dtype: torch.dtype = torch.float16):
    """(full ControlNetModel in float32, the Control-LoRA file's tensors) for the UNet state `base_unet`
    (diffusers names, e.g. tiny_model("sdxl")["state_dicts"]["unet"]).

    Each encoder weight of 2+ dims is base + up @ down (rank min(`rank`, out, in), as Stability's
    extraction), stored as `<ldm module>.up` [out, r] / `.down` [r, in] (convs [out, r, 1, 1] /
    [r, in, kh, kw]); 1-dim encoder tensors, the hint block, zero convs and middle block out are
    the ControlNet's own, stored in full; `lora_controlnet` is the empty marker. Tensors in `dtype`.
    """
    model = build_tiny_controlnet(family, seed=seed)
    generator = torch.Generator().manual_seed(7300 + seed)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith(_OWN) and param.dim() >= 2:
                out, inner = param.shape[0], param.shape[1]
                r = min(rank, out, inner)
                up = (torch.randn(out, r, generator=generator) * 0.2).to(dtype)
                down = (torch.randn(r, param[0].numel(), generator=generator) * 0.2).to(dtype)
                delta = (up.float() @ down.float()).reshape(param.shape)
                param.copy_(base_unet[name].float() + delta)
                if param.dim() == 4:
                    up, down = up.reshape(out, r, 1, 1), down.reshape(r, inner, *param.shape[2:])
                factors[name] = (up, down)
            else:
                param.copy_(param.to(dtype).float())  # what the file holds, exactly
    names = controlnet_to_original({k: k for k in model.state_dict()}, model.config, prefix="")
    tensors: dict[str, torch.Tensor] = {}
    for ldm, name in names.items():
        if name in factors:
            stem = ldm[: -len(".weight")]
            tensors[f"{stem}.up"], tensors[f"{stem}.down"] = (t.contiguous() for t in factors[name])
        else:
            tensors[ldm] = model.state_dict()[name].to(dtype).contiguous()
    tensors[MARKER] = torch.tensor([])
    return model.eval(), tensors


def write_tiny_control_lora(folder: str | Path, name: str, base_unet: Mapping[str, torch.Tensor],
                            family: str = "sdxl", *, seed: int = 0, rank: int = 4,
                            dtype: torch.dtype = torch.float16, deltas: bool = True):
    """Write `name`.safetensors, a Control-LoRA on `base_unet`, into `folder`; returns (path, the full
    ControlNetModel it stands for). `deltas` False writes zero differences (a file that is the base UNet's
    encoder as it is: what a loader that ignored the deltas would build)."""
    from safetensors.torch import save_file

    model, tensors = build_tiny_control_lora(base_unet, family, seed=seed, rank=rank, dtype=dtype)
    if not deltas:  # zero up factors: the pairs (and the shapes they tell) stay, the differences go
        tensors = {k: torch.zeros_like(v) if k.endswith(".up") else v for k, v in tensors.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path, model


def write_full_controlnet(folder: str | Path, name: str, model, *, layout: str = "diffusers-single") -> Path:
    """Write a built ControlNetModel as an ordinary ControlNet: one file with diffusers keys and its config
    ("diffusers-single"), or a diffusers folder ("diffusers"); returns the file or folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        target = folder / name
        model.save_pretrained(str(target), safe_serialization=True)
        return target
    if layout != "diffusers-single":
        raise ValueError(f"unknown layout {layout!r}")
    from safetensors.torch import save_file

    path = folder / f"{name}.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(json.loads(model.to_json_string()))})
    return path
