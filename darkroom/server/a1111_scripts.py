"""The webui's scripts over its API: `script_name` + positional `script_args`, for the X/Y/Z plot and SD upscale.

Darkroom runs two webui scripts: the X/Y/Z plot on its own X/Y plots (darkroom/services/xyplot.py),
and SD upscale (img2img only) on darkroom/services/sd_upscale.py.
Clients send it as the webui's API takes it (webuiapi's `txt2img(script_name=..., script_args=[...])`):
`script_args` in the order of the values the script's `ui()` returns (scripts/xyz_grid.py):

    [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown,
     z_type, z_values, z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
     no_fixed_seeds, margin_size, csv_mode, raw_mode]

An axis type is an index into the script's axis list for the tab (`TXT2IMG_AXES`, `IMG2IMG_AXES`;
the webui's dropdown uses type="index"); its label (any case) is accepted too, as some clients send
it. Older clients send the webui <= 1.2 order without the dropdowns and the last two flags
(`x_type, x_values, y_type, y_values, z_type, z_values, draw_legend, include_lone_images,
include_sub_grids, no_fixed_seeds, margin_size`): told apart by `script_args[2]` not being a list.
Missing trailing arguments take the script's defaults, as the webui fills them.

Refused with a 422 that says why: a Z axis (Darkroom's plots have two), an axis Darkroom's plots do
not have, "Keep -1 for seeds" with a random seed, no legend or grid margins (Darkroom's grid always
has its labels and no margins), and any other script.

SD upscale's `script_args` are its `ui()` values, `[info, overlap, upscaler, scale_factor]` (scripts/
sd_upscale.py): `info` is the script's HTML note and ignored; the upscaler is an index into the list
/sdapi/v1/upscalers answers (None, Lanczos, Nearest, then the model files; the webui's radio uses
type="index"), or its name, as many clients send it. Missing trailing values take the script's
defaults (64, None, 2): webui versions before the scale factor existed sent three values.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import Any

from darkroom.errors import InvalidRequest

XYZ_TITLE = "X/Y/Z plot"
SD_UPSCALE_TITLE = "SD upscale"
_XYZ_NAMES = {"x/y/z plot", "xyz plot", "x/y/z", "xyz", "xyz_grid", "xyz grid"}
_SD_UPSCALE_NAMES = {"sd upscale", "sd_upscale", "sdupscale"}

# The axis lists of scripts/xyz_grid.py (AUTOMATIC1111/stable-diffusion-webui, commit 02d5a43c), in order:
# the common axes plus those for one tab. Data only; which ones Darkroom runs is xyplot.AXES.
_COMMON_HEAD = ("Nothing", "Seed", "Var. seed", "Var. strength", "Steps")
_COMMON_TAIL = (
    "Checkpoint name", "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise",
    "Schedule type", "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Eta", "Clip skip", "Denoising",
    "Initial noise multiplier", "Extra noise",
)
_LAST = ("VAE", "Styles", "UniPC Order", "Face restore", "Token merging ratio", "Token merging ratio high-res",
         "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at",
         "RNG source")
TXT2IMG_AXES: tuple[str, ...] = (*_COMMON_HEAD, "Hires steps", "CFG Scale", "Prompt S/R", "Prompt order", "Sampler",
                                 "Hires sampler", *_COMMON_TAIL, "Hires upscaler", *_LAST)
IMG2IMG_AXES: tuple[str, ...] = (*_COMMON_HEAD, "CFG Scale", "Image CFG Scale", "Prompt S/R", "Prompt order",
                                 "Sampler", *_COMMON_TAIL, "Cond. Image Mask Weight", *_LAST)

# (name, default) of each script argument, in the webui's order; x_type's default is "Seed" (index 1)
ARGS: tuple[tuple[str, Any], ...] = (
    ("x_type", 1), ("x_values", ""), ("x_values_dropdown", []), ("y_type", 0), ("y_values", ""),
    ("y_values_dropdown", []), ("z_type", 0), ("z_values", ""), ("z_values_dropdown", []), ("draw_legend", True),
    ("include_lone_images", False), ("include_sub_grids", False), ("no_fixed_seeds", False), ("margin_size", 0),
    ("csv_mode", False), ("raw_mode", False),
)
_OLD_ORDER = ("x_type", "x_values", "y_type", "y_values", "z_type", "z_values", "draw_legend", "include_lone_images",
              "include_sub_grids", "no_fixed_seeds", "margin_size")


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


def check_script_name(name: str | None) -> None:
    """Refuse a script Darkroom does not run, naming those it does (no script, the X/Y/Z plot and SD upscale pass)."""
    if name is None or _key(name) in ("", "none") or _key(name) in _XYZ_NAMES | _SD_UPSCALE_NAMES:
        return
    if _key(name) == CONTROLNET_NAME:  # as in the webui, an always-on script is not a script_name
        raise InvalidRequest(f"script_name {name!r}: ControlNet is an always-on script; send its units in"
                             " alwayson_scripts.controlnet.args")
    raise InvalidRequest(f"script_name {name!r}: Darkroom does not have it; the scripts Darkroom runs are"
                         f" {XYZ_TITLE!r} and {SD_UPSCALE_TITLE!r} (img2img), or leave script_name out")


def is_xyz(name: str | None) -> bool:
    return name is not None and _key(name) in _XYZ_NAMES


def is_sd_upscale(name: str | None) -> bool:
    return name is not None and _key(name) in _SD_UPSCALE_NAMES


@dataclass(frozen=True)
class XYZRequest:
    """A parsed X/Y/Z plot request: Darkroom's `AXIS=VALUES` for x and y, and what the answer includes."""

    x: str | None
    y: str | None
    include_lone_images: bool
    include_sub_grids: bool


def _flag(args: dict[str, Any], name: str) -> bool:
    value = args[name]
    if isinstance(value, str):  # some clients send "True"/"False" (webui issue 10471)
        if value.strip().lower() not in ("true", "false", "1", "0", ""):
            raise InvalidRequest(f"script_args {name} must be true or false, not {value!r}")
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _named(script_args: list[Any]) -> dict[str, Any]:
    if len(script_args) > len(ARGS):
        raise InvalidRequest(f"script_args: the X/Y/Z plot takes at most {len(ARGS)} arguments"
                             f" ({', '.join(n for n, _ in ARGS)}), not {len(script_args)}")
    old = len(script_args) > 2 and not isinstance(script_args[2], (list, type(None)))
    names = _OLD_ORDER if old else [n for n, _ in ARGS]
    if len(script_args) > len(names):
        raise InvalidRequest(f"script_args: {len(script_args)} arguments do not fit the X/Y/Z plot's order"
                             f" ({', '.join(names)})")
    return {**dict(ARGS), **dict(zip(names, script_args, strict=False))}


def _axis_label(value: Any, axes: tuple[str, ...], which: str) -> str:
    """An axis type as its webui label: an index into `axes` (also as text), or a label in any case."""
    if isinstance(value, bool) or value is None:
        raise InvalidRequest(f"script_args {which}_type must be an axis index or name, not {value!r}")
    text = str(value).strip()
    if isinstance(value, int) or text.isdigit():
        index = int(text)
        if not 0 <= index < len(axes):
            raise InvalidRequest(f"script_args {which}_type {value!r} is not an axis index (0-{len(axes) - 1});"
                                 " GET /sdapi/v1/script-info lists the axes")
        return axes[index]
    match = next((a for a in axes if _key(a) == _key(text)), None)
    return match or text


def _values_text(args: dict[str, Any], which: str) -> str:
    """The axis values as one CSV line: the dropdown's list when given, else the text (raw mode: one per line)."""
    dropdown = args[f"{which}_values_dropdown"]
    text = args[f"{which}_values"]
    if dropdown and not (args["csv_mode"] and text):
        if not isinstance(dropdown, list):
            raise InvalidRequest(f"script_args {which}_values_dropdown must be a list of values")
        items = [str(v) for v in dropdown]
    elif isinstance(text, (int, float)) and not isinstance(text, bool):
        return str(text)
    elif not isinstance(text, str):
        raise InvalidRequest(f"script_args {which}_values must be text such as \"10,20,30\", not {text!r}")
    elif _flag(args, "raw_mode") and "\n" in text.strip():
        items = [line for line in text.strip().split("\n")]
    else:
        return text
    out = io.StringIO()
    csv.writer(out).writerow(items)
    return out.getvalue().strip()


def _axis(args: dict[str, Any], which: str, axes: tuple[str, ...]) -> str | None:
    from darkroom.services.xyplot import axis_names, find_axis

    label = _axis_label(args[f"{which}_type"], axes, which)
    if _key(label) == "nothing":
        return None
    try:
        find_axis(label)
    except InvalidRequest:
        raise InvalidRequest(f"X/Y/Z plot {which.upper()} type {label!r} is not one Darkroom's plots have; choose"
                             f" one of: {', '.join(axis_names())}") from None
    values = _values_text(args, which)
    if not values.strip():
        raise InvalidRequest(f"X/Y/Z plot: script_args {which}_values is empty; give the {label} values, e.g. \"1,2\"")
    return f"{label}={values}"


def parse_xyz(script_args: list[Any], *, img2img: bool, seed_was_random: bool) -> XYZRequest:
    """The X/Y/Z plot's positional `script_args` as Darkroom's X and Y axes (values are checked when queued)."""
    if not isinstance(script_args, list):
        raise InvalidRequest("script_args must be a list, in the X/Y/Z plot's argument order")
    args = _named(script_args)
    axes = IMG2IMG_AXES if img2img else TXT2IMG_AXES
    if _axis(args, "z", axes) is not None:
        raise InvalidRequest("X/Y/Z plot: a Z axis is not supported (Darkroom's plots have X and Y); set z_type to 0"
                             " (Nothing) and put the values on X or Y")
    if not _flag(args, "draw_legend"):
        raise InvalidRequest("X/Y/Z plot: draw_legend false is not supported (Darkroom's grid always has its labels)")
    margin = args["margin_size"]
    if margin not in (0, None, "", "0") and not (isinstance(margin, float) and margin == 0):
        raise InvalidRequest(f"X/Y/Z plot: margin_size {margin!r} is not supported (Darkroom's grid has no margins);"
                             " use 0")
    if _flag(args, "no_fixed_seeds") and seed_was_random:
        raise InvalidRequest("X/Y/Z plot: no_fixed_seeds (a new random seed per cell) is not supported; leave it"
                             " false or give a seed")
    x, y = _axis(args, "x", axes), _axis(args, "y", axes)
    if x is None and y is None:
        raise InvalidRequest("X/Y/Z plot: give an X or Y axis (x_type, x_values); both are Nothing")
    return XYZRequest(x, y, _flag(args, "include_lone_images"), _flag(args, "include_sub_grids"))


# --- SD upscale ---------------------------------------------------------------------------------------

SD_UPSCALE_ARGS = ("info", "overlap", "upscaler", "scale_factor")


def _brief(value: Any) -> str:
    """A value for a message, cut short (a 5,000-digit number has no repr at all)."""
    try:
        text = repr(value)
    except ValueError:
        return "a number of thousands of digits"
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: Any, name: str) -> int:
    """A whole number as clients send it (64, 64.0, "64")."""
    if isinstance(value, bool):
        raise InvalidRequest(f"SD upscale: script_args {name} must be a whole number, not {_brief(value)}")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"SD upscale: script_args {name} must be a whole number, not {_brief(value)}") from None
    if not number.is_integer():
        raise InvalidRequest(f"SD upscale: script_args {name} must be a whole number, not {_brief(value)}")
    return int(number)


def _upscaler(value: Any, names: list[str]) -> str:
    """An index into /sdapi/v1/upscalers' list (also as text) or a name (checked when the job is planned)."""
    if value is None:
        return names[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidRequest(f"SD upscale: script_args upscaler must be an index into /sdapi/v1/upscalers or a"
                             f" name, not {_brief(value)}")
    if isinstance(value, int):
        text = ""
    else:
        text = str(value).strip()
        if len(text) > 200:
            raise InvalidRequest(f"SD upscale: script_args upscaler {_brief(text)} is not an upscaler's name")
    if isinstance(value, (int, float)) or text.isdigit():
        index = _whole(value, "upscaler")
        if not 0 <= index < len(names):
            raise InvalidRequest(f"SD upscale: script_args upscaler {_brief(value)} is not an index into the upscalers"
                                 f" (0-{len(names) - 1}: {', '.join(names)}); GET /sdapi/v1/upscalers lists them")
        return names[index]
    return text


def parse_sd_upscale(script_args: list[Any], *, img2img: bool, upscalers: list[str]):
    """SD upscale's positional `script_args` as an sd_upscale.SDUpscale (sizes are checked when queued).

    `upscalers` is /sdapi/v1/upscalers' list of names, in its order."""
    from darkroom.services.sd_upscale import DEFAULT_FACTOR, DEFAULT_OVERLAP, SDUpscale

    if not img2img:
        raise InvalidRequest("SD upscale is an img2img script (it upscales the init image): send it to"
                             " /sdapi/v1/img2img with init_images")
    if not isinstance(script_args, list):
        raise InvalidRequest("script_args must be a list: [info, overlap, upscaler, scale_factor]")
    if len(script_args) > len(SD_UPSCALE_ARGS):
        raise InvalidRequest(f"script_args: SD upscale takes at most {len(SD_UPSCALE_ARGS)} arguments"
                             f" ({', '.join(SD_UPSCALE_ARGS)}), not {len(script_args)}")
    args = [*script_args, *[None] * (len(SD_UPSCALE_ARGS) - len(script_args))]
    overlap = DEFAULT_OVERLAP if args[1] is None else _whole(args[1], "overlap")
    factor = args[3]
    if factor is None:
        factor = DEFAULT_FACTOR
    elif isinstance(factor, bool) or not isinstance(factor, (int, float, str)):
        raise InvalidRequest(f"SD upscale: script_args scale_factor must be a number such as 2, not {_brief(factor)}")
    else:
        try:
            factor = float(factor)
        except (ValueError, OverflowError):
            raise InvalidRequest(f"SD upscale: script_args scale_factor must be a number such as 2, not"
                                 f" {_brief(factor)}") from None
    options = SDUpscale(factor=factor, overlap=overlap, upscaler=_upscaler(args[2], upscalers))
    options.check()
    return options


def sd_upscale_info(plan: Any) -> dict[str, Any]:
    """What an SD upscale changes in the webui's info: one seed per upscale, the script's parameters; {} for
    any other job (`plan` is the job's plan)."""
    from darkroom.services.sd_upscale import SDUpscalePlan

    if not isinstance(plan, SDUpscalePlan):
        return {}
    seeds = [(s, v if v >= 0 else s) for s, v in (plan.tile_seeds(n, 0) for n in range(plan.upscales))]
    return {"seed": seeds[0][0], "all_seeds": [s for s, _ in seeds], "subseed": seeds[0][1],
            "all_subseeds": [v for _, v in seeds], "extra_generation_params": plan.extra_params()}


# --- what /scripts and /script-info report ------------------------------------------------------------


CONTROLNET_NAME = "controlnet"  # the extension's always-on script (its title, lower-case), run from alwayson_scripts
CONTROLNET_SLOTS = 3  # the extension's default unit count ("Multi-ControlNet: ControlNet unit number")


def script_names() -> dict[str, list[str]]:
    """The webui's /scripts: each tab's script names, lower-case titles as the webui lists them (in its order:
    the webui's own scripts, then the extensions'). The webui lists always-on scripts too, so ControlNet is
    there as with the sd-webui-controlnet extension installed (clients look for it before sending units)."""
    return {"txt2img": [XYZ_TITLE.lower(), CONTROLNET_NAME],
            "img2img": [SD_UPSCALE_TITLE.lower(), XYZ_TITLE.lower(), CONTROLNET_NAME]}


def _arg(label: str | None, value: Any, choices: list[str] | None = None, minimum=None, maximum=None,
         step=None) -> dict:
    return {"label": label, "value": value, "minimum": minimum, "maximum": maximum, "step": step, "choices": choices}


def script_info(upscalers: list[str]) -> list[dict]:
    """The webui's /script-info entries (models.ScriptInfo): the X/Y/Z plot for each tab, then SD upscale
    (img2img) with `upscalers` (/sdapi/v1/upscalers' names) as its choices."""
    entries = []
    for img2img, axes in ((False, TXT2IMG_AXES), (True, IMG2IMG_AXES)):
        choices = list(axes)
        args = [
            _arg("X type", choices[1], choices), _arg("X values", ""), _arg("X values", None, []),
            _arg("Y type", choices[0], choices), _arg("Y values", ""), _arg("Y values", None, []),
            _arg("Z type", choices[0], choices), _arg("Z values", ""), _arg("Z values", None, []),
            _arg("Draw legend", True), _arg("Include Sub Images", False), _arg("Include Sub Grids", False),
            _arg("Keep -1 for seeds", False), _arg("Grid margins (px)", 0, None, 0, 500, 2),
            _arg("Use text inputs instead of dropdowns", False), _arg("Use raw text lines", False),
        ]
        entries.append({"name": XYZ_TITLE.lower(), "is_alwayson": False, "is_img2img": img2img, "args": args})
    note = "<p>Upscales the image by the scale factor, then redraws it in tiles of the width x height set above</p>"
    args = [_arg(None, note), _arg("Tile overlap", 64, None, 0, 256, 16), _arg("Upscaler", upscalers[0], upscalers),
            _arg("Scale Factor", 2, None, 0, 4, 1)]
    entries.append({"name": SD_UPSCALE_TITLE.lower(), "is_alwayson": False, "is_img2img": True, "args": args})
    for img2img in (False, True):
        entries.append({"name": CONTROLNET_NAME, "is_alwayson": True, "is_img2img": img2img,
                        "args": _controlnet_args()})
    return entries


def _controlnet_args() -> list[dict]:
    """ControlNet's arguments: one per unit slot (the extension's `ui()` gives a unit state each), its value
    the unit's defaults in the extension's field names, as `alwayson_scripts.controlnet.args` takes them."""
    from darkroom.control_unit import CORE_ONLY, ControlUnit

    default = ControlUnit(enabled=False).model_dump(exclude=set(CORE_ONLY))
    return [_arg(f"ControlNet Unit {i}", dict(default)) for i in range(CONTROLNET_SLOTS)]
