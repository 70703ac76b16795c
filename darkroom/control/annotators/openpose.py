"""OpenPose body keypoints (the extension's `openpose` preprocessor) from CMU's body_pose_model.pth; the
hand and face variants add openpose_parts' nets on boxes the body keypoints give.

The network is the 2017 COCO body model (Cao et al., "Realtime multi-person 2D pose estimation using part
affinity fields"): a VGG-19 front (conv1_1 to conv4_2, three 2x2 max-pools, so 1/8 resolution) narrowed by
conv4_3_CPM/conv4_4_CPM to 128 features, then six stages of two branches: L1 predicts 38 part affinity
fields (an x, y vector field for each of 19 limbs), L2 19 heatmaps (18 keypoints and the background).
Stage 1 uses three 3x3 and two 1x1 convolutions per branch; stages 2-6 see the previous stage's maps
next to the features and use five 7x7 and two 1x1 convolutions. Weight keys are the layer names
(`conv1_1.weight`, `Mconv7_stage6_L2.bias`); the widths are read from the file, so the tests' tiny file
(darkroom/testing/tiny_annotators.py) builds the same network.

Decoding follows the extension (its single 0.5 scale of a 368-pixel box): heatmap peaks above 0.1 after a
sigma-3 blur, limb candidates scored by the mean PAF along the segment, a greedy one-to-one matching per
limb, limbs joined into people, people with fewer than four parts or a low mean score dropped. The
skeleton is drawn in the extension's 18 colours on black (limbs at 60 % brightness, joints full).
The image goes in as BGR (the network was trained on OpenCV frames), as the extension feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import ndimage
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.control.annotators import openpose_parts as parts
from darkroom.control.annotators.poses import Person, PoseSet
from darkroom.errors import ModelLoadError

FILE, KIND = "body_pose_model.pth", "openpose"
PAFS, HEATMAPS = 38, 19
BOX, STRIDE, PAD_VALUE = 368, 8, 128
PEAK_THRESHOLD, PAF_THRESHOLD, SAMPLES = 0.1, 0.05, 10

# Keypoints (COCO order): 0 nose, 1 neck, 2-4 right shoulder/elbow/wrist, 5-7 left shoulder/elbow/wrist,
# 8-10 right hip/knee/ankle, 11-13 left hip/knee/ankle, 14/15 right/left eye, 16/17 right/left ear.
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
"""The 19 limbs the PAFs describe, as keypoint pairs; the last two (shoulder-ear) only help grouping."""
LIMB_PAFS = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7),
             (8, 9), (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))
"""The (x, y) PAF channels of each limb, in the order the network was trained with."""
DRAWN_LIMBS = 17
COLORS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
"""RGB per keypoint, and per drawn limb (limb i takes colour i): the colours the openpose ControlNets learned."""
STICK_WIDTH, JOINT_RADIUS = 4, 4


@dataclass(frozen=True)
class Widths:
    """Channel widths of the body model; the defaults are the released file's."""

    c1: int = 64
    c2: int = 128
    c3: int = 256
    c4: int = 512
    cpm: int = 256
    features: int = 128
    branch: int = 128
    wide: int = 512
    stage: int = 128


_WIDTH_KEYS = {"c1": "conv1_1", "c2": "conv2_1", "c3": "conv3_1", "c4": "conv4_1", "cpm": "conv4_3_CPM",
               "features": "conv4_4_CPM", "branch": "conv5_1_CPM_L1", "wide": "conv5_4_CPM_L1",
               "stage": "Mconv1_stage2_L1"}


class BodyPoseNet(nn.Module):
    """The layers are attributes named as the file's keys; `forward` gives (PAFs, heatmaps) at 1/8 size."""

    def __init__(self, w: Widths = Widths()):
        super().__init__()
        self._front: list[str | None] = []  # None: a max-pool
        cin = 3
        for group, (prefix, width, count) in enumerate(((1, w.c1, 2), (2, w.c2, 2), (3, w.c3, 4), (4, w.c4, 2))):
            if group:
                self._front.append(None)
            for i in range(1, count + 1):
                cin = self._conv(f"conv{prefix}_{i}", cin, width, 3)
        cin = self._conv("conv4_3_CPM", cin, w.cpm, 3)
        self._conv("conv4_4_CPM", cin, w.features, 3)
        self._branches: dict[tuple[int, int], list[str]] = {}
        for branch, out in ((1, PAFS), (2, HEATMAPS)):
            names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
            cin = w.features
            for name, (width, k) in zip(names, ((w.branch, 3),) * 3 + ((w.wide, 1), (out, 1)), strict=True):
                cin = self._conv(name, cin, width, k, front=False)
            self._branches[(1, branch)] = names
            for stage in range(2, 7):
                names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
                cin = w.features + PAFS + HEATMAPS
                for name, (width, k) in zip(names, ((w.stage, 7),) * 5 + ((w.stage, 1), (out, 1)), strict=True):
                    cin = self._conv(name, cin, width, k, front=False)
                self._branches[(stage, branch)] = names

    def _conv(self, name: str, cin: int, cout: int, k: int, front: bool = True) -> int:
        self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
        if front:
            self._front.append(name)
        return cout

    def _run(self, names: list[str], h: torch.Tensor, last_relu: bool) -> torch.Tensor:
        for i, name in enumerate(names):
            h = getattr(self, name)(h)
            if i < len(names) - 1 or last_relu:
                h = F.relu(h)
        return h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for name in self._front:
            h = F.max_pool2d(h, 2, 2) if name is None else F.relu(getattr(self, name)(h))
        features = h
        paf = heat = None
        for stage in range(1, 7):
            inp = features if stage == 1 else torch.cat([paf, heat, features], 1)
            paf = self._run(self._branches[(stage, 1)], inp, last_relu=False)
            # The PyTorch port every ControlNet install runs keeps a ReLU after the last heatmap layer (its
            # no-ReLU list names stage 6's PAF layer twice); the extension's keypoints come from that output.
            heat = self._run(self._branches[(stage, 2)], inp, last_relu=stage == 6)
        return paf, heat


def load(path: Path) -> BodyPoseNet:
    state = files.read_state_dict(path)
    try:
        widths = Widths(**{f.name: int(state[f"{_WIDTH_KEYS[f.name]}.weight"].shape[0]) for f in fields(Widths)})
    except (KeyError, AttributeError, IndexError, TypeError):
        raise ModelLoadError(f"{path.name}: not an OpenPose body weight file (no conv1_1 to Mconv1_stage2_L1"
                             " layers)") from None
    return files.load_strict(BodyPoseNet(widths), state, path, "CMU OpenPose body")


def maps(net: BodyPoseNet, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps HxWx19, PAFs HxWx38) of a uint8 RGB picture at its own size, float32.

    As the extension: the picture is scaled so its height is half the 368-pixel box, padded right and down
    to a multiple of 8 with grey, fed as BGR in [-0.5, 0.5); the maps are scaled back up (bicubic, where
    the extension uses OpenCV's Lanczos), cropped and resized to the picture."""
    h, w = img.shape[:2]
    scale = 0.5 * BOX / h
    sh, sw = max(1, int(h * scale)), max(1, int(w * scale))
    small = imageops.resize(img, sw, sh, imageops.AREA if scale < 1 else imageops.CUBIC)
    ph, pw = (-sh) % STRIDE, (-sw) % STRIDE
    padded = np.pad(small, ((0, ph), (0, pw), (0, 0)), constant_values=PAD_VALUE)
    device = next(net.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(padded[:, :, ::-1])).to(device).float()
        x = (x / 256.0 - 0.5).permute(2, 0, 1)[None]
        paf, heat = net(x)
        both = torch.cat([heat, paf], 1).float()
        both = F.interpolate(both, scale_factor=STRIDE, mode="bicubic", align_corners=False)[:, :, :sh, :sw]
        both = F.interpolate(both, size=(h, w), mode="bicubic", align_corners=False)
        out = both[0].permute(1, 2, 0).cpu().numpy()
    return out[:, :, :HEATMAPS], out[:, :, HEATMAPS:]


def find_peaks(heat: np.ndarray, threshold: float = PEAK_THRESHOLD) -> list[np.ndarray]:
    """Per keypoint, an (n, 4) array of x, y, score (the unblurred map there), id (numbered across all).

    A peak is a pixel of the sigma-3 blurred map above `threshold` and at least its four neighbours."""
    out, next_id = [], 0
    for part in range(HEATMAPS - 1):
        raw = heat[:, :, part]
        g = ndimage.gaussian_filter(raw.astype(np.float64), sigma=3)
        p = np.pad(g, 1)
        c = p[1:-1, 1:-1]
        keep = ((c >= p[:-2, 1:-1]) & (c >= p[2:, 1:-1]) & (c >= p[1:-1, :-2]) & (c >= p[1:-1, 2:])
                & (c > threshold))
        ys, xs = np.nonzero(keep)
        ids = np.arange(next_id, next_id + len(xs))
        out.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
        next_id += len(xs)
    return out


def match_limbs(peaks: list[np.ndarray], paf: np.ndarray, height: int) -> list[np.ndarray | None]:
    """Per limb, an (m, 3) array of (id A, id B, score) pairs, each peak used at most once, or None where
    one end has no peak.

    A pair's score is the mean dot product of the PAF with the unit vector from A to B at ten points on
    the segment, less a penalty for segments longer than half the picture's height; a pair counts only if
    the score is positive and more than 80 % of the points agree above 0.05."""
    result: list[np.ndarray | None] = []
    for (a, b), (cx, cy) in zip(LIMBS, LIMB_PAFS, strict=True):
        cand_a, cand_b = peaks[a], peaks[b]
        if not len(cand_a) or not len(cand_b):
            result.append(None)
            continue
        vec = cand_b[None, :, :2] - cand_a[:, None, :2]  # (A, B, 2), scored all at once
        norm = np.maximum(np.hypot(vec[..., 0], vec[..., 1]), 0.001)
        steps = np.arange(SAMPLES)[None, None, :, None] * (vec / (SAMPLES - 1))[:, :, None, :]
        points = cand_a[:, None, None, :2] + steps
        points[:, :, -1] = np.broadcast_to(cand_b[None, :, :2], points[:, :, -1].shape)  # ends exactly on B
        xs, ys = np.rint(points[..., 0]).astype(int), np.rint(points[..., 1]).astype(int)
        along = (paf[ys, xs, cx] * (vec[..., 0] / norm)[..., None] + paf[ys, xs, cy] * (vec[..., 1] / norm)[..., None])
        score = along.mean(axis=2) + np.minimum(0.5 * height / norm - 1.0, 0.0)
        ok = (np.count_nonzero(along > PAF_THRESHOLD, axis=2) > 0.8 * SAMPLES) & (score > 0)
        scored = [(float(score[i, j]), i, j) for i, j in zip(*np.nonzero(ok), strict=True)]
        scored.sort(key=lambda t: t[0], reverse=True)  # stable: ties keep the scan order, as the extension
        used_a, used_b, pairs = set(), set(), []
        for score, i, j in scored:
            if i in used_a or j in used_b:
                continue
            used_a.add(i)
            used_b.add(j)
            pairs.append((cand_a[i][3], cand_b[j][3], score))
            if len(pairs) >= min(len(cand_a), len(cand_b)):
                break
        result.append(np.array(pairs, dtype=np.float64).reshape(-1, 3))
    return result


def group_people(peaks: list[np.ndarray], limbs: list[np.ndarray | None]) -> list[np.ndarray]:
    """People as rows of 20: the peak id of each of the 18 keypoints (-1: missing), the total score and
    the number of parts. Limbs are taken in order; a limb touching one person extends it, one touching
    two people with no shared keypoint merges them, one touching nobody starts a person (the shoulder-ear
    limbs never do). People with fewer than 4 parts or a mean score under 0.4 are dropped."""
    scores = np.concatenate([p[:, 2] for p in peaks]) if peaks else np.zeros(0)
    people: list[np.ndarray] = []
    for k, ((a, b), pairs) in enumerate(zip(LIMBS, limbs, strict=True)):
        if pairs is None:
            continue
        for id_a, id_b, score in pairs:
            hits = [p for p in people if p[a] == id_a or p[b] == id_b]
            if len(hits) == 2 and not ((hits[0][:18] >= 0) & (hits[1][:18] >= 0)).any():
                first, second = hits
                first[:18] += second[:18] + 1
                first[18:] += second[18:]
                first[18] += score
                people = [p for p in people if p is not second]
            elif hits:
                person = hits[0]
                if len(hits) == 2 or person[b] != id_b:
                    person[b] = id_b
                    person[19] += 1
                    person[18] += scores[int(id_b)] + score
            elif k < DRAWN_LIMBS:
                person = np.full(20, -1.0)
                person[a], person[b] = id_a, id_b
                person[19] = 2
                person[18] = scores[int(id_a)] + scores[int(id_b)] + score
                people.append(person)
    return [p for p in people if p[19] >= 4 and p[18] / p[19] >= 0.4]


def decode(heat: np.ndarray, paf: np.ndarray) -> list[list[tuple[float, float] | None]]:
    """The people in the maps: per person 18 (x, y) pixel positions or None."""
    peaks = find_peaks(heat)
    people = group_people(peaks, match_limbs(peaks, paf, heat.shape[0]))
    table = np.concatenate(peaks) if peaks else np.zeros((0, 4))
    return [[None if idx < 0 else (float(table[int(idx), 0]), float(table[int(idx), 1])) for idx in p[:18]]
            for p in people]


def _ellipse(cx: int, cy: int, half_length: int, half_width: int, angle: int) -> list[tuple[int, int]]:
    """The outline of a rotated ellipse at one-degree steps, rounded to pixels (OpenCV's ellipse2Poly)."""
    ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    points: list[tuple[int, int]] = []
    for deg in range(0, 361):
        x, y = half_length * math.cos(math.radians(deg)), half_width * math.sin(math.radians(deg))
        pt = (int(np.rint(cx + x * ca - y * sa)), int(np.rint(cy + x * sa + y * ca)))
        if not points or points[-1] != pt:
            points.append(pt)
    return points


def _draw_body(pen: ImageDraw.ImageDraw, person: Sequence[tuple[float, float] | None]) -> None:
    for (a, b), color in zip(LIMBS[:DRAWN_LIMBS], COLORS, strict=False):
        if person[a] is None or person[b] is None:
            continue
        (xa, ya), (xb, yb) = person[a], person[b]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        outline = _ellipse(int((xa + xb) / 2), int((ya + yb) / 2), int(length / 2), STICK_WIDTH, int(angle))
        pen.polygon(outline, fill=tuple(int(c * 0.6) for c in color))
    for point, color in zip(person, COLORS, strict=True):
        if point is None:
            continue
        x, y = int(point[0]), int(point[1])
        pen.ellipse((x - JOINT_RADIUS, y - JOINT_RADIUS, x + JOINT_RADIUS, y + JOINT_RADIUS), fill=color)


def draw(people: Sequence[Sequence[tuple[float, float] | None]], height: int, width: int, *,
         hands: Sequence[tuple] | None = None, faces: Sequence | None = None, body: bool = True) -> np.ndarray:
    """The extension's skeletons on black, person by person: each limb an ellipse 8 pixels thick in 60 % of
    its colour, then each keypoint a full-colour dot of radius 4 (unless `body` is False); then the
    person's (left, right) `hands` and `faces` if given (openpose_parts). uint8 HxWx3."""
    canvas = Image.new("RGB", (width, height))
    pen = ImageDraw.Draw(canvas)
    for k, person in enumerate(people):
        if body:
            _draw_body(pen, person)
        for hand in hands[k] if hands is not None else ():
            parts.draw_hand(pen, hand)
        if faces is not None:
            parts.draw_face(pen, faces[k])
    return np.asarray(canvas, dtype=np.uint8).copy()


def find(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None, *, hand: bool = False,
         face: bool = False) -> PoseSet:
    """The people of the picture (short side at `res`, padded to 64 as the extension detects) on the unpadded
    canvas; `hand`/`face` add each person's hands and face found from the body keypoints."""
    device = device or "cpu"
    net = load(files.find(FILE, KIND, dirs)).to(device)
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    heat, paf = maps(net, padded)
    people = decode(heat, paf)
    bgr = np.ascontiguousarray(padded[:, :, ::-1])
    hands: list = [(None, None)] * len(people)
    faces: list = [None] * len(people)
    if hand:
        hand_net = parts.load(files.find(parts.HAND_FILE, KIND, dirs), parts.HAND_MAPS, "hand").to(device)
        hands = [parts.find_hands(hand_net, bgr, person) for person in people]
    if face:
        face_net = parts.load(files.find(parts.FACE_FILE, KIND, dirs), parts.FACE_MAPS, "face").to(device)
        faces = [parts.find_face(face_net, bgr, person) for person in people]
    return PoseSet(h, w, [Person(list(body), *both, found) for body, both, found in
                          zip(people, hands, faces, strict=True)])


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], device: str | None = None, *, hand: bool = False,
           face: bool = False, body: bool = True, found: list | None = None) -> np.ndarray:
    """The `openpose` map: body skeletons of the picture at the unit's resolution (`find`); `hand`/`face` add
    hands and faces (openpose_hand, openpose_face, openpose_full), `body=False` leaves the body out of the
    drawing (openpose_faceonly: the body is still what finds the face). The PoseSet is appended to `found`."""
    poses = find(img, res, dirs, device, hand=hand, face=face)
    if found is not None:
        found.append(poses)
    return poses.render(body=body, hands=hand, face=face)
