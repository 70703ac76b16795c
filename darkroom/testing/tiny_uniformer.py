"""Random upernet_global_small.pth files in the original mmsegmentation layout (tests and checks only).

The keys and shapes are written out here from the UniFormer authors' network and mmseg's UPerHead / FCNHead
(ConvModule: `conv` without bias, `bn`), not taken from Darkroom's module, so a strict load checks the layout:
`backbone.` (patch_embed1-4, blocks1-2 of convolutional blocks with batch norms, blocks3-4 of attention blocks
with LayerNorms, norm1-4), `decode_head.` (psp_modules, bottleneck, lateral_convs, fpn_convs, fpn_bottleneck,
conv_seg) and the training-only `auxiliary_head.` (convs.0, conv_seg), under "state_dict" beside a "meta" of
plain values as mmcv saves it. Narrow by default (1 block a stage, 16-128 channels, a 16-wide head: stage
widths from 64 up stay multiples of the 64-channel attention heads); `full=True` gives the released shapes
(UniFormer-S 64-512 with 3, 4, 8, 3 blocks, a 512-wide head, a 256-wide auxiliary head).
Weights are scaled to their fan-in so the logits differ from class to class and the map is varied.
"""

from __future__ import annotations

import torch

TINY = dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), channels=16, aux_channels=8)
FULL = dict(dims=(64, 128, 320, 512), depths=(3, 4, 8, 3), channels=512, aux_channels=256)
CLASSES, MLP_RATIO, POOL_SCALES = 150, 4, (1, 2, 3, 6)


def _layer_norm(prefix: str, n: int, g: torch.Generator) -> dict:
    return {f"{prefix}.weight": 1 + 0.1 * torch.randn(n, generator=g),
            f"{prefix}.bias": 0.1 * torch.randn(n, generator=g)}


def _batch_norm(prefix: str, n: int, g: torch.Generator) -> dict:
    return {**_layer_norm(prefix, n, g), f"{prefix}.running_mean": 0.1 * torch.randn(n, generator=g),
            f"{prefix}.running_var": 0.5 + torch.rand(n, generator=g),
            f"{prefix}.num_batches_tracked": torch.tensor(160000)}


def _weight(prefix: str, shape: tuple, g: torch.Generator, bias: bool = True) -> dict:
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    out = {f"{prefix}.weight": torch.randn(*shape, generator=g) / fan_in ** 0.5}
    if bias:
        out[f"{prefix}.bias"] = 0.1 * torch.randn(shape[0], generator=g)
    return out


def _conv_module(prefix: str, cin: int, cout: int, k: int, g: torch.Generator) -> dict:
    return {**_weight(f"{prefix}.conv", (cout, cin, k, k), g, bias=False), **_batch_norm(f"{prefix}.bn", cout, g)}


def _conv_block(p: str, d: int, g: torch.Generator) -> dict:
    h = d * MLP_RATIO
    return {**_weight(f"{p}.pos_embed", (d, 1, 3, 3), g), **_batch_norm(f"{p}.norm1", d, g),
            **_weight(f"{p}.conv1", (d, d, 1, 1), g), **_weight(f"{p}.conv2", (d, d, 1, 1), g),
            **_weight(f"{p}.attn", (d, 1, 5, 5), g), **_batch_norm(f"{p}.norm2", d, g),
            **_weight(f"{p}.mlp.fc1", (h, d, 1, 1), g), **_weight(f"{p}.mlp.fc2", (d, h, 1, 1), g)}


def _attention_block(p: str, d: int, g: torch.Generator) -> dict:
    h = d * MLP_RATIO
    return {**_weight(f"{p}.pos_embed", (d, 1, 3, 3), g), **_layer_norm(f"{p}.norm1", d, g),
            **_weight(f"{p}.attn.qkv", (3 * d, d), g), **_weight(f"{p}.attn.proj", (d, d), g),
            **_layer_norm(f"{p}.norm2", d, g), **_weight(f"{p}.mlp.fc1", (h, d), g),
            **_weight(f"{p}.mlp.fc2", (d, h), g)}


def uniformer_state(*, full: bool = False, seed: int = 0) -> dict:
    """The state dict (all three parts, auxiliary head included)."""
    cfg = FULL if full else TINY
    dims, depths, ch, aux = cfg["dims"], cfg["depths"], cfg["channels"], cfg["aux_channels"]
    g = torch.Generator().manual_seed(seed)
    sd: dict = {}
    cin = 3
    for i, (d, n) in enumerate(zip(dims, depths, strict=True), 1):
        patch = 4 if i == 1 else 2
        sd.update(_weight(f"backbone.patch_embed{i}.proj", (d, cin, patch, patch), g))
        sd.update(_layer_norm(f"backbone.patch_embed{i}.norm", d, g))
        for j in range(n):
            block = _conv_block if i <= 2 else _attention_block
            sd.update(block(f"backbone.blocks{i}.{j}", d, g))
        sd.update(_layer_norm(f"backbone.norm{i}", d, g))
        cin = d
    for k, _ in enumerate(POOL_SCALES):
        sd.update(_conv_module(f"decode_head.psp_modules.{k}.1", dims[-1], ch, 1, g))
    sd.update(_conv_module("decode_head.bottleneck", dims[-1] + len(POOL_SCALES) * ch, ch, 3, g))
    for k, d in enumerate(dims[:-1]):
        sd.update(_conv_module(f"decode_head.lateral_convs.{k}", d, ch, 1, g))
        sd.update(_conv_module(f"decode_head.fpn_convs.{k}", ch, ch, 3, g))
    sd.update(_conv_module("decode_head.fpn_bottleneck", len(dims) * ch, ch, 3, g))
    sd.update(_weight("decode_head.conv_seg", (CLASSES, ch, 1, 1), g))
    sd.update(_conv_module("auxiliary_head.convs.0", dims[2], aux, 3, g))
    sd.update(_weight("auxiliary_head.conv_seg", (CLASSES, aux, 1, 1), g))
    return sd


def uniformer_file_state(*, full: bool = False, seed: int = 0) -> dict:
    """What torch.save writes for the file: {"meta": plain values as mmcv keeps them, "state_dict": ...}."""
    from darkroom.control.annotators.palettes import ADE20K

    meta = {"mmseg_version": "0.11.0", "config": "model = dict(type='EncoderDecoder', ...)",
            "CLASSES": tuple(f"class{i}" for i in range(CLASSES)), "PALETTE": [list(c) for c in ADE20K],
            "epoch": 0, "iter": 160000}
    return {"meta": meta, "state_dict": uniformer_state(full=full, seed=seed)}
