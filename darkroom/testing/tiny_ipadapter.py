"""Tiny random IP-Adapters in the authors' layout for a given diffusers UNet, and a tiny CLIP vision tower in the
transformers layout (what the extension's clip_h.pth holds), for the tests.

Layout written: `image_proj.proj.weight/bias` + `image_proj.norm.*` (plain: the CLIP embedding to `tokens`
context tokens) or the Resampler's `image_proj.latents`, `proj_in`, `proj_out`, `norm_out` and four
`layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}` / `layers.{i}.1.{0,1,3}` (plus: the penultimate hidden states),
and `ip_adapter.{2i+1}.to_k_ip.weight` / `to_v_ip.weight` for the UNet's i-th cross-attention.
"""

from __future__ import annotations

from pathlib import Path

import torch

PLUS_DEPTH = 4  # the authors' Resampler depth (diffusers' converter knows layers 0-3)


def clip_vision_config(hidden: int = 64, projection: int = 48, layers: int = 2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=16, image_size=224, patch_size=32, projection_dim=projection,
                            hidden_act="gelu", layer_norm_eps=1e-5)


def clip_vision_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    """A random CLIPVisionModelWithProjection's weights (transformers keys), as the extension's clip_h.pth."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(clip_vision_config(**kw))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def _random(shape, g, scale=0.2) -> torch.Tensor:
    return torch.randn(shape, generator=g) * scale


def ipadapter_state(unet: torch.nn.Module, *, variant: str = "plain", clip_width: int = 48, tokens: int = 4,
                    seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights for every cross-attention of `unet`; `clip_width`: the CLIP output it projects (the
    embedding for plain, the hidden states for plus and faceid-plus; faceid projects a 512-wide face embedding)."""
    from darkroom.control.ipadapter import cross_attentions

    g = torch.Generator().manual_seed(seed)
    layers = cross_attentions(unet)
    cross = layers[0].to_k.weight.shape[1]
    state: dict[str, torch.Tensor] = {}
    if variant == "plain":
        state["image_proj.proj.weight"] = _random((tokens * cross, clip_width), g, scale)
        state["image_proj.proj.bias"] = _random((tokens * cross,), g, scale)
        state["image_proj.norm.weight"] = 1 + _random((cross,), g, 0.05)
        state["image_proj.norm.bias"] = _random((cross,), g, 0.05)
    elif variant == "plus":
        hidden, inner = 64, 64  # one 64-wide head, as the converter reads heads = to_q width / 64
        state["image_proj.latents"] = _random((1, tokens, hidden), g, 1.0)
        state["image_proj.proj_in.weight"] = _random((hidden, clip_width), g, scale)
        state["image_proj.proj_in.bias"] = _random((hidden,), g, scale)
        state["image_proj.proj_out.weight"] = _random((cross, hidden), g, scale)
        state["image_proj.proj_out.bias"] = _random((cross,), g, scale)
        state["image_proj.norm_out.weight"] = 1 + _random((cross,), g, 0.05)
        state["image_proj.norm_out.bias"] = _random((cross,), g, 0.05)
        for i in range(PLUS_DEPTH):
            p = f"image_proj.layers.{i}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                state[p + norm + ".weight"] = 1 + _random((hidden,), g, 0.05)
                state[p + norm + ".bias"] = _random((hidden,), g, 0.05)
            state[p + "0.to_q.weight"] = _random((inner, hidden), g, scale)
            state[p + "0.to_kv.weight"] = _random((2 * inner, hidden), g, scale)
            state[p + "0.to_out.weight"] = _random((hidden, inner), g, scale)
            state[p + "1.1.weight"] = _random((4 * hidden, hidden), g, scale)
            state[p + "1.3.weight"] = _random((hidden, 4 * hidden), g, scale)
    elif variant in ("faceid", "faceid-plus"):  # InsightFace's 512-wide embedding, an MLP to `tokens` tokens
        face = 512
        state["image_proj.proj.0.weight"] = _random((2 * face, face), g, scale / 4)
        state["image_proj.proj.0.bias"] = _random((2 * face,), g, scale)
        state["image_proj.proj.2.weight"] = _random((tokens * cross, 2 * face), g, scale / 4)
        state["image_proj.proj.2.bias"] = _random((tokens * cross,), g, scale)
        state["image_proj.norm.weight"] = 1 + _random((cross,), g, 0.05)
        state["image_proj.norm.bias"] = _random((cross,), g, 0.05)
        if variant == "faceid-plus":  # + a perceiver over the CLIP hidden states (one 64-wide head)
            p = "image_proj.perceiver_resampler."
            state[p + "proj_in.weight"] = _random((cross, clip_width), g, scale)
            state[p + "proj_in.bias"] = _random((cross,), g, scale)
            state[p + "proj_out.weight"] = _random((cross, cross), g, scale)
            state[p + "proj_out.bias"] = _random((cross,), g, scale)
            state[p + "norm_out.weight"] = 1 + _random((cross,), g, 0.05)
            state[p + "norm_out.bias"] = _random((cross,), g, 0.05)
            for i in range(PLUS_DEPTH):
                q = f"{p}layers.{i}."
                for norm in ("0.norm1", "0.norm2", "1.0"):
                    state[q + norm + ".weight"] = 1 + _random((cross,), g, 0.05)
                    state[q + norm + ".bias"] = _random((cross,), g, 0.05)
                state[q + "0.to_q.weight"] = _random((64, cross), g, scale)
                state[q + "0.to_kv.weight"] = _random((128, cross), g, scale)
                state[q + "0.to_out.weight"] = _random((cross, 64), g, scale)
                state[q + "1.1.weight"] = _random((4 * cross, cross), g, scale)
                state[q + "1.3.weight"] = _random((cross, 4 * cross), g, scale)
    else:
        raise ValueError(f"variant {variant!r}")
    for i, attn in enumerate(layers):
        out_features, in_features = attn.to_k.weight.shape
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = _random((out_features, in_features), g, scale)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = _random((out_features, in_features), g, scale)
    return state


def write_tiny_ipadapter(folder: Path, name: str, unet: torch.nn.Module, family: str, **kw) -> Path:
    """The adapter as `<name>.safetensors`; `family` in darkroom_config metadata (a tiny UNet's text width
    names no family)."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ipadapter_state(unet, **kw).items()}, str(path),
              metadata={"darkroom_config": json.dumps({"ip_adapter": {"family": family}})})
    return path


def write_tiny_clip_vision(path: Path, seed: int = 0, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(clip_vision_state(seed, **kw), path)
    return path
