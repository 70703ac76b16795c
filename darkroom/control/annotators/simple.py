"""The preprocessors that need no weight file, with the extension's formulas and defaults.

Each takes the uint8 HxWx3 picture at its input size and returns a uint8 HxWx3 (or HxW) map; the
ones that work at the preprocessor resolution resize first (the extension's resize_image_with_pad:
the short side to `resolution`; the 64-pixel pad it adds only matters at the border of canny).
"""

from __future__ import annotations

import numpy as np

from darkroom.control.annotators import imageops
from darkroom.control.annotators.canny import canny as canny_edges


def canny(img: np.ndarray, res: int, low: float, high: float) -> np.ndarray:
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    return canny_edges(padded, int(low), int(high))[:h, :w]


def invert(img: np.ndarray) -> np.ndarray:
    """White lines on black from black lines on white (the input size is kept)."""
    return 255 - img


def threshold(img: np.ndarray, res: int, level: float) -> np.ndarray:
    """White where every channel is above `level`."""
    img = imageops.to_resolution(img, res)
    return np.where(img.min(axis=2) > level, 255, 0).astype(np.uint8)


def scribble_xdog(img: np.ndarray, res: int, level: float) -> np.ndarray:
    """Difference of Gaussians (sigma 0.5 and 5): white where dark detail stands out by more than `level`/2."""
    x = imageops.to_resolution(img, res).astype(np.float32)
    dog = imageops.gaussian(x, 5.0) - imageops.gaussian(x, 0.5)
    dog = (255 - np.min(dog, axis=2)).clip(0, 255).astype(np.uint8)
    return np.where(2 * (255 - dog.astype(np.int32)) > level, 255, 0).astype(np.uint8)


def lineart_standard(img: np.ndarray, res: int) -> np.ndarray:
    """Dark lines (darker than their blurred surroundings) as bright strokes, scaled by their median."""
    x = imageops.to_resolution(img, res).astype(np.float32)
    intensity = np.min(imageops.gaussian(x, 6.0) - x, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    scale = max(16.0, float(np.median(lines)) if lines.size else 0.0)
    return (intensity / scale * 127).clip(0, 255).astype(np.uint8)


def tile_resample(img: np.ndarray, rate: float) -> np.ndarray:
    """The input shrunk by `rate` (area), for the tile model to fill in detail; under 1.1 it is kept."""
    if rate < 1.1:
        return img
    h, w = max(1, int(img.shape[0] / rate)), max(1, int(img.shape[1] / rate))
    return imageops.resize(img, w, h, imageops.AREA)


def blur_gaussian(img: np.ndarray, res: int, sigma: float) -> np.ndarray:
    return imageops.gaussian(imageops.to_resolution(img, res), max(float(sigma), 0.01))


def color_grid(img: np.ndarray, res: int) -> np.ndarray:
    """T2I-Adapter's colour palette: 64-pixel cells of the average colour (short side to `res`)."""
    h, w = imageops.short_side_size(img.shape[0], img.shape[1], res)
    img = imageops.resize(img, w, h, imageops.AREA)
    small = imageops.resize(img, max(1, w // 64), max(1, h // 64), imageops.CUBIC)
    return imageops.resize(small, w, h, imageops.NEAREST)


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """Smooth random field in [0, 1]: uniform noise on a grid of `f`-pixel cells, cubic-upsampled."""
    coarse = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2)).astype(np.float32)
    field = imageops.resize(coarse, w + 2 * f, h + 2 * f, imageops.CUBIC)[f:f + h, f:f + w]
    field = field - field.min()
    return field / max(float(field.max()), 1e-8)


def shuffle(img: np.ndarray, res: int, seed: int) -> np.ndarray:
    """Content shuffle: the picture pulled through a random smooth flow field, so colours and textures stay
    but the layout is scrambled. The same seed gives the same map (the extension seeds numpy from the
    generation's seed)."""
    img = imageops.to_resolution(img, res)
    h, w = img.shape[:2]
    rng = np.random.RandomState(int(seed) & 0xFFFFFFFF)
    map_x = _noise_disk(rng, h, w, 256) * float(w - 1)
    map_y = _noise_disk(rng, h, w, 256) * float(h - 1)
    return imageops.remap(img, map_x, map_y)


def inpaint(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float32 HxWx3 in [0, 1] with -1 where `mask` (bool HxW) is set: the inpaint ControlNet's input."""
    out = img.astype(np.float32) / 255.0
    out[mask] = -1.0
    return out


def _gamma(gray: np.ndarray, gamma: float) -> np.ndarray:
    return ((gray.astype(np.float32) / 255.0) ** float(gamma) * 255.0).clip(0, 255).astype(np.uint8)


def recolor_luminance(img: np.ndarray, gamma: float) -> np.ndarray:
    """Lightness L* (CIE Lab, 0-255), gamma-corrected: the recolor model's input. As in the extension, the
    RGB picture goes through OpenCV's BGR-to-Lab conversion, so red and blue swap their weights."""
    x = img.astype(np.float32) / 255.0
    linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    y = linear[..., 0] * 0.072169 + linear[..., 1] * 0.715160 + linear[..., 2] * 0.212671  # R read as B
    lightness = np.where(y > 0.008856, 116.0 * np.cbrt(y) - 16.0, 903.3 * y)
    return _gamma(np.rint(lightness * 255.0 / 100.0).clip(0, 255), gamma)


def recolor_intensity(img: np.ndarray, gamma: float) -> np.ndarray:
    """HSV value (the brightest channel), gamma-corrected."""
    return _gamma(img.max(axis=2), gamma)
