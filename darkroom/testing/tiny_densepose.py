"""A tiny TorchScript stand-in for densepose_r50_fpn_dl.torchscript (tests only).

Same calling convention as the extension's file: `model(image)` with a CHW uint8 picture returns
(pred_boxes [N, 4] xyxy in pixels, coarse_segm [N, 2, S, S], fine_segm [N, 25, S, S], u, v [N, 25, S, S]).
Like detectron2's export it calls `torch.ops.torchvision.nms` (to pick boxes) and
`torch.ops.torchvision.roi_align` (to pool each box's features), so loading it needs those operators: it is
scripted with Darkroom's own (annotators.tv_ops), no torchvision needed. Two strided convolutions, an
objectness and a box-offset layer over 16-pixel anchors at every feature cell, and a head on the pooled
features: boxes and part maps both follow the picture. The weights come from a fixed formula, so every
build is the same model whatever torch's random generator does: tests/data/densepose_reference.npz holds the
extension's maps of this very model, so a change here means recording that file again (see
tests/test_controlnet_densepose.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from darkroom.control.annotators import tv_ops

SIDE, PARTS = 12, 25  # the output maps' side (the real file's is 112) and the fine classes (24 parts + background)


class TinyDensePose(nn.Module):
    def __init__(self, width: int = 16, max_people: int = 3, anchor: float = 16.0):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.body = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.objectness = nn.Conv2d(width, 1, 1)
        self.deltas = nn.Conv2d(width, 4, 1)
        self.head = nn.Conv2d(width, 2 + 3 * PARTS, 3, padding=1)
        self.max_people, self.anchor, self.stride, self.side, self.parts = max_people, anchor, 4, SIDE, PARTS

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                    torch.Tensor]:
        height, width = image.shape[1], image.shape[2]
        x = image.float().unsqueeze(0) / 127.5 - 1.0
        feat = torch.relu(self.body(torch.relu(self.stem(x))))
        fh, fw = feat.shape[2], feat.shape[3]
        scores = torch.sigmoid(self.objectness(feat)).flatten()
        d = torch.tanh(self.deltas(feat))[0].flatten(1).t()
        cy = ((torch.arange(fh, device=feat.device) + 0.5) * self.stride).repeat_interleave(fw)
        cx = ((torch.arange(fw, device=feat.device) + 0.5) * self.stride).repeat(fh)
        cx, cy = cx + 6.0 * d[:, 0], cy + 6.0 * d[:, 1]
        half_w, half_h = self.anchor * (1.0 + 0.6 * d[:, 2]), self.anchor * (1.0 + 0.6 * d[:, 3])
        boxes = torch.stack([(cx - half_w).clamp(0.0, float(width)), (cy - half_h).clamp(0.0, float(height)),
                             (cx + half_w).clamp(0.0, float(width)), (cy + half_h).clamp(0.0, float(height))], 1)
        keep = torch.ops.torchvision.nms(boxes, scores, 0.1)[: self.max_people]
        boxes = boxes[keep]
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], 1)
        pooled = torch.ops.torchvision.roi_align(feat, rois, 1.0 / self.stride, self.side, self.side, 2, True)
        out = self.head(pooled)
        p = self.parts
        return boxes, out[:, :2], out[:, 2:2 + p], out[:, 2 + p:2 + 2 * p], out[:, 2 + 2 * p:]


def _fill(model: nn.Module) -> None:
    """Weights from a sine hash of their index (uniform in +-2.5 / sqrt(fan-in)), biases zero but the coarse
    foreground's: the same numbers on every machine and torch version."""
    with torch.no_grad():
        for layer, (name, p) in enumerate(model.named_parameters()):
            i = np.arange(p.numel(), dtype=np.float64)
            fan_in = p[0].numel() if p.dim() > 1 else 1
            values = np.modf(np.abs(np.sin(i * 12.9898 + layer * 78.233) * 43758.5453))[0] * 2.0 - 1.0
            values *= 0.0 if name.endswith("bias") else 2.5 / np.sqrt(fan_in)
            p.copy_(torch.from_numpy(values.astype(np.float32)).reshape(p.shape))
        model.head.bias[1] = 0.4  # the coarse map's foreground, so most of a box is body


def build(path: Path) -> Path:
    """The tiny model scripted and saved to `path` (torch.jit.save): a TorchScript archive that names
    torchvision::nms and torchvision::roi_align."""
    tv_ops.ensure_registered()
    model = TinyDensePose().eval().requires_grad_(False)
    _fill(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; the real file is TorchScript
        torch.jit.save(torch.jit.script(model), str(path))
    return path
