"""Face detection with RetinaFace (ResNet-50), the detector GFPGAN and CodeFormer are used with.

The network is written here in plain torch (torchvision, whose ResNet facexlib builds on, does not
import with Darkroom's torch) with the module names of facexlib's checkpoint, so the file users
already have, `detection_Resnet50_Final.pth`, loads with strict=True. The widths are read from the
file (`RetinaFace.from_state_dict`), so the tests' tiny random detector uses the same code.

Detection follows facexlib's FaceRestoreHelper as the webui calls it: the image is resized so its
short side is 640, fed as BGR pixel values minus the per-channel mean (104, 117, 123), the priors
are the published RetinaFace settings (min sizes 16/32, 64/128, 256/512 at strides 8, 16, 32;
variances 0.1, 0.2), faces under a 0.97 score are dropped, overlaps removed by NMS at IoU 0.4 and
faces whose eyes are under 5 pixels apart ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from darkroom.errors import ModelLoadError

# Published RetinaFace settings (biubug6/Pytorch_Retinaface data/config.py, as facexlib's cfg_re50 uses them).
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
DETECT_SIDE = 640  # the webui's get_face_landmarks_5(resize=640)
CONF_THRESHOLD = 0.97
NMS_IOU = 0.4
EYE_DIST_MIN = 5.0
RESNET50_BLOCKS = (3, 4, 6, 3)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    """conv (no bias) + batch norm: the `N.0` / `N.1` keys of facexlib's FPN and SSH blocks."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision's layout and names."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, width * 4, 1, stride, bias=False), nn.BatchNorm2d(width * 4))
                           if stride != 1 or cin != width * 4 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class _Body(nn.Module):
    """ResNet-50 up to layer4 (what facexlib's IntermediateLayerGetter keeps): the outputs of layers 2-4."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, blocks in enumerate(RESNET50_BLOCKS):
            planes = width * 2**i
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(cin, planes, 2 if b == 0 and i > 0 else 1))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class _FPN(nn.Module):
    def __init__(self, cins: list[int], cout: int):
        super().__init__()
        self.slope = 0.1 if cout <= 64 else 0.0  # RetinaFace's rule: leaky ReLU only for the narrow variant
        self.output1, self.output2, self.output3 = (_conv_bn(c, cout, 1) for c in cins)
        self.merge1, self.merge2 = _conv_bn(cout, cout, 3), _conv_bn(cout, cout, 3)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        act = lambda t: F.leaky_relu(t, self.slope)  # noqa: E731
        o1, o2, o3 = act(self.output1(feats[0])), act(self.output2(feats[1])), act(self.output3(feats[2]))
        o2 = act(self.merge2(o2 + F.interpolate(o3, size=o2.shape[-2:], mode="nearest")))
        o1 = act(self.merge1(o1 + F.interpolate(o2, size=o1.shape[-2:], mode="nearest")))
        return [o1, o2, o3]


class _SSH(nn.Module):
    """The context module: 3x3, 5x5 (two 3x3) and 7x7 (three 3x3) branches concatenated."""

    def __init__(self, c: int):
        super().__init__()
        self.slope = 0.1 if c <= 64 else 0.0
        self.conv3X3 = _conv_bn(c, c // 2, 3)
        self.conv5X5_1 = _conv_bn(c, c // 4, 3)
        self.conv5X5_2 = _conv_bn(c // 4, c // 4, 3)
        self.conv7X7_2 = _conv_bn(c // 4, c // 4, 3)
        self.conv7x7_3 = _conv_bn(c // 4, c // 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c5_1 = F.leaky_relu(self.conv5X5_1(x), self.slope)
        c7_2 = F.leaky_relu(self.conv7X7_2(c5_1), self.slope)
        return F.relu(torch.cat([self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(c7_2)], dim=1))


class _Head(nn.Module):
    def __init__(self, c: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(c, anchors * per_anchor, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """RetinaFace-ResNet50: (boxes, scores, landmarks) regressions for every prior of an input."""

    def __init__(self, width: int = 64, channels: int = 256):
        super().__init__()
        self.body = _Body(width)
        self.fpn = _FPN([width * 8, width * 16, width * 32], channels)
        self.ssh1, self.ssh2, self.ssh3 = _SSH(channels), _SSH(channels), _SSH(channels)
        self.ClassHead = nn.ModuleList(_Head(channels, 2) for _ in range(3))
        self.BboxHead = nn.ModuleList(_Head(channels, 4) for _ in range(3))
        self.LandmarkHead = nn.ModuleList(_Head(channels, 10) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats, strict=True)], dim=1)
        conf = torch.cat([h(f) for h, f in zip(self.ClassHead, feats, strict=True)], dim=1)
        landm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats, strict=True)], dim=1)
        return loc, conf.softmax(-1), landm

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], name: str = "detection_Resnet50_Final.pth") -> RetinaFace:
        """The network of a facexlib RetinaFace-ResNet50 checkpoint (a `module.` prefix is stripped), loaded
        strictly; a clear ModelLoadError for a file of another layout."""
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            width = int(state["body.conv1.weight"].shape[0])
            channels = int(state["fpn.output1.0.weight"].shape[0])
            net = cls(width, channels)
            net.load_state_dict(state, strict=True)
        except (KeyError, RuntimeError, AttributeError, IndexError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ModelLoadError(f"{name}: not a RetinaFace-ResNet50 face detector ({first}); use facexlib's"
                                 " detection_Resnet50_Final.pth") from None
        return net.eval().requires_grad_(False)


def priors(height: int, width: int) -> torch.Tensor:
    """[n, 4] anchors (cx, cy, w, h), relative to the image size, in the order the heads emit them:
    stride by stride, row by row, two sizes per cell."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float32) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float32) + 0.5) * step / width
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        for_size = [torch.stack([gx, gy, torch.full_like(gx, s / width), torch.full_like(gx, s / height)], -1)
                    for s in sizes]
        out.append(torch.stack(for_size, dim=2).reshape(-1, 4))
    return torch.cat(out)


def decode_boxes(loc: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Box regressions -> (x1, y1, x2, y2), relative to the image size (the SSD encoding with variances)."""
    centre = anchors[:, :2] + loc[:, :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def decode_landmarks(pre: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Landmark regressions -> [n, 5, 2] points (eyes, nose, mouth corners), relative to the image size."""
    pts = pre.reshape(-1, 5, 2)
    return anchors[:, None, :2] + pts * VARIANCE[0] * anchors[:, None, 2:]


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> list[int]:
    """Greedy non-maximum suppression: indices kept, best score first; a box overlapping a kept one by more
    than `iou` (intersection over union, areas as x2-x1 times y2-y1) is dropped."""
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep: list[int] = []
    while order.numel():
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        overlap = inter / (area[i] + area[rest] - inter).clamp(min=1e-12)
        order = rest[overlap <= iou]
    return keep


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixel coordinates of the image given."""

    box: tuple[float, float, float, float]
    score: float
    landmarks: torch.Tensor  # [5, 2]: left eye, right eye, nose, left and right mouth corner (x, y)


class FaceDetector:
    """A RetinaFace network and the webui's detection rules (resize, threshold, NMS, eye distance)."""

    def __init__(self, net: RetinaFace, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.net = net.to(self.device)

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[Face]:
        """The faces of an RGB image, best score first."""
        rgb = image.convert("RGB")
        scale = min(rgb.size) / DETECT_SIDE
        w, h = int(rgb.width / scale), int(rgb.height / scale)
        if (w, h) != rgb.size:
            rgb = rgb.resize((w, h), Image.LANCZOS)
        x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
        x = x.flip(-1).permute(2, 0, 1).float() - torch.tensor(BGR_MEAN).view(3, 1, 1)
        loc, conf, landm = self.net(x[None].to(self.device))
        loc, scores, landm = loc[0].float().cpu(), conf[0, :, 1].float().cpu(), landm[0].float().cpu()
        anchors = priors(h, w)
        keep = scores > CONF_THRESHOLD
        size = torch.tensor([w, h], dtype=torch.float32) * scale
        boxes = decode_boxes(loc[keep], anchors[keep]) * size.repeat(2)
        points = decode_landmarks(landm[keep], anchors[keep]) * size
        scores = scores[keep]
        faces = []
        for i in nms(boxes, scores, NMS_IOU):
            pts = points[i]
            if float(torch.dist(pts[0], pts[1])) < EYE_DIST_MIN:
                continue
            faces.append(Face(tuple(float(v) for v in boxes[i]), float(scores[i]), pts))
        return faces
