"""Tiny ONNX stand-ins for InsightFace's det_10g.onnx (SCRFD) and w600k_r50.onnx (ArcFace) (tests only; needs the
`onnx` package of requirements-dev.txt).

The detector has the real file's input and its nine outputs with the real shapes for a 640 x 640 input, answering
with fixed outputs (plus zero times the input's mean): the anchors the test names score and carry the box
distances and keypoint offsets it gives, every other anchor scores 0. So a test knows where each face lands.
The recognition graph really depends on its input: an 8 x 8 average pool, flattened, times fixed random weights
(`arcface_weights`), so a test can compute the embedding of an aligned face itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from darkroom.testing.tiny_onnx import _constant_graph

STRIDES = (8, 16, 32)
# det_10g.onnx's output names: scores, boxes, keypoints per stride
SCORE_NAMES, BOX_NAMES, KPS_NAMES = ("448", "471", "494"), ("451", "474", "497"), ("454", "477", "500")
EMBEDDING = 512


class Anchor(NamedTuple):
    """One anchor's answer: stride 8, 16 or 32, grid column and row, anchor 0 or 1, score, the box's left, top,
    right and bottom distances from the anchor centre (grid column x stride, row x stride) and the five keypoints'
    offsets (x, y each) from it, both in strides."""

    stride: int
    gx: int
    gy: int
    anchor: int
    score: float
    distances: tuple[float, float, float, float]
    offsets: tuple[float, ...]


def scrfd_outputs(anchors: Sequence[Anchor], size: int = 640) -> dict[str, np.ndarray]:
    """The nine outputs (by det_10g.onnx's names) answering with `anchors`."""
    scores = {s: np.zeros(((size // s) ** 2 * 2, 1), np.float32) for s in STRIDES}
    boxes = {s: np.zeros(((size // s) ** 2 * 2, 4), np.float32) for s in STRIDES}
    kps = {s: np.zeros(((size // s) ** 2 * 2, 10), np.float32) for s in STRIDES}
    for a in anchors:
        i = (a.gy * (size // a.stride) + a.gx) * 2 + a.anchor
        scores[a.stride][i], boxes[a.stride][i], kps[a.stride][i] = a.score, a.distances, a.offsets
    named = {}
    for names, values in ((SCORE_NAMES, scores), (BOX_NAMES, boxes), (KPS_NAMES, kps)):
        named |= {name: values[stride] for name, stride in zip(names, STRIDES, strict=True)}
    return named


def scrfd_file(path: Path, anchors: Sequence[Anchor] = (), *, batched: bool = False) -> Path:
    """det_10g.onnx (input "input.1", 1 x 3 x ? x ?) answering with `anchors`; `batched`: outputs with a
    leading batch of one, as some exports have."""
    outputs = scrfd_outputs(anchors)
    if batched:
        outputs = {name: value[None] for name, value in outputs.items()}
    return _constant_graph(path, "input.1", (1, 3, "?", "?"), outputs)


def face_anchor(box: tuple[float, float, float, float], kps: np.ndarray, score: float = 0.9, stride: int = 8,
                anchor: int = 0) -> Anchor:
    """The anchor nearest a box's centre answering with that box and those keypoints (detector-input pixels)."""
    x1, y1, x2, y2 = box
    gx, gy = int((x1 + x2) / 2 // stride), int((y1 + y2) / 2 // stride)
    cx, cy = gx * stride, gy * stride
    distances = ((cx - x1) / stride, (cy - y1) / stride, (x2 - cx) / stride, (y2 - cy) / stride)
    offsets = tuple(float(v) for v in ((np.asarray(kps, np.float64) - (cx, cy)) / stride).ravel())
    return Anchor(stride, gx, gy, anchor, score, distances, offsets)


def arcface_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The recognition graph's (192 x 512 weights, 512 biases)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((3 * 8 * 8, EMBEDDING)).astype(np.float32), rng.standard_normal(EMBEDDING).astype(
        np.float32)


def arcface_file(path: Path, seed: int = 0) -> Path:
    """w600k_r50.onnx's I/O ("input.1" N x 3 x 112 x 112 -> "683" N x 512): 14 x 14 average pooling to 8 x 8,
    flattened, times arcface_weights(seed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights, bias = arcface_weights(seed)
    nodes = [helper.make_node("AveragePool", ["input.1"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14]),
             helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "weights", "bias"], ["683"])]
    graph = helper.make_graph(
        nodes, "tiny_arcface", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", EMBEDDING])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def pack(folder: Path, anchors: Sequence[Anchor] = (), *, name: str = "buffalo_l", seed: int = 0) -> Path:
    """A pack folder (`folder`/<name>) with the tiny detector and recognition files under the pack's names."""
    from darkroom.control.annotators.insightface import PACK_FILES

    det, rec = PACK_FILES[name]
    scrfd_file(folder / name / det, anchors)
    arcface_file(folder / name / rec, seed)
    return folder / name
