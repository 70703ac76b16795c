"""ControlNet units in images: the extension's `ControlNet N` infotext lines, and the control maps themselves.

The infotext line is the sd-webui-controlnet extension's: `ControlNet 0: "Module: canny, Model:
control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, Processor Res: 512,
Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False,
Control Mode: Balanced"` (field names capitalised word by word, values as Python prints them). We
add "Hr Option" and "Guess Mode" only when not at their defaults; the extension ignores fields it
does not know.

A line cannot rebuild the map (the source picture is not in the image), so Darkroom also stores
each unit's prepared map as a PNG, base64, in compressed text chunks `darkroom-controlnet-N`
(continued in `darkroom-controlnet-N-pK` past Pillow's 1 MB text-chunk limit): rerunning from the
image uses the exact map. Masked pixels of inpaint maps (-1) are stored as transparent.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image

from darkroom.errors import InvalidRequest

INFOTEXT_FIELDS = ("module", "model", "weight", "resize_mode", "processor_res", "threshold_a", "threshold_b",
                   "guidance_start", "guidance_end", "pixel_perfect", "control_mode")
"""The extension's infotext fields, in its order."""
OPTIONAL_FIELDS = {"hr_option": "Both", "guess_mode": False}
"""Darkroom's additions, written only when not at these defaults."""
CHUNK_PREFIX = "darkroom-controlnet-"
PART_CHARS = 900_000  # below Pillow's MAX_TEXT_CHUNK (1 MiB) for one decompressed text chunk
MAX_MAP_CHARS = 16 * PART_CHARS
"""Largest map stored (base64 characters, ~10 MB of PNG); a larger one is left out, the line stays."""
_UNIT_KEY = re.compile(r"^ControlNet (\d+)$")
_CHUNK_KEY = re.compile(r"^darkroom-controlnet-(\d+)(?:-p(\d+))?$")


def display_name(field: str) -> str:
    return " ".join(word.capitalize() for word in field.split("_"))


def field_name(display: str) -> str:
    return "_".join(word.lower() for word in display.strip().split(" "))


def format_unit(values: Mapping[str, Any]) -> str | None:
    """One unit's infotext value from its field values (the keys of INFOTEXT_FIELDS, + OPTIONAL_FIELDS);
    None when a value holds ',' or ':' (a model file named so), which the line cannot carry: the extension
    leaves such a unit out of the infotext too."""
    pairs = [(f, values[f]) for f in INFOTEXT_FIELDS]
    pairs += [(f, values[f]) for f, default in OPTIONAL_FIELDS.items() if f in values and values[f] != default]
    if any("," in str(value) or ":" in str(value) for _, value in pairs):
        return None
    return ", ".join(f"{display_name(f)}: {v}" for f, v in pairs)


def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_unit(text: str) -> dict[str, Any]:
    """The fields of one `ControlNet N` value ("Module: canny, Model: ..., ..."); unknown fields kept."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        if ": " not in item:
            continue
        key, value = item.strip().split(": ", 1)
        out[field_name(key)] = _parse_value(value.strip())
    if "model" in out:
        out["model"] = str(out["model"])
    if "module" in out:
        out["module"] = str(out["module"])
    return out


def control_units_from_infotext(params: Mapping[str, str]) -> list[dict[str, Any]]:
    """Unit fields from parsed infotext parameters (darkroom.metadata.infotext.parse_infotext), by unit
    number; each dict has "unit" (its N) and the fields the line gives, enabled."""
    units = []
    for key, value in params.items():
        m = _UNIT_KEY.match(key)
        if m is None or not isinstance(value, str):
            continue
        fields = parse_unit(value)
        if not fields:
            continue
        units.append({"unit": int(m.group(1)), "enabled": True, **fields})
    return sorted(units, key=lambda u: u["unit"])


# --- the maps ------------------------------------------------------------------------------------


def quantize_map(control: np.ndarray) -> np.ndarray:
    """The map at the 8 bits a PNG stores, -1 (masked) kept: generating from this makes the stored map exact."""
    masked = control < 0
    out = np.round(np.clip(control, 0.0, 1.0) * 255.0) / 255.0
    return np.where(masked, -1.0, out).astype(np.float32)


def encode_map(control: np.ndarray) -> str | None:
    """A float HxWx3 map (values in [0, 1], -1 masked) as base64 PNG text; None when too large to store."""
    masked = (control < 0).any(axis=-1)
    rgb = np.round(np.clip(control, 0.0, 1.0) * 255.0).astype(np.uint8)
    if masked.any():
        alpha = np.where(masked, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([np.where(masked[..., None], 0, rgb), alpha]), "RGBA")
    else:
        image = Image.fromarray(rgb, "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=6)
    text = base64.b64encode(out.getvalue()).decode("ascii")
    return text if len(text) <= MAX_MAP_CHARS else None


def decode_map(text: str) -> np.ndarray:
    """The float32 HxWx3 map of `encode_map`'s text; InvalidRequest when it is damaged."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
        image = Image.open(io.BytesIO(data))
        image.load()
    except (binascii.Error, ValueError, OSError) as e:
        raise InvalidRequest(f"the stored ControlNet map is damaged ({type(e).__name__})") from None
    if image.mode == "RGBA":
        arr = np.asarray(image, dtype=np.float32)
        rgb = arr[..., :3] / 255.0
        return np.where(arr[..., 3:4] < 128, -1.0, rgb).astype(np.float32)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def map_chunks(maps: Mapping[int, np.ndarray]) -> dict[str, str]:
    """PNG text chunks (name -> text) holding each unit's map; maps too large to store are left out."""
    chunks: dict[str, str] = {}
    for unit, control in maps.items():
        text = encode_map(control)
        if text is None:
            continue
        for part, start in enumerate(range(0, len(text), PART_CHARS)):
            name = f"{CHUNK_PREFIX}{unit}" + (f"-p{part}" if part else "")
            chunks[name] = text[start:start + PART_CHARS]
    return chunks


def control_maps_from_chunks(raw: Mapping[str, str]) -> dict[int, np.ndarray]:
    """The stored maps by unit number, from an image's text chunks (darkroom.metadata.images'
    ImageMetadata.raw). A unit whose parts are not all there is left out."""
    parts: dict[int, dict[int, str]] = {}
    for key, value in raw.items():
        m = _CHUNK_KEY.match(key)
        if m:
            parts.setdefault(int(m.group(1)), {})[int(m.group(2) or 0)] = value
    maps = {}
    for unit, pieces in sorted(parts.items()):
        if sorted(pieces) != list(range(len(pieces))):
            continue
        maps[unit] = decode_map("".join(pieces[i] for i in range(len(pieces))))
    return maps


def read_control_maps(png: bytes) -> dict[int, np.ndarray]:
    """The stored maps of a PNG file's bytes, by unit number (empty when it has none)."""
    from darkroom.metadata.images import read_image_metadata

    return control_maps_from_chunks(read_image_metadata(png).raw)
