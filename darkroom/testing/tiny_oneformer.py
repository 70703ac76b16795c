"""Random OneFormer checkpoints in the original SHI-Labs / detectron2 layout (tests and checks only).

The keys and shapes are written out here from the OneFormer network (the extension's annotator/oneformer copy
of it), not taken from Darkroom's module or transformers', so a strict load checks the renaming:
`backbone.` (D2SwinTransformer: patch_embed, layers.i.blocks.j with a fused qkv and a stored
relative_position_index, layers.i.downsample, norm0-3), `sem_seg_head.pixel_decoder.` (MSDeformAttn pixel
decoder: input_proj, transformer.level_embed and encoder layers with a 1024-wide feed-forward, mask_features,
adapter_1 / layer_1 with GroupNorm), `sem_seg_head.predictor.` (class_transformer, the masked-attention decoder
layers, query_embed, class_input_proj, class_embed, mask_embed), `task_mlp.`, and the training-only parts a
released file carries: `text_encoder.`, `text_projector.`, `prompt_ctx.` and `criterion.` (empty_weight,
logit_scale). The state dict sits under "model", beside an "iteration", as detectron2's checkpointer saves it.
`FULL` gives the released Swin-L shapes (250 queries and 150 classes for ADE20K; pass queries=150,
classes=133 for COCO). Weights are scaled to their fan-in so the map is varied.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

TINY = dict(embed=32, depths=(1, 1, 2, 1), swin_heads=(1, 2, 4, 8), window=4, queries=6, classes=5, hidden=64,
            ffn=96, enc_layers=1, dec_layers=3, class_dec_layers=1, text_width=32, text_layers=1, vocab=64,
            n_ctx=4)
FULL = dict(embed=192, depths=(2, 2, 18, 2), swin_heads=(6, 12, 24, 48), window=12, queries=250, classes=150,
            hidden=256, ffn=2048, enc_layers=6, dec_layers=10, class_dec_layers=2, text_width=256,
            text_layers=6, vocab=49408, n_ctx=16)
HEADS, LEVELS, POINTS, ENCODER_FFN, TASK_LEN, TEXT_LEN = 8, 3, 4, 1024, 77, 77


def _randn(g: torch.Generator | None, *shape: int) -> torch.Tensor:
    """Normal samples, or an empty meta tensor (shapes only) without a generator."""
    return torch.empty(shape, device="meta") if g is None else torch.randn(*shape, generator=g)


def _norm(prefix: str, n: int, g: torch.Generator | None) -> dict:
    return {f"{prefix}.weight": 1 + 0.1 * _randn(g, n),
            f"{prefix}.bias": 0.1 * _randn(g, n)}


def _weight(prefix: str, shape: tuple, g: torch.Generator | None, bias: bool = True) -> dict:
    fan_in = math.prod(shape[1:])
    out = {f"{prefix}.weight": _randn(g, *shape) / fan_in ** 0.5}
    if bias:
        out[f"{prefix}.bias"] = 0.1 * _randn(g, shape[0])
    return out


def _mha(prefix: str, d: int, g: torch.Generator | None, gain: float = 1.0) -> dict:
    """torch's nn.MultiheadAttention: a fused in-projection."""
    w = _weight(prefix + ".out_proj", (d, d), g)
    return {f"{prefix}.in_proj_weight": gain * _randn(g, 3 * d, d) / d ** 0.5,
            f"{prefix}.in_proj_bias": 0.1 * _randn(g, 3 * d), **w}


def _relative_index(window: int) -> torch.Tensor:
    """Swin's pairwise relative position index inside a window (a buffer the original saves)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _swin(s: dict, g: torch.Generator | None) -> dict:
    c, w = s["embed"], s["window"]
    out = {**_weight("backbone.patch_embed.proj", (c, 3, 4, 4), g), **_norm("backbone.patch_embed.norm", c, g)}
    for i, (depth, heads) in enumerate(zip(s["depths"], s["swin_heads"], strict=True)):
        dim = c * 2 ** i
        for j in range(depth):
            p = f"backbone.layers.{i}.blocks.{j}."
            out.update(_norm(p + "norm1", dim, g))
            out[p + "attn.relative_position_bias_table"] = 0.1 * _randn(g, (2 * w - 1) ** 2, heads)
            out[p + "attn.relative_position_index"] = _relative_index(w)
            out.update(_weight(p + "attn.qkv", (3 * dim, dim), g))
            out.update(_weight(p + "attn.proj", (dim, dim), g))
            out.update(_norm(p + "norm2", dim, g))
            out.update(_weight(p + "mlp.fc1", (4 * dim, dim), g))
            out.update(_weight(p + "mlp.fc2", (dim, 4 * dim), g))
        if i < len(s["depths"]) - 1:
            out.update(_weight(f"backbone.layers.{i}.downsample.reduction", (2 * dim, 4 * dim), g, bias=False))
            out.update(_norm(f"backbone.layers.{i}.downsample.norm", 4 * dim, g))
    for i in range(len(s["depths"])):
        out.update(_norm(f"backbone.norm{i}", c * 2 ** i, g))
    return out


def _pixel_decoder(s: dict, g: torch.Generator | None) -> dict:
    c, h = s["embed"], s["hidden"]
    p = "sem_seg_head.pixel_decoder."
    out = {}
    for i, width in enumerate((8 * c, 4 * c, 2 * c)):  # res5, res4, res3
        out.update(_weight(f"{p}input_proj.{i}.0", (h, width, 1, 1), g))
        out.update(_norm(f"{p}input_proj.{i}.1", h, g))
    out[p + "transformer.level_embed"] = _randn(g, LEVELS, h)
    for j in range(s["enc_layers"]):
        q = f"{p}transformer.encoder.layers.{j}."
        out.update(_weight(q + "self_attn.sampling_offsets", (HEADS * LEVELS * POINTS * 2, h), g))
        out.update(_weight(q + "self_attn.attention_weights", (HEADS * LEVELS * POINTS, h), g))
        out.update(_weight(q + "self_attn.value_proj", (h, h), g))
        out.update(_weight(q + "self_attn.output_proj", (h, h), g))
        out.update(_norm(q + "norm1", h, g))
        out.update(_weight(q + "linear1", (ENCODER_FFN, h), g))
        out.update(_weight(q + "linear2", (h, ENCODER_FFN), g))
        out.update(_norm(q + "norm2", h, g))
    out.update(_weight(p + "mask_features", (h, h, 1, 1), g))
    out.update(_weight(p + "adapter_1", (h, c, 1, 1), g, bias=False))
    out.update(_norm(p + "adapter_1.norm", h, g))
    out.update(_weight(p + "layer_1", (h, h, 3, 3), g, bias=False))
    out.update(_norm(p + "layer_1.norm", h, g))
    return out


def _predictor(s: dict, g: torch.Generator | None) -> dict:
    """The decoder, with sharper attention, larger query embeddings and class weights than fan-in scaling: the
    queries start alike (zero content, only their position embeddings differ) and would otherwise all pick the
    same class."""
    h, f, sharp = s["hidden"], s["ffn"], 5.0
    p = "sem_seg_head.predictor."
    out = {}
    for k in range(s["class_dec_layers"]):
        q = f"{p}class_transformer.decoder.layers.{k}."
        out.update({**_mha(q + "self_attn", h, g, sharp), **_mha(q + "multihead_attn", h, g, sharp)})
        out.update({**_weight(q + "linear1", (f, h), g), **_weight(q + "linear2", (h, f), g)})
        for n in (1, 2, 3):
            out.update(_norm(f"{q}norm{n}", h, g))
    out.update(_norm(p + "class_transformer.decoder.norm", h, g))
    for i in range(s["dec_layers"] - 1):
        out.update(_mha(f"{p}transformer_self_attention_layers.{i}.self_attn", h, g, sharp))
        out.update(_norm(f"{p}transformer_self_attention_layers.{i}.norm", h, g))
        out.update(_mha(f"{p}transformer_cross_attention_layers.{i}.multihead_attn", h, g, sharp))
        out.update(_norm(f"{p}transformer_cross_attention_layers.{i}.norm", h, g))
        out.update(_weight(f"{p}transformer_ffn_layers.{i}.linear1", (f, h), g))
        out.update(_weight(f"{p}transformer_ffn_layers.{i}.linear2", (h, f), g))
        out.update(_norm(f"{p}transformer_ffn_layers.{i}.norm", h, g))
    out.update(_norm(p + "decoder_norm", h, g))
    out[p + "query_embed.weight"] = sharp * _randn(g, s["queries"], h)
    out[p + "level_embed.weight"] = _randn(g, LEVELS, h)
    out.update(_weight(p + "class_input_proj", (h, h, 1, 1), g))
    out.update(_weight(p + "class_embed", (s["classes"] + 1, h), g))
    out[p + "class_embed.weight"] *= 4
    for i in range(3):
        out.update(_weight(f"{p}mask_embed.layers.{i}", (h, h), g))
    out.update(_weight("task_mlp.layers.0", (h, TASK_LEN), g))
    out.update(_weight("task_mlp.layers.1", (h, h), g))
    return out


def _training_only(s: dict, g: torch.Generator | None) -> dict:
    """The text encoder, its projector and prompt context, and the loss's buffers: in a released file, unused
    by inference."""
    t, h = s["text_width"], s["hidden"]
    out = {"text_encoder.positional_embedding": 0.01 * _randn(g, TEXT_LEN, t),
           "text_encoder.token_embedding.weight": 0.02 * _randn(g, s["vocab"], t),
           **_norm("text_encoder.ln_final", t, g)}
    for i in range(s["text_layers"]):
        p = f"text_encoder.transformer.resblocks.{i}."
        out.update({**_mha(p + "attn", t, g), **_norm(p + "ln_1", t, g), **_norm(p + "ln_2", t, g)})
        out.update({**_weight(p + "mlp.c_fc", (4 * t, t), g), **_weight(p + "mlp.c_proj", (t, 4 * t), g)})
    out.update({**_weight("text_projector.layers.0", (h, t), g), **_weight("text_projector.layers.1", (h, h), g)})
    out["prompt_ctx.weight"] = _randn(g, s["n_ctx"], t)
    empty = torch.ones(s["classes"] + 1)
    empty[-1] = 0.1
    out.update({"criterion.empty_weight": empty, "criterion.logit_scale": torch.tensor(math.log(1 / 0.07))})
    return out


def oneformer_state(spec: dict | None = None, seed: int | None = 0, training: bool = True) -> dict:
    """A random OneFormer state dict in the original key layout (`spec`: TINY by default, or FULL); with
    seed=None the tensors are on the meta device (shapes only)."""
    s = {**TINY, **(spec or {})}
    g = None if seed is None else torch.Generator().manual_seed(seed)
    state = {**_swin(s, g), **_pixel_decoder(s, g), **_predictor(s, g)}
    if training:
        state.update(_training_only(s, g))
    return state


def write_oneformer(path, spec: dict | None = None, seed: int = 0) -> dict:
    """Save a random checkpoint as detectron2 does ({"model": ..., "iteration": ...}); the state dict back.
    The state dict carries the head's format version, as Module.state_dict() records it (without it, OneFormer's
    head would "upgrade" the pixel decoder's keys on loading)."""
    state = OrderedDict(oneformer_state(spec, seed))
    state._metadata = OrderedDict([("sem_seg_head", {"version": 2})])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "iteration": 159999}, path)
    return dict(state)
