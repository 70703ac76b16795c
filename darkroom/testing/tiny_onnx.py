"""Tiny ONNX stand-ins for DW Pose's yolox_l.onnx and dw-ll_ucoco_384.onnx and the AP-10K animal pose model
(tests only; needs the `onnx` package of requirements-dev.txt).

Each graph has the real file's input and output shapes and answers with fixed outputs chosen by the test
(plus zero times the input's mean, so the input is used): the detector with the boxes asked for, the pose
model with SimCC peaks where the keypoints are asked to be. So a test knows exactly where each person and
keypoint must land in the drawn map.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

ANCHORS = sum((640 // s) ** 2 for s in (8, 16, 32))  # 8400


def _constant_graph(path: Path, input_name: str, input_shape: Sequence[int],
                    outputs: Mapping[str, np.ndarray]) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    outs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), name + "_value"))
        nodes.append(helper.make_node("Add", [name + "_value", "nothing"], [name]))
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                           list(input_shape))], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def yolox_file(path: Path, boxes: Sequence[tuple[float, float, float, float, float, int]] = ()) -> Path:
    """yolox_l.onnx answering with `boxes`: (centre x, centre y, width, height in 640-pixel input pixels,
    score, class), each on the stride-8 anchor nearest its centre (objectness 1, class score `score`)."""
    raw = np.zeros((1, ANCHORS, 85), np.float32)
    raw[0, :, 2:4] = math.log(1.0)
    for cx, cy, w, h, score, cls in boxes:
        gx, gy = int(cx // 8), int(cy // 8)
        i = gy * 80 + gx
        raw[0, i, :4] = (cx / 8 - gx, cy / 8 - gy, math.log(w / 8), math.log(h / 8))
        raw[0, i, 4] = 1.0
        raw[0, i, 5 + cls] = score
    return _constant_graph(path, "images", (1, 3, 640, 640), {"output": raw})


def dwpose_file(path: Path, points: Mapping[int, tuple[float, float, float]] | None = None, *,
                count: int = 133, size: tuple[int, int] = (288, 384)) -> Path:
    """dw-ll_ucoco_384.onnx (`count` keypoints on a `size` = (width, height) input; 17 and (256, 256): the
    AP-10K animal model) answering with keypoint k at (x, y) input pixels with score s, for each k: (x, y, s)
    of `points`; every other keypoint scores 0.05 at the input's corner."""
    width, height = size
    simcc_x = np.zeros((1, count, width * 2), np.float32)
    simcc_y = np.zeros((1, count, height * 2), np.float32)
    simcc_x[0, :, 0] = simcc_y[0, :, 0] = 0.05
    for k, (x, y, s) in (points or {}).items():
        simcc_x[0, k, :] = simcc_y[0, k, :] = 0.0
        simcc_x[0, k, int(round(x * 2))] = s
        simcc_y[0, k, int(round(y * 2))] = s
    return _constant_graph(path, "input", (1, 3, height, width), {"simcc_x": simcc_x, "simcc_y": simcc_y})
