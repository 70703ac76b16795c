"""Canny edges without OpenCV, step for step as cv2.Canny(image, low, high) with its defaults.

The extension calls cv2.Canny on the resized uint8 RGB image with no blur first, so this does the same:
3x3 Sobel derivatives (replicated border) per channel, keeping per pixel the channel with the largest
L1 magnitude |dx| + |dy| (OpenCV's default, not L2); non-maximum suppression along the gradient
quantised to 0, 45, 90 or 135 degrees with OpenCV's tie rule (strictly above one neighbour, at least the
other); then hysteresis: a candidate above `low` is kept when its 8-connected run of candidates
holds a pixel above `high`.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_TAN_22_5 = np.tan(np.pi / 8)
_TAN_67_5 = np.tan(3 * np.pi / 8)


def _sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = channel.astype(np.int32)
    dx = ndimage.sobel(x, axis=1, mode="nearest")
    dy = ndimage.sobel(x, axis=0, mode="nearest")
    return dx, dy


def _gradients(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx, dy and the L1 magnitude, from the channel with the largest magnitude at each pixel."""
    planes = img[:, :, None] if img.ndim == 2 else img
    best_dx = best_dy = best_mag = None
    for c in range(planes.shape[2]):
        dx, dy = _sobel(planes[:, :, c])
        mag = np.abs(dx) + np.abs(dy)
        if best_mag is None:
            best_dx, best_dy, best_mag = dx, dy, mag
        else:
            take = mag > best_mag
            best_dx = np.where(take, dx, best_dx)
            best_dy = np.where(take, dy, best_dy)
            best_mag = np.where(take, mag, best_mag)
    return best_dx, best_dy, best_mag


def _suppress(dx: np.ndarray, dy: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """Where `mag` is a local maximum across the edge (the pixels of a one-pixel-wide ridge)."""
    h, w = mag.shape
    m = np.pad(mag, 1)  # outside the image counts as no gradient
    centre = m[1:h + 1, 1:w + 1]

    def at(oy: int, ox: int) -> np.ndarray:
        return m[1 + oy:h + 1 + oy, 1 + ox:w + 1 + ox]

    ax, ay = np.abs(dx).astype(np.float64), np.abs(dy).astype(np.float64)
    horizontal = ay < ax * _TAN_22_5  # gradient mostly along x: compare left and right
    vertical = ay > ax * _TAN_67_5
    diagonal = ~(horizontal | vertical)
    same_sign = (dx ^ dy) >= 0  # gradient towards down-right / up-left
    keep_h = (centre > at(0, -1)) & (centre >= at(0, 1))
    keep_v = (centre > at(-1, 0)) & (centre >= at(1, 0))
    keep_d1 = (centre > at(-1, -1)) & (centre > at(1, 1))
    keep_d2 = (centre > at(-1, 1)) & (centre > at(1, -1))
    keep_d = np.where(same_sign, keep_d1, keep_d2)
    return (horizontal & keep_h) | (vertical & keep_v) | (diagonal & keep_d)


def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 HxW edge map (0 or 255) of a uint8 HxW or HxWxC image, as cv2.Canny(img, low, high)."""
    low, high = float(low), float(high)
    if low > high:
        low, high = high, low
    dx, dy, mag = _gradients(img)
    candidate = _suppress(dx, dy, mag) & (mag > low)
    labels, count = ndimage.label(candidate, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros(mag.shape, dtype=np.uint8)
    strong = np.zeros(count + 1, dtype=bool)
    strong[np.unique(labels[candidate & (mag > high)])] = True
    strong[0] = False
    return np.where(strong[labels], 255, 0).astype(np.uint8)
