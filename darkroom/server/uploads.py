"""Uploaded and base64 images, with limits: a client cannot make the server read or decode too much."""

from __future__ import annotations

import base64
import binascii

from darkroom.errors import InvalidRequest, TooLarge

MAX_UPLOAD_BYTES = 32 * 1024 * 1024
MAX_PIXELS = 8192 * 8192
__all__ = ["MAX_PIXELS", "MAX_UPLOAD_BYTES", "TooLarge", "decode_base64_image", "open_image", "read_upload"]


async def read_upload(file, limit: int | None = None) -> bytes:
    """The bytes of a multipart upload, refusing more than `limit` (default MAX_UPLOAD_BYTES)."""
    limit = limit or MAX_UPLOAD_BYTES
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"{file.filename or 'upload'}: file too large (limit {limit // (1024 * 1024)} MB)")
    if not data:
        raise InvalidRequest(f"{file.filename or 'upload'}: the file is empty")
    return data


def decode_base64_image(value: str, *, field: str = "image", limit: int = MAX_UPLOAD_BYTES) -> bytes:
    """Bytes of a base64 image as the A1111 API sends it (plain or as a data: URL)."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{field}: expected a base64-encoded image")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > limit * 4 // 3 + 4:
        raise TooLarge(f"{field}: image too large (limit {limit // (1024 * 1024)} MB)")
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as e:
        raise InvalidRequest(f"{field}: not valid base64 ({e})") from None


def open_image(data: bytes, *, name: str = "image", max_pixels: int | None = None):
    """A decoded PIL image, refusing non-images and pixel counts over `max_pixels` (the engine's one opener)."""
    from darkroom.engine.img2img import open_image as engine_open_image

    return engine_open_image(data, name, max_pixels=max_pixels or MAX_PIXELS)
