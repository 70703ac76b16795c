"""Diffusers-layout state dicts -> the single-file "LDM" (CompVis/SGM) key layout.

Users' checkpoints are single `.safetensors` files in the layout the original training
code wrote and that AUTOMATIC1111, Forge and ComfyUI load (see
`/work/shared/reference/model-formats.md`). To test our loader on every family without
multi-GB downloads we write tiny random models in exactly that layout; this module is the
inverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint`, so that a file we write
converts back, through diffusers' own code, to the very tensors we started from.

The UNet's mapping lives in darkroom.models.ldm_unet_keys, because the runtime needs it too
(LoRA layer names); this module adds the VAE, the text encoders, EMA, the schedule buffers and
whole files. Keys a mapping does not know raise `ValueError`: a silently dropped tensor
would make a test pass on a file no real tool would load.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from darkroom.models.ldm_unet_keys import UNET_PREFIX, rename_first, unet_to_ldm

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")

VAE_PREFIX = "first_stage_model."
EMA_PREFIX = "model_ema."
# HF-layout CLIP-L (the `transformer` of LDM's FrozenCLIPEmbedder / SGM's embedder 0).
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
# open_clip-layout text towers (FrozenOpenCLIPEmbedder(2)'s `model`).
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
# The refiner has only the bigG tower, so it is embedder 0 there.
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

# Trained CLIP models end with logit_scale clamped at ln(100); it is unused by SD.
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

_VAE_TOP = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_out": "encoder.conv_out",
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_out": "decoder.conv_out",
    "decoder.conv_norm_out": "decoder.norm_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


# --------------------------------------------------------------------------- UNet (EMA)


def ema_to_ldm(
    ldm_unet: Mapping[str, Tensor], *, decay: float = 0.9999, num_updates: int = 0
) -> StateDict:
    """`model_ema.*` buffers as LDM/SGM's `LitEma` saves them.

    LitEma registers one buffer per trainable parameter of `model` (the DiffusionWrapper)
    named with the dots removed: `model.diffusion_model.input_blocks.0.0.weight` becomes
    `model_ema.diffusion_modelinput_blocks00weight` (diffusers' `extract_ema` builds the
    same name), plus `model_ema.decay` (float32) and `model_ema.num_updates` (int32).
    """
    out: StateDict = {
        EMA_PREFIX + "decay": torch.tensor(decay, dtype=torch.float32),
        EMA_PREFIX + "num_updates": torch.tensor(num_updates, dtype=torch.int32),
    }
    for key, value in ldm_unet.items():
        if not key.startswith(UNET_PREFIX):
            raise ValueError(f"not an LDM UNet key: {key!r}")
        flat = EMA_PREFIX + "".join(key.split(".")[1:])
        if flat in out:
            raise ValueError(f"EMA name collision on {flat!r}")
        out[flat] = value
    return out


# --------------------------------------------------------------------------- VAE


def vae_to_ldm(
    state_dict: Mapping[str, Tensor], prefix: str = VAE_PREFIX, *, conv_attention: bool = True
) -> StateDict:
    """Map an `AutoencoderKL` state dict to `first_stage_model.*` keys.

    The decoder's levels run the other way round in LDM (`decoder.up.{n-1-i}` is
    diffusers' `up_blocks.{i}`). LDM's mid-block attention uses 1x1 convolutions, so with
    `conv_attention` (what real SD files hold) q/k/v/proj_out weights become [C, C, 1, 1].
    """
    levels = 1 + max(
        int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks.")
    )
    out: StateDict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        coder = parts[0]
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            i = int(parts[2])
            stage = f"down.{i}" if parts[1] == "down_blocks" else f"up.{levels - 1 - i}"
            if parts[3] == "resnets":
                rest = rename_first(".".join(parts[5:]), _VAE_RESNET, key)
                new = f"{coder}.{stage}.block.{parts[4]}.{rest}"
            elif parts[3] in ("downsamplers", "upsamplers") and parts[5] == "conv":
                sampler = "downsample" if parts[3] == "downsamplers" else "upsample"
                new = f"{coder}.{stage}.{sampler}.conv.{parts[6]}"
            else:
                raise ValueError(f"no LDM name known for {key!r}")
        elif len(parts) > 2 and parts[1] == "mid_block" and parts[2] == "resnets":
            rest = rename_first(".".join(parts[4:]), _VAE_RESNET, key)
            new = f"{coder}.mid.block_{int(parts[3]) + 1}.{rest}"
        elif len(parts) > 2 and parts[1] == "mid_block" and parts[2] == "attentions":
            rest = rename_first(".".join(parts[4:]), _VAE_ATTN, key)
            new = f"{coder}.mid.attn_{int(parts[3]) + 1}.{rest}"
            if conv_attention and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)
        else:
            new = rename_first(key, _VAE_TOP, key)
        out[prefix + new] = value
    return out


# --------------------------------------------------------------------------- text encoders


def _strip_text_model(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Keys without `text_model.`: transformers >= 5.6 flattens `CLIPTextModel`, while
    `CLIPTextModelWithProjection` (and older releases) still nest under `text_model.`."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


def clip_to_ldm(
    state_dict: Mapping[str, Tensor],
    prefix: str = SD1_CLIP_PREFIX,
    *,
    text_model_prefix: bool = True,
    position_ids: bool = True,
) -> StateDict:
    """HF `CLIPTextModel` weights under `prefix` + `text_model.` (HF layout, as SD1/SDXL
    files store CLIP-L).

    `text_model_prefix=False` gives the very old SD1 layout
    (`cond_stage_model.transformer.embeddings...`). Real files carry the int64
    `embeddings.position_ids` buffer that older transformers saved; `position_ids` adds it.
    """
    inner = _strip_text_model(state_dict)
    inner.pop("text_projection.weight", None)  # CLIP-L in SD has no projection in the file
    inner.pop("embeddings.position_ids", None)
    if position_ids:
        positions = inner["embeddings.position_embedding.weight"].shape[0]
        inner["embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    head = prefix + ("text_model." if text_model_prefix else "")
    return {head + k: v for k, v in inner.items()}


def _random_resblock(width: int, mlp_width: int, generator: torch.Generator) -> StateDict:
    """One open_clip residual block with CLIP-like init (weights N(0, 0.02), norms 1)."""

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    return {
        "ln_1.weight": torch.ones(width),
        "ln_1.bias": torch.zeros(width),
        "attn.in_proj_weight": randn(3 * width, width),
        "attn.in_proj_bias": torch.zeros(3 * width),
        "attn.out_proj.weight": randn(width, width),
        "attn.out_proj.bias": torch.zeros(width),
        "ln_2.weight": torch.ones(width),
        "ln_2.bias": torch.zeros(width),
        "mlp.c_fc.weight": randn(mlp_width, width),
        "mlp.c_fc.bias": torch.zeros(mlp_width),
        "mlp.c_proj.weight": randn(width, mlp_width),
        "mlp.c_proj.bias": torch.zeros(width),
    }


def open_clip_to_ldm(
    state_dict: Mapping[str, Tensor],
    prefix: str = SD2_OPEN_CLIP_PREFIX,
    *,
    extra_resblocks: int = 0,
    text_projection: Tensor | None = None,
    logit_scale: float | None = OPEN_CLIP_LOGIT_SCALE,
    seed: int = 0,
) -> StateDict:
    """HF CLIP text weights in open_clip's layout (SD2's ViT-H, SDXL's bigG).

    q/k/v are stacked into `attn.in_proj_weight`/`in_proj_bias` (q, k, v order); the
    projection is stored as a bare matrix `text_projection` of shape [width, proj] that
    open_clip applies as `x @ text_projection`, i.e. the transpose of HF's
    `text_projection.weight` ([proj, width]); diffusers transposes it back and reads the
    width (to split q/k/v) from its first dimension.

    `extra_resblocks` appends random blocks after the HF layers: SD2 files hold 24 blocks
    but diffusers' SD2 encoder has 23 because SD2 conditions on the penultimate block.
    `text_projection` is written when the HF weights have none (SD2's `CLIPTextModel`),
    as real SD2 files carry one. `logit_scale` adds the (unused) `logit_scale` scalar.
    """
    inner = _strip_text_model(state_dict)
    out: StateDict = {}
    qkv: dict[int, dict[str, Tensor]] = {}
    layers: set[int] = set()
    for key, value in inner.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.split(".", 1)[1]] = value
        elif key == "embeddings.position_ids":
            continue
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            i, rest = int(m.group(1)), m.group(2)
            layers.add(i)
            if qm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault(i, {})[f"{qm.group(2)}.{qm.group(1)}"] = value
            else:
                rest = rename_first(rest, _OPEN_CLIP_LAYER, key)
                out[f"transformer.resblocks.{i}.{rest}"] = value
        else:
            raise ValueError(f"no open_clip name known for {key!r}")
    for i, parts in qkv.items():
        for kind in ("weight", "bias"):
            try:
                stacked = [parts[f"{kind}.{c}"] for c in "qkv"]
            except KeyError as exc:
                raise ValueError(f"layer {i}: q/k/v {kind} incomplete") from exc
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(stacked)
    if extra_resblocks:
        width = out["positional_embedding"].shape[1]
        mlp_width = out["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        generator = torch.Generator().manual_seed(seed)
        for i in range(len(layers), len(layers) + extra_resblocks):
            for key, value in _random_resblock(width, mlp_width, generator).items():
                out[f"transformer.resblocks.{i}.{key}"] = value
    if "text_projection" not in out and text_projection is not None:
        out["text_projection"] = text_projection
    if logit_scale is not None:
        out["logit_scale"] = torch.tensor(logit_scale, dtype=torch.float32)
    return {prefix + k: v for k, v in out.items()}


# --------------------------------------------------------------------------- schedule


def ldm_schedule_buffers(
    num_timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> StateDict:
    """The DDPM buffers LDM's `register_schedule` saves at the top level of SD1/SD2 files.

    Computed as LDM does (float64 "linear" schedule, which is diffusers' "scaled_linear":
    betas = linspace(sqrt(start), sqrt(end))^2, v_posterior = 0) and stored as float32.
    """
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64)
    betas = betas**2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - cumprod_prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": cumprod,
        "alphas_cumprod_prev": cumprod_prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * cumprod_prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - cumprod_prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


# --------------------------------------------------------------------------- whole files


def pipeline_to_ldm(
    family: str,
    *,
    unet: Mapping[str, Tensor],
    unet_config: Mapping,
    vae: Mapping[str, Tensor],
    text_encoder: Mapping[str, Tensor] | None = None,
    text_encoder_2: Mapping[str, Tensor] | None = None,
    unet_ema: Mapping[str, Tensor] | None = None,
    old_te_keys: bool = False,
    schedule: bool | None = None,
    open_clip_extra_resblocks: int | None = None,
    seed: int = 0,
) -> StateDict:
    """One checkpoint's state dict in the layout real files of `family` have.

    - sd1: HF CLIP-L under `cond_stage_model.transformer.` (`old_te_keys`: without
      `text_model.`), plus the DDPM schedule buffers.
    - sd2: open_clip under `cond_stage_model.model.` with one extra random resblock and a
      random square `text_projection` (see `open_clip_to_ldm`), plus the schedule buffers.
    - sdxl: CLIP-L under `conditioner.embedders.0.transformer.`, bigG (`text_encoder_2`,
      with its projection) under `conditioner.embedders.1.model.`; no schedule buffers.
    - sdxl-refiner: only bigG, as `conditioner.embedders.0.model.`.
    `unet_ema` (diffusers layout) adds `model_ema.*`. Random filler tensors use `seed`.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    sdxl = family.startswith("sdxl")
    out = unet_to_ldm(unet, unet_config)
    out.update(vae_to_ldm(vae))
    extra = open_clip_extra_resblocks
    if family == "sd1":
        out.update(clip_to_ldm(text_encoder, SD1_CLIP_PREFIX, text_model_prefix=not old_te_keys))
    elif family == "sd2":
        te = _strip_text_model(text_encoder)
        width = te["embeddings.position_embedding.weight"].shape[1]
        generator = torch.Generator().manual_seed(seed + 1)
        projection = torch.randn(width, width, generator=generator) * width**-0.5
        out.update(
            open_clip_to_ldm(
                te,
                SD2_OPEN_CLIP_PREFIX,
                extra_resblocks=1 if extra is None else extra,
                text_projection=projection,
                seed=seed,
            )
        )
    else:
        if family == "sdxl":
            out.update(clip_to_ldm(text_encoder, SDXL_CLIP_PREFIX))
            prefix = SDXL_OPEN_CLIP_PREFIX
        else:
            prefix = REFINER_OPEN_CLIP_PREFIX
        out.update(open_clip_to_ldm(text_encoder_2, prefix, extra_resblocks=extra or 0, seed=seed))
    if schedule if schedule is not None else not sdxl:
        out.update(ldm_schedule_buffers())
    if unet_ema is not None:
        out.update(ema_to_ldm(unet_to_ldm(unet_ema, unet_config)))
    return out


def cast_floats(state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> StateDict:
    """Floating tensors to `dtype` (as `model.half()` does); int buffers keep their type."""
    return {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()
    }


def save_ldm_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    configs: Mapping[str, Mapping | None] | None = None,
    v_prediction: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a `.safetensors` single file, floats in `dtype`.

    `configs` ({"unet", "vae", "text_encoder", "text_encoder_2"} -> config dict or None)
    goes to `__metadata__["darkroom_config"]` as JSON so our loader can recover what tensor
    shapes cannot tell (e.g. attention head counts). `v_prediction` writes metadata
    `v_pred: "true"`.
    """
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if configs is not None:
        meta["darkroom_config"] = json.dumps(configs, sort_keys=True)
    if v_prediction:
        meta["v_pred"] = "true"
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(cast_floats(state_dict, dtype), str(path), metadata=meta)
    return path

