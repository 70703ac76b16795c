"""Tiny randomly initialised Stable Diffusion models of every family, for tests.

Real checkpoints are gigabytes; these have the same *structure* (component classes,
single-file key layout, prefixes, conv-vs-linear projections, label embedding, number of
levels) at widths no real model uses, so a loader that guesses a width instead of reading
it from the tensors fails loudly here. The text encoders keep the real 49408-token
vocabulary and 77 positions so that the real CLIP tokenizer works with them; SDXL's two
encoders have different widths so that swapping them cannot load.

Every parameter gets extra seeded noise after the normal init, so no two tensors are
equal (LayerNorm weights would otherwise all be ones) and a mapping that swaps two of
them cannot pass a round-trip test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers/transformers)
from darkroom.testing.ldm_export import (
    FAMILIES,
    cast_floats,
    pipeline_to_ldm,
    save_ldm_checkpoint,
)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

# A1111/SGM defaults every SD family was trained with (see model-formats.md).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

_CROSS, _DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _UP = "CrossAttnUpBlock2D", "UpBlock2D"
_ADD_TIME_DIM = 8  # real SDXL: 256


def _clip_config(hidden: int, layers: int, heads: int, act: str, projection: int) -> dict:
    """CLIPTextConfig kwargs; special-token ids as in the real SD/SDXL configs."""
    return {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


def tiny_configs(family: str, *, inpainting: bool = False) -> dict:
    """Constructor kwargs {"unet", "vae", "text_encoder", "text_encoder_2"} (None = absent).

    Mirrors the real families: SD1 conv proj_in + quick_gelu CLIP-L; SD2 linear proj_in +
    gelu open_clip encoder (3 HF layers, 4 blocks in the file); SDXL 3 levels (first
    without attention), per-level transformer depth, text_time label_emb fed by
    6 * addition_time_embed_dim + te2 projection dim, context = te1 + te2 widths; the
    refiner 4 levels, bigG alone, 5 time ids.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "layers_per_block": 1,
        "sample_size": 64,
        "scaling_factor": 0.13025 if family.startswith("sdxl") else 0.18215,
    }
    unet = {"in_channels": 9 if inpainting else 4, "out_channels": 4, "sample_size": 32}
    te = te2 = None
    if family == "sd1":
        te = _clip_config(32, 3, 4, "quick_gelu", 32)
        unet |= {
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": (_CROSS, _DOWN),
            "up_block_types": (_UP, _CROSS_UP),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,  # diffusers' name for the head count (SD1: 8)
        }
    elif family == "sd2":
        te = _clip_config(32, 3, 2, "gelu", 32)
        unet |= {
            "block_out_channels": (32, 32, 64),
            "layers_per_block": 2,
            "down_block_types": (_CROSS, _CROSS, _DOWN),
            "up_block_types": (_UP, _CROSS_UP, _CROSS_UP),
            "cross_attention_dim": 32,
            "attention_head_dim": (2, 2, 4),
            "use_linear_projection": True,
        }
    elif family == "sdxl":
        te = _clip_config(32, 2, 4, "quick_gelu", 32)
        te2 = _clip_config(48, 3, 4, "gelu", 40)
        unet |= {
            "block_out_channels": (32, 64, 64),
            "layers_per_block": 1,
            "down_block_types": (_DOWN, _CROSS, _CROSS),
            "up_block_types": (_CROSS_UP, _CROSS_UP, _UP),
            "transformer_layers_per_block": (1, 1, 2),
            "cross_attention_dim": te["hidden_size"] + te2["hidden_size"],
            "attention_head_dim": (2, 4, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _ADD_TIME_DIM,
            "projection_class_embeddings_input_dim": 6 * _ADD_TIME_DIM + te2["projection_dim"],
        }
    else:
        te2 = _clip_config(48, 3, 4, "gelu", 40)
        unet |= {
            "block_out_channels": (32, 64, 64, 64),
            "layers_per_block": 1,
            "down_block_types": (_DOWN, _CROSS, _CROSS, _DOWN),
            "up_block_types": (_UP, _CROSS_UP, _CROSS_UP, _UP),
            "transformer_layers_per_block": 2,
            "cross_attention_dim": te2["hidden_size"],
            "attention_head_dim": (2, 4, 4, 4),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": _ADD_TIME_DIM,
            "projection_class_embeddings_input_dim": 5 * _ADD_TIME_DIM + te2["projection_dim"],
        }
    return {"unet": unet, "vae": vae, "text_encoder": te, "text_encoder_2": te2}


def _jitter(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)


def build_tiny_modules(family: str, *, seed: int = 0, inpainting: bool = False) -> dict:
    """The diffusers/transformers modules (None where the family has no such component),
    deterministic in `seed` and without touching the global RNG."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = tiny_configs(family, inpainting=inpainting)
    builders = {
        "unet": lambda c: UNet2DConditionModel(**c),
        "vae": lambda c: AutoencoderKL(**c),
        "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
        "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c)),
    }
    modules: dict = {}
    with torch.random.fork_rng(devices=[]):
        for n, (name, build) in enumerate(builders.items()):
            if cfg[name] is None:
                modules[name] = None
                continue
            torch.manual_seed(seed * 1000 + n)
            module = build(cfg[name]).eval()
            _jitter(module, torch.Generator().manual_seed(seed * 1000 + 100 + n))
            modules[name] = module
    return modules


def _config_dict(module) -> dict | None:
    """The full, JSON-safe config (diffusers' incl. `_class_name`; transformers' to_dict)."""
    if module is None:
        return None
    if hasattr(module.config, "to_json_string"):  # transformers PretrainedConfig
        return json.loads(module.config.to_json_string(use_diff=False))
    return json.loads(module.to_json_string())


def build_tiny_checkpoint(
    path: str | Path,
    family: str,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    inpainting: bool = False,
    ema: bool = False,
    old_te_keys: bool = False,
    v_prediction: bool = False,
) -> dict:
    """Write a tiny `family` checkpoint as an LDM single-file `.safetensors` at `path`.

    Returns {"path", "family", "configs", "state_dicts", "ldm", "metadata"}: `configs` are
    the full component configs (also in the file's `darkroom_config` metadata),
    `state_dicts` the diffusers/transformers-layout tensors cast to `dtype` (exactly what
    a correct loader must produce; keys as the installed transformers names them) with
    "unet_ema" when `ema` (EMA weights differ from the main ones so a test can tell which
    were loaded), `ldm` the file's tensors. `old_te_keys` (sd1 only) writes the pre-
    `text_model.` CLIP layout. `v_prediction` writes `v_pred: "true"` metadata, and for
    SDXL families also the empty `v_pred` tensor that v-prediction SDXL finetunes carry.
    """
    if old_te_keys and family != "sd1":
        raise ValueError("old_te_keys exists only for sd1 files")
    modules = build_tiny_modules(family, seed=seed, inpainting=inpainting)
    configs = {name: _config_dict(m) for name, m in modules.items()}
    # Cast the modules once: every tensor below is then already in `dtype` (copies are
    # slow on small CI machines), and the returned tensors are exactly the file's.
    state_dicts = {
        name: dict(m.to(dtype).state_dict()) for name, m in modules.items() if m is not None
    }
    if ema:
        generator = torch.Generator().manual_seed(seed * 1000 + 500)
        state_dicts["unet_ema"] = {
            k: (v.float() + torch.randn(v.shape, generator=generator) * 0.01).to(dtype)
            for k, v in state_dicts["unet"].items()
        }
    ldm = pipeline_to_ldm(
        family,
        unet=state_dicts["unet"],
        unet_config=configs["unet"],
        vae=state_dicts["vae"],
        text_encoder=state_dicts.get("text_encoder"),
        text_encoder_2=state_dicts.get("text_encoder_2"),
        unet_ema=state_dicts.get("unet_ema"),
        old_te_keys=old_te_keys,
        seed=seed,
    )
    if v_prediction and family.startswith("sdxl"):
        ldm["v_pred"] = torch.zeros(0)
    ldm = cast_floats(ldm, dtype)
    path = save_ldm_checkpoint(path, ldm, dtype=dtype, configs=configs, v_prediction=v_prediction)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return {
        "path": path,
        "family": family,
        "configs": configs,
        "state_dicts": state_dicts,
        "ldm": ldm,
        "metadata": metadata,
    }


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer from the package's assets (no hub access).

    SD1/SDXL's first tokenizer pads with <|endoftext|>; the open_clip-trained encoders'
    tokenizers (SD2, SDXL's tokenizer_2) pad with "!" (id 0) as the real repos do.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=str(TOKENIZER_DIR / "vocab.json"),
        merges=str(TOKENIZER_DIR / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


def save_diffusers_folder(
    path: str | Path,
    family: str,
    seed: int = 0,
    *,
    inpainting: bool = False,
    v_prediction: bool = False,
) -> Path:
    """The same tiny model (same `seed` -> same weights as `build_tiny_checkpoint`) as a
    diffusers folder: model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/,
    scheduler/ (PNDM for SD1/SD2, Euler for SDXL, as the official repos ship)."""
    import diffusers

    modules = build_tiny_modules(family, seed=seed, inpainting=inpainting)
    prediction = "v_prediction" if v_prediction else "epsilon"
    if family.startswith("sdxl"):
        scheduler = diffusers.EulerDiscreteScheduler(
            **SCHEDULER_CONFIG, interpolation_type="linear", prediction_type=prediction
        )
    else:
        scheduler = diffusers.PNDMScheduler(
            **SCHEDULER_CONFIG,
            skip_prk_steps=True,
            set_alpha_to_one=False,
            prediction_type=prediction,
        )
    parts = {"unet": modules["unet"], "vae": modules["vae"], "scheduler": scheduler}
    if family in ("sd1", "sd2"):
        pipe_cls = (
            diffusers.StableDiffusionInpaintPipeline
            if inpainting
            else diffusers.StableDiffusionPipeline
        )
        pad = "!" if family == "sd2" else "<|endoftext|>"
        pipe = pipe_cls(
            **parts,
            text_encoder=modules["text_encoder"],
            tokenizer=clip_tokenizer(pad),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        refiner = family == "sdxl-refiner"
        if inpainting:
            pipe_cls = diffusers.StableDiffusionXLInpaintPipeline
        elif refiner:
            pipe_cls = diffusers.StableDiffusionXLImg2ImgPipeline
        else:
            pipe_cls = diffusers.StableDiffusionXLPipeline
        extra = {"requires_aesthetics_score": True} if refiner else {}
        pipe = pipe_cls(
            **parts,
            text_encoder=modules["text_encoder"],
            text_encoder_2=modules["text_encoder_2"],
            tokenizer=None if refiner else clip_tokenizer(),
            tokenizer_2=clip_tokenizer("!"),
            force_zeros_for_empty_prompt=not refiner,
            add_watermarker=False,
            **extra,
        )
    path = Path(path)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return path
