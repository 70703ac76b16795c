"""Tiny random T2I-Adapters matching the tiny SD1/SDXL UNets of darkroom.testing.tiny, for tests.

Kinds: "full" (SD1's `Adapter`), "light" (SD1's `Adapter_light`, the color adapter) and "xl" (SDXL's
FullAdapterXL). Their widths copy the tiny UNet's levels, and the unshuffle factor is scaled as the tiny
VAE is (factor 2, real 8): SD1 adapters unshuffle by 2 (real 8), SDXL's by 4 (real 16), so the features
land on the tiny UNet's levels. Those widths say nothing about the factor, so the files record it in
`darkroom_config` metadata ({"t2i_adapter": {"downscale_factor", "adapter_type"}}); a `downscale_factor`
of 8 or 16 gives a file real adapters' rule reads without metadata (for the .pth layout).

Layouts: "original" (TencentARC's keys: `conv_in`, flat `body.k`; the light one's `body.i.body.j`),
"diffusers-single" (diffusers keys, the config JSON in metadata "config") and "diffusers" (a folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import darkroom  # noqa: F401  (sets the HF stack offline before diffusers is imported)
from darkroom.control.adapter import diffusers_to_original

KINDS = ("full", "light", "xl")
LAYOUTS = ("original", "diffusers-single", "diffusers")


def tiny_adapter_config(kind: str = "full", *, in_channels: int = 3, downscale_factor: int | None = None) -> dict:
    """`T2IAdapter` kwargs for a tiny adapter of `kind` fitting the tiny UNet of its family."""
    if kind == "full":  # tiny SD1 UNet levels (32, 64)
        cfg = {"channels": [32, 64], "num_res_blocks": 2, "downscale_factor": 2, "adapter_type": "full_adapter"}
    elif kind == "light":  # features 32, 64 (and an extra 64 past the tiny UNet's two levels, as real ones end)
        cfg = {"channels": [32, 64], "num_res_blocks": 2, "downscale_factor": 2, "adapter_type": "light_adapter"}
    elif kind == "xl":  # tiny SDXL UNet levels (32, 64, 64) and its middle block
        cfg = {"channels": [32, 64, 64, 64], "num_res_blocks": 2, "downscale_factor": 4,
               "adapter_type": "full_adapter_xl"}
    else:
        raise ValueError(f"unknown adapter kind {kind!r}; expected one of {KINDS}")
    cfg["in_channels"] = in_channels
    if downscale_factor is not None:
        cfg["downscale_factor"] = downscale_factor
    return cfg


def build_tiny_adapter(kind: str = "full", *, seed: int = 0, in_channels: int = 3,
                       downscale_factor: int | None = None):
    """A `T2IAdapter` in eval mode, deterministic in `seed`, without touching the global RNG; every tensor
    gets seeded noise large enough that the features visibly steer a tiny model."""
    from diffusers import T2IAdapter

    cfg = tiny_adapter_config(kind, in_channels=in_channels, downscale_factor=downscale_factor)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8000 + seed)
        model = T2IAdapter(**cfg).eval()
    generator = torch.Generator().manual_seed(8100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


def tiny_adapter_state(kind: str = "full", *, seed: int = 0, in_channels: int = 3,
                       downscale_factor: int | None = None, dtype: torch.dtype = torch.float32) -> dict:
    """The diffusers-keyed tensors `write_tiny_adapter` writes for these arguments, for exact comparisons."""
    model = build_tiny_adapter(kind, seed=seed, in_channels=in_channels, downscale_factor=downscale_factor)
    return {k: v.clone() for k, v in model.to(dtype).state_dict().items()}


def write_tiny_adapter(folder: str | Path, name: str, kind: str = "full", layout: str = "original", *,
                       dtype: torch.dtype = torch.float32, suffix: str = ".safetensors", seed: int = 0,
                       in_channels: int = 3, downscale_factor: int | None = None, variant: str | None = None,
                       metadata: bool = True) -> Path:
    """Write a tiny adapter called `name` into `folder`; returns the file (or the diffusers folder).

    `layout` is one of LAYOUTS; `suffix` ".safetensors" or ".pth" (weights only, no metadata) for single
    files; `variant` "fp16" names a folder's weights diffusion_pytorch_model.fp16.safetensors; `metadata`
    False leaves the darkroom_config entry out (real files have none)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    model = build_tiny_adapter(kind, seed=seed, in_channels=in_channels, downscale_factor=downscale_factor)
    model = model.to(dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        target = folder / name
        model.save_pretrained(str(target), safe_serialization=True, variant=variant)
        return target
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = dict(model.config)
    info: dict[str, str] = {}
    if layout == "diffusers-single":
        info["config"] = json.dumps({k: v for k, v in config.items() if not k.startswith("_")})
    else:
        state = diffusers_to_original(state, config)
        if metadata:
            info["darkroom_config"] = json.dumps({"t2i_adapter": {
                "downscale_factor": config["downscale_factor"], "adapter_type": config["adapter_type"]}})
    path = folder / f"{name}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata=info)
    elif suffix in (".pth", ".pt"):
        torch.save(state, str(path))
    else:
        raise ValueError(f"unsupported suffix {suffix!r}")
    return path


def write_style_adapter(folder: str | Path, name: str = "t2iadapter_style_sd14v1", suffix: str = ".pth") -> Path:
    """A tiny file with the style adapter's names (style_embedding, transformer_layes, ln_pre/post, proj)."""
    state = {"style_embedding": torch.zeros(1, 8, 16), "ln_pre.weight": torch.ones(16), "ln_pre.bias": torch.zeros(16),
             "ln_post.weight": torch.ones(16), "ln_post.bias": torch.zeros(16), "proj": torch.zeros(16, 32),
             "transformer_layes.0.attn.in_proj_weight": torch.zeros(48, 16)}
    path = Path(folder) / f"{name}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return path


def style_adapter_state(width: int, context: int, *, layers: int = 2, tokens: int = 8, seed: int = 0,
                        scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights with every name of the style adapter (t2iadapter_style_sd14v1: width 1024, context 768, 3
    layers, 8 tokens), at the given sizes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=scale):
        return torch.randn(shape, generator=g) * s

    state = {"style_embedding": rnd(1, tokens, width, s=width ** -0.5), "proj": rnd(width, context, s=width ** -0.5)}
    for norm in ("ln_pre", "ln_post"):
        state[f"{norm}.weight"], state[f"{norm}.bias"] = 1 + rnd(width, s=0.05), rnd(width, s=0.05)
    for i in range(layers):
        p = f"transformer_layes.{i}."
        state |= {p + "attn.in_proj_weight": rnd(3 * width, width), p + "attn.in_proj_bias": rnd(3 * width),
                  p + "attn.out_proj.weight": rnd(width, width), p + "attn.out_proj.bias": rnd(width),
                  p + "mlp.c_fc.weight": rnd(4 * width, width), p + "mlp.c_fc.bias": rnd(4 * width),
                  p + "mlp.c_proj.weight": rnd(width, 4 * width), p + "mlp.c_proj.bias": rnd(width)}
        for norm in ("ln_1", "ln_2"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = 1 + rnd(width, s=0.05), rnd(width, s=0.05)
    return state


def write_tiny_style_adapter(folder: str | Path, name: str, width: int, context: int, family: str = "sd1",
                             **kw) -> Path:
    """`style_adapter_state` as `<name>.safetensors`, its family in darkroom_config metadata (a tiny model's text
    width names no family)."""
    from safetensors.torch import save_file

    path = Path(folder) / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(style_adapter_state(width, context, **kw), str(path),
              metadata={"darkroom_config": json.dumps({"t2i_style": {"family": family}})})
    return path
