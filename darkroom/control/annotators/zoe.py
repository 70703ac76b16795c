"""ZoeDepth (depth_zoe) from ZoeD_M12_N.pt: metric depth, run through transformers' ZoeDepthForDepthEstimation.

The file is Intel's ZoeD_N (NYU): MiDaS 3.1's BEiT-L/16-384 (relative position bias per block, resized to the
input's window) feeding a DPT neck and ZoeDepth's metric head (64 bins, attractors 16-8-4-1, log-binomial
output). transformers ships the same network; its config is the default ZoeDepth one (BEiT-L at 384, outputs
of blocks 6, 12, 18, 24), with timm's LayerNorm epsilon (1e-6) and the neck widths 256-512-1024-1024. The
original keys (under `model`: `core.core.pretrained.model.` for the BEiT, with a fused qkv and separate q and
v biases; `core.core.pretrained.act_postprocess1-4` and `core.core.scratch.` for the neck and the relative
head; the metric head at the top level, `_net.0`/`_net.2` for its 1x1 convolution pairs) are renamed onto it.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) in [0, 1] is run
twice, as it is and mirrored (the mirrored result flipped back and the two averaged); each run pads it by
reflection (sqrt(h / 2) x 3 rows and sqrt(w / 2) x 3 columns each side), scales it to the 384 x 512 side
that changes it least, keeping its aspect, in multiples of 32 (bilinear, corners aligned), normalises to
[-1, 1], and scales the depth back (bicubic) before cutting the padding off. The map is the depth stretched
between its 2nd and 85th percentiles and inverted (near white).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

FILE, KIND = "ZoeD_M12_N.pt", "zoedepth"
NET_SIZE = (384, 512)  # (height, width) the core scales towards
MULTIPLE = 32
NECK = [256, 512, 1024, 1024]
_BEIT = "core.core.pretrained.model."
_BLOCK = {"norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
          "attn.proj": "attention.o_proj"}
_SCALES = {"gamma_1": "lambda_1", "gamma_2": "lambda_2"}


def _config(state: dict):
    """ZoeDepthConfig for the file: the BEiT's width, depth and window from the tensors, the rest ZoeD_N's."""
    from transformers import BeitConfig, ZoeDepthConfig

    hidden = int(state[_BEIT + "cls_token"].shape[-1])
    patch = int(state[_BEIT + "patch_embed.proj.weight"].shape[-1])
    layers = 1 + max(int(k[len(_BEIT):].split(".")[1]) for k in state if k.startswith(_BEIT + "blocks."))
    table = int(state[_BEIT + "blocks.0.attn.relative_position_bias_table"].shape[0])
    window = (math.isqrt(table - 3) + 1) // 2
    heads = int(state[_BEIT + "blocks.0.attn.relative_position_bias_table"].shape[1])
    if (2 * window - 1) ** 2 + 3 != table or layers % 4:
        raise ValueError("unexpected relative position table or depth")
    step = layers // 4
    backbone = BeitConfig(
        image_size=window * patch, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=int(state[_BEIT + "blocks.0.mlp.fc1.weight"].shape[0]),
        use_relative_position_bias=True, reshape_hidden_states=False, layer_norm_eps=1e-6,
        out_features=[f"stage{step * (i + 1)}" for i in range(4)])
    bins = int(state["seed_bin_regressor._net.2.weight"].shape[0])
    attractors = [int(state[f"attractors.{i}._net.2.weight"].shape[0]) for i in range(4)]
    return ZoeDepthConfig(
        backbone_config=backbone, neck_hidden_sizes=[int(state[f"core.core.scratch.layer{i}_rn.weight"].shape[1])
                                                     for i in range(1, 5)],
        fusion_hidden_size=int(state["core.core.scratch.layer1_rn.weight"].shape[0]), num_attractors=attractors,
        bottleneck_features=int(state["conv2.weight"].shape[0]),
        bin_embedding_dim=int(state["seed_projector._net.2.weight"].shape[0]),
        bin_configurations=[{"n_bins": bins, "min_depth": 1e-3, "max_depth": 10.0}])


def _rename(state: dict, hidden: int) -> dict:
    """The original tensors under transformers' names; the BEiT's classifier, final norms and position indices
    (recomputed there) are dropped; an unknown key is kept, so a strict load names it."""
    out = {}
    for key, value in state.items():
        if key.startswith(_BEIT):
            rest = key[len(_BEIT):]
            parts = rest.split(".")
            if rest == "cls_token":
                out["backbone.beit.embeddings.cls_token"] = value
            elif rest.startswith("patch_embed.proj."):
                out[f"backbone.beit.embeddings.patch_embeddings.projection.{parts[-1]}"] = value
            elif parts[0] == "blocks" and len(parts) >= 3:
                prefix, inner = f"backbone.beit.layers.{parts[1]}.", ".".join(parts[2:])
                if inner == "attn.qkv.weight":
                    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                        out[f"{prefix}attention.{name}.weight"] = value[i * hidden:(i + 1) * hidden]
                elif inner in ("attn.q_bias", "attn.v_bias"):
                    out[f"{prefix}attention.{inner[5]}_proj.bias"] = value
                elif inner in _SCALES:
                    out[prefix + _SCALES[inner]] = value
                elif inner == "attn.relative_position_index":
                    continue
                elif inner == "attn.relative_position_bias_table":
                    out[prefix + "relative_position_bias.relative_position_bias_table"] = value
                else:
                    layer = ".".join(parts[2:-1])
                    out[f"{prefix}{_BLOCK.get(layer, layer)}.{parts[-1]}"] = value
            elif parts[0] in ("norm", "fc_norm", "head"):
                continue
            else:
                out[key] = value
            continue
        out[_rename_rest(key)] = value
    return out


def _rename_rest(key: str) -> str:
    parts = key.split(".")
    if key.startswith("core.core.pretrained.act_postprocess"):
        stage = int(parts[3][len("act_postprocess"):]) - 1
        rest = ".".join(parts[4:])
        if rest.startswith("0.project.0."):
            return f"neck.reassemble_stage.readout_projects.{stage}.0.{parts[-1]}"
        kind = {"3": "projection", "4": "resize"}.get(parts[4])
        return f"neck.reassemble_stage.layers.{stage}.{kind}.{parts[-1]}" if kind else key
    if key.startswith("core.core.scratch.layer") and key.endswith("_rn.weight"):
        return f"neck.convs.{int(parts[3][len('layer'):-len('_rn')]) - 1}.weight"
    if key.startswith("core.core.scratch.refinenet"):
        rest = ".".join(parts[4:]).replace("out_conv", "projection").replace("resConfUnit", "residual_layer")
        rest = rest.replace("conv1", "convolution1").replace("conv2", "convolution2")
        return f"neck.fusion_stage.layers.{4 - int(parts[3][len('refinenet'):])}.{rest}"
    if key.startswith("core.core.scratch.output_conv."):
        return f"relative_head.conv{int(parts[4]) // 2 + 1}.{parts[-1]}"
    head = ("conv2.", "seed_bin_regressor.", "seed_projector.", "projectors.", "attractors.",
            "conditional_log_binomial.")
    if key.startswith(head):
        return "metric_head." + key.replace("_net.0.", "conv1.").replace("_net.2.", "conv2.")
    return key


_BUFFERS = ("conditional_log_binomial.log_binomial_transform.",)


def load(path: Path):
    from transformers import ZoeDepthForDepthEstimation

    state = {k: v for k, v in files.read_state_dict(path, nested="model").items() if not k.startswith(_BUFFERS)}
    try:
        config = _config(state)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        raise ModelLoadError(f"{path.name}: not a ZoeDepth weight file (no MiDaS BEiT `core.core.pretrained` and"
                             " metric head)") from None
    model = ZoeDepthForDepthEstimation(config)
    renamed = _rename(state, config.backbone_config.hidden_size)
    return files.load_strict(model, renamed, path, "ZoeDepth (ZoeD_M12_N.pt)")


def core_size(height: int, width: int) -> tuple[int, int]:
    """The size the core works at: scaled towards 384 x 512 by the factor closer to 1 (aspect kept), in
    multiples of 32 (MiDaS's "minimal" resize)."""
    scale_h, scale_w = NET_SIZE[0] / height, NET_SIZE[1] / width
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return (int(np.round(scale * height / MULTIPLE) * MULTIPLE), int(np.round(scale * width / MULTIPLE) * MULTIPLE))


def _padded_run(model, x: torch.Tensor) -> torch.Tensor:
    """One metric depth [1, 1, H, W] of x [1, 3, H, W] in [0, 1], with the reflection padding around it."""
    pad_h, pad_w = int(np.sqrt(x.shape[2] / 2) * 3), int(np.sqrt(x.shape[3] / 2) * 3)
    padded = F.pad(x, [pad_w, pad_w, pad_h, pad_h], mode="reflect")
    h, w = core_size(*padded.shape[2:])
    feed = F.interpolate(padded, (h, w), mode="bilinear", align_corners=True) * 2.0 - 1.0
    out = model(pixel_values=feed).predicted_depth[:, None]
    out = F.interpolate(out, size=padded.shape[2:], mode="bicubic", align_corners=False)
    return out[:, :, pad_h:out.shape[2] - pad_h, pad_w:out.shape[3] - pad_w]


def depth(model, img: np.ndarray) -> np.ndarray:
    """Metric depth (larger: farther) of a uint8 RGB picture, at its size, float32: the mean of a run and a
    mirrored run."""
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float().permute(2, 0, 1)[None] / 255.0
        straight = _padded_run(model, x)
        mirrored = torch.flip(_padded_run(model, torch.flip(x, dims=[3])), dims=[3])
    return ((straight + mirrored) / 2)[0, 0].float().cpu().numpy()


def depth_map(d: np.ndarray) -> np.ndarray:
    """uint8, near white: stretched between the 2nd and 85th percentiles, inverted."""
    lo, hi = np.percentile(d, 2), np.percentile(d, 85)
    scaled = 1.0 - (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    return (scaled * 255.0).clip(0, 255).astype(np.uint8)


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """The depth_zoe map at the unit's resolution."""
    model = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return depth_map(depth(model, padded))[:h, :w]
