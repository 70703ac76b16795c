"""Tiny random LoRA files for tests, in the real key layouts users' files have.

`write_tiny_lora` writes a LoRA for one of the tiny models of `darkroom.testing.tiny` (or a
loaded model): kohya-ss / CivitAI keys (`lora_unet_*` with diffusers-style or LDM-style
layer names, `lora_te_*` / `lora_te1_*` / `lora_te2_*`, `.lora_down.weight`,
`.lora_up.weight`, `.alpha`, LoCon convolutions with a 3x3 `down` or a `lora_mid` CP core)
or diffusers/PEFT keys (`unet.<module>.lora_A.weight`, `text_encoder.text_model.<module>
.lora_B.weight`, alpha in `lora_adapter_metadata`). Unlike a freshly initialised LoRA its
`up` matrices are not zero, so it changes what the model generates.

The matrices depend only on `seed`, `rank`, the model and the chosen layers (not on the
format or the naming), so a kohya and a PEFT file written with the same arguments hold
the same LoRA.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers/transformers)
from darkroom.testing.ldm_export import unet_to_ldm

# target layers (module paths; text-encoder paths without `text_model.`)
_UNET_LINEAR = re.compile(
    r"attentions\.\d+\.(transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
    r"|proj_in|proj_out)$"
)
_UNET_CONV = re.compile(r"(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$")
_TEXT = re.compile(r"^encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")

# ss_base_model_version as kohya's sd-scripts write it
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "sdxl-refiner": "sdxl_refiner_v1-0"}


def _weight_shapes(state_dict: dict[str, Any], *, text: bool) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight") and len(value.shape) in (2, 4):
            path = key[: -len(".weight")]
            out[path.removeprefix("text_model.") if text else path] = tuple(value.shape)
    return out


def _source(model: Any) -> tuple[str, dict[str, dict[str, tuple[int, ...]]], dict]:
    """(family, {component: {module path: weight shape}}, unet config) of a build_tiny_checkpoint
    result or a LoadedModel."""
    if isinstance(model, dict):
        family, sds, unet_config = model["family"], model["state_dicts"], dict(model["configs"]["unet"])
        encoders = {"te1": sds.get("text_encoder"), "te2": sds.get("text_encoder_2")}
        unet = sds["unet"]
    else:
        family, unet, unet_config = model.family.id, model.unet.state_dict(), dict(model.unet.config)
        encs = [slot.model.state_dict() for slot in model.text_encoders]
        if family == "sdxl-refiner":
            encoders = {"te1": None, "te2": encs[0]}
        else:
            encoders = {"te1": encs[0], "te2": encs[1] if len(encs) > 1 else None}
    shapes = {"unet": _weight_shapes(unet, text=False)}
    for component, sd in encoders.items():
        if sd is not None:
            shapes[component] = _weight_shapes(sd, text=True)
    return family, shapes, unet_config


def _kohya_prefix(component: str, family: str) -> str:
    if component == "unet":
        return "lora_unet_"
    if family.startswith("sdxl"):
        return "lora_te1_" if component == "te1" else "lora_te2_"
    return "lora_te_"


def write_tiny_lora(
    path: str | Path,
    model: Any,
    *,
    family: str | None = None,
    fmt: str = "kohya",
    rank: int = 4,
    alpha: float | None = 2.0,
    seed: int = 0,
    include_te: bool = True,
    include_unet: bool = True,
    conv: bool = True,
    tucker: bool = False,
    naming: str = "diffusers",
    strength: float = 0.05,
    dtype: torch.dtype = torch.float32,
    base_model_version: bool | str = False,
    tag_frequency: dict[str, dict[str, int]] | None = None,
    output_name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> dict:
    """Write a random LoRA for `model` (a `build_tiny_checkpoint` result or a LoadedModel).

    - fmt "kohya": `lora_unet_` + underscored layer names, `naming` "diffusers"
      (`down_blocks_0_attentions_0_...`, as kohya writes SD1 LoRAs) or "ldm"
      (`input_blocks_1_1_...`, as kohya writes SDXL LoRAs); text encoders `lora_te_`
      (SD1/SD2) or `lora_te1_`/`lora_te2_` (SDXL); `.alpha` unless `alpha` is None.
      fmt "peft": diffusers' PEFT keys, alpha in `lora_adapter_metadata`.
    - Layers: attention q/k/v/out, feed-forward, proj_in/proj_out; with `conv` also the
      resnet convolutions, time-embedding projections and down/up-samplers (LoCon, 3x3
      `down`; `tucker`: 1x1 `down` and a 3x3 `lora_mid` core); text encoders q/k/v/out
      and the MLP (`include_te`).
    - `family` only names the key prefixes and metadata (default: the model's).
    - Metadata: `ss_network_dim`/`ss_network_alpha` (kohya), `ss_base_model_version`
      (True: kohya's value for the family), `ss_tag_frequency`, `ss_output_name`, plus
      `metadata`.

    Returns {"path", "family", "modules": {(component, module path): {"key", "down", "up",
    "mid", "alpha"}}, "tensors", "metadata"}; text-encoder module paths without `text_model.`.
    """
    if fmt not in ("kohya", "peft"):
        raise ValueError(f"fmt must be 'kohya' or 'peft', not {fmt!r}")
    if naming not in ("diffusers", "ldm"):
        raise ValueError(f"naming must be 'diffusers' or 'ldm', not {naming!r}")
    if fmt == "peft" and (naming == "ldm" or tucker):
        raise ValueError("PEFT files use diffusers names and plain LoRA layers only")
    model_family, shapes, unet_config = _source(model)
    family = family or model_family

    targets: list[tuple[str, str, tuple[int, ...]]] = []
    if include_unet:
        for p, shape in shapes["unet"].items():
            if _UNET_LINEAR.search(p) or (conv and _UNET_CONV.search(p)):
                targets.append(("unet", p, shape))
    if include_te:
        for component in ("te1", "te2"):
            for p, shape in shapes.get(component, {}).items():
                if _TEXT.match(p):
                    targets.append((component, p, shape))
    targets.sort()
    ldm_names: dict[str, str] = {}
    if naming == "ldm":
        keys = [p + ".weight" for p in shapes["unet"]]
        ldm = unet_to_ldm({k: k for k in keys}, unet_config, prefix="")
        ldm_names = {d[: -len(".weight")]: lk[: -len(".weight")] for lk, d in ldm.items()}

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[tuple[str, str], dict] = {}
    for component, p, shape in targets:
        out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
        mid = None
        if kernel:
            k = kernel if not (tucker and kernel != (1, 1)) else (1, 1)
            down = torch.randn(rank, in_dim, *k, generator=generator) / (in_dim * k[0] * k[1]) ** 0.5
            if tucker and kernel != (1, 1):
                mid = torch.randn(rank, rank, *kernel, generator=generator) / (rank * kernel[0] * kernel[1]) ** 0.5
            up = torch.randn(out_dim, rank, 1, 1, generator=generator) * strength
        else:
            down = torch.randn(rank, in_dim, generator=generator) / in_dim**0.5
            up = torch.randn(out_dim, rank, generator=generator) * strength
        down, up = down.to(dtype), up.to(dtype)
        mid = mid.to(dtype) if mid is not None else None
        if fmt == "kohya":
            if component == "unet":
                name = _kohya_prefix(component, family) + ldm_names.get(p, p).replace(".", "_")
            else:
                name = _kohya_prefix(component, family) + "text_model_" + p.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            if mid is not None:
                tensors[f"{name}.lora_mid.weight"] = mid
            if alpha is not None:
                tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        else:
            prefix = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}[component]
            name = prefix + (p if component == "unet" else "text_model." + p)
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up
        modules[(component, p)] = {"key": name, "down": down, "up": up, "mid": mid, "alpha": alpha}

    meta: dict[str, str] = {}
    if fmt == "kohya":
        meta |= {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
        if alpha is not None:
            meta["ss_network_alpha"] = str(float(alpha))
    elif alpha is not None:
        present = {c for c, _, _ in targets}
        names = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
        adapter = {}
        for c in sorted(present):
            adapter |= {f"{names[c]}.r": rank, f"{names[c]}.lora_alpha": alpha}
        meta["lora_adapter_metadata"] = json.dumps(adapter, sort_keys=True)
    if base_model_version:
        meta["ss_base_model_version"] = (
            base_model_version if isinstance(base_model_version, str) else BASE_MODEL_VERSION[family]
        )
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = json.dumps(tag_frequency)
    if output_name is not None:
        meta["ss_output_name"] = output_name
    meta |= metadata or {}

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return {"path": path, "family": family, "modules": modules, "tensors": tensors, "metadata": meta}
