"""X/Y plot: one generation per cell over one or two varied parameters, plus a labelled grid.

The webui's "X/Y/Z plot" script without the Z axis. An axis is a parameter from `AXES` and a
list of values written as the webui takes them:

- comma-separated, read as CSV (`"DPM++ 2M, Karras", DDIM` is two values);
- whole-number axes: `1-5` (1..5), `1-10 (+3)` (1,4,7,10), `10-1 (-3)` (10,7,4,1), `1-10 [4]`
  (4 evenly spaced, truncated to whole numbers);
- decimal axes: the same with decimals, `1.5-3 (+0.5)`, `2-8 [4]`.

Ranges include their end in both directions (the webui's descending ranges stop one step short).
Every value is checked and every cell's request built and validated before the first image is
generated, so a typo in the last value costs nothing.

Seeds: a base seed (and variation seed) of -1 is resolved once, so every cell shares it; -1
values on a Seed or Var. seed axis each get their own random seed. Cells with more than one
image (batch size x count > 1) show their images side by side. The grid is one PNG whose
infotext is the first cell's plus the webui's keys (Script, X Type, X Values, Fixed X Values
for seed axes, and the same for Y), so PNG Info and "send to txt2img" read it as the webui's.

This module imports nothing heavy at import time: the CLI lists `AXES` in its help.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from darkroom.errors import DarkroomError, InvalidRequest

if TYPE_CHECKING:
    import threading

    from PIL import Image

    from darkroom.request import GeneratedImage, GenerationRequest

SCRIPT_TITLE = "X/Y/Z plot"
MAX_VALUES = 1000  # per axis: a range typo such as 1-100000 fails instead of planning forever

# ---------------------------------------------------------------------------------------------
# value parsing

_NUM = r"[+-]?\s*\d+"
_DEC = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)"
_RANGE = {
    int: re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*(?:\(\s*({_NUM})\s*\))?\s*"),
    float: re.compile(rf"\s*({_DEC})\s*-\s*({_DEC})\s*(?:\(\s*({_DEC})\s*\))?\s*"),
}
_COUNT = {
    int: re.compile(rf"\s*({_NUM})\s*-\s*({_NUM})\s*\[\s*(\d+)\s*\]\s*"),
    float: re.compile(rf"\s*({_DEC})\s*-\s*({_DEC})\s*\[\s*(\d+)\s*\]\s*"),
}
_KIND_WORDS = {int: "a whole number", float: "a number", str: "a value"}


def split_values(text: str) -> list[str]:
    """The webui's list reading: CSV with quotes, spaces after commas skipped, empty items dropped."""
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [item.strip() for row in rows for item in row if item.strip()]


def _number(kind: type, text: str) -> int | float:
    """A number as written; ValueError for one that is not (or a decimal too large to be finite)."""
    value = kind(text.replace(" ", ""))  # int(): ValueError past 4,300 digits too
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _expand(kind: type, item: str, axis: str) -> list[Any]:
    """One list item -> its values: a range, a counted range or a single value."""
    if kind is str:
        return [item]
    try:
        return _expand_numbers(kind, item, axis)
    except ValueError:  # a bound of a range that is not a number (e.g. 5,000 digits): the single-value message
        pass
    except OverflowError:  # bounds so far apart that their distance is no float
        raise InvalidRequest(f"{axis} value {item[:80]!r}: its numbers are too large") from None
    raise InvalidRequest(f"{axis} value {item[:80]!r}: not {_KIND_WORDS[kind]} or a range such as"
                         f" {'1-10 (+3)' if kind is int else '1.5-3 (+0.5)'}")


def _expand_numbers(kind: type, item: str, axis: str) -> list[Any]:
    if m := _COUNT[kind].fullmatch(item):
        start, end, count = _number(kind, m[1]), _number(kind, m[2]), int(m[3])
        if count < 1 or count > MAX_VALUES:
            raise InvalidRequest(f"{axis} value {item!r}: asks for {count} values; give 1 to {MAX_VALUES}")
        if count == 1:
            return [start]
        values = [start + (end - start) * i / (count - 1) for i in range(count)]
        return [int(v) for v in values] if kind is int else [round(v, 10) for v in values]
    if m := _RANGE[kind].fullmatch(item):
        start, end = _number(kind, m[1]), _number(kind, m[2])
        step = _number(kind, m[3]) if m[3] else (1 if end >= start else -1)
        if step == 0 or (end - start) * step < 0:
            raise InvalidRequest(f"{axis} value {item!r}: the step never reaches {m[2].strip()}"
                                 f" (use a {'negative' if end < start else 'positive'} step)")
        span = (end - start) / step  # OverflowError for whole numbers too far apart for a float: see _expand
        if not math.isfinite(span):
            raise OverflowError(span)
        count = int(span + 1e-9) + 1
        if count > MAX_VALUES:
            raise InvalidRequest(f"{axis} value {item!r}: makes {count} values; at most {MAX_VALUES}")
        return [start + i * step if kind is int else round(start + i * step, 10) for i in range(count)]
    return [_number(kind, item)]


# ---------------------------------------------------------------------------------------------
# the axis table


def _label(spec: AxisSpec, value: Any) -> str:
    from darkroom.metadata.infotext import format_value

    return f"{spec.name}: {format_value(value)}"


def _value_only(spec: AxisSpec, value: Any) -> str:
    return str(value)


def _checkpoint_label(spec: AxisSpec, value: Any) -> str:
    return f"{spec.name}: {Path(str(value)).stem}"


def _set_field(spec: AxisSpec, req: GenerationRequest | None, value: Any, values: list[Any]) -> dict[str, Any]:
    return {spec.field: value}


def _prompt_sr(spec: AxisSpec, req: GenerationRequest | None, value: Any, values: list[Any]) -> dict[str, Any]:
    """The first value is searched for; each value replaces it (so the first means "unchanged")."""
    if req is None:
        return {}
    return {"prompt": req.prompt.replace(values[0], value),
            "negative_prompt": req.negative_prompt.replace(values[0], value)}


def _size(spec: AxisSpec, req: GenerationRequest | None, value: Any, values: list[Any]) -> dict[str, Any]:
    m = re.fullmatch(r"\s*(\d{1,9})\s*[xX×]\s*(\d{1,9})\s*", value)  # (int() refuses 4,300 digits and more)
    if m is None:
        raise InvalidRequest("not WIDTHxHEIGHT, e.g. 512x768")
    return {"width": int(m[1]), "height": int(m[2])}


def _check_sampler(value: str) -> None:
    from darkroom.engine import samplers

    samplers.resolve(value)


def _check_schedule(value: str) -> None:
    from darkroom.engine import samplers

    names = {n.lower() for n in samplers.SCHEDULE_NAMES} | set(samplers.SCHEDULE_ALIASES)
    if value.lower() not in names:
        raise InvalidRequest(f"unknown schedule type {value!r}; choose one of: {', '.join(samplers.SCHEDULE_NAMES)}")


def _check_upscaler(value: str) -> None:
    """The hires fix's upscalers, or a name an upscaler model file may have ("R-ESRGAN 4x+", "4x-UltraSharp"):
    the files are looked up when the plot is planned (Engine.generate names the ones there)."""
    from darkroom.engine.generate import HIRES_UPSCALERS

    if value not in HIRES_UPSCALERS and not _MODEL_UPSCALER.fullmatch(value):
        raise InvalidRequest(f"unknown hires upscaler {value!r}; choose one of: {', '.join(HIRES_UPSCALERS)}"
                             " or an upscaler model's name (see `darkroom upscale --list`)")


_MODEL_UPSCALER = re.compile(r"(?=.*\d)[\w .+()\[\]-]{2,120}")
"""An upscaler model's name states its scale ("4x-UltraSharp", "R-ESRGAN 4x+", "SwinIR 4x", "DAT x2")."""


Apply = Callable[["AxisSpec", "GenerationRequest | None", Any, list[Any]], dict[str, Any]]


@dataclass(frozen=True)
class AxisSpec:
    """One row of the axis table: what an axis sets, how its values parse, how a label reads."""

    name: str  # the webui's label, e.g. "CFG Scale" (also the X/Y Type written in the grid infotext)
    field: str | None  # the GenerationRequest field it sets; None when `apply` sets several
    kind: type  # int, float or str: picks the value parser
    aliases: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None  # a value check beyond the field's own validation
    apply: Apply = _set_field  # (spec, request or None, value, all values) -> field updates
    label: Callable[[AxisSpec, Any], str] = _label
    cost: float = 0.0  # slow to switch (checkpoints): generated in the outer loop, as the webui does
    seed: bool = False  # -1 values pick a random seed each, written as "Fixed X Values"

    def updates(self, req: GenerationRequest | None, value: Any, values: list[Any]) -> dict[str, Any]:
        return self.apply(self, req, value, values)


AXES: tuple[AxisSpec, ...] = (
    AxisSpec("Seed", "seed", int, seed=True),
    AxisSpec("Var. seed", "subseed", int, ("variation seed",), seed=True),
    AxisSpec("Var. strength", "subseed_strength", float, ("variation strength",)),
    AxisSpec("Steps", "steps", int),
    AxisSpec("Hires steps", "hr_second_pass_steps", int, ("hr steps",)),
    AxisSpec("CFG Scale", "cfg_scale", float, ("cfg",)),
    AxisSpec("Prompt S/R", None, str, ("prompt sr", "sr"), apply=_prompt_sr, label=_value_only),
    AxisSpec("Sampler", "sampler", str, ("sampler name",), check=_check_sampler),
    AxisSpec("Schedule type", "schedule", str, ("scheduler",), check=_check_schedule),
    AxisSpec("Checkpoint name", "model", str, ("checkpoint",), label=_checkpoint_label, cost=1.0),
    AxisSpec("Eta", "eta", float),
    AxisSpec("Clip skip", "clip_skip", int),
    AxisSpec("Denoising", "denoising_strength", float, ("strength",)),
    AxisSpec("Hires upscale", "hr_scale", float),
    AxisSpec("Hires upscaler", "hr_upscaler", str, check=_check_upscaler),
    AxisSpec("Width", "width", int, ("w",)),
    AxisSpec("Height", "height", int, ("h",)),
    AxisSpec("Size", None, str, apply=_size),
)


def _key(name: str) -> str:
    return " ".join(re.sub(r"[-_ ]+", " ", name).lower().split())


_BY_KEY: dict[str, AxisSpec] = {}
for _spec in AXES:
    for _name in (_spec.name, _spec.field, *_spec.aliases):
        if _name:
            _BY_KEY.setdefault(_key(_name), _spec)


def axis_names() -> list[str]:
    return [s.name for s in AXES]


def find_axis(name: str) -> AxisSpec:
    """An axis by its webui name, its request field or an alias, case-insensitively."""
    spec = _BY_KEY.get(_key(name))
    if spec is None:
        raise InvalidRequest(f"unknown X/Y plot axis {name!r}; choose one of: {', '.join(axis_names())}")
    return spec


@dataclass(frozen=True)
class Axis:
    """An axis with its parsed values; `text` is the values as the user typed them."""

    spec: AxisSpec
    values: tuple[Any, ...]
    text: str

    @property
    def name(self) -> str:
        return self.spec.name

    def labels(self) -> list[str]:
        return [self.spec.label(self.spec, v) for v in self.values]


def parse_axis(name: str, text: str) -> Axis:
    """`parse_axis("steps", "10-30 (+10)")` -> Axis(Steps, (10, 20, 30)); every value checked."""
    from pydantic import ValidationError

    from darkroom.request import GenerationRequest

    spec = find_axis(name)
    values: list[Any] = []
    for item in split_values(text):
        values += _expand(spec.kind, item, spec.name)
    if not values:
        raise InvalidRequest(f"{spec.name}: no values given")
    if len(values) > MAX_VALUES:
        raise InvalidRequest(f"{spec.name}: {len(values)} values; at most {MAX_VALUES}")
    probe = GenerationRequest()
    for value in values:
        try:
            if spec.check is not None:
                spec.check(value)
            for key, v in spec.updates(None, value, values).items():
                setattr(probe, key, v)  # the request's own field validation (ranges, multiples of 8)
        except DarkroomError as e:
            raise InvalidRequest(f"{spec.name} value {value!r}: {e}") from None
        except ValidationError as e:
            msg = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise InvalidRequest(f"{spec.name} value {value!r}: {msg}") from None
    return Axis(spec, tuple(values), text)


def parse_axis_option(option: str) -> Axis:
    """The CLI's `AXIS=VALUES`, e.g. `steps=10,20,30` or `sampler=Euler a,"DPM++ 2M"`."""
    name, sep, text = option.partition("=")
    if not sep or not name.strip():
        raise InvalidRequest(f"X/Y plot axis {option!r} is not AXIS=VALUES, e.g. steps=10,20,30")
    return parse_axis(name.strip(), text)


# ---------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class Cell:
    """One grid cell: its column (x) and row (y), request, images, and box (l, t, r, b) in the grid."""

    x: int
    y: int
    request: GenerationRequest
    x_label: str | None = None
    y_label: str | None = None
    images: tuple[GeneratedImage, ...] = ()
    box: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class XYPlan:
    """Validated cells in grid order (row by row) and the order to generate them in."""

    x: Axis | None
    y: Axis | None
    cells: tuple[Cell, ...]
    order: tuple[int, ...]

    @property
    def columns(self) -> int:
        return len(self.x.values) if self.x else 1

    @property
    def rows(self) -> int:
        return len(self.y.values) if self.y else 1

    @property
    def total_steps(self) -> int:
        return sum(c.request.steps_per_batch * c.request.n_iter for c in self.cells)


@dataclass
class XYResult:
    cells: list[Cell]  # grid order, with their images and boxes
    images: list[GeneratedImage]  # in the order they were generated (and written)
    grid_png: bytes | None = None  # None when interrupted
    grid_path: str | None = None
    infotext: str | None = None  # the grid's
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self.images]


def _fix_seeds(axis: Axis | None) -> Axis | None:
    from darkroom.engine.generate import random_seed

    if axis is None or not axis.spec.seed:
        return axis
    return replace(axis, values=tuple(random_seed() if v == -1 else v for v in axis.values))


def plan_xy(engine, base: GenerationRequest, x: Axis | None, y: Axis | None, *,
            prepare: Callable[[GenerationRequest], GenerationRequest] | None = None) -> XYPlan:
    """Resolve seeds, build every cell's request and validate and admit them all (nothing is generated).

    `prepare` is applied to each cell whose model or VAE an axis changed, as the queue applied it to
    the job's request (the server pins the models an axis names to files the library lists)."""
    from pydantic import ValidationError

    from darkroom.engine.generate import random_seed

    if x is None and y is None:
        raise InvalidRequest("an X/Y plot needs an X or a Y axis")
    if x is not None and y is not None and x.spec is y.spec and x.spec.apply is not _prompt_sr:
        raise InvalidRequest(f"the X and Y axes both set {x.name}; vary two different parameters")
    for axis in (x, y):
        if axis is not None and axis.spec.apply is _prompt_sr:
            first = axis.values[0]
            if first not in base.prompt and first not in base.negative_prompt:
                raise InvalidRequest(f"Prompt S/R: {first!r} is not in the prompt or the negative prompt"
                                     " (the first value is the text the others replace)")
    base = base.model_copy(update={"seed": random_seed() if base.seed == -1 else base.seed,
                                   "subseed": random_seed() if base.subseed == -1 else base.subseed})
    x, y = _fix_seeds(x), _fix_seeds(y)
    xs = list(zip(x.values, x.labels(), strict=True)) if x else [(None, None)]
    ys = list(zip(y.values, y.labels(), strict=True)) if y else [(None, None)]
    cells = []
    checked_models: set[str | None] = set()
    for iy, (yv, y_label) in enumerate(ys):
        for ix, (xv, x_label) in enumerate(xs):
            where = ", ".join(label for label in (x_label, y_label) if label)
            req = base.model_copy()
            try:
                for axis, value in ((x, xv), (y, yv)):
                    if axis is not None:
                        for key, v in axis.spec.updates(req, value, list(axis.values)).items():
                            setattr(req, key, v)
                if prepare is not None and (req.model, req.vae) != (base.model, base.vae):
                    req = prepare(req)  # an axis named another model or VAE (the base is prepared already)
                engine.check_inputs(req)
                if hasattr(engine, "admit"):  # limits and memory, for the CLI and the queue alike (engine/admission.py)
                    engine.admit(req)
                if req.model not in checked_models:  # each checkpoint resolves (once)
                    engine.model_path(req)
                    checked_models.add(req.model)
            except ValidationError as e:
                msg = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
                                for err in e.errors())
                raise InvalidRequest(f"X/Y plot cell ({where}): {msg}") from None
            except DarkroomError as e:
                raise InvalidRequest(f"X/Y plot cell ({where}): {e}") from None
            cells.append(Cell(ix, iy, req, x_label, y_label))
    columns = len(xs)
    outer_x = x is not None and y is not None and x.spec.cost > y.spec.cost
    if outer_x:
        order = tuple(iy * columns + ix for ix in range(len(xs)) for iy in range(len(ys)))
    else:
        order = tuple(range(len(cells)))
    return XYPlan(x, y, tuple(cells), order)


# ---------------------------------------------------------------------------------------------
# running


def run_plan(engine, plan: XYPlan, *, output_dir: Path | None = None, grid_dir: Path | None = None,
             on_step=None, cancel: threading.Event | None = None,
             on_cell: Callable[[int, Cell], None] | None = None, on_image=None) -> XYResult:
    """Generate every cell (images go to `output_dir` as usual), then draw and write the grid.

    `on_cell(n, cell)` is told before the n-th generation starts. A cancel keeps the finished
    images and writes no grid (`interrupted` is set).
    """
    from darkroom.metadata.images import encode_png

    done: dict[int, Cell] = {}
    images: list[GeneratedImage] = []
    timings: dict[str, float] = {}
    interrupted = False
    for n, index in enumerate(plan.order):
        if cancel is not None and cancel.is_set():
            interrupted = True
            break
        cell = plan.cells[index]
        if on_cell is not None:
            on_cell(n, cell)
        result = engine.generate(cell.request, on_step=on_step, cancel=cancel, output_dir=output_dir,
                                 on_image=on_image)
        for key, value in result.timings.items():
            timings[key] = timings.get(key, 0.0) + value
        images += result.images
        done[index] = replace(cell, images=tuple(result.images))
        if result.interrupted:
            interrupted = True
            break
    cells = [done.get(i, cell) for i, cell in enumerate(plan.cells)]
    if interrupted or any(not c.images for c in cells):
        return XYResult(cells, images, interrupted=True, timings=timings)
    grid, boxes = draw_grid([_cell_image(c) for c in cells], plan.columns,
                            plan.x.labels() if plan.x else None, plan.y.labels() if plan.y else None)
    cells = [replace(c, box=box) for c, box in zip(cells, boxes, strict=True)]
    infotext = grid_infotext(plan, cells[0].images[0].infotext)
    png = encode_png(grid, infotext)
    path = str(write_grid(grid_dir, png)) if grid_dir is not None else None
    return XYResult(cells, images, png, path, infotext, timings=timings)


def run_xy(engine, base: GenerationRequest, x: Axis | None, y: Axis | None, *, output_dir: Path | None = None,
           grid_dir: Path | None = None, on_step=None, cancel: threading.Event | None = None,
           on_cell: Callable[[int, Cell], None] | None = None) -> XYResult:
    """Plan (validate everything), then generate every cell and the grid; see `run_plan`."""
    return run_plan(engine, plan_xy(engine, base, x, y), output_dir=output_dir, grid_dir=grid_dir,
                    on_step=on_step, cancel=cancel, on_cell=on_cell)


def grid_infotext(plan: XYPlan, first: str) -> str:
    """The first cell's infotext plus the webui's X/Y/Z plot keys."""
    from darkroom.metadata.infotext import format_infotext, parse_infotext

    params: dict[str, object] = dict(parse_infotext(first))
    prompt, negative = str(params.pop("Prompt")), str(params.pop("Negative prompt"))
    params["Script"] = SCRIPT_TITLE
    for letter, axis in (("X", plan.x), ("Y", plan.y)):
        if axis is not None:
            params[f"{letter} Type"] = axis.name
            params[f"{letter} Values"] = axis.text
            if axis.spec.seed:
                params[f"Fixed {letter} Values"] = ", ".join(str(v) for v in axis.values)
    return format_infotext(prompt, negative, params)


def write_grid(folder: Path, data: bytes) -> Path:
    """Write `grid-NNNNN.png` with the next free number, as images are written (write_atomic: a
    full disk or a read-only folder is a StorageError naming the folder, never half a file)."""
    from darkroom.engine.generate import write_atomic
    from darkroom.errors import StorageError

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError.wrap(e, folder) from None
    numbers = [int(p.stem[5:]) for p in folder.glob("grid-*.png") if p.stem[5:].isdigit()]
    number = max(numbers, default=-1) + 1
    while (folder / f"grid-{number:05d}.png").exists():
        number += 1
    return write_atomic(folder / f"grid-{number:05d}.png", data)


# ---------------------------------------------------------------------------------------------
# drawing


def _cell_image(cell: Cell) -> Image.Image:
    """A cell's images side by side (one image: that image)."""
    from PIL import Image

    pics = [Image.open(io.BytesIO(im.png)).convert("RGB") for im in cell.images]
    if len(pics) == 1:
        return pics[0]
    out = Image.new("RGB", (sum(p.width for p in pics), max(p.height for p in pics)), "white")
    left = 0
    for p in pics:
        out.paste(p, (left, 0))
        left += p.width
    return out


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> str:
    """Greedy word wrap to `width` pixels; a word longer than a line is cut between characters."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > 1 and font.getlength(word) > width:
                cut = max(1, max((k for k in range(1, len(word)) if font.getlength(word[:k]) <= width), default=1))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return "\n".join(lines)


def draw_grid(images: list[Image.Image], columns: int, column_labels: list[str] | None,
              row_labels: list[str] | None) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Images (row by row) in a white grid with column labels on top and row labels on the left.

    Each column is as wide as its widest image and each row as tall as its tallest; an image sits
    at its slot's top-left corner. Returns the grid and each image's box (left, top, right, bottom).
    """
    from PIL import Image, ImageDraw

    rows = len(images) // columns
    col_w = [max(images[r * columns + c].width for r in range(rows)) for c in range(columns)]
    row_h = [max(images[r * columns + c].height for c in range(columns)) for r in range(rows)]
    size = max(12, (images[0].width + images[0].height) // 25)  # the webui's label size, readable on tiny cells
    font, pad, spacing = _font(size), max(4, size // 2), max(2, size // 4)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def box(text: str) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = measure.multiline_textbbox((0, 0), text, font=font, spacing=spacing, align="center")
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)

    top_texts = [_wrap(t, font, max(1, w - 2 * pad)) for t, w in zip(column_labels, col_w, strict=True)] \
        if column_labels else []
    row_wrap = max(max(col_w), 8 * size)
    left_texts = [_wrap(t, font, row_wrap) for t in row_labels] if row_labels else []
    top = max((box(t)[3] - box(t)[1] for t in top_texts), default=-2 * pad) + 2 * pad
    left = max((box(t)[2] - box(t)[0] for t in left_texts), default=-2 * pad) + 2 * pad
    grid = Image.new("RGB", (left + sum(col_w), top + sum(row_h)), "white")
    draw = ImageDraw.Draw(grid)
    xs = [left + sum(col_w[:c]) for c in range(columns)]
    ys = [top + sum(row_h[:r]) for r in range(rows)]
    for c, text in enumerate(top_texts):
        l0, t0, r0, b0 = box(text)
        at = (xs[c] + (col_w[c] - (r0 - l0)) // 2 - l0, top - pad - (b0 - t0) - t0)
        draw.multiline_text(at, text, fill="black", font=font, spacing=spacing, align="center")
    for r, text in enumerate(left_texts):
        l0, t0, r0, b0 = box(text)
        at = ((left - (r0 - l0)) // 2 - l0, ys[r] + (row_h[r] - (b0 - t0)) // 2 - t0)
        draw.multiline_text(at, text, fill="black", font=font, spacing=spacing, align="center")
    boxes = []
    for i, image in enumerate(images):
        x0, y0 = xs[i % columns], ys[i // columns]
        grid.paste(image, (x0, y0))
        boxes.append((x0, y0, x0 + image.width, y0 + image.height))
    return grid, boxes
