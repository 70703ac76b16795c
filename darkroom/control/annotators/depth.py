"""Depth maps: depth_anything (depth_anything_vitl14.pth), depth_anything_v2 (depth_anything_v2_vitl.safetensors)
and depth_midas (dpt_hybrid-midas-501f0c75.pt); normal_midas's normals from the MiDaS depth.

Both nets are run through transformers' implementations with configs built here from the files' shapes
(never fetched) and the original checkpoints' keys renamed onto them.

Depth Anything:

The network is LiheYoung's Depth Anything: a DINOv2 ViT (ViT-L/14 in the released file) whose last four
blocks feed a DPT head. transformers ships the same network as DepthAnythingForDepthEstimation; its config
is built here from the file's shapes (never fetched), and the original checkpoint's keys are renamed onto
it: the ViT under `pretrained.` (a fused qkv matrix, split here into query, key and value), the head under
`depth_head.` (projects/resize_layers: the reassemble stage; scratch.layerN_rn: the neck convolutions;
scratch.refinenetN: the fusion layers in reverse order; output_conv1/output_conv2: the head).

As the extension: the picture is scaled so both sides reach 518 pixels (multiples of 14, bicubic),
normalised with ImageNet's mean and deviation, and the relative depth is resized back and stretched to
0-255. The extension hands this model its RGB picture through an RGB-to-BGR conversion, so the network
sees BGR; Darkroom does the same, so its maps match the extension's.

Depth Anything V2 has the same network and key layout, and the extension treats it the same way; only the
ViT blocks that feed the head differ: V1 takes the last four, V2 four spread through the encoder (blocks 4,
11, 17 and 23 of ViT-L's 24, 2, 5, 8 and 11 of ViT-B's and ViT-S's 12), which the file cannot tell.

MiDaS v3 DPT-Hybrid (transformers' DPTForDepthEstimation with a BiT backbone): timm's ViT-B/16 over a
ResNet-50 stem (stages of 3, 4 and 9 bottlenecks with weight-standardised convolutions and group norm)
under `pretrained.model.`, whose first two stages feed the DPT neck directly; `pretrained.act_postprocess3/4`
are the readout projections and reassemble convolutions of ViT blocks 8 and 11; `scratch.` is the neck and
head. As the extension: the picture (short side at the resolution, padded to 64) goes in at its own size
in [-1, 1], and the depth is stretched to 0-255.
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

FILE, KIND = "depth_anything_vitl14.pth", "depth_anything"
V2_FILE, V2_KIND = "depth_anything_v2_vitl.safetensors", "depth_anything_v2"
SIZE, MULTIPLE = 518, 14
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _shape(state: dict, key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in state[key].shape)


def v2_blocks(layers: int) -> list[int]:
    """The ViT blocks (0-based) whose outputs feed Depth Anything V2's head: the authors' table for ViT-L
    (24 blocks), else evenly spaced and ending at the last block, which is the table for 12 (ViT-S, ViT-B)
    and 40 (ViT-G) blocks."""
    if layers == 24:
        return [4, 11, 17, 23]
    return [round(layers * (i + 1) / 4) - 1 for i in range(4)]


def _config(state: dict, v2: bool = False):
    """A DepthAnythingConfig matching the file: widths, depth and patch size from the tensors' shapes."""
    from transformers import DepthAnythingConfig, Dinov2Config

    hidden = _shape(state, "pretrained.cls_token")[-1]
    patch = _shape(state, "pretrained.patch_embed.proj.weight")[-1]
    tokens = _shape(state, "pretrained.pos_embed")[1] - 1
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("pretrained.blocks."))
    side = math.isqrt(tokens)
    if side * side != tokens or layers < 4:
        raise ValueError("unexpected position embedding or depth")
    # transformers counts the embeddings as hidden state 0, so block i's output is index i + 1
    outs = [i + 1 for i in v2_blocks(layers)] if v2 else list(range(layers - 3, layers + 1))
    backbone = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        mlp_ratio=_shape(state, "pretrained.blocks.0.mlp.fc1.weight")[0] // hidden, patch_size=patch,
        image_size=side * patch, out_indices=outs, apply_layernorm=True,
        reshape_hidden_states=False)
    return DepthAnythingConfig(
        backbone_config=backbone, reassemble_hidden_size=hidden, patch_size=patch,
        neck_hidden_sizes=[_shape(state, f"depth_head.projects.{i}.weight")[0] for i in range(4)],
        fusion_hidden_size=_shape(state, "depth_head.scratch.layer1_rn.weight")[0],
        head_hidden_size=_shape(state, "depth_head.scratch.output_conv2.0.weight")[0])


def _attention_names(model_keys: set[str]) -> tuple[str, str, str, str]:
    """transformers renamed the ViT attention's layers (query/key/value/output.dense to q/k/v/o_proj)."""
    if "backbone.encoder.layer.0.attention.q_proj.weight" in model_keys:
        return "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"
    return "attention.attention.query", "attention.attention.key", "attention.attention.value", \
        "attention.output.dense"


def _rename(state: dict, hidden: int, model_keys: set[str]) -> dict:
    """The original checkpoint's tensors under transformers' names; an unknown key is kept as is, so a
    strict load names it."""
    q, k, v, o = _attention_names(model_keys)
    fusion = {1: 3, 2: 2, 3: 1, 4: 0}  # refinenet4 takes the deepest features first
    fixed = {"pretrained.cls_token": "backbone.embeddings.cls_token",
             "pretrained.mask_token": "backbone.embeddings.mask_token",
             "pretrained.pos_embed": "backbone.embeddings.position_embeddings",
             "pretrained.norm.weight": "backbone.layernorm.weight", "pretrained.norm.bias": "backbone.layernorm.bias",
             "depth_head.scratch.output_conv1.weight": "head.conv1.weight",
             "depth_head.scratch.output_conv1.bias": "head.conv1.bias",
             "depth_head.scratch.output_conv2.0.weight": "head.conv2.weight",
             "depth_head.scratch.output_conv2.0.bias": "head.conv2.bias",
             "depth_head.scratch.output_conv2.2.weight": "head.conv3.weight",
             "depth_head.scratch.output_conv2.2.bias": "head.conv3.bias"}
    block = {"norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2", "attn.proj": o}
    scales = {"ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith("pretrained.patch_embed.proj."):
            out["backbone.embeddings.patch_embeddings.projection." + parts[-1]] = value
        elif key.startswith("pretrained.blocks.") and len(parts) >= 5:
            prefix, inner = f"backbone.encoder.layer.{parts[2]}.", ".".join(parts[3:-1])
            if ".".join(parts[3:]) in scales:
                out[prefix + scales[".".join(parts[3:])]] = value
            elif inner == "attn.qkv":
                for i, name in enumerate((q, k, v)):
                    out[f"{prefix}{name}.{parts[-1]}"] = value[i * hidden:(i + 1) * hidden]
            elif inner in block:
                out[f"{prefix}{block[inner]}.{parts[-1]}"] = value
            else:
                out[key] = value
        elif key.startswith("depth_head.projects."):
            out[f"neck.reassemble_stage.layers.{parts[2]}.projection.{parts[-1]}"] = value
        elif key.startswith("depth_head.resize_layers."):
            out[f"neck.reassemble_stage.layers.{parts[2]}.resize.{parts[-1]}"] = value
        elif key.startswith("depth_head.scratch.layer") and key.endswith("_rn.weight"):
            out[f"neck.convs.{int(parts[2][len('layer'):-len('_rn')]) - 1}.weight"] = value
        elif key.startswith("depth_head.scratch.refinenet"):
            rest = ".".join(parts[3:]).replace("out_conv", "projection").replace("resConfUnit", "residual_layer")
            rest = rest.replace("conv1", "convolution1").replace("conv2", "convolution2")
            out[f"neck.fusion_stage.layers.{fusion[int(parts[2][len('refinenet'):])]}.{rest}"] = value
        else:
            out[key] = value
    return out


def load(path: Path, v2: bool = False):
    """Depth Anything (V2: its layer choice) from an original checkpoint, .pth or .safetensors."""
    from transformers import DepthAnythingForDepthEstimation

    state = files.read_state_dict(path)
    try:
        config = _config(state, v2)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        raise ModelLoadError(f"{path.name}: not a Depth Anything weight file (no DINOv2 `pretrained.` and"
                             " `depth_head.` tensors)") from None
    model = DepthAnythingForDepthEstimation(config)
    hidden = config.backbone_config.hidden_size
    try:
        renamed = _rename(state, hidden, set(model.state_dict()))
    except (KeyError, ValueError, IndexError):
        raise ModelLoadError(f"{path.name}: not a Depth Anything weight file") from None
    return files.load_strict(model, renamed, path, "Depth Anything")


def _multiple(x: float) -> int:
    """The extension's rounding of a side: the nearest multiple of 14, or the next one up below 518."""
    y = int(np.round(x / MULTIPLE) * MULTIPLE)
    return y if y >= SIZE else int(math.ceil(x / MULTIPLE) * MULTIPLE)


def depth(model, img: np.ndarray) -> np.ndarray:
    """Relative depth (near is large) of a uint8 RGB picture, at its size, float32."""
    h, w = img.shape[:2]
    scale = max(SIZE / h, SIZE / w)
    feed = img[:, :, ::-1].astype(np.float32) / 255.0  # the extension's RGB-to-BGR swap, see the docstring
    feed = imageops.resize(feed, _multiple(scale * w), _multiple(scale * h), imageops.CUBIC)
    feed = (feed - MEAN) / STD
    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(feed.transpose(2, 0, 1))).to(device)[None]
        pred = model(pixel_values=x).predicted_depth
        pred = F.interpolate(pred[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    return pred[0, 0].cpu().numpy()


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None,
           v2: bool = False) -> np.ndarray:
    """The `depth_anything` (`v2`: `depth_anything_v2`) map: grey depth, near white, the short side at `res`."""
    path = files.find(V2_FILE, V2_KIND, dirs) if v2 else files.find(FILE, KIND, dirs)
    model = load(path, v2).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    d = depth(model, padded)
    lo, hi = float(d.min()), float(d.max())
    scaled = (d - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(d)
    return scaled.clip(0, 255).astype(np.uint8)[:h, :w]


MIDAS_FILE, MIDAS_KIND = "dpt_hybrid-midas-501f0c75.pt", "midas"
_VIT, _RESNET = "pretrained.model.", "pretrained.model.patch_embed.backbone."
HYBRID_PATCH, GROUPS = 16, 32


def _midas_config(state: dict):
    """A hybrid DPTConfig matching the file (widths, depths, stage sizes from the tensors' shapes)."""
    from transformers import BitConfig, DPTConfig

    hidden = _shape(state, _VIT + "cls_token")[-1]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(_VIT + "blocks."))
    side = math.isqrt(_shape(state, _VIT + "pos_embed")[1] - 1)
    depths = [1 + max(int(k.split(".")[7]) for k in state if k.startswith(f"{_RESNET}stages.{s}.blocks."))
              for s in range(3)]
    widths = [_shape(state, f"{_RESNET}stages.{s}.blocks.0.conv3.weight")[0] for s in range(3)]
    if layers < 4 or side < 1:
        raise ValueError("too few blocks")
    bit = BitConfig(global_padding="same", layer_type="bottleneck", depths=depths, hidden_sizes=widths,
                    embedding_size=_shape(state, _RESNET + "stem.conv.weight")[0], num_groups=GROUPS,
                    out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True)
    return DPTConfig(
        is_hybrid=True, backbone_config=bit, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), intermediate_size=_shape(state, _VIT + "blocks.0.mlp.fc1.weight")[0],
        image_size=side * HYBRID_PATCH, patch_size=HYBRID_PATCH, layer_norm_eps=1e-6,  # timm's ViT epsilon
        backbone_out_indices=[0, 1, (2 * layers) // 3, layers - 1],  # MiDaS hooks: ResNet 1, 2, ViT 8, 11
        neck_hidden_sizes=[_shape(state, f"scratch.layer{i}_rn.weight")[1] for i in range(1, 5)],
        reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=_shape(state, "scratch.layer1_rn.weight")[0],
        readout_type="project", use_batch_norm_in_fusion_residual=False,
        backbone_featmap_shape=[1, widths[-1], side, side])


def _midas_rename(state: dict, hidden: int, model_keys: set[str]) -> dict:
    """The MiDaS checkpoint's tensors under transformers' DPT names (the ImageNet classifier is dropped)."""
    if "dpt.encoder.layer.0.attention.q_proj.weight" in model_keys:
        q, k, v, o = "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"
    else:
        q, k, v, o = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                      "attention.output.dense")
    block = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": o, "mlp.fc1": "intermediate.dense",
             "mlp.fc2": "output.dense"}
    fixed = {_VIT + "cls_token": "dpt.embeddings.cls_token", _VIT + "pos_embed": "dpt.embeddings.position_embeddings"}
    post = {"0.project.0": "readout_projects.{i}.0", "3": "layers.{i}.projection", "4": "layers.{i}.resize"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith(_VIT + "head."):
            continue
        if key in fixed:
            out[fixed[key]] = value
        elif key.startswith(_RESNET + "stem."):
            out[f"dpt.embeddings.backbone.bit.embedder.{'convolution' if parts[5] == 'conv' else 'norm'}."
                f"{parts[-1]}"] = value
        elif key.startswith(_RESNET + "stages."):
            rest = ".".join(parts[8:])
            out[f"dpt.embeddings.backbone.bit.encoder.stages.{parts[5]}.layers.{parts[7]}.{rest}"] = value
        elif key.startswith(_VIT + "patch_embed.proj."):
            out[f"dpt.embeddings.projection.{parts[-1]}"] = value
        elif key.startswith(_VIT + "norm."):
            out[f"dpt.layernorm.{parts[-1]}"] = value
        elif key.startswith(_VIT + "blocks.") and len(parts) >= 6:
            prefix, inner = f"dpt.encoder.layer.{parts[3]}.", ".".join(parts[4:-1])
            if inner == "attn.qkv":
                for i, name in enumerate((q, k, v)):
                    out[f"{prefix}{name}.{parts[-1]}"] = value[i * hidden:(i + 1) * hidden]
            else:
                out[f"{prefix}{block.get(inner, inner)}.{parts[-1]}"] = value
        elif key.startswith("pretrained.act_postprocess") and ".".join(parts[2:-1]) in post:
            stage = int(parts[1][len("act_postprocess"):]) - 1
            out["neck.reassemble_stage." + post[".".join(parts[2:-1])].format(i=stage) + "." + parts[-1]] = value
        elif key.startswith("scratch.layer") and key.endswith("_rn.weight"):
            out[f"neck.convs.{int(parts[1][len('layer'):-len('_rn')]) - 1}.weight"] = value
        elif key.startswith("scratch.refinenet"):
            rest = ".".join(parts[2:]).replace("out_conv", "projection").replace("resConfUnit", "residual_layer")
            rest = rest.replace("conv1", "convolution1").replace("conv2", "convolution2")
            out[f"neck.fusion_stage.layers.{4 - int(parts[1][len('refinenet'):])}.{rest}"] = value
        elif key.startswith("scratch.output_conv."):
            out["head.head." + ".".join(parts[2:])] = value
        else:
            out[key] = value
    return out


def load_midas(path: Path):
    from transformers import DPTForDepthEstimation

    state = files.read_state_dict(path)
    try:
        config = _midas_config(state)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        raise ModelLoadError(f"{path.name}: not a MiDaS DPT-Hybrid weight file (no `pretrained.model.` ViT with"
                             " a ResNet `patch_embed.backbone`)") from None
    model = DPTForDepthEstimation(config)
    try:
        renamed = _midas_rename(state, config.hidden_size, set(model.state_dict()))
    except (KeyError, ValueError, IndexError):
        raise ModelLoadError(f"{path.name}: not a MiDaS DPT-Hybrid weight file") from None
    return files.load_strict(model, renamed, path, "MiDaS DPT-Hybrid")


def midas_depth(model, img: np.ndarray) -> np.ndarray:
    """Relative inverse depth (near is large) of a uint8 RGB picture whose sides are multiples of 16."""
    h, w = img.shape[:2]
    device = next(model.parameters()).device
    # transformers checks the input against the config's size before resizing the position embedding, and
    # its hybrid neck assumes a square grid; MiDaS takes any size, so the parts are run here with the grid
    model.dpt.embeddings.image_size = (h, w)
    config = model.config
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float() / 127.5 - 1.0
        out = model.dpt(x.permute(2, 0, 1)[None], output_hidden_states=True)
        stages = list(out.intermediate_activations)  # the ResNet's first two stages
        stages += [s for i, s in enumerate(out.hidden_states[1:]) if i in config.backbone_out_indices[2:]]
        pred = model.head(model.neck(stages, h // HYBRID_PATCH, w // HYBRID_PATCH))
    return pred[0].float().cpu().numpy()


def detect_midas(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None) -> np.ndarray:
    """The `depth` (depth_midas) map: grey depth, near white, the short side at `res`."""
    model = load_midas(files.find(MIDAS_FILE, MIDAS_KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    d = midas_depth(model, padded)
    d = d - d.min()
    top = float(d.max())
    scaled = d / top * 255.0 if top > 0 else np.zeros_like(d)
    return scaled.clip(0, 255).astype(np.uint8)[:h, :w]


def detect_midas_normal(img: np.ndarray, res: int, dirs: Sequence[Path], bg_threshold: float = 0.4,
                        device: str | None = None) -> np.ndarray:
    """The normal_midas map: normals from the MiDaS depth's 3x3 Sobel gradients (x right, y down) with a
    constant 2 pi for z, flat where the stretched depth is under `bg_threshold` (the background), as
    (z, y, x) colours 127.5 + 127.5 n (the extension's channel order), the short side at `res`."""
    from scipy import ndimage

    model = load_midas(files.find(MIDAS_FILE, MIDAS_KIND, dirs)).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    d = midas_depth(model, padded).astype(np.float32)
    stretched = d - d.min()
    top = float(stretched.max())
    stretched = stretched / top if top > 0 else stretched
    gx = ndimage.sobel(d, axis=1, mode="mirror")  # OpenCV's Sobel with its reflect-101 border
    gy = ndimage.sobel(d, axis=0, mode="mirror")
    background = stretched < bg_threshold
    gx[background] = 0
    gy[background] = 0
    normal = np.stack([gx, gy, np.full_like(gx, 2 * np.pi)], axis=2)
    normal /= np.sqrt((normal ** 2).sum(axis=2, keepdims=True))
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)[:h, :w, ::-1]
