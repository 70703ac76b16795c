"""ControlNet units as clients send them, translated to `ControlUnit` (darkroom/control_unit.py).

Two shapes arrive: the sd-webui-controlnet extension's unit dicts in an A1111 body's
`alwayson_scripts.controlnet.args` (what webuiapi's `ControlNetUnit.to_dict()` sends, plus the
older clients' keys), and the native API's units with base64 images. Both end here, so both get
the same checks: a model named by a client must be one of the ControlNet files found in the
library (never a path the client makes up, so no request can make the server open any file), an
unknown preprocessor or a bad field is a 422 naming the field as the client wrote it.

The routers (a1111_controlnet, native_controlnet), a1111_requests and native share this module;
the detection and listing helpers live here too so the A1111 and the native routes answer alike.
"""

from __future__ import annotations

import io
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict

from darkroom.control_unit import CORE_ONLY, MAX_BATCH_IMAGES, MAX_UNITS, ControlUnit
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.server.common import location
from darkroom.server.uploads import decode_base64_image, open_image
from darkroom.services.studio import Studio

SCRIPT = "controlnet"  # the extension's script title, matched case-insensitively as the webui does

# the older clients' names for unit fields (the extension reads both)
OLD_KEYS = {"input_image": "image", "guessmode": "guess_mode", "lowvram": "low_vram", "guidance": "guidance_end"}
# keys newer extension versions send that Darkroom has one behaviour for: accepted while they hold a value
# that asks for nothing more (else refused, naming the key); other unknown keys are refused
HARMLESS: dict[str, Any] = {
    "is_ui": lambda v: True, "save_detected_map": lambda v: True, "use_preview_as_input": lambda v: not v,
    "generated_image": lambda v: not v,
    "batch_image_dir": lambda v: not v, "batch_mask_dir": lambda v: not v,
    "batch_input_gallery": lambda v: not v, "batch_mask_gallery": lambda v: not v,
    "animatediff_batch": lambda v: not v, "batch_modifiers": lambda v: not v, "batch_keyframe_idx": lambda v: not v,
    "ipadapter_input": lambda v: v is None,
    "inpaint_crop_input_image": lambda v: True, "pulid_mode": lambda v: True, "hr_option_enabled": lambda v: True,
}


# --- the library's ControlNet files ------------------------------------------------------------------


def controlnet_files(studio: Studio, problems: list | None = None) -> list:
    """The usable ControlNet files in the library folders (darkroom.control.files.find_controlnets)."""
    from darkroom.control.files import find_controlnets

    return [f for f in find_controlnets(studio.home, problems) if f.supported]


def model_titles(files: list) -> list[str]:
    """The A1111 titles ("name [hash8]"), as /controlnet/model_list lists them."""
    return [f.title for f in files]


def require_controlnet(studio: Studio, wanted: str, field: str, files: list | None = None):
    """The listed file a client names (title "name [hash]", name, file name); else a 422 naming `field` and
    the available models. Only listed files match, so a request cannot point the server at another file."""
    from darkroom.control.files import find_controlnets, resolve

    files = find_controlnets(studio.home) if files is None else files
    try:
        return resolve(files, wanted)
    except InvalidRequest as e:
        raise InvalidRequest(f"{field}: {e.message}; see GET /controlnet/model_list", code="DR-MODEL-NOT-FOUND",
                             hint=e.hint) from None


def check_module(module: str, field: str) -> str:
    """The preprocessor's canonical name; an unknown one is a 422 naming `field`."""
    from darkroom.control.preprocess import canonical_module

    try:
        return canonical_module(module)
    except (KeyError, ValueError, DarkroomError) as e:
        message = e.message if isinstance(e, DarkroomError) else str(e).strip("'\"")
        raise InvalidRequest(f"{field}: {message}") from None


# --- units -----------------------------------------------------------------------------------------


def _image(value: Any, field: str) -> bytes | None:
    """A base64 image (or data: URL) checked to be a readable image; empty means none."""
    if value is None or value == "":
        return None
    data = decode_base64_image(value, field=field)
    open_image(data, name=field).close()
    return data


def _field_errors(e: pydantic.ValidationError, where: str, spelled: dict[str, str]) -> InvalidRequest:
    parts = []
    for err in e.errors():
        loc = location(err.get("loc", ()))
        key = spelled.get(loc, loc)
        msg = " ".join(str(err.get("msg", "invalid")).removeprefix("Value error, ").split())
        parts.append(f"{where}.{key}: {msg}" if key else f"{where}: {msg}")
    return InvalidRequest("invalid request: " + "; ".join(parts))


def build_unit(fields: dict[str, Any], where: str, spelled: dict[str, str] | None = None) -> ControlUnit:
    """A ControlUnit from checked fields; pydantic's errors name `where.field` as the client spelled it."""
    try:
        return ControlUnit(**fields)
    except pydantic.ValidationError as e:
        raise _field_errors(e, where, spelled or {}) from None


def finish_units(units: list[tuple[str, ControlUnit]], studio: Studio, *, img2img: bool) -> list[ControlUnit]:
    """The active units, each with its model resolved to a listed file and its preprocessor checked.

    Units that would change nothing (disabled, model "None" with a module that needs one, weight 0) are
    dropped, as the extension skips them; reference modules need no model (written back as "None").
    A txt2img unit needs its own image; img2img falls back to the init image."""
    active = [(where, u) for where, u in units if u.active]
    if len(active) > MAX_UNITS:
        raise InvalidRequest(f"at most {MAX_UNITS} ControlNet units at once (got {len(active)} enabled)")
    from darkroom.control.files import find_controlnets

    files = find_controlnets(studio.home) if active else []
    out = []
    for where, unit in active:
        if unit.model_free:  # reference units run on the checkpoint's UNet: no model to find
            if unit.image is None and not unit.batch_images and not img2img:
                raise InvalidRequest(f"{where}.image: txt2img needs a reference image for each enabled unit")
            module = check_module(unit.module, f"{where}.module")
            out.append(unit.model_copy(update={"model": "None", "module": module}))
            continue
        found = require_controlnet(studio, unit.model, f"{where}.model", files)
        module = check_module(unit.module, f"{where}.module")
        from darkroom.control.union import check_union_unit

        check_union_unit(found.path, unit.union_control_type, module, f"{where}.union_control_type", found.name)
        if unit.image is None and not unit.batch_images and not img2img:
            raise InvalidRequest(f"{where}.image: txt2img needs a control image for each enabled unit (a base64"
                                 " PNG, JPEG or WebP)")
        out.append(unit.model_copy(update={"model": found.name, "module": module}))  # names are unique
    return out


def a1111_units(scripts: dict[str, Any], studio: Studio, *, img2img: bool) -> list[ControlUnit]:
    """`alwayson_scripts.controlnet.args` as ControlUnits (the other scripts are refused by the caller)."""
    key = next((k for k in scripts if k.lower() == SCRIPT), None)
    if key is None:
        return []
    where = f"alwayson_scripts.{key}"
    script = scripts[key]
    if isinstance(script, list):  # a few clients send the args list alone
        args = script
    elif isinstance(script, dict):
        args = script.get("args", [])
    else:
        raise InvalidRequest(f"{where}: expected {{\"args\": [unit, ...]}}")
    if not isinstance(args, list):
        raise InvalidRequest(f"{where}.args: expected a list of ControlNet units")
    units = []
    for i, raw in enumerate(args):
        if raw is None:  # the extension skips empty slots
            continue
        units.append((f"{where}.args[{i}]", a1111_unit(raw, f"{where}.args[{i}]")))
    return finish_units(units, studio, img2img=img2img)


def a1111_unit(raw: Any, where: str) -> ControlUnit:
    """One extension unit dict as a ControlUnit: old keys renamed, images decoded, unknown keys refused."""
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where}: expected a ControlNet unit (a JSON object with image, module, model, ...)")
    fields: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    mode, batch = "simple", None
    for key, value in raw.items():
        name = OLD_KEYS.get(key, key)
        if name == "input_mode":  # the extension's simple (one picture), merge (several) or batch (one run each)
            mode = str(value or "simple").lower()
            continue
        if name == "batch_images":
            batch = value
            continue
        if name in HARMLESS:
            if not HARMLESS[name](value):
                shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
                raise InvalidRequest(f"{where}.{location([key])} {shown} is not supported yet")
            continue
        if name not in ControlUnit.model_fields or name in CORE_ONLY:  # the extension's fields only
            known = ", ".join(sorted(set(ControlUnit.model_fields) - set(CORE_ONLY)))
            raise InvalidRequest(f"{where}.{location([key])}: not a ControlNet unit field (known: {known})")
        if name == "guess_mode" and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = bool(value)
        fields[name] = value
        spelled[name] = key
    image = fields.pop("image", None)
    mask = fields.pop("mask", None)
    image_key = spelled.get("image", "image")
    if mode not in ("simple", "merge", "batch"):
        raise InvalidRequest(f"{where}.input_mode {mode!r} is not one of simple, merge, batch")
    pictures = _batch_images(batch, mode, where)
    merged: list = []
    if isinstance(image, (list, tuple)) and image and all(isinstance(i, dict) for i in image):
        if len(image) > 1 and mode != "merge":
            raise InvalidRequest(f"{where}.{image_key}: several pictures need input_mode \"merge\"")
        image, merged = image[0], list(image[1:])  # [{"image", "mask"}, ...]: the extension's merge input
    if isinstance(image, dict):  # older clients: {"image": b64, "mask": b64}
        mask = image.get("mask") if mask in (None, "") else mask
        image = image.get("image")
    elif isinstance(image, (list, tuple)) and len(image) == 2:  # (image, mask)
        image, mask = image[0], image[1] if mask in (None, "") else mask
    for name, value in (("model", fields.get("model")), ("module", fields.get("module"))):
        if value is None and name in fields:
            fields[name] = "None" if name == "model" else "none"
    region = fields.pop("effective_region_mask", None)
    unit = build_unit(fields, where, spelled)
    more = [_image(entry.get("image"), f"{where}.{image_key}[{i}].image") for i, entry in enumerate(merged, start=1)]
    masks = [_image(entry.get("mask"), f"{where}.{image_key}[{i}].mask") for i, entry in enumerate(merged, start=1)]
    return unit.model_copy(update={"image": _image(image, f"{where}.{image_key}"),
                                   "mask": _image(mask, f"{where}.{spelled.get('mask', 'mask')}"),
                                   "effective_region_mask": _image(region, f"{where}.effective_region_mask"),
                                   "merge_images": more or None,
                                   "merge_masks": masks if any(m is not None for m in masks) else None,
                                   "batch_images": pictures})


def _batch_images(value: Any, mode: str, where: str) -> list[bytes] | None:
    """The extension's `batch_images` for input_mode "batch": a list of base64 pictures (or {"image": ...});
    a folder path is refused (the server reads no folder a request names)."""
    if mode != "batch":
        if value:
            raise InvalidRequest(f"{where}.batch_images is only read with input_mode \"batch\" (one run per"
                                 " picture); set it, or send one picture in image")
        return None
    if isinstance(value, str) and value.strip():
        raise InvalidRequest(f"{where}.batch_images: Darkroom's server does not read a folder named in a request;"
                             " send the pictures themselves, a list of base64 images")
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidRequest(f"{where}.batch_images: input_mode \"batch\" needs a list of base64 pictures (the"
                             " job runs once per picture)")
    if len(value) > MAX_BATCH_IMAGES:
        raise InvalidRequest(f"{where}.batch_images: {len(value)} pictures; at most {MAX_BATCH_IMAGES} in one request")
    out = []
    for i, entry in enumerate(value):
        picture = entry.get("image") if isinstance(entry, dict) else entry
        data = _image(picture, f"{where}.batch_images[{i}]")
        if data is None:
            raise InvalidRequest(f"{where}.batch_images[{i}] is empty; every entry must be a picture")
        out.append(data)
    return out


class NativeUnit(BaseModel):
    """A unit as the native API and the web UI send it: the ControlUnit fields, images as base64 or data: URLs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    model: str = "None"
    module: str = "none"
    image: str | None = None
    mask: str | None = None
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str | int = "Balanced"
    resize_mode: str | int = "Crop and Resize"
    processor_res: int = 512
    threshold_a: float = -1
    threshold_b: float = -1
    pixel_perfect: bool = False
    guess_mode: bool = False
    low_vram: bool = False
    hr_option: str | int = "Both"
    union_control_type: str | int = "Unknown"  # for ControlNet Union models (darkroom.control.union)
    advanced_weighting: list[float] | None = None
    effective_region_mask: str | None = None
    merge_images: list[str] | None = None
    merge_masks: list[str | None] | None = None
    batch_images: list[str] | None = None
    prepared: bool = False  # the image is the module's map already (the web UI's map restored from a PNG)

    def to_unit(self, where: str) -> ControlUnit:
        fields = self.model_dump(exclude={"image", "mask", "effective_region_mask", "merge_images", "merge_masks",
                                          "batch_images"})
        more = [_image(b64, f"{where}.merge_images[{i}]") for i, b64 in enumerate(self.merge_images or [])]
        masks = None if self.merge_masks is None else [
            _image(b64, f"{where}.merge_masks[{i}]") for i, b64 in enumerate(self.merge_masks)]
        return build_unit(fields | {
            "image": _image(self.image, f"{where}.image"), "mask": _image(self.mask, f"{where}.mask"),
            "effective_region_mask": _image(self.effective_region_mask, f"{where}.effective_region_mask"),
            "merge_images": more or None, "merge_masks": masks,
            "batch_images": None if self.batch_images is None else _batch_images(self.batch_images, "batch", where)},
            where)


def native_units(units: list[NativeUnit], studio: Studio, *, img2img: bool) -> list[ControlUnit]:
    return finish_units([(f"controlnet[{i}]", u.to_unit(f"controlnet[{i}]")) for i, u in enumerate(units)],
                        studio, img2img=img2img)


# --- detection (the preprocessors) --------------------------------------------------------------------


def run_detect(module: str, image: bytes, *, mask: bytes | None, resolution: int, threshold_a: float,
               threshold_b: float, studio: Studio, field: str = "module", image_field: str = "image",
               mask_field: str = "mask", poses: list | None = None) -> bytes:
    """The control map a preprocessor makes of `image`, as PNG bytes; a pose module appends its pose JSON
    (the extension's OpenPose layout) to `poses`.

    A preprocessor whose weights are missing raises a DarkroomError naming the file; it is answered
    as a 422 (the request asks for something this install cannot do), never a 500."""
    import numpy as np
    from PIL import Image

    from darkroom.control.preprocess import annotator_dirs, detect

    name = check_module(module, field)
    with open_image(image, name=image_field) as opened:
        picture = opened.convert("RGBA")  # transparency goes on white in detect, as the extension does
    mask_image = None
    if mask is not None:
        with open_image(mask, name=mask_field) as opened:
            mask_image = opened.convert("L")
    found: list = []
    try:
        result = detect(name, picture, resolution=resolution, threshold_a=threshold_a, threshold_b=threshold_b,
                        mask=mask_image, annotator_dirs=tuple(annotator_dirs(studio.home)), poses=found)
    except DarkroomError as e:
        if e.status >= 500 or e.status < 400:
            raise InvalidRequest(str(e), code=e.code) from None
        raise
    if poses is not None:
        poses += [p.to_json() for p in found]
    pixels = np.clip(np.asarray(result, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# --- listings ---------------------------------------------------------------------------------------


def model_rows(studio: Studio) -> list[dict[str, Any]]:
    """The ControlNet files as the native API lists them (a union model with its number of control types)."""
    from darkroom.control.union import union_type_count

    rows = []
    for f in controlnet_files(studio):
        try:
            types = union_type_count(f.path)
        except (OSError, DarkroomError):  # a file that vanished or broke since it was listed: no picker
            types = None
        rows.append({"name": f.name, "title": f.title, "family": f.family, "path": str(f.path), "kind": f.noun,
                     "union_types": types})
    return rows


def module_rows(studio: Studio) -> list[dict[str, Any]]:
    """Each preprocessor with its label, sliders, and whether this install can run it (its weight files)."""
    from darkroom.control import preprocess

    names = preprocess.module_list(alias_names=False)
    labels = preprocess.module_list(alias_names=True)["module_list"]
    dirs = tuple(preprocess.annotator_dirs(studio.home))
    rows = []
    for name, label in zip(names["module_list"], labels, strict=True):
        detail = names["module_detail"].get(name, {})
        _, problem = preprocess.module_status(name, dirs)  # the missing weight file, if any
        rows.append({"name": name, "label": label, "model_free": bool(detail.get("model_free", False)),
                     "sliders": list(detail.get("sliders", [])), "available": problem is None, "problem": problem})
    return rows

