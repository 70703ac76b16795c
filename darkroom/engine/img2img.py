"""Pixels in for img2img and inpainting, the webui's way: resize modes, masks, fill, crop, overlay.

Everything here is plain image work (PIL/numpy) done once per request before sampling;
the sampler only sees init latents and a latent-resolution mask. After decoding, the
generated pixels are laid over the original through the blurred mask, so pixels outside
the mask are exactly the source's (the webui's "overlay").
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from darkroom.errors import InvalidRequest, TooLarge

MAX_PIXELS = 8192 * 8192
FILL_NAMES = ("fill", "original", "latent noise", "latent nothing")
RESIZE_NAMES = ("Just resize", "Crop and resize", "Resize and fill")


def open_image(data: bytes, name: str, *, max_pixels: int | None = None) -> Image.Image:
    """A user's image file, decoded, refusing non-images, damaged ones and more than `max_pixels`.

    The one place user images are opened (the CLI's files, every API's uploads): PIL's own
    decompression-bomb guard (a tiny file that decodes to gigabytes) and the pixel limit both
    become one InvalidRequest naming the image, its size and the limit.
    """
    limit = max_pixels or MAX_PIXELS
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_many_pixels(name, _pixels_in(e), limit) from None
    except MemoryError:
        raise
    except Exception as e:  # a format plugin's own error on bad bytes: see _brief
        raise InvalidRequest(f"{name}: not a readable image ({type(e).__name__}); use a PNG, JPEG or WebP") from None
    if image.width * image.height > limit:
        raise _too_many_pixels(name, f"{image.width}x{image.height}", limit)
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as e:
        raise InvalidRequest(f"{name}: the image is damaged ({_brief(e)})") from None
    return image


def _brief(error: Exception) -> str:
    """A decoding error as one short line for a message (Pillow quotes raw header bytes in some).

    Pillow's format plugins raise whatever their parsing meets on a damaged or hostile file, not
    only OSError: a PPM header gives ValueError ("Token too long in file header"), others
    struct.error, SyntaxError, EOFError, IndexError... Whatever reading a user's bytes raises is
    the file's fault, so the openers here turn every exception but MemoryError (the machine's)
    into an InvalidRequest naming the image.
    """
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _pixels_in(error: Exception) -> str:
    """The pixel count PIL's bomb error names ("Image size (400000000 pixels) exceeds ...")."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(found[1]):,}" if found else "more than PIL's limit of"


def _too_many_pixels(name: str, size: str, limit: int) -> TooLarge:
    side = math.isqrt(limit)
    square = f" = {side}x{side}" if side * side == limit else ""
    return TooLarge(f"{name}: too many pixels ({size}; the limit is {limit:,}{square}); use a smaller image")


def decode_image(data: bytes, name: str, *, mode: str = "RGB") -> Image.Image:
    """An uploaded image, upright (EXIF orientation applied), refusing non-images and huge ones."""
    image = open_image(data, name)
    try:
        image = ImageOps.exif_transpose(image)
        transparent = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
        if mode == "L" and transparent:
            image = image.convert("RGBA" if image.mode in ("P", "PA") else image.mode)
            alpha = image.getchannel("A")
            if alpha.getextrema() != (255, 255):
                # a mask painted on a transparent layer: painted (opaque) = repaint
                return alpha
        return image.convert(mode)
    except MemoryError:
        raise
    except Exception as e:  # a damaged EXIF block, a mode that cannot convert: see _brief
        raise InvalidRequest(f"{name}: the image is damaged ({_brief(e)})") from None


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """0 just resize (stretch), 1 crop and resize (cover, centre crop), 2 resize and fill (fit, edges stretched)."""
    if image.size == (width, height):
        return image.copy()
    resample = Image.LANCZOS
    if mode == 0:
        return image.resize((width, height), resample)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == 1:
        w, h = (width, round(width / src_ratio)) if ratio > src_ratio else (round(height * src_ratio), height)
        resized = image.resize((max(w, 1), max(h, 1)), resample)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))
    w, h = (round(height * src_ratio), height) if ratio > src_ratio else (width, round(width / src_ratio))
    resized = image.resize((max(w, 1), max(h, 1)), resample)
    out = Image.new(image.mode, (width, height))
    left, top = (width - resized.width) // 2, (height - resized.height) // 2
    out.paste(resized, (left, top))
    # fill the empty bands by stretching the resized image's edge rows / columns, as the webui does
    if left > 0:
        out.paste(resized.crop((0, 0, 1, resized.height)).resize((left, resized.height)), (0, top))
        right = width - left - resized.width
        if right > 0:
            edge = resized.crop((resized.width - 1, 0, resized.width, resized.height)).resize((right, resized.height))
            out.paste(edge, (left + resized.width, top))
    if top > 0:
        out.paste(resized.crop((0, 0, resized.width, 1)).resize((resized.width, top)), (left, 0))
        bottom = height - top - resized.height
        if bottom > 0:
            edge = resized.crop((0, resized.height - 1, resized.width, resized.height)).resize((resized.width, bottom))
            out.paste(edge, (left, top + resized.height))
    return out


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """Bounding box of the mask's non-zero pixels grown by `padding`, clipped to the image; None if empty."""
    box = mask.point(lambda v: 255 if v > 0 else 0).getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_aspect(box: tuple[int, int, int, int], width: int, height: int, image_w: int,
                     image_h: int) -> tuple[int, int, int, int]:
    """Grow `box` to the aspect ratio of width x height (so the crop is not distorted when resized)."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    target = width / height
    if bw / bh < target:
        want = min(round(bh * target), image_w)
        x1 = max(0, min(x1 - (want - bw) // 2, image_w - want))
        x2 = x1 + want
    else:
        want = min(round(bw / target), image_h)
        y1 = max(0, min(y1 - (want - bh) // 2, image_h - want))
        y2 = y1 + want
    return x1, y1, x2, y2


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": the hole painted with the colours around it, blurred ever wider."""
    arr = np.asarray(image, dtype=np.float32)
    keep = (np.asarray(mask, dtype=np.float32) < 128).astype(np.float32)[..., None]
    if keep.min() == 1.0 or keep.max() == 0.0:
        return image.copy()
    out = arr * keep
    filled = keep.copy()
    for radius in (4, 8, 16, 32, 64, 128, 256):
        num = np.asarray(Image.fromarray(np.uint8(np.clip(arr * keep, 0, 255))).filter(
            ImageFilter.GaussianBlur(radius)), dtype=np.float32)
        den = np.asarray(Image.fromarray(np.uint8(keep[..., 0] * 255)).filter(
            ImageFilter.GaussianBlur(radius)), dtype=np.float32)[..., None] / 255.0
        estimate = num / np.maximum(den, 1e-3)
        take = (filled == 0) & (den > 0.02)
        out = np.where(take, estimate, out)
        filled = np.maximum(filled, take.astype(np.float32))
    out = np.where(filled > 0, out, arr.mean(axis=(0, 1)))
    return Image.fromarray(np.uint8(np.clip(out, 0, 255)))


@dataclass
class Source:
    """What img2img/inpainting hands the sampler, plus how to put the result back."""

    image: Image.Image  # width x height, what gets encoded (after fill)
    mask: Image.Image | None  # width x height, L, blurred, 255 = repaint
    latent_mask: np.ndarray | None  # [h/f, w/f] in {0, 1}, 1 = repaint
    original: Image.Image  # the full source for the final overlay (input size when only-masked)
    overlay_mask: Image.Image | None  # mask at `original`'s size, blurred
    box: tuple[int, int, int, int] | None  # only-masked: where the width x height crop came from

    def finish(self, generated: Image.Image) -> Image.Image:
        """Lay the generated pixels over the source through the blurred mask (unmasked pixels stay exact)."""
        if self.mask is None:
            return generated
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            patch = generated.resize((x2 - x1, y2 - y1), Image.LANCZOS)
            canvas = self.original.copy()
            canvas.paste(patch, (x1, y1))
            generated = canvas
        original, overlay = self.original, self.overlay_mask
        if generated.size != original.size:  # the hires fix made it larger: the source is laid over at that size
            original = original.resize(generated.size, Image.LANCZOS)
            overlay = overlay.resize(generated.size, Image.LANCZOS)
        return Image.composite(generated, original, overlay)


def prepare_source(init: bytes, mask: bytes | None, *, width: int | None, height: int | None, resize_mode: int,
                   mask_blur: int, invert: bool, fill: int, full_res: bool, padding: int,
                   latent_factor: int) -> tuple[Source, int, int]:
    """Decode and shape the init image and mask; returns the Source and the sampling width, height."""
    image = decode_image(init, "init image")
    if width is None or height is None:
        # the source's own size, rounded down to the VAE's 8-pixel blocks
        width = width or max(8, image.width // 8 * 8)
        height = height or max(8, image.height // 8 * 8)
    if mask is None:
        resized = resize_image(image, width, height, resize_mode)
        return Source(resized, None, None, resized, None, None), width, height
    m = decode_image(mask, "mask", mode="L")
    if m.size != image.size:
        m = m.resize(image.size, Image.LANCZOS)
    if invert:
        m = ImageOps.invert(m)
    m = m.point(lambda v: 255 if v >= 128 else 0)
    blurred = m.filter(ImageFilter.GaussianBlur(mask_blur)) if mask_blur > 0 else m
    if full_res:
        region = crop_region(m, padding)
        if region is None:
            raise InvalidRequest("the mask is empty (all black): paint the area to repaint in white")
        box = expand_to_aspect(region, width, height, image.width, image.height)
        crop = image.crop(box).resize((width, height), Image.LANCZOS)
        crop_mask = blurred.crop(box).resize((width, height), Image.LANCZOS)
        original, overlay = image, blurred
    else:
        box = None
        crop = resize_image(image, width, height, resize_mode)
        crop_mask = resize_image(blurred, width, height, resize_mode)
        original, overlay = crop, crop_mask
    if fill == 0:
        crop = fill_masked(crop, crop_mask)
    lw, lh = width // latent_factor, height // latent_factor
    latent = np.asarray(crop_mask.resize((lw, lh), Image.BILINEAR), dtype=np.float32) / 255.0
    latent = np.around(latent)
    return Source(crop, crop_mask, latent, original, overlay, box), width, height
