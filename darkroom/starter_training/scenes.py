"""Procedural scenes for the starter model: a small grammar, a deterministic renderer and varied captions.

The starter text-to-image model is trained from scratch on these pictures, and `darkroom.starter_training.judge`
checks generated pictures against the same grammar. Three rules make the judge possible:

* every colour in a scene (objects and background) is distinct, so objects can be found by colour;
* a caption is the truth: `Example.asserted` records exactly what the text claims, and anything the
  text leaves unsaid (background, size, position) is "don't care" for the judge, while the rendered
  scene still picks a random value for it so the model learns that it is free;
* some (colour, shape) pairs never occur in training (`HELD_OUT`) so evaluation can measure whether
  the model composes attributes rather than memorising pairs.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 35),
    "orange": (255, 135, 0),
    "yellow": (255, 235, 20),
    "green": (40, 175, 60),
    "blue": (35, 75, 225),
    "purple": (135, 45, 190),
    "pink": (255, 125, 205),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (130, 130, 130),
    "brown": (125, 70, 25),
    "cyan": (20, 215, 235),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "heart", "cross")
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Largest side of the object's bounding box as a fraction of the image side (before jitter).
SIZE_EXTENT: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.44}
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITIONS: tuple[str, ...] = tuple(POSITION_CENTRES)
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")
INVERSE_RELATION: dict[str, str] = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
# Position pairs (first object, second object) used to draw each relation: same column or row, two grid
# steps apart, so even two large objects fit without overlapping and the relation is unambiguous.
RELATION_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "above": (("top", "bottom"), ("top left", "bottom left"), ("top right", "bottom right")),
    "left of": (("left", "right"), ("top left", "top right"), ("bottom left", "bottom right")),
}
RELATION_LAYOUTS["below"] = tuple((b, a) for a, b in RELATION_LAYOUTS["above"])
RELATION_LAYOUTS["right of"] = tuple((b, a) for a, b in RELATION_LAYOUTS["left of"])

# Never in `split="train"`: one pair per shape (plus one more), spread over colours, so every colour and
# every shape is still seen often in training and only the combination is new.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("blue", "triangle"),
        ("green", "ring"),
        ("yellow", "square"),
        ("purple", "circle"),
        ("orange", "heart"),
        ("cyan", "cross"),
        ("white", "triangle"),
    }
)
EVAL_SEED = 20240607

_JITTER_XY = 0.04  # centre offset, fraction of the image side
_JITTER_SCALE = 0.06  # relative change of the extent
_JITTER_ROTATION = 10.0  # degrees, for shapes whose rotation is visible
_MARGIN = 0.02  # objects stay this far inside the image
_GAP = 0.03  # and this far from each other
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        _normalise_spelling(self)
        _check(self.shape, SHAPES, "shape")
        _check(self.colour, COLOURS, "colour")
        _check(self.size, SIZES, "size")
        _check(self.position, POSITIONS, "position")


@dataclass(frozen=True)
class Scene:
    """One or two objects on a plain background; with two objects and a relation, obj 0 is `relation` obj 1."""

    background: str
    objects: tuple[SceneObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        _check(self.background, COLOURS, "background")
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects, not {len(self.objects)}")
        colours = [self.background, *(o.colour for o in self.objects)]
        if len(set(colours)) != len(colours):
            raise ValueError(f"colours in a scene must be distinct (the judge segments by colour): {colours}")
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError("a relation needs two objects")
            return
        a, b = (POSITION_CENTRES[o.position] for o in self.objects)
        if max(abs(a[0] - b[0]), abs(a[1] - b[1])) < 0.5:
            raise ValueError("two objects need positions two grid steps apart (e.g. left/right) so they cannot overlap")
        if self.relation is not None:
            _check(self.relation, RELATIONS, "relation")
            pair = (self.objects[0].position, self.objects[1].position)
            if pair not in RELATION_LAYOUTS[self.relation]:
                raise ValueError(f"positions {pair} do not show {self.relation!r}; use one of {RELATION_LAYOUTS}")


@dataclass(frozen=True)
class ObjectClaim:
    """What a caption says about one object; None means the caption does not say it."""

    shape: str
    colour: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        _normalise_spelling(self)


@dataclass(frozen=True)
class Claims:
    """Everything a caption asserts, objects in the order the text names them; the judge checks only these."""

    objects: tuple[ObjectClaim, ...]
    background: str | None = None
    relation: str | None = None  # objects[0] <relation> objects[1]


@dataclass(frozen=True)
class Example:
    scene: Scene
    text: str
    asserted: Claims


@dataclass(frozen=True)
class Placement:
    """Where one object is drawn, in image fractions: area centroid, bbox and polygons."""

    centre: tuple[float, float]
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1
    outer: tuple[tuple[tuple[float, float], ...], ...]
    holes: tuple[tuple[tuple[float, float], ...], ...]


def _normalise_spelling(obj: SceneObject | ObjectClaim) -> None:
    """Accept "center" and "grey" from hand-written code; store the canonical "centre" and "gray"."""
    if obj.position == "center":
        object.__setattr__(obj, "position", "centre")
    if obj.colour == "grey":
        object.__setattr__(obj, "colour", "gray")


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


# ---------------------------------------------------------------------------------------------------------
# Geometry


Polygon = tuple[tuple[float, float], ...]


def _circle(radius: float, n: int = 96) -> Polygon:
    return tuple((radius * math.cos(2 * math.pi * i / n), radius * math.sin(2 * math.pi * i / n)) for i in range(n))


def _signed_area_centroid(poly: Polygon) -> tuple[float, float, float]:
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1], strict=True):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    a /= 2
    return abs(a), cx / (6 * a), cy / (6 * a)


@lru_cache(maxsize=256)
def unit_shape(shape: str, param: float | None = None) -> tuple[tuple[Polygon, ...], tuple[Polygon, ...]]:
    """(outer polygons, holes) with the area centroid at the origin and the larger bbox side 1 (y points down).

    `param` varies the one free proportion of a shape (star inner radius, ring hole, cross arm width, all as
    fractions) so the shape classifier can be trained on variants; the renderer always uses the default.
    """
    _check(shape, SHAPES, "shape")
    holes: tuple[Polygon, ...] = ()
    if shape == "circle":
        outer = _circle(0.5)
    elif shape == "square":
        outer = ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5))
    elif shape == "triangle":
        outer = tuple((math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150))
    elif shape == "star":
        k = 0.45 if param is None else param
        outer = tuple(
            ((0.5 if i % 2 == 0 else 0.5 * k) * math.cos(math.radians(-90 + 36 * i)),
             (0.5 if i % 2 == 0 else 0.5 * k) * math.sin(math.radians(-90 + 36 * i)))
            for i in range(10)
        )
    elif shape == "ring":
        outer = _circle(0.5)
        holes = (_circle(0.5 * (0.5 if param is None else param)),)
    elif shape == "heart":
        ts = [2 * math.pi * i / 128 for i in range(128)]
        outer = tuple(
            (16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
            for t in ts
        )
    else:  # cross
        a = (1 / 6) if param is None else param / 2
        outer = ((-a, -0.5), (a, -0.5), (a, -a), (0.5, -a), (0.5, a), (a, a), (a, 0.5), (-a, 0.5), (-a, a),
                 (-0.5, a), (-0.5, -a), (-a, -a))
    area, cx, cy = _signed_area_centroid(outer)
    for hole in holes:  # holes here are concentric, so only the area changes
        area -= _signed_area_centroid(hole)[0]
    xs = [p[0] for p in outer]
    ys = [p[1] for p in outer]
    scale = 1.0 / max(max(xs) - min(xs), max(ys) - min(ys))

    def norm(poly: Polygon) -> Polygon:
        return tuple(((x - cx) * scale, (y - cy) * scale) for x, y in poly)

    return (norm(outer),), tuple(norm(h) for h in holes)


def place_shape(
    shape: str, centre: tuple[float, float], extent: float, rotation: float = 0.0, param: float | None = None
) -> Placement:
    """Rotate a unit shape, scale it so its bbox's larger side is `extent`, put its centroid at `centre`.

    The centre is then clamped so the object stays inside the image (large objects in corners would not).
    """
    outer, holes = unit_shape(shape, param)
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    rot = [tuple((x * c - y * s, x * s + y * c) for x, y in poly) for poly in (*outer, *holes)]
    xs = [p[0] for poly in rot[: len(outer)] for p in poly]
    ys = [p[1] for poly in rot[: len(outer)] for p in poly]
    k = extent / max(max(xs) - min(xs), max(ys) - min(ys))
    x0, x1, y0, y1 = min(xs) * k, max(xs) * k, min(ys) * k, max(ys) * k
    cx = min(max(centre[0], _MARGIN - x0), 1 - _MARGIN - x1)
    cy = min(max(centre[1], _MARGIN - y0), 1 - _MARGIN - y1)
    polys = tuple(tuple((cx + x * k, cy + y * k) for x, y in poly) for poly in rot)
    return Placement((cx, cy), (cx + x0, cy + y0, cx + x1, cy + y1), polys[: len(outer)], polys[len(outer):])


def layout(scene: Scene, jitter_seed: int | None = 0) -> tuple[Placement, ...]:
    """Exact placements for a scene; `jitter_seed` picks small offsets that never change the truth.

    With two objects, jitter that would bring them closer than `_GAP` is redrawn (the symbolic layout alone
    always keeps them apart), so the caption's relation and "no overlap" hold for every seed.
    """
    rng = random.Random(jitter_seed) if jitter_seed is not None else None
    for _ in range(20 if rng else 1):
        out = []
        for obj in scene.objects:
            cx, cy = POSITION_CENTRES[obj.position]
            extent, rotation = SIZE_EXTENT[obj.size], 0.0
            if rng is not None:
                cx += rng.uniform(-_JITTER_XY, _JITTER_XY)
                cy += rng.uniform(-_JITTER_XY, _JITTER_XY)
                extent *= 1 + rng.uniform(-_JITTER_SCALE, _JITTER_SCALE)
                if obj.shape not in ("circle", "ring"):
                    rotation = rng.uniform(-_JITTER_ROTATION, _JITTER_ROTATION)
            out.append(place_shape(obj.shape, (cx, cy), extent, rotation))
        if len(out) == 1 or not _too_close(out[0].bbox, out[1].bbox):
            return tuple(out)
    return layout(scene, None)


def _too_close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] + _GAP and b[0] < a[2] + _GAP and a[1] < b[3] + _GAP and b[1] < a[3] + _GAP


def object_mask(placement: Placement, side: int) -> Image.Image:
    """The object's pixels (255) on a side x side canvas, holes cut out (not anti-aliased)."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for polys, fill in ((placement.outer, 255), (placement.holes, 0)):
        for poly in polys:
            draw.polygon([(x * side, y * side) for x, y in poly], fill=fill)
    return mask


def render(scene: Scene, size: int = 128, jitter_seed: int | None = 0) -> Image.Image:
    """Draw a scene as an RGB image, anti-aliased by drawing at 4x and box-filtering down (deterministic)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    for obj, placement in zip(scene.objects, layout(scene, jitter_seed), strict=True):
        image.paste(PALETTE[obj.colour], mask=object_mask(placement, big))
    return image.resize((size, size), Image.Resampling.BOX)


# ---------------------------------------------------------------------------------------------------------
# Sampling


def _sample_object(rng: random.Random, split: str, taken: set[str], heldout: bool = False) -> tuple[str, str]:
    while True:
        if heldout:
            colour, shape = rng.choice(sorted(HELD_OUT))
        else:
            colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        if colour in taken or (split == "train" and (colour, shape) in HELD_OUT):
            continue
        return colour, shape


def sample_scene(rng: random.Random, split: str = "train", n_objects: int | None = None) -> Scene:
    """A random scene. split: "train" (no held-out pair), "heldout" (an object is one), "any".

    Two-object scenes always get a relation; about 30% of scenes have two objects unless `n_objects` says.
    """
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', not {split!r}")
    if n_objects is None:
        n_objects = 2 if rng.random() < 0.3 else 1
    taken: set[str] = set()
    pairs = []
    for i in range(n_objects):
        colour, shape = _sample_object(rng, split, taken, heldout=split == "heldout" and i == 0)
        taken.add(colour)
        pairs.append((colour, shape))
    background = rng.choice([c for c in COLOURS if c not in taken])
    if n_objects == 1:
        positions: tuple[str, ...] = (rng.choice(POSITIONS),)
        relation = None
    else:
        relation = rng.choice(RELATIONS)
        positions = rng.choice(RELATION_LAYOUTS[relation])
        if rng.random() < 0.5:  # held-out object first or second, equally often
            pairs.reverse()
    objects = tuple(
        SceneObject(shape, colour, rng.choice(SIZES), pos)
        for (colour, shape), pos in zip(pairs, positions, strict=True)
    )
    return Scene(background, objects, relation)


def sample_example(rng: random.Random, *, split: str = "train") -> Example:
    """A random scene and a caption for it; render `example.scene` to get a picture that obeys `example.text`."""
    return describe(sample_scene(rng, split), rng)


@lru_cache(maxsize=8)
def _eval_set(n: int, seed: int) -> tuple[Example, ...]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        two = i % 10 in (2, 5, 8)  # 30% two-object relation captions
        heldout = i % 5 in (0, 3)  # 40% contain a held-out (colour, shape) pair
        out.append(describe(sample_scene(rng, "heldout" if heldout else "train", 2 if two else 1), rng))
    return tuple(out)


def eval_set(n: int = 200, seed: int = EVAL_SEED) -> list[Example]:
    """A fixed evaluation list (the same for the same arguments): 40% held-out pairs, 30% two objects."""
    return list(_eval_set(n, seed))


def has_held_out(scene: Scene) -> bool:
    return any((o.colour, o.shape) in HELD_OUT for o in scene.objects)


# ---------------------------------------------------------------------------------------------------------
# Captions

_SIZE_WORDS = {"small": ("small", "small", "little"), "medium": ("medium", "medium-sized"), "large": ("large", "big")}
_COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"gray": ("gray", "gray", "grey")}
_POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "at the top of the image"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom of the image"),
    "centre": ("in the centre", "in the center", "in the middle", "in the center of the image"),
    "top left": ("in the top left corner", "in the top left", "at the top left", "in the upper left corner"),
    "top right": ("in the top right corner", "in the top right", "at the top right", "in the upper right corner"),
    "bottom left": (
        "in the bottom left corner", "in the bottom left", "at the bottom left", "in the lower left corner"
    ),
    "bottom right": (
        "in the bottom right corner", "in the bottom right", "at the bottom right", "in the lower right corner"
    ),
}
_POSITION_SHORT = {
    "left": ("left", "left side"),
    "right": ("right", "right side"),
    "top": ("top",),
    "bottom": ("bottom",),
    "centre": ("centre", "center", "centered", "middle"),
    "top left": ("top left", "top left corner", "top-left"),
    "top right": ("top right", "top right corner", "top-right"),
    "bottom left": ("bottom left", "bottom left corner", "bottom-left"),
    "bottom right": ("bottom right", "bottom right corner", "bottom-right"),
}
_RELATION_PHRASES = {
    "above": ("above", "above", "over"),
    "below": ("below", "below", "under", "beneath"),
    "left of": ("to the left of", "to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "to the right of", "right of", "on the right of"),
}
_LEADS = ("", "", "", "a picture of ", "an image of ", "a drawing of ", "a simple drawing of ", "there is ")
_BG_PHRASES = (" on a {} background", " on a {} background", " against a {} background", " with a {} background",
               ", {} background")


_GENERIC_NOUNS = ("shape", "object", "thing")


def _np(claim: ObjectClaim, rng: random.Random, article: bool, omit: str | None = None) -> str:
    words = []
    if claim.size is not None:
        words.append(rng.choice(_SIZE_WORDS[claim.size]))
    if omit != "colour":
        words.append(rng.choice(_COLOUR_WORDS[claim.colour]))
    words.append(rng.choice(_GENERIC_NOUNS) if omit == "shape" else claim.shape)
    text = " ".join(words)
    if article:
        text = ("an " if text[0] in "aeiou" else "a ") + text
    return text


def describe(scene: Scene, rng: random.Random) -> Example:
    """Choose what to say about a scene (the rest is left free) and say it in one of many phrasings."""
    bg = scene.background if rng.random() < 0.5 else None
    if len(scene.objects) == 1:
        o = scene.objects[0]
        claims = Claims(
            (ObjectClaim(o.shape, o.colour, o.size if rng.random() < 0.45 else None,
                         o.position if rng.random() < 0.6 else None),),
            bg,
        )
    elif scene.relation is not None:
        objs = [ObjectClaim(o.shape, o.colour, o.size if rng.random() < 0.3 else None) for o in scene.objects]
        relation = scene.relation
        if rng.random() < 0.5:  # "A above B" and "B below A" are the same picture
            objs.reverse()
            relation = INVERSE_RELATION[relation]
        claims = Claims(tuple(objs), bg, relation)
    else:
        claims = Claims(tuple(ObjectClaim(o.shape, o.colour, None, o.position) for o in scene.objects), bg)
    return Example(scene, _say(claims, rng), claims)


def caption(scene: Scene, rng: random.Random) -> str:
    """A caption for the scene (see `describe` for the claims it makes)."""
    return describe(scene, rng).text


def partial_caption(scene: Scene, rng: random.Random) -> str:
    """A training caption that leaves out every object's colour ("a circle on the left") or shape
    ("a red shape on the left"), so each word has to mean the same whatever it is paired with.

    For training only: the judge's grammar (`parse_caption`) needs both, so these are never evaluated.
    """
    return _say(describe(scene, rng).asserted, rng, omit=rng.choice(("colour", "shape")))


def _say(claims: Claims, rng: random.Random, omit: str | None = None) -> str:
    bg = claims.background
    bg_word = rng.choice(_COLOUR_WORDS[bg]) if bg else ""
    if len(claims.objects) == 1:
        (obj,) = claims.objects
        pos = obj.position
        form = rng.randrange(4)
        if form == 0 or (form == 2 and pos is None) or (form == 3 and pos is None and bg is None):
            lead = rng.choice(_LEADS)
            text = lead + _np(obj, rng, article=bool(lead) or rng.random() < 0.7, omit=omit)
            if pos is not None:
                text += " " + rng.choice(_POSITION_PHRASES[pos])
            if bg:
                text += rng.choice(_BG_PHRASES).format(bg_word)
        elif form == 1:  # background before position
            lead = rng.choice(_LEADS)
            text = lead + _np(obj, rng, article=bool(lead) or rng.random() < 0.7, omit=omit)
            if bg:
                text += rng.choice(_BG_PHRASES[:4]).format(bg_word)
            if pos is not None:
                text += " " + rng.choice(_POSITION_PHRASES[pos])
        elif form == 2:  # position first
            text = rng.choice(_POSITION_PHRASES[pos]) + ", " + _np(obj, rng, article=True, omit=omit)
            if bg:
                text += rng.choice(_BG_PHRASES).format(bg_word)
        else:  # terse, comma separated
            parts = [_np(obj, rng, article=False, omit=omit)]
            if pos is not None:
                parts.append(rng.choice(_POSITION_SHORT[pos]))
            if bg:
                parts.append(f"{bg_word} background")
            text = ", ".join(parts)
    elif claims.relation is not None:
        a, b = claims.objects
        rel = rng.choice(_RELATION_PHRASES[claims.relation])
        form = rng.randrange(3)
        if form == 0 or (form == 2 and not bg):
            lead = rng.choice(_LEADS)
            article = bool(lead) or rng.random() < 0.8
            text = f"{lead}{_np(a, rng, article, omit=omit)} {rel} {_np(b, rng, article, omit=omit)}"
            if bg:
                text += rng.choice(_BG_PHRASES).format(bg_word)
        elif form == 1:
            text = f"{_np(a, rng, False, omit=omit)} {rel} {_np(b, rng, False, omit=omit)}"
            if bg:
                text += f", {bg_word} background"
        else:
            text = f"on a {bg_word} background, {_np(a, rng, True, omit=omit)} {rel} {_np(b, rng, True, omit=omit)}"
    else:
        parts = [f"{_np(o, rng, True, omit=omit)} {rng.choice(_POSITION_PHRASES[o.position])}" for o in claims.objects]
        text = " and ".join(parts)
        if bg:
            text += rng.choice(_BG_PHRASES).format(bg_word)
    return text


# ---------------------------------------------------------------------------------------------------------
# Parsing free text back into claims (so the judge can check any prompt written in this grammar)

_SIZE_OF = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_SIZE_OF |= {"tiny": "small", "huge": "large", "mid-sized": "medium"}
_COLOUR_OF = {w: c for c, ws in _COLOUR_WORDS.items() for w in ws}
_NP_RE = re.compile(
    r"\b(?:(" + "|".join(sorted(map(re.escape, _SIZE_OF), key=len, reverse=True)) + r")\s+)?"
    r"(" + "|".join(_COLOUR_OF) + r")\s+(" + "|".join(SHAPES) + r")s?\b"
)
_BG_RE = re.compile(r"\b(" + "|".join(_COLOUR_OF) + r")\s+background\b")
_RELATION_RES = (
    ("left of", re.compile(r"\bleft\s+of\b")),
    ("right of", re.compile(r"\bright\s+of\b")),
    ("above", re.compile(r"\b(?:above|over)\b")),
    ("below", re.compile(r"\b(?:below|under|underneath|beneath)\b")),
)
_V_RE = re.compile(r"\b(top|upper|bottom|lower)\b")
_H_RE = re.compile(r"\b(left|right)\b")
_C_RE = re.compile(r"\b(centre|center|centered|centred|middle)\b")


def _parse_position(text: str) -> str | None:
    v, h = _V_RE.search(text), _H_RE.search(text)
    vert = {"upper": "top", "lower": "bottom"}.get(v.group(1), v.group(1)) if v else None
    horiz = h.group(1) if h else None
    if vert and horiz:
        return f"{vert} {horiz}"
    if vert or horiz:
        return vert or horiz
    return "centre" if _C_RE.search(text) else None


def parse_caption(text: str) -> Claims:
    """Claims made by a caption in this grammar (objects need a colour and a shape); ValueError if none."""
    low = text.lower().replace("-", " ").replace("medium sized", "medium-sized").replace("mid sized", "mid-sized")
    bg_match = _BG_RE.search(low)
    background = _COLOUR_OF[bg_match.group(1)] if bg_match else None
    if bg_match:
        low = low[: bg_match.start()] + " " * (bg_match.end() - bg_match.start()) + low[bg_match.end():]
    nps = list(_NP_RE.finditer(low))[:2]
    if not nps:
        raise ValueError(f"no '<colour> <shape>' in {text!r}; colours {COLOURS}, shapes {SHAPES}")
    objects = []
    relation = None
    if len(nps) == 2:
        between = low[nps[0].end(): nps[1].start()]
        relation = next((name for name, rx in _RELATION_RES if rx.search(between)), None)
    for i, m in enumerate(nps):
        if len(nps) == 1:
            context = low[: m.start()] + " " + low[m.end():]
        elif relation is not None:
            context = ""
        else:
            context = low[m.end(): nps[1].start() if i == 0 else len(low)]
        size = _SIZE_OF[m.group(1)] if m.group(1) else None
        objects.append(ObjectClaim(m.group(3), _COLOUR_OF[m.group(2)], size, _parse_position(context)))
    return Claims(tuple(objects), background, relation)
