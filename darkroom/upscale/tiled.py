"""Run an upscaler network over an image in overlapping tiles, blended at the seams.

A 4x model on a 2048x2048 image makes 64-channel feature maps of 8192x8192: tens of GB at once.
Tiled, only one tile's activations live at a time (their size set by a memory budget), and the
result is accumulated on the CPU. Where tiles overlap, each tile's weight is 0 for the first
`margin` pixels from its inner edge (what a network sees wrongly there: zero padding instead of
the neighbour's pixels) and then rises linearly to 1, so seams are feathered and, for networks
whose reach is within the margin, the tiled result equals the untiled one (tests check both).
Cancellation is answered between tiles.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from darkroom.errors import Interrupted

GiB = 2**30
BUDGET_CPU = 1 * GiB
BUDGET_GPU = 2 * GiB
"""Activations one tile may use (on a GPU: at most half the free memory, see tile_budget)."""
OVERLAP = 32
"""Input pixels shared by neighbouring tiles; a quarter of it (MARGIN_PART) is given weight 0."""
MARGIN_PART = 4
MIN_TILE, MAX_TILE = 64, 1024
_CHANNELS = 64  # feature channels of ESRGAN-like networks, at the output size, the largest live set
_LIVE_MAPS = 4  # of those maps alive at once (input, output, residual, temporary)
_TRANSFORMER_FACTOR = 4  # SwinIR/HAT/DAT: attention over windows and wider embeddings
TRANSFORMERS = ("SwinIR", "Swin2SR", "HAT", "DAT", "DRCT", "ATD", "RGT", "GRL", "SRFormer", "FDAT")
ACCUMULATOR_BYTES = 16  # per output pixel: fp32 RGB sum + fp32 weight
IMAGE_BYTES = 3  # per pixel of a PIL RGB image


def bytes_per_input_pixel(scale: int, architecture: str = "", dtype_size: int = 4) -> int:
    """Working memory of one input pixel of a tile (calibrated on ESRGAN's widths; conservative)."""
    per = _CHANNELS * _LIVE_MAPS * (scale * scale + 2) * dtype_size
    return per * (_TRANSFORMER_FACTOR if architecture in TRANSFORMERS else 1)


def tile_size(scale: int, budget: int, architecture: str = "", dtype_size: int = 4, multiple_of: int = 8) -> int:
    """The side of a square tile whose working memory stays within `budget` bytes."""
    side = int((budget / bytes_per_input_pixel(scale, architecture, dtype_size)) ** 0.5)
    side = max(MIN_TILE, min(MAX_TILE, side))
    m = max(8, multiple_of)
    return max(m, side // m * m)


def working_bytes(width: int, height: int, scale: int, *, budget: int = BUDGET_CPU, weights: int = 0) -> int:
    """Peak memory of upscaling a width x height image by `scale`: one tile's activations (at most the
    budget), the accumulator and the images in and out, plus the network's weights."""
    out_px = width * height * scale * scale
    tile = min(budget, width * height * bytes_per_input_pixel(scale))
    return int(tile + out_px * (ACCUMULATOR_BYTES + IMAGE_BYTES) + width * height * IMAGE_BYTES * 2 + weights)


def tile_budget(device: torch.device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device.index if device.index is not None else torch.cuda.current_device())
        return max(256 * 2**20, min(BUDGET_GPU, free // 2))
    return BUDGET_CPU


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def _ramp(length: int, lead: bool, trail: bool, margin: int, overlap: int) -> torch.Tensor:
    """Weights along one side of a tile: 0 for `margin` pixels at an inner edge, then up to 1 over the
    rest of the overlap; 1 at the image's own edges (nothing to blend with there)."""
    w = torch.ones(length)
    d = torch.arange(length, dtype=torch.float32)
    rise = max(1.0, overlap - 2 * margin)
    if lead:
        w = torch.minimum(w, ((d - margin + 1) / rise).clamp(0, 1))
    if trail:
        w = torch.minimum(w, ((length - d - margin) / rise).clamp(0, 1))
    return w


def _pad_to(x: torch.Tensor, multiple: int, minimum: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph = max(minimum, -(-h // multiple) * multiple) - h
    pw = max(minimum, -(-w // multiple) * multiple) - w
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


def run_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: Image.Image, scale: int, *, tile: int,
              device: torch.device, dtype: torch.dtype, multiple_of: int = 1, min_size: int = 0,
              overlap: int = OVERLAP, cancel: threading.Event | None = None,
              progress: Callable[[int, int], None] | None = None) -> Image.Image:
    """`image` upscaled by `model` (one pass, its native `scale`), in tiles of `tile` input pixels.
    Raises Interrupted when `cancel` is set (checked before each tile)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    _, _, h, w = x.shape
    overlap = min(overlap, tile // 2)
    margin = overlap // MARGIN_PART
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    out = torch.zeros(3, h * scale, w * scale)
    weight = torch.zeros(1, h * scale, w * scale)
    total, done = len(ys) * len(xs), 0
    for y0 in ys:
        for x0 in xs:
            if cancel is not None and cancel.is_set():
                raise Interrupted("upscale interrupted")
            th, tw = min(tile, h - y0), min(tile, w - x0)
            piece, ph, pw = _pad_to(x[:, :, y0:y0 + th, x0:x0 + tw], multiple_of, min_size)
            with torch.no_grad():
                result = model(piece.to(device=device, dtype=dtype))
            result = result[0, :, :ph * scale, :pw * scale].float().clamp(0, 1).cpu()
            wy = _ramp(th * scale, y0 > 0, y0 + th < h, margin * scale, overlap * scale)
            wx = _ramp(tw * scale, x0 > 0, x0 + tw < w, margin * scale, overlap * scale)
            mask = (wy[:, None] * wx[None, :])[None]
            ys_, xs_ = slice(y0 * scale, (y0 + th) * scale), slice(x0 * scale, (x0 + tw) * scale)
            out[:, ys_, xs_] += result * mask
            weight[:, ys_, xs_] += mask
            done += 1
            if progress is not None:
                progress(done, total)
    out = (out / weight.clamp_min(1e-8)).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(out.permute(1, 2, 0).numpy()))
