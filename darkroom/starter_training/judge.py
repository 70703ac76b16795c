"""Automatic judge: does a (generated) picture obey its caption?

Scenes use distinct palette colours, so objects are found by colour: each pixel goes to the nearest palette
colour (or to none if it is far from all of them, as noise and odd generated colours are), a 3x3 opening
removes the thin blended fringes that anti-aliasing and blur leave between two colours, and the largest
connected component of the asserted colour is the object. Colour passes when that component has a plausible
area and is flat (not noise); position and relation come from its centroid, size from its bounding box, and
shape from a tiny CNN (`ShapeNet`, trained by `scripts/train_shape_classifier.py`) on the component's mask.
Only what the caption asserts is checked; a check on an object that cannot be found fails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from darkroom.starter_training.scenes import COLOURS, PALETTE, SHAPES, Claims, Example, parse_caption

WORK_SIZE = 128  # images are judged at this size, whatever size they come in
MAX_COLOUR_DISTANCE = 100.0  # RGB distance beyond which a pixel belongs to no palette colour
AREA_RANGE = (0.005, 0.35)  # plausible object area, fraction of the image (any shape, any size)
# Objects are flat colour: the RMS colour spread inside a component is < 30 even after blur, JPEG q30 or
# noise sigma 15, while blobs that noise happens to form around a palette colour (gray, mostly) spread ~55.
MAX_SPREAD = 42.0
SIZE_BOUNDS = (0.26, 0.37)  # bbox extent: small | medium | large (drawn 0.22, 0.32, 0.44 +-6%; blur shaves tips)
EDGE = 0.4  # "left" means centroid x < EDGE, "right" x > 1 - EDGE, likewise top/bottom
CENTRE_BOX = 0.15  # "centre" means both coordinates within 0.5 +- CENTRE_BOX
RELATION_MARGIN = 0.08  # "above" needs the first centroid this much higher (image fraction) ...
RELATION_DOMINANCE = 0.5  # ... and the vertical offset at least this times the horizontal one
BACKGROUND_COVER = 0.3  # the background colour must also cover this much of the image
INPUT_SIZE = 32
WEIGHTS = Path(__file__).with_name("shape_classifier.safetensors")

_PALETTE = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class Blob:
    """The component taken as an object: mask, area and centroid in image fractions, bbox extent."""

    mask: np.ndarray
    area: float
    centroid: tuple[float, float]  # x, y
    extent: float  # larger bbox side
    spread: float = 0.0  # RMS colour distance of its interior pixels from their mean

    @property
    def plausible(self) -> bool:
        """Big enough, not the whole picture, and flat like a drawn object rather than noise."""
        return AREA_RANGE[0] <= self.area <= AREA_RANGE[1] and self.spread <= MAX_SPREAD


@dataclass(frozen=True)
class ObjectVerdict:
    colour: bool
    shape: bool
    position: bool | None  # None: not asserted
    size: bool | None  # None: not asserted
    predicted_shape: str | None = None
    centroid: tuple[float, float] | None = None
    extent: float | None = None


@dataclass(frozen=True)
class Verdict:
    objects: tuple[ObjectVerdict, ...]
    relation: bool | None = None
    background: bool | None = None

    @property
    def passed(self) -> bool:
        """True when every asserted check passed."""
        checks = [self.relation, self.background]
        for o in self.objects:
            checks += [o.colour, o.shape, o.position, o.size]
        return all(c for c in checks if c is not None)


# ---------------------------------------------------------------------------------------------------------
# Segmentation


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(WORK_SIZE, WORK_SIZE, 3) float32 in 0..255 from a PIL image or an HWC/CHW array.

    Arrays may be uint8, floats in 0..1, or floats in -1..1 (a VAE's output range; any negative value means this).
    """
    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype.kind == "f":
            arr = np.nan_to_num(arr.astype(np.float32))
            if arr.min(initial=0.0) < 0:
                arr = (arr + 1.0) / 2.0
            arr = arr * 255.0 if arr.max(initial=0.0) <= 1.0 else arr
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BOX if image.width > WORK_SIZE else
                             Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def palette_labels(arr: np.ndarray) -> np.ndarray:
    """Index into COLOURS of each pixel's nearest palette colour, -1 where none is within MAX_COLOUR_DISTANCE."""
    d2 = ((arr[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    labels = d2.argmin(-1).astype(np.int16)
    labels[d2.min(-1) > MAX_COLOUR_DISTANCE**2] = -1
    return labels


def _shift_all(mask: np.ndarray, combine: str) -> np.ndarray:
    h, w = mask.shape
    p = np.pad(mask, 1, constant_values=False)
    out = mask.copy()
    for dy in range(3):
        for dx in range(3):
            if combine == "and":
                out &= p[dy: dy + h, dx: dx + w]
            else:
                out |= p[dy: dy + h, dx: dx + w]
    return out


def opening(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion then dilation: drops one- and two-pixel fringes, keeps objects' outlines."""
    return _shift_all(_shift_all(mask, "and"), "or")


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components, labelled 1..n (0 = off); union-find over row runs, so no scipy is needed."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    diff = np.diff(padded, axis=1)
    rows, starts = np.nonzero(diff == 1)
    _, ends = np.nonzero(diff == -1)  # exclusive; row-major order keeps starts and ends paired
    n = len(starts)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(h + 1))
    for r in range(1, h):
        a0, a1 = row_first[r - 1], row_first[r]
        b0, b1 = row_first[r], row_first[r + 1]
        i = a0
        for j in range(b0, b1):
            # runs above that touch run j (diagonals included): start <= end_j and end > start_j - 1
            while i < a1 and ends[i] < starts[j]:
                i += 1
            k = i
            while k < a1 and starts[k] <= ends[j]:
                ra, rb = find(k), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
                k += 1
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for j in range(n):
        root = find(j)
        label = ids.setdefault(root, len(ids) + 1)
        labels[rows[j], starts[j]: ends[j]] = label
    return labels, len(ids)


def find_object(labels: np.ndarray, colour: str, image: np.ndarray | None = None) -> Blob | None:
    """The largest component of `colour` after the opening, or None when there is no such pixel.

    `image` (the array `labels` came from) is needed only to measure the colour spread.
    """
    raw = labels == COLOURS.index(colour)
    mask = opening(raw)
    if not mask.any():
        return None
    comp, n = components(mask)
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    areas[0] = 0
    # Give back what the opening shaved off this component (star tips, thin arms), but not distant fringes.
    blob = raw & _shift_all(_shift_all(comp == int(areas.argmax()), "or"), "or")
    ys, xs = np.nonzero(blob)
    h, w = blob.shape
    extent = max((xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h)
    centroid = (float(xs.mean() + 0.5) / w, float(ys.mean() + 0.5) / h)
    spread = 0.0
    if image is not None:
        core = _shift_all(blob, "and")
        pixels = image[core if core.sum() >= 10 else blob]
        spread = float(np.sqrt(((pixels - pixels.mean(0)) ** 2).sum(1).mean()))
    return Blob(blob, float(blob.sum()) / (h * w), centroid, float(extent), spread)


# ---------------------------------------------------------------------------------------------------------
# Shape classifier


class ShapeNet(nn.Module):
    """A ~90k-parameter CNN (360 KB): 32x32 object mask -> logits over SHAPES."""

    def __init__(self, n_classes: int = len(SHAPES)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def mask_to_input(mask: np.ndarray) -> torch.Tensor:
    """(1, 32, 32) float input: the mask's bbox, padded to a centred square (aspect kept) and resized."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return torch.zeros(1, INPUT_SIZE, INPUT_SIZE)
    crop = mask[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)
    h, w = crop.shape
    side = max(h, w) + 2
    square = np.zeros((side, side), dtype=np.float32)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0: y0 + h, x0: x0 + w] = crop
    t = torch.from_numpy(square)[None, None]
    return F.interpolate(t, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)[0]


@lru_cache(maxsize=2)
def load_shape_classifier(path: Path = WEIGHTS) -> ShapeNet:
    """The trained classifier (cached); FileNotFoundError says how to make the weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is missing; run `python scripts/train_shape_classifier.py`")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    shapes = json.loads(meta.get("shapes", "[]"))
    if tuple(shapes) != SHAPES:
        raise ValueError(f"{path} was trained for shapes {shapes}, not {SHAPES}; retrain it")
    model = ShapeNet()
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def classify_masks(masks: Sequence[np.ndarray]) -> list[str]:
    if not masks:
        return []
    x = torch.stack([mask_to_input(m) for m in masks])
    with torch.no_grad():
        logits = load_shape_classifier()(x)
    return [SHAPES[i] for i in logits.argmax(1).tolist()]


# ---------------------------------------------------------------------------------------------------------
# Checks


def position_ok(position: str, centroid: tuple[float, float]) -> bool:
    """Lenient regions: "left" constrains only x (an object at top left is still on the left)."""
    x, y = centroid
    if position in ("centre", "center"):
        return bool(abs(x - 0.5) < CENTRE_BOX and abs(y - 0.5) < CENTRE_BOX)
    tests = {"left": x < EDGE, "right": x > 1 - EDGE, "top": y < EDGE, "bottom": y > 1 - EDGE}
    return all(bool(tests[word]) for word in position.split())


def size_of(extent: float) -> str:
    return "small" if extent < SIZE_BOUNDS[0] else "medium" if extent < SIZE_BOUNDS[1] else "large"


def relation_ok(relation: str, a: tuple[float, float], b: tuple[float, float]) -> bool:
    """a <relation> b, judged on centroids: clearly offset along the named axis, more than along the other."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {"above": (dy, dx), "below": (-dy, dx), "left of": (dx, dy), "right of": (-dx, dy)}[relation]
    return bool(along >= RELATION_MARGIN and along >= RELATION_DOMINANCE * abs(across))


def background_ok(labels: np.ndarray, colour: str) -> bool:
    """The most common colour along the border is `colour`, and it covers a fair part of the image."""
    idx = COLOURS.index(colour)
    border = np.concatenate([labels[:2].ravel(), labels[-2:].ravel(), labels[:, :2].ravel(), labels[:, -2:].ravel()])
    border = border[border >= 0]
    if len(border) == 0:
        return False
    return int(np.bincount(border).argmax()) == idx and float((labels == idx).mean()) >= BACKGROUND_COVER


def claims_of(example: Example | Claims | str) -> Claims:
    if isinstance(example, Claims):
        return example
    if isinstance(example, str):
        return parse_caption(example)
    return example.asserted


def judge(image: Image.Image | np.ndarray, example: Example | Claims | str) -> Verdict:
    """Check the caption's claims (an Example, its Claims, or caption text) against an image of any size."""
    claims = claims_of(example)
    arr = to_array(image)
    labels = palette_labels(arr)
    blobs = []
    for claim in claims.objects:
        blob = find_object(labels, claim.colour, arr)
        blobs.append(blob if blob is not None and blob.plausible else None)
    found = [b for b in blobs if b is not None]
    predicted = iter(classify_masks([b.mask for b in found]))
    verdicts = []
    for claim, blob in zip(claims.objects, blobs, strict=True):
        if blob is None:
            verdicts.append(ObjectVerdict(False, False, None if claim.position is None else False,
                                          None if claim.size is None else False))
            continue
        shape = next(predicted)
        verdicts.append(ObjectVerdict(
            colour=True,
            shape=shape == claim.shape,
            position=None if claim.position is None else position_ok(claim.position, blob.centroid),
            size=None if claim.size is None else size_of(blob.extent) == claim.size,
            predicted_shape=shape,
            centroid=(round(blob.centroid[0], 4), round(blob.centroid[1], 4)),
            extent=round(blob.extent, 4),
        ))
    relation = None
    if claims.relation is not None:
        a, b = blobs[0], blobs[1] if len(blobs) > 1 else None
        relation = a is not None and b is not None and relation_ok(claims.relation, a.centroid, b.centroid)
    background = None if claims.background is None else background_ok(labels, claims.background)
    return Verdict(tuple(verdicts), relation, background)


def summarise(verdicts: Sequence[Verdict]) -> dict[str, float | int | None]:
    """Fraction of asserted checks passed per attribute (None when never asserted).

    "position" pools single-object positions and two-object relations (both are about where things are);
    each is also reported alone, as "placement" (a named place: "in the top left") and "relation" ("above"),
    because they fail for different reasons. "all" is the fraction of images that pass every asserted check.
    """
    keys = ("colour", "position", "placement", "shape", "size", "relation", "background")
    tally: dict[str, list[bool]] = {k: [] for k in keys}
    for v in verdicts:
        for o in v.objects:
            tally["colour"].append(o.colour)
            tally["shape"].append(o.shape)
            if o.position is not None:
                tally["position"].append(o.position)
                tally["placement"].append(o.position)
            if o.size is not None:
                tally["size"].append(o.size)
        if v.relation is not None:
            tally["relation"].append(v.relation)
            tally["position"].append(v.relation)
        if v.background is not None:
            tally["background"].append(v.background)
    out: dict[str, float | int | None] = {k: (sum(x) / len(x) if x else None) for k, x in tally.items()}
    out["all"] = sum(v.passed for v in verdicts) / len(verdicts) if verdicts else None
    out["n"] = len(verdicts)
    return out


def vae_round_trip(vae, examples: Sequence[Example], batch: int = 25) -> dict[str, float | int | None]:
    """The judge's scores on the examples' drawn scenes after encoding and decoding by `vae`.

    Every generated picture comes out of the decoder, so what it loses here (colours shifted, thin shapes
    blurred) caps what any prompt can score: the ceiling the generation numbers are read against.
    """
    from darkroom.starter_training.scenes import render

    verdicts = []
    for start in range(0, len(examples), batch):
        chunk = examples[start: start + batch]
        pixels = np.stack([np.asarray(render(e.scene, WORK_SIZE, jitter_seed=start + i), dtype=np.float32)
                           for i, e in enumerate(chunk)])
        x = torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 3, 1, 2).to(vae.device, vae.dtype)
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        decoded = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        verdicts += [judge(d, e) for d, e in zip(decoded, chunk, strict=True)]
    return summarise(verdicts)
