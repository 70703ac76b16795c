"""SD upscale: enlarge an image, then redraw it tile by tile with img2img at the model's own size.

The webui's "SD upscale" script (img2img tab). A model draws detail well only near the size it was
trained at, so a large picture is made in pieces: the init image is upscaled (an upscaler model,
Lanczos, Nearest, or "None": kept as it is), cut into tiles of the request's width x height that
overlap, each tile is run through img2img with the request's prompt and settings, and the tiles are
pasted back with their overlap faded in. The webui's rules, kept so a picture matches its own:

- grid: columns = ceil((W - overlap) / (tile_w - overlap)), rows alike; the tiles are spread evenly,
  the first at 0 and the last flush with the far edge, positions truncated to whole pixels;
- recombining: within a row, each later tile fades in over its left neighbour across its first
  `overlap` columns (alpha i * 255 // overlap at column i), and replaces it beyond; finished rows
  join top to bottom the same way;
- seeds: upscale n (of the batch count) starts at seed + n; the webui runs the tiles in batches of
  `batch_size`, each batch starting one seed after the previous batch's start, image j of a batch at
  start + j (at start alone when a variation strength is set; its variation seed at subseed + j).
  Darkroom runs every tile on its own with exactly those seeds (a batch equals its single runs);
- each upscale is one image; its infotext is its first tile's (Size is the tile size) plus
  "SD upscale overlap" and "SD upscale upscaler".

Where Darkroom differs: each upscale's infotext carries its own seed (the webui repeats the first
one's); an upscaled image smaller than a tile is refused (the webui pads it with black); a skipped
tile keeps its upscaled pixels instead of shifting the tiles after it. Cancel is answered between
tiles and inside each (through the engine); tiles are never written, only the recombined images.

This module imports nothing heavy at import time (the job queue imports it).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from darkroom.errors import Interrupted, InvalidRequest

if TYPE_CHECKING:
    import threading

    from PIL import Image

    from darkroom.request import GeneratedImage, GenerationRequest

SCRIPT_TITLE = "SD upscale"
DEFAULT_OVERLAP = 64
DEFAULT_FACTOR = 2.0


@dataclass(frozen=True)
class SDUpscale:
    """What the script is asked: the upscale factor, the tiles' overlap in pixels, the upscaler's name."""

    factor: float = DEFAULT_FACTOR
    overlap: int = DEFAULT_OVERLAP
    upscaler: str = "None"

    def check(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not math.isfinite(
                self.factor) or self.factor <= 0:
            raise InvalidRequest(f"SD upscale: the scale factor must be a number over 0, not {self.factor!r}")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, int) or self.overlap < 0:
            raise InvalidRequest(f"SD upscale: the tile overlap must be a whole number of pixels >= 0, not"
                                 f" {self.overlap!r}")


def upscaler_names(upscalers) -> list[str]:
    """The upscalers in the webui's order (None, Lanczos, Nearest, then the model files): the list an index
    into /sdapi/v1/upscalers picks from."""
    from darkroom.upscale import NONE, RESIZERS

    return [NONE, *RESIZERS, *(f.name for f in upscalers.files())]


# ---------------------------------------------------------------------------------------------
# the grid


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of a width x height image sit: every row has the same columns."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Each tile's (left, top, right, bottom), row by row."""
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]


def _starts(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    count = math.ceil((size - overlap) / (tile - overlap))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return tuple(min(int(i * step), size - tile) for i in range(count))


def split_grid(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """The webui's tile positions for an image of width x height (see the module docstring)."""
    if width < tile_w or height < tile_h:
        raise InvalidRequest(f"SD upscale: the upscaled image {width}x{height} is smaller than a tile"
                             f" ({tile_w}x{tile_h}, the request's width x height); use a smaller width and height"
                             " or a larger scale factor")
    if not 0 <= overlap < min(tile_w, tile_h):
        raise InvalidRequest(f"SD upscale: the tile overlap {overlap} must be at least 0 and less than the tile's"
                             f" width and height ({tile_w}x{tile_h})")
    return TileGrid(width, height, tile_w, tile_h, overlap, _starts(width, tile_w, overlap),
                    _starts(height, tile_h, overlap))


def crop_tiles(image: Image.Image, grid: TileGrid) -> list[Image.Image]:
    return [image.crop(box) for box in grid.boxes()]


def _fade(overlap: int, across: int, vertical: bool) -> Image.Image:
    """An "L" mask `overlap` pixels deep that rises from 0 as the webui's does (i * 255 // overlap)."""
    import numpy as np
    from PIL import Image

    ramp = (np.arange(overlap) * 255 // overlap).astype(np.uint8)
    array = np.repeat(ramp[:, None], across, axis=1) if vertical else np.repeat(ramp[None, :], across, axis=0)
    return Image.fromarray(np.ascontiguousarray(array), "L")


def _lay(canvas: Image.Image, pieces: list[tuple[int, Image.Image]], overlap: int, vertical: bool) -> None:
    """Paste `pieces` (offset, image) along one axis: each after the first fades in over its first `overlap`
    pixels and replaces what lies beyond."""
    mask = None
    for i, (at, piece) in enumerate(pieces):
        where = (0, at) if vertical else (at, 0)
        if i == 0 or overlap == 0:
            canvas.paste(piece, where)
            continue
        if mask is None:
            mask = _fade(overlap, piece.width if vertical else piece.height, vertical)
        near = (0, 0, piece.width, overlap) if vertical else (0, 0, overlap, piece.height)
        far = (0, overlap, piece.width, piece.height) if vertical else (overlap, 0, piece.width, piece.height)
        canvas.paste(piece.crop(near), where, mask)
        canvas.paste(piece.crop(far), (0, at + overlap) if vertical else (at + overlap, 0))


def combine(grid: TileGrid, tiles: list[Image.Image]) -> Image.Image:
    """The tiles (row by row, as `crop_tiles` gives them) joined into one width x height image."""
    from PIL import Image

    if len(tiles) != grid.count:
        raise ValueError(f"{len(tiles)} tiles for a grid of {grid.count}")
    out = Image.new("RGB", (grid.width, grid.height))
    rows = []
    columns = len(grid.xs)
    for r, y in enumerate(grid.ys):
        row = Image.new("RGB", (grid.width, grid.tile_h))
        _lay(row, [(x, tiles[r * columns + c].convert("RGB")) for c, x in enumerate(grid.xs)], grid.overlap, False)
        rows.append((y, row))
    _lay(out, rows, grid.overlap, True)
    return out


# ---------------------------------------------------------------------------------------------
# planning


@dataclass(frozen=True)
class SDUpscalePlan:
    """A checked SD upscale: the request (seeds resolved, width x height = the tile size), the options (the
    upscaler's listed name), the source's and the upscaled size, and the grid."""

    request: GenerationRequest
    options: SDUpscale
    source_size: tuple[int, int]
    grid: TileGrid

    @property
    def upscales(self) -> int:
        return self.request.n_iter

    @property
    def runs(self) -> int:
        """img2img runs in all: every tile of every upscale."""
        return self.grid.count * self.upscales

    @property
    def total_steps(self) -> int:
        return self.tile_template().steps_per_batch * self.runs

    def tile_seeds(self, n: int, t: int) -> tuple[int, int]:
        """(seed, variation seed) of tile t of upscale n: the webui's batches (module docstring)."""
        req, size = self.request, self.request.batch_size
        j = t % size
        seed = req.seed + n + t // size + (0 if req.subseed_strength > 0 else j)
        return seed, (req.subseed + j if req.subseed >= 0 else req.subseed)

    def tile_template(self) -> GenerationRequest:
        """A tile's request but for its seeds and image (what admission and progress need)."""
        return self.request.model_copy(update={"batch_size": 1, "n_iter": 1, "resize_mode": 0})

    def tile_request(self, n: int, t: int, tile_png: bytes) -> GenerationRequest:
        seed, subseed = self.tile_seeds(n, t)
        return self.request.model_copy(update={"batch_size": 1, "n_iter": 1, "resize_mode": 0, "seed": seed,
                                               "subseed": subseed, "init_image": tile_png})

    def extra_params(self) -> dict[str, object]:
        """The webui's extra_generation_params for the script, also written in the infotext."""
        return {"SD upscale overlap": self.options.overlap, "SD upscale upscaler": self.options.upscaler}


def plan_sd_upscale(engine, request: GenerationRequest, options: SDUpscale) -> SDUpscalePlan:
    """Check everything and admit one tile (each tile is an ordinary img2img request); nothing is run.

    The upscaled image must stay within the max_side setting and its upscale within the free memory."""
    from darkroom.engine.admission import Limits, limit_problems
    from darkroom.engine.generate import random_seed
    from darkroom.engine.img2img import decode_image
    from darkroom.request import MAX_SEED
    from darkroom.upscale.resize import aim

    options.check()
    if request.init_image is None:
        raise InvalidRequest("SD upscale upscales an image: give an init image (img2img)")
    if request.mask is not None:
        raise InvalidRequest("SD upscale redraws the whole image: leave out the mask")
    if request.enable_hr:
        raise InvalidRequest("SD upscale does not take the hires fix; turn enable_hr off")
    upscaler = engine.upscalers.canonical(options.upscaler)  # an unknown name: 422 listing the choices
    options = dataclasses.replace(options, upscaler=upscaler)
    tile_w, tile_h = request.width, request.height
    if tile_w is None or tile_h is None:  # the model's native size (the admission settles it without loading)
        native = request.model_copy(update={"init_image": None, "width": None, "height": None, "batch_size": 1,
                                            "n_iter": 1})
        settled = engine.admit(native) if hasattr(engine, "admit") else native
        tile_w, tile_h = tile_w or settled.width or 512, tile_h or settled.height or 512
    source = decode_image(request.init_image, "init image")
    limits: Limits = getattr(engine, "limits", None) or Limits()
    if upscaler == "None":
        size = source.size
    elif max(source.size) * options.factor < limits.max_side + 8:  # (a huge factor never reaches aim's int())
        size = aim(source.width, source.height, options.factor)
    else:
        size = (limits.max_side + 1, limits.max_side + 1)
    if max(size) > limits.max_side:
        raise InvalidRequest(f"SD upscale: {source.width}x{source.height} upscaled by {options.factor:g} is over the"
                             f" limit max_side = {limits.max_side} (a setting: POST /sdapi/v1/options"
                             " darkroom_max_side, or settings.json); use a smaller scale factor")
    grid = split_grid(size[0], size[1], tile_w, tile_h, options.overlap)
    seed = random_seed() if request.seed == -1 else request.seed
    strength = request.subseed_strength > 0
    subseed = random_seed() if strength and request.subseed == -1 else request.subseed
    base = request.model_copy(update={"seed": seed, "subseed": subseed, "width": tile_w, "height": tile_h})
    plan = SDUpscalePlan(base, options, source.size, grid)
    last = seed + base.n_iter - 1 + (grid.count - 1) // base.batch_size + base.batch_size - 1  # a bound on tile seeds
    if last > MAX_SEED:
        raise InvalidRequest(f"SD upscale: seed {seed} is too large for {plan.runs} tiles (tile seeds count up from"
                             f" it and end at most at 2**64-1); use a smaller seed or -1")
    problems = limit_problems(base, limits)
    if problems:
        raise InvalidRequest(f"SD upscale: {'; '.join(problems)}")
    tile = plan.tile_template()
    engine.check_inputs(tile)
    if hasattr(engine, "admit"):
        engine.admit(tile)  # size, steps, memory of one tile (the init image's bytes do not change its size)
        _admit_upscale(engine, source.width, source.height, options)
    return plan


def _admit_upscale(engine, width: int, height: int, options: SDUpscale) -> None:
    """Refuse (422) an upscale that would not fit in the free memory."""
    from darkroom.engine import memory

    device = engine.upscalers.device
    free = memory.available_memory(device)
    need = engine.upscalers.working_bytes(width, height, options.factor, options.upscaler)
    if free is not None and need > free:
        raise InvalidRequest(f"SD upscale: upscaling {width}x{height} by {options.factor:g} with {options.upscaler}"
                             f" needs about {memory.human_gb(need)} of memory; {memory.human_gb(free)} is free: use a"
                             " smaller scale factor or a lighter upscaler")


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class SDUpscaleResult:
    images: list[GeneratedImage]  # one per finished upscale
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    model_hash: str = ""

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self.images]


def upscale_infotext(plan: SDUpscalePlan, first_tile: str, seed: int) -> str:
    """The first tile's infotext with the upscale's seed and the script's keys."""
    from darkroom.metadata.infotext import format_infotext, parse_infotext

    params: dict[str, object] = dict(parse_infotext(first_tile))
    prompt, negative = str(params.pop("Prompt")), str(params.pop("Negative prompt"))
    params["Seed"] = seed
    params.update(plan.extra_params())
    return format_infotext(prompt, negative, params)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _save(req: GenerationRequest, image: Image.Image, infotext: str, seed: int,
          output_dir: Path | None) -> GeneratedImage:
    """Encode the recombined image with its infotext and write it as the engine writes its images."""
    from darkroom.engine.generate import write_numbered
    from darkroom.metadata.images import SUFFIXES, encode_file, encode_png
    from darkroom.request import GeneratedImage

    png = encode_png(image, infotext)
    path = None
    if output_dir is not None:
        fmt = (req.output_format or "png").lower()
        data = png if fmt == "png" else encode_file(image, infotext, fmt, quality=req.output_quality or 80,
                                                    lossless=bool(req.output_lossless))
        path = str(write_numbered(output_dir, seed, data, SUFFIXES[fmt]))
    return GeneratedImage(seed=seed, infotext=infotext, png=png, path=path)


def run_sd_upscale(engine, plan: SDUpscalePlan, *, output_dir: Path | None = None, on_step=None,
                   cancel: threading.Event | None = None, skip: threading.Event | None = None,
                   on_tile: Callable[[int, int], None] | None = None,
                   on_image: Callable[[GeneratedImage], None] | None = None) -> SDUpscaleResult:
    """Upscale, then img2img every tile and recombine, once per upscale (the batch count).

    `on_tile(n, t)` is told before tile t of upscale n; progress events count the tiles as batches. A
    cancel keeps the upscales finished; a skip abandons the current tile only (it keeps its upscaled pixels).
    """
    import time

    from PIL import Image

    from darkroom.engine.img2img import decode_image
    from darkroom.engine.sampling import renumbered_batches

    result = SDUpscaleResult(images=[])
    t0 = time.perf_counter()
    source = decode_image(plan.request.init_image, "init image")
    try:
        upscaled = engine.upscalers.upscale(source, plan.options.factor, plan.options.upscaler, cancel=cancel)
    except Interrupted:
        result.interrupted = True
        return result
    result.timings["upscale"] = time.perf_counter() - t0
    if upscaled.size != (plan.grid.width, plan.grid.height):  # the planned size is the upscaler's rule
        upscaled = upscaled.resize((plan.grid.width, plan.grid.height), Image.LANCZOS)
    boxes = plan.grid.boxes()
    for n in range(plan.upscales):
        tiles: list[Image.Image] = []
        first: str | None = None
        for t, box in enumerate(boxes):
            if on_tile is not None:
                on_tile(n, t)
            if cancel is not None and cancel.is_set():  # between tiles: the next one is not started
                result.interrupted = True
                break
            tile = upscaled.crop(box)
            step = renumbered_batches(on_step, n * len(boxes) + t, plan.runs)  # a tile is one batch
            done = engine.generate(plan.tile_request(n, t, _png(tile)), on_step=step, cancel=cancel, skip=skip)
            for key, value in done.timings.items():
                result.timings[key] = result.timings.get(key, 0.0) + value
            result.model_name, result.model_hash = done.model_name or result.model_name, done.model_hash
            if done.interrupted:
                result.interrupted = True
                break
            if done.images:
                tiles.append(Image.open(io.BytesIO(done.images[0].png)).convert("RGB"))
                first = first or done.images[0].infotext
            else:  # skipped: the upscaled pixels stay
                tiles.append(tile)
        if result.interrupted:
            break
        if first is None:  # every tile was skipped: nothing was drawn, so no image
            continue
        seed = plan.tile_seeds(n, 0)[0]
        image = _save(plan.request, combine(plan.grid, tiles), upscale_infotext(plan, first, seed), seed, output_dir)
        result.images.append(image)
        if on_image is not None:
            on_image(image)
    result.timings["total"] = time.perf_counter() - t0
    return result


def run(engine, request: GenerationRequest, options: SDUpscale, **kw) -> SDUpscaleResult:
    """Plan (check everything), then run; see `run_sd_upscale`."""
    return run_sd_upscale(engine, plan_sd_upscale(engine, request, options), **kw)
