"""OpenPose hands and faces (openpose_hand, openpose_face, openpose_faceonly, openpose_full), found where
the body keypoints say, from CMU's hand_pose_model.pth and facenet.pth.

Both networks have one layout, differing only in their outputs (22 hand maps: 21 joints and background;
71 face maps: 70 landmarks and background): a VGG-19 front (conv1_1 to conv5_2, three 2x2 max-pools)
narrowed by conv5_3_CPM, a first stage of two 1x1 convolutions (conv6_1_CPM, conv6_2_CPM), then five
stages (Mconv1-7_stage2-6) of five 7x7 and two 1x1 convolutions that see the previous maps next to the
features. Weight keys are the layer names; the widths are read from the file, so the tests' tiny files
build the same network. Only the last stage's maps are used.

As the extension (after OpenPose's handDetector): a hand's square box sits a third of the forearm past
the wrist, 1.5 x the longer of forearm and 0.9 x upper arm wide, cut to the picture, kept from 20 pixels
up. Its crop (BGR, blurred sigma 0.8) goes through the net at 184, 368, 552 and 736 pixels, the maps are
averaged at 128 x 128; per joint the largest blob of the sigma-3 blurred map above 0.05 gives the peak.
A face's box is centred on the nose, 3 x the nose-eye distance or 1.5 x the nose-ear distance (the larger)
each way; its crop goes through the net at 384 pixels, the maps come back to the crop's size and each of
the 71 maps with a value above 0.05 gives its maximum as a landmark (the background map too, as there).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageDraw
from scipy import ndimage
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

HAND_FILE, FACE_FILE, KIND = "hand_pose_model.pth", "facenet.pth", "openpose"
HAND_MAPS, FACE_MAPS = 22, 71
HAND_BOXES = (184, 368, 552, 736)  # 0.5, 1, 1.5, 2 x OpenPose's 368-pixel box
HAND_GRID, FACE_INPUT, STRIDE = 128, 384, 8
HAND_THRESHOLD, FACE_THRESHOLD, MIN_BOX = 0.05, 0.05, 20
WRIST_RATIO = 0.33  # a hand's centre lies this fraction of the forearm past the wrist (OpenPose's handDetector)
HAND_EDGES = ((0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11), (11, 12),
              (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20))
"""The hand skeleton: wrist 0, then four joints per finger from the thumb (1-4) to the little finger."""
HAND_COLORS = tuple(tuple(round(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
                    for i in range(len(HAND_EDGES)))
"""Edge i of the hand in hue i/20 at full saturation and value: the colours the openpose ControlNets learned."""
MARGIN = 0.01  # the extension draws nothing at or left of / above this pixel position (its "not found")

Point = tuple[float, float]


@dataclass(frozen=True)
class PartWidths:
    """Channel widths of the hand and face models; the defaults are the released files'."""

    c1: int = 64
    c2: int = 128
    c3: int = 256
    c4: int = 512
    cpm: int = 128
    wide: int = 512
    stage: int = 128


_WIDTH_KEYS = {"c1": "conv1_1", "c2": "conv2_1", "c3": "conv3_1", "c4": "conv4_1", "cpm": "conv5_3_CPM",
               "wide": "conv6_1_CPM", "stage": "Mconv1_stage2"}
_FRONT = (("conv1_1", "c1"), ("conv1_2", "c1"), None, ("conv2_1", "c2"), ("conv2_2", "c2"), None,
          *((f"conv3_{i}", "c3") for i in range(1, 5)), None, *((f"conv4_{i}", "c4") for i in range(1, 5)),
          ("conv5_1", "c4"), ("conv5_2", "c4"), ("conv5_3_CPM", "cpm"))
"""The VGG front, None for a 2x2 max-pool."""


class PartNet(nn.Module):
    """The hand or face keypoint network; `forward` gives the last stage's maps at 1/8 size."""

    def __init__(self, outputs: int, w: PartWidths = PartWidths()):
        super().__init__()
        cin = 3
        for layer in _FRONT:
            if layer is not None:
                name, width = layer
                self.add_module(name, nn.Conv2d(cin, getattr(w, width), 3, padding=1))
                cin = getattr(w, width)
        self.conv6_1_CPM = nn.Conv2d(w.cpm, w.wide, 1)
        self.conv6_2_CPM = nn.Conv2d(w.wide, outputs, 1)
        for stage in range(2, 7):
            sizes = [(outputs + w.cpm, w.stage, 7)] + [(w.stage, w.stage, 7)] * 4 + [(w.stage, w.stage, 1),
                                                                                      (w.stage, outputs, 1)]
            for i, (a, b, k) in enumerate(sizes, start=1):
                self.add_module(f"Mconv{i}_stage{stage}", nn.Conv2d(a, b, k, padding=k // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in _FRONT:
            h = F.max_pool2d(h, 2, 2) if layer is None else F.relu(getattr(self, layer[0])(h))
        features = h
        maps = self.conv6_2_CPM(F.relu(self.conv6_1_CPM(features)))
        for stage in range(2, 7):
            h = torch.cat([maps, features], 1)
            for i in range(1, 7):
                h = F.relu(getattr(self, f"Mconv{i}_stage{stage}")(h))
            maps = getattr(self, f"Mconv7_stage{stage}")(h)
        return maps


def load(path: Path, outputs: int, what: str) -> PartNet:
    state = files.read_state_dict(path)
    try:
        widths = PartWidths(**{f.name: int(state[f"{_WIDTH_KEYS[f.name]}.weight"].shape[0])
                               for f in fields(PartWidths)})
        found = int(state["conv6_2_CPM.weight"].shape[0])
    except (KeyError, AttributeError, IndexError, TypeError):
        raise ModelLoadError(f"{path.name}: not an OpenPose {what} weight file (no conv1_1 to Mconv1_stage2"
                             " layers)") from None
    if found != outputs:
        raise ModelLoadError(f"{path.name}: not an OpenPose {what} weight file ({found} maps, not {outputs})")
    return files.load_strict(PartNet(outputs, widths), state, path, f"CMU OpenPose {what}")


def _run(net: PartNet, img: np.ndarray) -> np.ndarray:
    """The net's maps (C, h/8, w/8) for a uint8 BGR picture fed as x/256 - 0.5."""
    device = next(net.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float().permute(2, 0, 1)[None]
        return net(x / 256.0 - 0.5)[0].float().cpu().numpy()


def _resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """The extension's smart_resize: area when shrinking, Lanczos when enlarging."""
    grow = (width + height) >= (x.shape[0] + x.shape[1])
    return imageops.resize(x, width, height, imageops.LANCZOS if grow else imageops.AREA)


def hand_maps(net: PartNet, crop: np.ndarray) -> np.ndarray:
    """The hand maps of a square BGR crop, averaged over the four box sizes, at 128 x 128 (HxWx22)."""
    blurred = imageops.gaussian(crop, 0.8)
    total = np.zeros((HAND_GRID, HAND_GRID, HAND_MAPS), np.float32)
    for box in HAND_BOXES:
        small = _resize(blurred, box, box)
        ph, pw = (-box) % STRIDE, (-box) % STRIDE
        padded = np.pad(small, ((0, ph), (0, pw), (0, 0)), constant_values=128)
        maps = _run(net, padded).transpose(1, 2, 0)
        maps = _resize(maps, maps.shape[1] * STRIDE, maps.shape[0] * STRIDE)[:box, :box]
        total += _resize(maps, HAND_GRID, HAND_GRID) / len(HAND_BOXES)
    return total


def hand_peaks(maps: np.ndarray, height: int, width: int) -> list[Point | None]:
    """Per joint (21) its (x, y) in a crop of height x width, or None: the maximum of the joint's map in
    its strongest blob (8-connected, summed over the map) of the sigma-3 blurred map above 0.05."""
    peaks: list[Point | None] = []
    for part in range(HAND_MAPS - 1):
        raw = maps[:, :, part].astype(np.float64)
        blob = ndimage.gaussian_filter(raw, sigma=3) > HAND_THRESHOLD
        if not blob.any():
            peaks.append(None)
            continue
        labels, count = ndimage.label(blob, structure=np.ones((3, 3)))
        sums = ndimage.sum(raw, labels, index=np.arange(1, count + 1))
        kept = np.where(labels == int(np.argmax(sums)) + 1, raw, 0.0)
        y, x = np.unravel_index(int(np.argmax(kept)), kept.shape)
        point = (int(x * width / HAND_GRID), int(y * height / HAND_GRID))
        peaks.append(point if point[0] > 0 and point[1] > 0 else None)
    return peaks


def face_peaks(net: PartNet, crop: np.ndarray) -> list[Point | None]:
    """The landmarks of a BGR face crop, in its pixels: each map's maximum where it passes 0.05 (else None)."""
    h, w = crop.shape[:2]
    maps = _run(net, _resize(crop, FACE_INPUT, FACE_INPUT))
    with torch.no_grad():
        maps = F.interpolate(torch.from_numpy(maps)[None], (h, w), mode="bilinear", align_corners=True)[0].numpy()
    out: list[Point | None] = []
    for m in maps:
        point = None
        if (m > FACE_THRESHOLD).any():
            y, x = np.unravel_index(int(np.argmax(m)), m.shape)
            if x > 0 and y > 0:
                point = (float(x), float(y))
        out.append(point)
    return out


def hand_boxes(person: Sequence[Point | None], height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """(x, y, size, is_left) of the square boxes round a person's hands, left (5-7) first, then right (2-4)."""
    out = []
    for shoulder, elbow, wrist, left in ((5, 6, 7, True), (2, 3, 4, False)):
        if person[shoulder] is None or person[elbow] is None or person[wrist] is None:
            continue
        (x1, y1), (x2, y2), (x3, y3) = person[shoulder], person[elbow], person[wrist]
        size = 1.5 * max(math.hypot(x3 - x2, y3 - y2), 0.9 * math.hypot(x2 - x1, y2 - y1))
        x = max(x3 + WRIST_RATIO * (x3 - x2) - size / 2, 0.0)
        y = max(y3 + WRIST_RATIO * (y3 - y2) - size / 2, 0.0)
        size = min(size if x + size <= width else width - x, size if y + size <= height else height - y)
        if size >= MIN_BOX:
            out.append((int(x), int(y), int(size), left))
    return out


def face_box(person: Sequence[Point | None], height: int, width: int) -> tuple[int, int, int] | None:
    """(x, y, size) of the box round a person's face, or None without the nose and an eye or ear."""
    nose = person[0]
    if nose is None or all(person[i] is None for i in (14, 15, 16, 17)):
        return None
    half = 0.0
    for i, factor in ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)):
        if person[i] is not None:
            half = max(half, factor * max(abs(nose[0] - person[i][0]), abs(nose[1] - person[i][1])))
    x, y = max(nose[0] - half, 0.0), max(nose[1] - half, 0.0)
    # as the extension: the overflow test uses the half size, the cut the whole
    size = min(2 * half if x + half <= width else width - x, 2 * half if y + half <= height else height - y)
    return (int(x), int(y), int(size)) if size >= MIN_BOX else None


def find_hands(net: PartNet, img_bgr: np.ndarray, person) -> tuple[list | None, list | None]:
    """(left, right) hands of one person in picture pixels: 21 points (None where not found) or None."""
    hands: dict[bool, list[Point | None]] = {}
    for x, y, size, left in hand_boxes(person, *img_bgr.shape[:2]):
        crop = img_bgr[y:y + size, x:x + size]
        peaks = hand_peaks(hand_maps(net, crop), *crop.shape[:2])
        hands[left] = [None if p is None else (p[0] + x, p[1] + y) for p in peaks]
    return hands.get(True), hands.get(False)


def find_face(net: PartNet, img_bgr: np.ndarray, person) -> list[Point | None] | None:
    box = face_box(person, *img_bgr.shape[:2])
    if box is None:
        return None
    x, y, size = box
    return [None if p is None else (p[0] + x, p[1] + y) for p in face_peaks(net, img_bgr[y:y + size, x:x + size])]


def draw_hand(pen: ImageDraw.ImageDraw, hand: Sequence[Point | None] | None) -> None:
    """The extension's hand: 2-pixel edges in their hues, then blue dots of radius 4 on the joints."""
    if not hand:
        return
    pixel = [None if p is None else (int(p[0]), int(p[1])) for p in hand]
    for (a, b), color in zip(HAND_EDGES, HAND_COLORS, strict=True):
        if pixel[a] is None or pixel[b] is None or min(*pixel[a], *pixel[b]) <= MARGIN:
            continue
        pen.line([pixel[a], pixel[b]], fill=color, width=2)
    for p in pixel:
        if p is not None and min(p) > MARGIN:
            pen.ellipse((p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4), fill=(0, 0, 255))


def draw_face(pen: ImageDraw.ImageDraw, face: Sequence[Point | None] | None) -> None:
    """The extension's face: white dots of radius 3 on the landmarks found."""
    for point in face or ():
        if point is None:
            continue
        x, y = int(point[0]), int(point[1])
        if x > MARGIN and y > MARGIN:
            pen.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(255, 255, 255))
