"""`--controlnet SPEC`: one ControlNet unit written on the command line, shared by the commands that take it.

SPEC is comma-separated key=value pairs with the unit's field names (darkroom/control_unit.py)
or their short aliases: `model=control_v11p_sd15_canny,image=edges.png,module=canny,weight=0.8,
start=0,end=0.8,mode=balanced,resize=crop`. `image` and `mask` are files, read here so a
missing or unreadable one is a one-line error naming its path.
"""

from __future__ import annotations

from pathlib import Path

import click
import pydantic

from darkroom.control_unit import CONTROL_MODES, HR_OPTIONS, MAX_BATCH_IMAGES, RESIZE_MODES, ControlUnit
from darkroom.errors import DarkroomError
from darkroom.fsutil import read_regular
from darkroom.metadata.images import MAX_IMAGE_FILE_BYTES

OPTION = "--controlnet"
ALIASES = {"start": "guidance_start", "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode",
           "res": "processor_res", "resolution": "processor_res", "a": "threshold_a", "b": "threshold_b",
           "guess": "guess_mode", "pp": "pixel_perfect", "hr": "hr_option",
           "preprocessor": "module", "input_image": "image", "union": "union_control_type", "batch": "batch_images"}
# short words for the enumerations (the full names and 0/1/2 work too)
WORDS = {
    "control_mode": {"balanced": CONTROL_MODES[0], "prompt": CONTROL_MODES[1], "control": CONTROL_MODES[2],
                     "controlnet": CONTROL_MODES[2]},
    "resize_mode": {"just-resize": RESIZE_MODES[0], "resize": RESIZE_MODES[0], "crop": RESIZE_MODES[1],
                    "fill": RESIZE_MODES[2]},
    "hr_option": {"both": HR_OPTIONS[0], "low": HR_OPTIONS[1], "high": HR_OPTIONS[2]},
}
FLAGS = ("pixel_perfect", "guess_mode", "low_vram", "enabled", "prepared")
HELP = ("A ControlNet unit (repeat for several): comma-separated key=value, e.g. model=control_v11p_sd15_canny,"
        "image=edges.png,module=canny,weight=0.8,start=0,end=0.8,mode=balanced,resize=crop. Keys: model, image,"
        " mask, module, weight, start, end, mode (balanced, prompt, control), resize (just-resize, crop, fill), res,"
        " a, b (the preprocessor's thresholds), pixel_perfect, guess_mode, hr (both, low, high), prepared (the image"
        " is the module's map already: recorded, not run), union (a ControlNet Union model's control type: openpose,"
        " depth, softedge, canny, normal, seg, tile, inpaint; default: from the module), batch (a folder of"
        " pictures: the whole job runs once per picture, in name order, each with the same seed; for frames)."
        " The reference modules"
        " (reference_only, reference_adain, reference_adain+attn; a: style fidelity) need no model. With --from-png it"
        " replaces the image's units. `darkroom controlnet list` shows the models and preprocessors.")


def _bad(spec: str, message: str) -> click.BadParameter:
    return click.BadParameter(f"{message} (in {spec!r})", param_hint=f"'{OPTION}'")


def _file(value: str, key: str, spec: str) -> bytes:
    path = Path(value).expanduser()
    if not path.exists():
        raise _bad(spec, f"{key} file {str(path)!r} not found")
    try:
        return read_regular(path, what=f"a ControlNet {key}", limit=MAX_IMAGE_FILE_BYTES)
    except DarkroomError as e:
        raise _bad(spec, str(e)) from None
    except OSError as e:
        raise _bad(spec, f"cannot read {key} file {str(path)!r}: {e.strerror or e}") from None


PICTURES = (".png", ".jpg", ".jpeg", ".webp")


def _folder(value: str, spec: str) -> list[bytes]:
    """The pictures (PNG, JPEG, WebP) of a folder, in name order: a batch unit's control images."""
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise _bad(spec, f"batch folder {str(folder)!r} not found (batch=FOLDER: a folder of control pictures)")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICTURES and p.is_file())
    except OSError as e:
        raise _bad(spec, f"cannot list batch folder {str(folder)!r}: {e.strerror or e}") from None
    if not files:
        raise _bad(spec, f"batch folder {str(folder)!r} holds no PNG, JPEG or WebP pictures")
    if len(files) > MAX_BATCH_IMAGES:
        raise _bad(spec, f"batch folder {str(folder)!r} holds {len(files)} pictures; at most {MAX_BATCH_IMAGES}"
                         " at once")
    return [_file(str(path), "batch", spec) for path in files]


def parse_unit(spec: str) -> ControlUnit:
    """A ControlUnit from SPEC; every mistake is a click.BadParameter naming the key."""
    fields: dict = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower().replace("-", "_")
        name = ALIASES.get(key, key)
        if name not in ControlUnit.model_fields:
            known = ", ".join(sorted({*ControlUnit.model_fields, *ALIASES}))
            raise _bad(spec, f"unknown key {key!r} (known: {known})")
        if name in fields:
            raise _bad(spec, f"{key} is given twice")
        value = value.strip()
        if not eq:
            if name not in FLAGS:
                raise _bad(spec, f"{key} needs a value ({key}=...)")
            value = "true"
        if name in ("image", "mask"):
            fields[name] = _file(value, name, spec)
        elif name == "batch_images":
            fields[name] = _folder(value, spec)
        else:
            fields[name] = WORDS.get(name, {}).get(value.lower(), value)
    if not fields:
        raise _bad(spec, "empty unit: give at least model=NAME and image=FILE")
    try:
        return ControlUnit(**fields)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        raise _bad(spec, f"{where}: {msg}" if where else msg) from None


def parse_units(specs: tuple[str, ...] | list[str]) -> list[ControlUnit]:
    return [parse_unit(s) for s in specs]


def units_from_png(path: Path) -> list[ControlUnit]:
    """The ControlNet units an image was made with, to rerun it: the settings from its `ControlNet N`
    infotext lines, the control maps from the chunks Darkroom stores (darkroom.metadata.control_maps).

    A stored map is the preprocessed map at the generation size, so it is given back `prepared`: not
    preprocessed again (that would change it), its module kept for the rerun's infotext; an inpaint
    map's masked pixels come back as its mask. A line without a stored map (an image from the webui)
    cannot be rerun: that is an error saying to give the unit again with --controlnet."""
    from darkroom.errors import InvalidRequest
    from darkroom.metadata.control_maps import control_maps_from_chunks, control_units_from_infotext
    from darkroom.metadata.images import read_image_metadata
    from darkroom.metadata.infotext import parse_infotext

    meta = read_image_metadata(path)
    if not meta.parameters:
        return []
    lines = control_units_from_infotext(parse_infotext(meta.parameters))
    maps = control_maps_from_chunks(meta.raw) if lines else {}
    units = []
    for line in lines:
        n = line["unit"]
        if n not in maps:
            raise InvalidRequest(f"{path}: ControlNet {n} has no stored control map (the image was not made by"
                                 f" Darkroom), so it cannot be rerun; give the unit again with {OPTION} SPEC")
        fields = {k: v for k, v in line.items() if k in ControlUnit.model_fields and k not in ("image", "mask")}
        image, mask = _map_files(maps[n])
        if not str(fields.get("module", "")).lower().startswith("inpaint"):
            mask = None
        fields["prepared"] = True
        try:
            units.append(ControlUnit(**fields, image=image, mask=mask))
        except pydantic.ValidationError as e:
            raise InvalidRequest(f"{path}: ControlNet {n} in the infotext is not valid"
                                 f" ({e.errors()[0].get('msg', 'invalid')})") from None
    return units


def _map_files(control) -> tuple[bytes, bytes | None]:
    """A stored map (HxWx3 in [0, 1], -1 masked) as PNG bytes of its picture, and of its mask if it has one."""
    import io

    import numpy as np
    from PIL import Image

    masked = (control < 0).any(axis=-1)
    pixels = np.round(np.clip(control, 0.0, 1.0) * 255.0).astype(np.uint8)
    out = []
    for array in (pixels, (masked * 255).astype(np.uint8) if masked.any() else None):
        if array is None:
            out.append(None)
            continue
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out[0], out[1]
