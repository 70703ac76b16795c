"""A control map to the generation size: the extension's three resize modes and its resize rules.

- "Just Resize": stretched to the size. "Crop and Resize": scaled to cover it, centre crop.
  "Resize and Fill": scaled to fit inside, centred on a background of the median colour of the map's
  border pixels (an inpaint map's fill counts as masked, -1).
- Interpolation as the extension's high_quality_resize: nearest for maps of 3 to 199 colours
  (segmentation, colour grids), area when shrinking, cubic when enlarging; a two-colour black/white map
  (edges, scribbles) is re-binarized at Otsu's threshold after resizing so it stays binary, and a map of
  one-pixel lines (canny) is thinned back to one-pixel lines, as the edge models were trained on.
- pixel_perfect_resolution: the preprocessor resolution that lands the map on the generation size 1:1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from darkroom.control.annotators import imageops
from darkroom.control_unit import RESIZE_MODES
from darkroom.errors import InvalidRequest

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = RESIZE_MODES
MAX_SIDE = 16384
_OLD = {"envelope (outer fit)": RESIZE_AND_FILL, "outer fit": RESIZE_AND_FILL,
        "scale to fit (inner fit)": CROP_AND_RESIZE, "inner fit": CROP_AND_RESIZE}


def resize_mode_name(mode: str | int) -> str:
    """One of RESIZE_MODES from its name (any case), an old name, or 0/1/2."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    text = str(mode).strip().lower()
    for name in RESIZE_MODES:
        if text == name.lower():
            return name
    if text in _OLD:
        return _OLD[text]
    raise InvalidRequest(f"resize_mode {mode!r} is not one of: {', '.join(RESIZE_MODES)}")


def pixel_perfect_resolution(image_width: int, image_height: int, target_width: int, target_height: int,
                             resize_mode: str | int) -> int:
    """The extension's pixel-perfect preprocessor resolution: the short side of the picture scaled by the
    factor its resize mode will apply (the smaller of the two for Resize and Fill, else the larger)."""
    if min(image_width, image_height, target_width, target_height) < 1:
        raise InvalidRequest("pixel-perfect resolution needs positive picture and target sizes")
    k_h = float(target_height) / float(image_height)
    k_w = float(target_width) / float(image_width)
    k = min(k_h, k_w) if resize_mode_name(resize_mode) == RESIZE_AND_FILL else max(k_h, k_w)
    return int(np.round(k * float(min(image_width, image_height))))


def _unique_colours(q: np.ndarray) -> int:
    packed = (q[..., 0].astype(np.int32) << 16) | (q[..., 1].astype(np.int32) << 8) | q[..., 2].astype(np.int32)
    return len(np.unique(packed))


def _one_pixel_lines(q: np.ndarray) -> bool:
    """Whether a black/white map is mostly thin lines: a 3x3 opening removes more than half its white."""
    white = q > 127
    opened = ndimage.grey_dilation(ndimage.grey_erosion(q, size=(3, 3, 1), mode="nearest"), size=(3, 3, 1),
                                   mode="nearest")
    return int((opened < q).sum()) * 2 > int(white.sum())


def _resize_map(rgb: np.ndarray, mask: np.ndarray | None, width: int, height: int):
    """high_quality_resize on a float [0, 1] map (and its inpaint mask)."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb, mask
    q = np.rint(rgb * 255).clip(0, 255).astype(np.uint8)
    colours = _unique_colours(q)
    smaller = width * height < rgb.shape[0] * rgb.shape[1]
    binary = colours == 2 and q.min() < 16 and q.max() > 240
    if 2 < colours < 200:
        method = imageops.NEAREST
    elif smaller:
        method = imageops.AREA
    else:
        method = imageops.CUBIC
    out = imageops.resize(rgb.astype(np.float32), width, height, method).clip(0.0, 1.0)
    if binary:
        gray = np.rint(out.mean(axis=2) * 255).clip(0, 255).astype(np.uint8)
        if _one_pixel_lines(q):
            line = imageops.otsu(imageops.line_peaks(gray)) > 0
            line = imageops.thin(line, prune=width * height > rgb.shape[0] * rgb.shape[1])
        else:
            line = imageops.otsu(gray) > 0
        out = np.repeat(line.astype(np.float32)[:, :, None], 3, axis=2)
    if mask is not None:
        mask = imageops.resize(mask.astype(np.float32), width, height, method) > 0.5
    return out, mask


def fill_masked(control: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """A float map's colours with its masked pixels (-1) set to the median colour of the rest (`empty` when
    everything is masked): what resizes without the -1s bleeding in."""
    rgb = control.astype(np.float32, copy=True)
    masked = (rgb < 0).any(axis=2)
    rgb[masked] = np.median(rgb[~masked], axis=0) if (~masked).any() else empty
    return rgb


def fit(control: np.ndarray, width: int, height: int, resize_mode: str | int) -> np.ndarray:
    """`control` (float32 HxWx3 in [0, 1], -1 where inpaint-masked) at exactly height x width."""
    width, height = int(width), int(height)
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise InvalidRequest(f"control size {width}x{height} is out of range (1 to {MAX_SIDE})")
    control = np.asarray(control, dtype=np.float32)
    if control.ndim == 2:
        control = control[:, :, None]
    if control.ndim != 3 or control.shape[2] not in (1, 3) or min(control.shape[:2]) < 1:
        raise InvalidRequest(f"a control map must be HxWx3, not {control.shape}")
    if control.shape[2] == 1:
        control = np.repeat(control, 3, axis=2)
    mode = resize_mode_name(resize_mode)
    masked = (control < 0).any(axis=2)
    mask = masked if masked.any() else None
    rgb = control
    if mask is not None:  # resize the colours without the -1s bleeding in, then mask again
        rgb = fill_masked(control)
    old_h, old_w = rgb.shape[:2]
    if mode == JUST_RESIZE:
        out, mask = _resize_map(rgb, mask, width, height)
    elif mode == CROP_AND_RESIZE:
        k = max(height / old_h, width / old_w)
        new_w, new_h = max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k)))
        out, mask = _resize_map(rgb, mask, new_w, new_h)
        top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
        out = out[top:top + height, left:left + width]
        mask = None if mask is None else mask[top:top + height, left:left + width]
    else:
        k = min(height / old_h, width / old_w)
        new_w, new_h = max(1, int(np.round(old_w * k))), max(1, int(np.round(old_h * k)))
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)
        background = np.tile(np.median(border, axis=0).astype(np.float32), (height, width, 1))
        inner, inner_mask = _resize_map(rgb, mask, new_w, new_h)
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        background[top:top + new_h, left:left + new_w] = inner[:height, :width]
        out = background
        if mask is not None:
            mask = np.ones((height, width), dtype=bool)
            mask[top:top + new_h, left:left + new_w] = inner_mask[:height, :width]
    out = np.ascontiguousarray(out, dtype=np.float32)
    if mask is not None:
        out[mask] = -1.0
    return out
