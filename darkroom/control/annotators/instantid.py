"""InstantID's two preprocessors, on InsightFace's antelopev2 files (annotators.insightface), as the extension
runs them: the picture first takes the annotators' usual size (short side 512: cubic up, area down) and is
edge-padded to multiples of 64, then SCRFD finds the faces and the largest one is used.

- instant_id_face_embedding: that face's raw ArcFace embedding (512 floats, not normalised: the InstantID
  adapter was trained on it so), for the InstantID IP-Adapter unit.
- instant_id_face_keypoints: the face's five keypoints drawn on black for the InstantID ControlNet: four limbs
  from the nose to the eyes and mouth corners (ellipses 4 px across, in the first point's colour, at 60%), then
  a filled circle of radius 10 on each point, in the extension's colours; the pad cropped away. The shapes are
  rasterised with PIL, so edge pixels may differ from OpenCV's by one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from darkroom.control.annotators import imageops, insightface

PACK = "antelopev2"
RESOLUTION = 512  # the extension's default for both (they have no resolution slider)
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))  # eyes and mouth corners to the nose
STICK = 4


def _largest(img: np.ndarray, dirs: Sequence[Path]) -> tuple[insightface.Face, tuple[int, int], tuple[int, int]]:
    """The largest face of the picture at the annotators' size, padded; (face, padded size, unpadded size)."""
    resized = imageops.to_resolution(img, RESOLUTION)
    padded, size = imageops.pad64(resized)
    face = insightface.largest_face(insightface.faces(padded, dirs, PACK))
    return face, padded.shape[:2], size


def face_embedding(img: np.ndarray, dirs: Sequence[Path]) -> np.ndarray:
    """The largest face's raw ArcFace embedding (float32, 512)."""
    return _largest(img, dirs)[0].embedding


def draw_keypoints(kps: np.ndarray, height: int, width: int) -> np.ndarray:
    """The extension's draw_kps: limbs as thin filled ellipses at 60%, then the points as circles; uint8 HxWx3."""
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    for a, b in LIMBS:
        (x0, y0), (x1, y1) = kps[a], kps[b]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.radians(int(math.degrees(math.atan2(y0 - y1, x0 - x1))))  # OpenCV takes whole degrees
        cx, cy, half = int((x0 + x1) / 2), int((y0 + y1) / 2), int(length / 2)
        points = [(cx + half * math.cos(t) * math.cos(angle) - STICK * math.sin(t) * math.sin(angle),
                   cy + half * math.cos(t) * math.sin(angle) + STICK * math.sin(t) * math.cos(angle))
                  for t in np.radians(np.arange(0, 361))]
        draw.polygon([(round(x), round(y)) for x, y in points], fill=COLOURS[a])
    out = (np.asarray(canvas, np.float64) * 0.6).astype(np.uint8)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    for (x, y), colour in zip(kps, COLOURS, strict=False):
        x, y = int(x), int(y)
        draw.ellipse((x - 10, y - 10, x + 10, y + 10), fill=colour)
    return np.asarray(canvas, np.uint8)


def keypoints_map(img: np.ndarray, dirs: Sequence[Path]) -> np.ndarray:
    """The instant_id_face_keypoints map: the largest face's keypoints drawn at the annotators' size."""
    face, (ph, pw), (h, w) = _largest(img, dirs)
    return draw_keypoints(face.kps, ph, pw)[:h, :w]
