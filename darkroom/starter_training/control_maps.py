"""Control maps for the starter ControlNet: the outlines of a scene's objects, white lines on black.

The starter ControlNet (scripts/train_starter_control.py) learns to put objects where a map draws them. A map
here is what a user would draw, or what a canny edge detector makes of a rendered scene: one closed line
around each object (and around a ring's hole), nothing for the flat background. Training maps are augmented
(line width 1-3 px, vertices wobbled by up to a pixel, long edges bent, sometimes the edges of the rendered
picture itself) so hand-drawn scribbles and canny maps both steer it.

`placements(scene, rng)` lays a scene out with a wider position jitter than `scenes.layout` (objects anywhere
near their named place, not only on the nine-point grid); `render_placements` draws the picture and
`outline_map` / `edge_map` draw the control map, so picture and map always agree. Evaluation uses the plain
`scenes.layout(scene, seed)`, so every position the scene names still holds for the judge.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from darkroom.starter_training.scenes import (
    PALETTE,
    POSITION_CENTRES,
    SIZE_EXTENT,
    Placement,
    Scene,
    layout,
    object_mask,
    place_shape,
)

SIZE = 128
TRAIN_XY_JITTER = 0.07  # training centre offset (image fraction): wider than scenes' 0.04, still inside EDGE
_SUPERSAMPLE = 4


def placements(scene: Scene, rng: random.Random, xy_jitter: float = TRAIN_XY_JITTER) -> tuple[Placement, ...]:
    """A layout with each object moved up to `xy_jitter` from its named place (both objects of a pair by the
    same offset, so they keep their gap), scaled by +-6% and turned by up to 10 degrees as scenes.layout does."""
    shared = (rng.uniform(-xy_jitter, xy_jitter), rng.uniform(-xy_jitter, xy_jitter))
    out = []
    for obj in scene.objects:
        cx, cy = POSITION_CENTRES[obj.position]
        dx, dy = shared if len(scene.objects) == 2 else (rng.uniform(-xy_jitter, xy_jitter),
                                                          rng.uniform(-xy_jitter, xy_jitter))
        extent = SIZE_EXTENT[obj.size] * (1 + rng.uniform(-0.06, 0.06))
        rotation = 0.0 if obj.shape in ("circle", "ring") else rng.uniform(-10.0, 10.0)
        out.append(place_shape(obj.shape, (cx + dx, cy + dy), extent, rotation))
    return tuple(out)


def render_placements(scene: Scene, placed: tuple[Placement, ...], size: int = SIZE) -> Image.Image:
    """The scene drawn with the given placements (anti-aliased like scenes.render)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    for obj, placement in zip(scene.objects, placed, strict=True):
        image.paste(PALETTE[obj.colour], mask=object_mask(placement, big))
    return image.resize((size, size), Image.Resampling.BOX)


def _wobbly(poly, side: int, rng: random.Random | None, wobble: float) -> list[tuple[float, float]]:
    """The polygon in pixels, closed; with rng, long edges split into ~6 px pieces and every point moved."""
    pts = [(x * side, y * side) for x, y in poly]
    if rng is None:
        return [*pts, pts[0]]
    out = []
    phase, freq, amp = rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 3.0), rng.uniform(0.0, wobble)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1], strict=True):
        pieces = max(1, int(math.hypot(x1 - x0, y1 - y0) / 6))
        for k in range(pieces):
            t = k / pieces
            x, y = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
            # a slow bend (the hand drifting) plus a little per-point tremble
            bend = amp * math.sin(phase + freq * 2 * math.pi * len(out) / 40)
            out.append((x + bend + rng.uniform(-wobble, wobble) * 0.5, y - bend + rng.uniform(-wobble, wobble) * 0.5))
    return [*out, out[0]]


WHITE = (255, 255, 255)
UNCOLOURED = ("white", "black")  # drawn as white lines: black would vanish on the black ground


def line_colour(colour: str | None) -> tuple[int, int, int]:
    """The pen colour of an outline in a colour map: the object's colour, or white ("colour from the prompt")."""
    return WHITE if colour is None or colour in UNCOLOURED else PALETTE[colour]


def outline_map(placed: tuple[Placement, ...], size: int = SIZE, rng: random.Random | None = None,
                width: int | None = None, wobble: float = 1.0,
                colours: tuple[str | None, ...] | None = None,
                fills: tuple[str | None, ...] | None = None) -> Image.Image:
    """Outlines of the objects (and of any hole) on black, RGB. Without rng: clean 2 px lines.

    White lines, or with `colours` each object's outline in its own colour (a colour map: the map then says
    which object goes where, not only where something goes; white and black objects keep white lines).
    With `fills`, each object is also painted inside its white outline in its colour (a ring's hole stays
    black): black inside an outline means "the colour the prompt names", a colour means that colour.
    """
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    w = width if width is not None else (rng.randint(1, 3) if rng is not None else 2)
    for k, placement in enumerate(placed):
        pen = line_colour(colours[k]) if colours is not None else WHITE
        outer = [_wobbly(poly, size, rng, wobble) for poly in placement.outer]
        holes = [_wobbly(poly, size, rng, wobble) for poly in placement.holes]
        if fills is not None and fills[k] not in (None, "black"):  # black would be the ground itself
            for pts in outer:
                draw.polygon(pts, fill=PALETTE[fills[k]])
            for pts in holes:
                draw.polygon(pts, fill=(0, 0, 0))
        for pts in (*outer, *holes):
            draw.line(pts, fill=pen, width=w, joint="curve")
    return image


def edge_map(image: Image.Image, threshold: float = 40.0, thick: bool = False) -> Image.Image:
    """A canny-like map of a rendered picture: pixels whose colour differs from a neighbour's, white on black.

    Flat scenes need no smoothing or hysteresis: the boundary between two palette colours is the only edge.
    """
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    dx = np.zeros(arr.shape[:2], dtype=np.float32)
    dy = np.zeros(arr.shape[:2], dtype=np.float32)
    dx[:, 1:] = np.sqrt(((arr[:, 1:] - arr[:, :-1]) ** 2).sum(-1))
    dy[1:] = np.sqrt(((arr[1:] - arr[:-1]) ** 2).sum(-1))
    edges = np.maximum(dx, dy) > threshold
    if thick:
        grown = edges.copy()
        grown[:, :-1] |= edges[:, 1:]
        grown[:-1] |= edges[1:]
        edges = grown
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, axis=-1))


def training_pair(scene: Scene, rng: random.Random, size: int = SIZE) -> tuple[Image.Image, tuple[Placement, ...]]:
    """(picture, placements) of one training example; draw its map with `training_map`."""
    placed = placements(scene, rng)
    return render_placements(scene, placed, size), placed


def training_map(placed: tuple[Placement, ...], rng: random.Random, picture: Image.Image | None = None,
                 size: int = SIZE, edge_share: float = 0.2,
                 colours: tuple[str | None, ...] | None = None,
                 fills: tuple[str | None, ...] | None = None) -> Image.Image:
    """An augmented map: usually wobbly outlines of width 1-3 (coloured with `colours`, filled with `fills`);
    with `picture`, sometimes its canny-like edges."""
    if picture is not None and rng.random() < edge_share:
        return edge_map(picture, thick=rng.random() < 0.5)
    return outline_map(placed, size, rng, colours=colours, fills=fills)


def scene_colours(scene: Scene) -> tuple[str, ...]:
    """The objects' colour names, for a colour map of the scene."""
    return tuple(obj.colour for obj in scene.objects)


def eval_map(scene: Scene, jitter_seed: int, size: int = SIZE, coloured: bool = False,
             filled: bool = False) -> Image.Image:
    """The clean map of a scene as scenes.render(scene, size, jitter_seed) draws it (2 px outlines; with
    `coloured`, each outline in its object's colour; with `filled`, white outlines filled with the colours)."""
    return outline_map(layout(scene, jitter_seed), size, colours=scene_colours(scene) if coloured else None,
                       fills=scene_colours(scene) if filled else None)


def to_array(image: Image.Image) -> np.ndarray:
    """(3, H, W) float32 in 0..1, the ControlNet's conditioning input (as diffusers' pipelines feed it)."""
    return np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
