"""Image helpers that stand in for the OpenCV calls of the extension's annotators, with numpy, scipy and PIL.

Darkroom does not ship OpenCV (a 64 MB wheel on USB bundles), so resizing goes through PIL (NEAREST, BILINEAR for
floats; LANCZOS has 3 lobes where OpenCV's LANCZOS4 has 4; BOX when area-enlarging) or, for OpenCV's INTER_AREA
shrink, its INTER_LINEAR on uint8 pictures and its INTER_CUBIC, its own arithmetic written here, and
blurs through scipy.ndimage with OpenCV's kernel sizes and its default reflect-101 border ("mirror" in scipy).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

AREA, CUBIC, LINEAR, NEAREST, LANCZOS = "area", "cubic", "linear", "nearest", "lanczos"
_PIL = {AREA: Image.Resampling.BOX, CUBIC: Image.Resampling.BICUBIC, LINEAR: Image.Resampling.BILINEAR,
        NEAREST: Image.Resampling.NEAREST, LANCZOS: Image.Resampling.LANCZOS}


def hwc3(image: Image.Image) -> np.ndarray:
    """A PIL image as uint8 HxWx3; transparency is composited over white (the extension's HWC3 rule, so a
    transparent scribble reads as black lines on white)."""
    if image.mode.startswith("I") or image.mode == "F":  # 16/32-bit greys (16-bit PNGs): scaled to 8 bits
        scale = 257.0 if image.mode.startswith("I;16") or np.asarray(image).max() > 255 else 1.0
        grey = np.rint(np.asarray(image, dtype=np.float64) / scale).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        return (rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _area_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """x shrunk to `size` along `axis` by area: each output cell the mean of the input it covers, cells cut by
    its edges counted by the fraction covered (OpenCV's INTER_AREA), from running sums."""
    n = x.shape[axis]
    if n == size:
        return x
    x = np.moveaxis(x, axis, 0)
    sums = np.concatenate([np.zeros((1, *x.shape[1:])), np.cumsum(x, axis=0, dtype=np.float64)])
    edges = np.arange(size + 1, dtype=np.float64) * (n / size)
    k = np.minimum(np.floor(edges).astype(np.int64), n - 1)
    shape = (-1,) + (1,) * (x.ndim - 1)
    at = sums[k] + (edges - k).reshape(shape) * x[k]
    return np.moveaxis((at[1:] - at[:-1]) * (size / n), 0, axis)


def _area(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """OpenCV's INTER_AREA when shrinking: exact fractional area weights (PIL's BOX gives a cell's edge pixels
    all or nothing); uint8 rounds half up for whole-number factors, as OpenCV's fast integer path does."""
    out = _area_axis(_area_axis(x.astype(np.float64), height, 0), width, 1)
    if x.dtype != np.uint8:
        return out.astype(np.float32)
    whole = x.shape[0] % height == 0 and x.shape[1] % width == 0
    return (np.floor(out + 0.5) if whole else np.rint(out)).clip(0, 255).astype(np.uint8)


def _linear_taps(n_in: int, n_out: int, clamp: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's INTER_LINEAR taps along one axis: two source indices and their 11-bit weights (float32
    positions, half-pixel centres). Columns past an edge take the edge pixel at full weight (`clamp`); rows
    keep their weights and only the indices are clipped, as OpenCV does."""
    f = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = f - i.astype(np.float32)
    if clamp:
        f = np.where((i < 0) | (i >= n_in - 1), np.float32(0), f)
    w1 = np.rint(f * np.float32(2048)).astype(np.int64)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int64)
    return np.clip(i, 0, n_in - 1), np.clip(i + 1, 0, n_in - 1), w0, w1


def _linear_uint8(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) of a uint8 HxWxC picture, bit for bit as its vectorised path computes it: a
    horizontal pass in 11-bit fixed point, then a vertical one on 16-bit values (>> 4, high half of the
    product, rounded >> 2). PIL's BILINEAR widens its filter when shrinking (antialiased) where OpenCV keeps two
    taps: up to 29 levels apart on a 1500 -> 640 shrink."""
    y0, y1, b0, b1 = _linear_taps(img.shape[0], height, clamp=False)
    x0, x1, a0, a1 = _linear_taps(img.shape[1], width, clamp=True)
    src = img.astype(np.int64)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]
    top = ((rows[y0] >> 4) * b0[:, None, None]) >> 16
    bottom = ((rows[y1] >> 4) * b1[:, None, None]) >> 16
    return ((top + bottom + 2) >> 2).clip(0, 255).astype(np.uint8)


_CUBIC_A = np.float32(-0.75)  # OpenCV's cubic kernel (PIL's BICUBIC uses -0.5: a softer, different curve)
_CUBIC_LANES = 8  # values per vector in OpenCV's vertical cubic pass (v_int16 on its SSE baseline)


def _cubic_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_CUBIC taps along one axis: four source indices ([n_out, 4], edge pixels repeated past the
    borders) and their weights, computed in float32 as OpenCV's interpolateCubic does (half-pixel centres)."""
    f = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = f - i.astype(np.float32)
    a, one, g = _CUBIC_A, np.float32(1), np.float32(1) - f
    x1 = f + one
    c0 = ((a * x1 - np.float32(5) * a) * x1 + np.float32(8) * a) * x1 - np.float32(4) * a
    c1 = ((a + np.float32(2)) * f - (a + np.float32(3))) * f * f + one
    c2 = ((a + np.float32(2)) * g - (a + np.float32(3))) * g * g + one
    weights = np.stack([c0, c1, c2, one - c0 - c1 - c2], axis=1).astype(np.float32)
    return np.clip(i[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1), weights


def _cubic(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize(INTER_CUBIC) of an HxWxC picture. uint8: bit for bit OpenCV's own path (11-bit weights, an
    integer horizontal pass, then its vectorised vertical pass in float32: S3*b3, then + S2*b2, + S1*b1, + S0*b0,
    rounded half to even). OpenCV builds with IPP (most x86 pip wheels) take IPP's resize instead, which is 1
    level off that on about 4% of values; the values past a row's last full vector of 8 take OpenCV's integer
    path. Floats: OpenCV's weights, summed in float64 (within 1e-3 of either)."""
    y, b = _cubic_taps(img.shape[0], height)
    x, a = _cubic_taps(img.shape[1], width)
    if img.dtype != np.uint8:
        src = img.astype(np.float64)
        rows = sum(src[:, x[:, k]] * a[None, :, k, None].astype(np.float64) for k in range(4))
        return sum(rows[y[:, k]] * b[:, k, None, None].astype(np.float64) for k in range(4)).astype(np.float32)
    src = img.astype(np.int64)
    a_fixed = np.rint(a * np.float32(2048)).astype(np.int64)
    b_fixed = np.rint(b * np.float32(2048)).astype(np.int64)
    rows = sum(src[:, x[:, k]] * a_fixed[None, :, k, None] for k in range(4)).astype(np.float32)  # exact: < 2**24
    beta = (b_fixed.astype(np.float32) * np.float32(1.0 / (2048 * 2048))).astype(np.float32)
    out = rows[y[:, 3]] * beta[:, 3, None, None]
    for k in (2, 1, 0):
        out = rows[y[:, k]] * beta[:, k, None, None] + out
    out = np.rint(out).reshape(height, -1)
    tail = out.shape[1] - out.shape[1] % _CUBIC_LANES  # values past the last full vector: OpenCV's integer path
    if tail < out.shape[1]:
        flat = rows.reshape(rows.shape[0], -1)[:, tail:].astype(np.int64)
        exact = sum(flat[y[:, k]] * b_fixed[:, k, None] for k in range(4))
        out[:, tail:] = (exact + (1 << 21)) >> 22
    return out.clip(0, 255).astype(np.uint8).reshape(height, width, -1)


def resize(x: np.ndarray, width: int, height: int, method: str) -> np.ndarray:
    """An HxW or HxWxC array resized to height x width; uint8 stays uint8 (rounded), floats stay float32.
    AREA shrinking, LINEAR on uint8 and CUBIC are OpenCV's own results; the rest PIL's."""
    if x.shape[0] == height and x.shape[1] == width:
        return x.copy()
    if method == AREA and height <= x.shape[0] and width <= x.shape[1]:
        return _area(x, width, height)
    if (method == LINEAR and x.dtype == np.uint8) or method == CUBIC:
        planes = x[:, :, None] if x.ndim == 2 else x
        out = (_linear_uint8 if method == LINEAR else _cubic)(planes, width, height)
        if out.dtype != np.uint8:
            out = out.astype(np.float32)
        return out[:, :, 0] if x.ndim == 2 else out
    squeeze = x.ndim == 2
    planes = x[:, :, None] if squeeze else x
    out = np.empty((height, width, planes.shape[2]), dtype=np.float32)
    for c in range(planes.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(planes[:, :, c], dtype=np.float32), mode="F")
        out[:, :, c] = np.asarray(plane.resize((width, height), _PIL[method]), dtype=np.float32)
    if x.dtype == np.uint8:
        out = np.rint(out).clip(0, 255).astype(np.uint8)
    return out[:, :, 0] if squeeze else out


def gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's GaussianBlur(x, (0, 0), sigma) over H and W: its kernel reaches 3 sigma for uint8 input and
    4 sigma for floats; uint8 in gives uint8 out."""
    truncate = 3.0 if x.dtype == np.uint8 else 4.0
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    y = ndimage.gaussian_filter(x.astype(np.float32), sigmas, mode="mirror", truncate=truncate)
    return np.rint(y).clip(0, 255).astype(np.uint8) if x.dtype == np.uint8 else y


def short_side_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """(height, width) with the short side at `resolution`, the aspect kept (the extension's rounding)."""
    k = float(resolution) / float(min(height, width))
    return max(1, int(np.round(height * k))), max(1, int(np.round(width * k)))


def to_resolution(img: np.ndarray, resolution: int) -> np.ndarray:
    """The extension's resize_image_with_pad without the pad: short side to `resolution`, cubic when
    enlarging and area when shrinking."""
    h, w = short_side_size(img.shape[0], img.shape[1], resolution)
    method = CUBIC if resolution > min(img.shape[:2]) else AREA
    return resize(img, w, h, method)


def pad64(img: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Edge-padded to multiples of 64 (what the extension feeds its detectors) and the size to crop back to."""
    h, w = img.shape[:2]
    ph, pw = (-h) % 64, (-w) % 64
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (img.ndim - 2)
    return np.pad(img, pad, mode="edge"), (h, w)


def otsu(gray: np.ndarray) -> np.ndarray:
    """uint8 0/255 binarization at Otsu's threshold (OpenCV's THRESH_OTSU: the level that maximises the
    between-class variance; values above it become 255)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1.0
    t = int(np.argmax(between))
    return np.where(gray > t, 255, 0).astype(np.uint8)


def remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray, border: str = "nearest") -> np.ndarray:
    """OpenCV's remap with linear interpolation: out[y, x] = img[map_y[y, x], map_x[y, x]] (maps in pixels);
    outside the picture the edge repeats (`border` "nearest") or it is black ("constant", warpAffine's)."""
    coords = [map_y, map_x]
    mode = {"nearest": "nearest", "constant": "grid-constant"}[border]
    out = np.empty(map_x.shape + (img.shape[2],), dtype=np.float32)
    for c in range(img.shape[2]):
        out[:, :, c] = ndimage.map_coordinates(img[:, :, c].astype(np.float32), coords, order=1, mode=mode, cval=0.0)
    return np.rint(out).clip(0, 255).astype(np.uint8) if img.dtype == np.uint8 else out


_LINES = [np.array(f, dtype=bool) for f in (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]


def line_peaks(x: np.ndarray) -> np.ndarray:
    """`x` where a pixel is the largest of its 3-pixel line in at least one of four directions, else 0
    (a cheap non-maximum suppression that keeps ridges one pixel wide)."""
    y = np.zeros_like(x)
    for footprint in _LINES:
        peak = ndimage.grey_dilation(x, footprint=footprint, mode="nearest") == x
        y[peak] = x[peak]
    return y


def safe_step(x: np.ndarray, step: int = 2) -> np.ndarray:
    """Soft edges in [0, 1] quantised to `step` levels (the "safe" variants: less room for hidden detail)."""
    return np.floor(x.astype(np.float32) * float(step + 1)) / float(step)


def scribble_strokes(edge: np.ndarray) -> np.ndarray:
    """uint8 soft edges as thick binary strokes (the scribble variants): ridges above 127 kept one pixel
    wide (blurred with sigma 3 first), blurred again with sigma 3, everything above 4 made white."""
    ridges = line_peaks(gaussian(edge.astype(np.float32), 3.0))
    thin = np.where(ridges > 127, 255, 0).astype(np.uint8)
    return np.where(gaussian(thin, 3.0) > 4, 255, 0).astype(np.uint8)


def soft_edge_map(edges, img: np.ndarray, res: int, *, safe: bool, scribble: bool) -> np.ndarray:
    """A soft-edge net's map as the extension makes it (HED, PiDiNet): `edges(padded image) -> 0..1` at the unit's
    resolution, padded to a multiple of 64 and cropped back; `safe` quantises it, `scribble` thickens it into
    binary strokes."""
    padded, (h, w) = pad64(to_resolution(img, res))
    edge = edges(padded)
    if safe:
        edge = safe_step(edge)
    out = (edge * 255.0).clip(0, 255).astype(np.uint8)[:h, :w]
    return scribble_strokes(out) if scribble else out


def _patterns(raw: list[list[list[int]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hit-or-miss patterns (1: set, -1: clear, 0: either) in their four rotations."""
    out = []
    for k in range(4):
        for r in raw:
            p = np.rot90(np.array(r), k)
            out.append((p == 1, p == -1))
    return out


_THIN = _patterns([[[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]]])
_PRUNE = _patterns([[[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]]])


def thin(binary: np.ndarray, prune: bool = True, rounds: int = 32) -> np.ndarray:
    """Morphological thinning of a boolean map to one-pixel lines: each round strips, one pattern after the
    other, the pixels whose 3x3 neighbourhood matches an edge or corner pattern; `prune` then removes
    one-pixel spurs (the extension thins enlarged edge maps so, because its edge models learned thin lines)."""
    x = binary.copy()

    def sweep(patterns) -> bool:
        changed = False
        for hit, miss in patterns:
            found = ndimage.binary_hit_or_miss(x, structure1=hit, structure2=miss)
            if found.any():
                x[found] = False
                changed = True
        return changed

    for _ in range(rounds):
        if not sweep(_THIN):
            break
    if prune:
        sweep(_PRUNE)
    return x
