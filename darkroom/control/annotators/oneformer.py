"""OneFormer semantic segmentation (seg_ofade20k, seg_ofcoco) from SHI-Labs' Swin-L detectron2 checkpoints.

The files are the original OneFormer releases (under "model": `backbone.` a D2SwinTransformer,
`sem_seg_head.pixel_decoder.` the multi-scale deformable-attention pixel decoder, `sem_seg_head.predictor.`
the task-conditioned masked-attention decoder, `task_mlp.`). transformers' OneFormerForUniversalSegmentation is
the same network; the keys are renamed onto it (Swin's and the decoder self-attention's fused projections
split into q, k, v) and its config is read from the tensor shapes; the attention heads of the deformable
encoder come from its sampling offsets (4 points on 3 levels), the decoder uses as many (8 in both yamls). The
text encoder, its projector and prompt context and Swin's stored relative position indices are dropped: only
training (the contrastive loss) uses the first three and transformers recomputes the indices. Two parts of
transformers' model that inference never reads (the loss's `criterion.` buffers, Swin's final LayerNorm,
which the backbone output skips) take the file's tensors when it has them, else their initial values.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) goes through
detectron2's DefaultPredictor, which resizes it with PIL's bilinear filter so the short side is MIN_SIZE_TEST
(ADE20K 640, COCO 800; the long side at most 2560 / 1333), normalises it in RGB with ImageNet's mean and
deviation (0-255 scale) and pads it with zeros to a multiple of 32. The task is the CLIP-tokenised "The task
is semantic" (77 tokens). Each query's mask logits are upsampled to the padded size, cropped to the picture,
resized to the predictor's input size, and the class scores are the softmax over classes without "no object"
times the mask sigmoids, summed over queries; the label is the best class. Each pixel takes its class colour
(detectron2's metadata: ADE20K's 150 colours, equal to mmseg's palette, or COCO panoptic's 133). The extension
draws the labels with matplotlib as polygons with antialiased white outlines on a white canvas, which lightens
the pixels next to each region's border (1-4% of a map, all within a pixel of a border); Darkroom paints the
exact per-pixel labels instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from darkroom.control.annotators import files, imageops, palettes
from darkroom.errors import InvalidRequest, ModelLoadError

FILES = {"ade20k": "250_16_swin_l_oneformer_ade20k_160k.pth", "coco": "150_16_swin_l_oneformer_coco_100ep.pth"}
KIND = "oneformer"
LABELS = {"ade20k": "seg_ofade20k", "coco": "seg_ofcoco"}
TEST_SIZE = {"ade20k": (640, 2560), "coco": (800, 1333)}  # INPUT.MIN_SIZE_TEST, MAX_SIZE_TEST of the yamls
PIXEL_MEAN = (123.675, 116.280, 103.530)
PIXEL_STD = (58.395, 57.120, 57.375)
SIZE_DIVISIBILITY = 32
TASK = "The task is semantic"
LEVELS, POINTS = 3, 4  # the deformable encoder's feature levels and sampling points
_DROPPED = ("text_encoder.", "text_projector.", "prompt_ctx.")
_UNUSED = ("model.pixel_level_module.encoder.swin.layernorm.", "criterion.")  # not read by inference

_PIXEL = "model.pixel_level_module."
_SW, _PD, _TM = _PIXEL + "encoder.swin.", _PIXEL + "decoder.", "model.transformer_module."
# original name (regex) -> transformers' name, first match wins; keys no rule matches stay, so a strict load
# names them
_RULES = [(re.compile(a), b) for a, b in (
    (r"^backbone\.patch_embed\.proj\.", _SW + "embeddings.patch_embeddings.projection."),
    (r"^backbone\.patch_embed\.norm\.", _SW + "embeddings.norm."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.norm1\.", _SW + r"encoder.layers.\1.blocks.\2.layernorm_before."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.norm2\.", _SW + r"encoder.layers.\1.blocks.\2.layernorm_after."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$",
     _SW + r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.", _SW + r"encoder.layers.\1.blocks.\2.attention.o_proj."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.", _SW + r"encoder.layers.\1.blocks.\2.mlp."),
    (r"^backbone\.layers\.(\d+)\.downsample\.", _SW + r"encoder.layers.\1.downsample."),
    (r"^sem_seg_head\.pixel_decoder\.input_proj\.", _PD + "input_projections."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", _PD + "level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm1\.",
     _PD + r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.norm2\.",
     _PD + r"encoder.layers.\1.final_layer_norm."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear(\d)\.",
     _PD + r"encoder.layers.\1.fc\2."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.",
     _PD + r"encoder.layers.\1.self_attn."),
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.", _PD + "mask_projection."),
    (r"^sem_seg_head\.pixel_decoder\.(adapter_1|layer_1)\.weight$", _PD + r"\1.0.weight"),
    (r"^sem_seg_head\.pixel_decoder\.(adapter_1|layer_1)\.norm\.", _PD + r"\1.1."),
    (r"^sem_seg_head\.predictor\.query_embed\.", _TM + "queries_embedder."),
    (r"^sem_seg_head\.predictor\.level_embed\.", _TM + "level_embed."),
    (r"^sem_seg_head\.predictor\.decoder_norm\.", _TM + "decoder.decoder_norm."),
    (r"^sem_seg_head\.predictor\.class_input_proj\.", _TM + "decoder.query_input_projection."),
    (r"^sem_seg_head\.predictor\.class_embed\.", _TM + "decoder.class_embed."),
    (r"^sem_seg_head\.predictor\.mask_embed\.layers\.(\d+)\.", _TM + r"decoder.mask_embed.layers.\1.0."),
    (r"^sem_seg_head\.predictor\.class_transformer\.decoder\.", _TM + "decoder.query_transformer.decoder."),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.out_proj\.",
     _TM + r"decoder.layers.\1.self_attn.self_attn.out_proj."),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.norm\.",
     _TM + r"decoder.layers.\1.self_attn.norm."),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.", _TM + r"decoder.layers.\1.cross_attn."),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\.", _TM + r"decoder.layers.\1.ffn."),
    (r"^task_mlp\.layers\.(\d+)\.", r"model.task_encoder.task_mlp.layers.\1.0."),
)]
# fused query-key-value projections, split in q, k, v order
_FUSED = [(re.compile(a), b) for a, b in (
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$",
     _SW + r"encoder.layers.\1.blocks.\2.attention.{}_proj.\3"),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$",
     _TM + r"decoder.layers.\1.self_attn.self_attn.{}_proj.\2"),
)]


def _count(state: dict, pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return 1 + max(found) if found else 0


def _config(state: dict):
    """OneFormerConfig for the file: widths, depths, heads, window, queries and classes from the tensors."""
    from transformers import OneFormerConfig, SwinConfig

    embed = int(state["backbone.patch_embed.proj.weight"].shape[0])
    stages = _count(state, r"backbone\.layers\.(\d+)\.")
    depths = [_count(state, rf"backbone\.layers\.{i}\.blocks\.(\d+)\.") for i in range(stages)]
    tables = [state[f"backbone.layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(stages)]
    window = (int(round(tables[0].shape[0] ** 0.5)) + 1) // 2
    if (2 * window - 1) ** 2 != tables[0].shape[0] or 0 in depths:
        raise ValueError("not a Swin backbone")
    backbone = SwinConfig(
        embed_dim=embed, depths=depths, num_heads=[int(t.shape[1]) for t in tables], window_size=window,
        patch_size=int(state["backbone.patch_embed.proj.weight"].shape[-1]), drop_path_rate=0.0,
        mlp_ratio=state["backbone.layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed,
        out_features=[f"stage{i + 1}" for i in range(stages)])
    pd, pr = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."
    offsets = int(state[pd + "transformer.encoder.layers.0.self_attn.sampling_offsets.weight"].shape[0])
    return OneFormerConfig(
        backbone_config=backbone, num_labels=int(state[pr + "class_embed.weight"].shape[0]) - 1,
        num_queries=int(state[pr + "query_embed.weight"].shape[0]),
        hidden_dim=int(state[pr + "query_embed.weight"].shape[1]),
        conv_dim=int(state[pd + "input_proj.0.0.weight"].shape[0]),
        mask_dim=int(state[pd + "mask_features.weight"].shape[0]),
        encoder_feedforward_dim=int(state[pd + "transformer.encoder.layers.0.linear1.weight"].shape[0]),
        encoder_layers=_count(state, pd.replace(".", r"\.") + r"transformer\.encoder\.layers\.(\d+)\."),
        num_attention_heads=offsets // (LEVELS * POINTS * 2),
        dim_feedforward=int(state[pr + "transformer_ffn_layers.0.linear1.weight"].shape[0]),
        decoder_layers=1 + _count(state, r"sem_seg_head\.predictor\.transformer_ffn_layers\.(\d+)\."),
        query_dec_layers=_count(state, r"sem_seg_head\.predictor\.class_transformer\.decoder\.layers\.(\d+)\."),
        task_seq_len=int(state["task_mlp.layers.0.weight"].shape[1]), is_training=False,
        output_auxiliary_logits=False)


def _rename(state: dict) -> dict:
    """The original tensors under transformers' names, without the training-only ones (_DROPPED) and Swin's
    relative position indices."""
    out = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key.endswith("attn.relative_position_index"):
            continue
        fused = next((m.expand(b) for r, b in _FUSED if (m := r.match(key))), None)
        if fused is not None:
            for part, name in zip(value.chunk(3, dim=0), ("q", "k", "v"), strict=True):
                out[fused.format(name)] = part
            continue
        if m := re.match(r"^backbone\.norm(\d+)\.(weight|bias)$", key):
            out[f"{_PIXEL}encoder.hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        out[next((r.sub(b, key) for r, b in _RULES if r.match(key)), key)] = value
    return out


def load(path: Path):
    from transformers import OneFormerForUniversalSegmentation

    state = files.read_state_dict(path, nested="model")
    try:
        config = _config(state)
    except (KeyError, AttributeError, IndexError, TypeError, ValueError):
        raise ModelLoadError(f"{path.name}: not a OneFormer weight file (no Swin `backbone.` with"
                             " `sem_seg_head.predictor.`)") from None
    model = OneFormerForUniversalSegmentation(config)
    renamed = _rename(state)
    for key, value in model.state_dict().items():  # parts inference never reads: the file's if it has them
        if key.startswith(_UNUSED) and key not in renamed:
            renamed[key] = value
    return files.load_strict(model, renamed, path, f"OneFormer ({' or '.join(FILES.values())})")


def task_tokens(length: int = 77) -> torch.Tensor:
    """OneFormer's task input: "The task is semantic" in CLIP's BPE (start and end tokens), zero-padded."""
    from darkroom.text.tokenizer import load_clip_tokenizer

    ids = load_clip_tokenizer()(TASK)["input_ids"][:length]
    return torch.tensor([ids + [0] * (length - len(ids))], dtype=torch.float32)


def predictor_size(height: int, width: int, short: int, longest: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge: the short side at `short`, scaled down if the long side passes
    `longest`, rounded half up."""
    scale = short / min(height, width)
    h, w = (short, scale * width) if height < width else (scale * height, short)
    if max(h, w) > longest:
        h, w = h * longest / max(h, w), w * longest / max(h, w)
    return int(h + 0.5), int(w + 0.5)


def class_scores(model, img: np.ndarray, kind: str) -> torch.Tensor:
    """Per-class scores [classes, H, W] of a uint8 RGB picture at its size, as OneFormer's semantic_inference
    gives them (the predictor's resize and the crop and resize back included)."""
    height, width = img.shape[:2]
    h, w = predictor_size(height, width, *TEST_SIZE[kind])
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), Image.Resampling.BILINEAR))
    device = next(model.parameters()).device
    x = torch.from_numpy(resized.astype(np.float32)).permute(2, 0, 1).to(device)
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (PIXEL_MEAN, PIXEL_STD))
    x = (x - mean) / std
    pad_h, pad_w = (-h) % SIZE_DIVISIBILITY, (-w) % SIZE_DIVISIBILITY
    x = F.pad(x, [0, pad_w, 0, pad_h])[None]
    with torch.no_grad():
        out = model(pixel_values=x, task_inputs=task_tokens(model.config.task_seq_len).to(device))
        masks = F.interpolate(out.masks_queries_logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        masks = F.interpolate(masks[:, :, :h, :w], size=(height, width), mode="bilinear", align_corners=False)[0]
        classes = F.softmax(out.class_queries_logits[0], dim=-1)[:, :-1]
        return torch.einsum("qc,qhw->chw", classes, masks.sigmoid())


def palette(kind: str) -> np.ndarray:
    return np.array(palettes.ADE20K if kind == "ade20k" else palettes.COCO_PANOPTIC, dtype=np.uint8)


def colour(labels: np.ndarray, kind: str) -> np.ndarray:
    """The class colours of a label map (HxWx3 uint8); a label past the palette stays white, as the extension
    leaves it unpainted."""
    table = np.concatenate([palette(kind), np.full((1, 3), 255, np.uint8)])
    return table[np.minimum(labels, len(table) - 1)]


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], kind: str, device: str | None = None) -> np.ndarray:
    """The seg_ofade20k / seg_ofcoco map at the unit's resolution."""
    if kind not in FILES:
        raise InvalidRequest(f"OneFormer kind {kind!r} must be one of {', '.join(FILES)}")
    path = files.find(FILES[kind], KIND, dirs)
    if path is None:
        raise InvalidRequest(f"{LABELS[kind]} needs {FILES[kind]} (the extension's annotator/downloads/{KIND})",
                             hint="searched: " + ", ".join(str(d) for d in dirs))
    model = load(path).to(device or "cpu")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    labels = class_scores(model, padded, kind).argmax(dim=0).cpu().numpy()
    return colour(labels, kind)[:h, :w]
