"""The AUTOMATIC1111 API's request and response shapes, and their translation to ours.

Request models carry the webui's field names and defaults; `to_generation_request` turns one
into a `GenerationRequest` (refusing, with a 422 naming the field, anything that would change
the picture in the webui but that Darkroom cannot honour yet), and `job_info` builds the
webui's `info` JSON back from a finished job. The routes live in `darkroom.server.a1111`.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, field_validator

import darkroom
from darkroom.engine import samplers
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.request import MAX_ENSD, MAX_TOKEN_MERGING, RANDN_SOURCES, GenerationRequest, unicode_problem
from darkroom.server.a1111_scripts import check_script_name
from darkroom.server.common import current_model_info, find_model, require_model, validation_message
from darkroom.server.control_units import SCRIPT as CONTROLNET_SCRIPT
from darkroom.server.control_units import a1111_units
from darkroom.server.uploads import decode_base64_image, open_image
from darkroom.services.jobs import Job
from darkroom.services.studio import Studio
from darkroom.settings import OUTPUT_FORMATS, SETTINGS
from darkroom.webui_options import DEFAULTS, PICTURE, picture_problem, stored_value

VERSION = f"darkroom-{darkroom.__version__}"


class NotAvailable(DarkroomError):
    """A webui route whose feature Darkroom does not have yet: an honest 501, not a fake answer."""

    status = 501
    code = "DR-NOT-AVAILABLE"


# --- models ---------------------------------------------------------------------------------------


# --- settings: webui option names <-> ours ------------------------------------------------------

_OUR_NAME = {s.a1111: s.name for s in SETTINGS if s.a1111}
# Webui options Darkroom has one fixed behaviour for: the accepted values (first = what we do).
# A client asking for another value would get a different picture, so it is refused.
FIXED_OPTIONS: dict[str, tuple[Any, ...]] = {}


def _check_fixed(options: dict[str, Any], where: str) -> None:
    for key, allowed in FIXED_OPTIONS.items():
        if key in options and options[key] not in allowed:
            raise InvalidRequest(f"{where}{key} {options[key]!r} is not supported yet (Darkroom uses {allowed[0]!r})")


def randn_source_option(value: Any, where: str) -> str:
    """The webui's randn_source option (CPU, GPU or NV; any case here)."""
    canonical = str(value).strip().upper()
    if canonical not in RANDN_SOURCES:
        raise InvalidRequest(f"{where}randn_source {value!r} is not one of CPU, GPU, NV")
    return canonical


def ensd_option(value: Any, where: str) -> int:
    """The webui's eta_noise_seed_delta option: a whole number (also as text), 0 to 2**32-1."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{where}eta_noise_seed_delta must be a whole number, not {value!r}") from None
    if not 0 <= n <= MAX_ENSD:
        raise InvalidRequest(f"{where}eta_noise_seed_delta {n} is out of range (0-{MAX_ENSD})")
    return n


def output_format_option(value: Any, where: str) -> str:
    """The webui's samples_format: png, jpg, jpeg or webp (any case)."""
    fmt = value.strip().lower() if isinstance(value, str) else value
    if fmt not in OUTPUT_FORMATS:
        raise InvalidRequest(f"{where}samples_format {value!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    return fmt


def save_option(key: str, value: Any, where: str) -> Any:
    """jpeg_quality (a whole number 1-100) or webp_lossless (true or false), checked."""
    if key == "webp_lossless":
        if not isinstance(value, bool):
            raise InvalidRequest(f"{where}webp_lossless must be true or false, not {value!r}")
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise InvalidRequest(f"{where}jpeg_quality must be a whole number from 1 to 100, not {value!r}")
    return value


# Webui options this module applies itself; the others are darkroom/webui_options.py's to classify.
_APPLIED = {"sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae", "samples_format", "jpeg_quality",
            "webp_lossless", "randn_source", "eta_noise_seed_delta", "sd_checkpoint_hash", *_OUR_NAME}


def override_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    """override_settings: a picture-changing option Darkroom does not apply is refused (naming it) unless at
    Darkroom's value; the saving options become the request's output fields; the rest cannot change the
    picture and are ignored, as they would be after the webui restores its settings."""
    for key, value in overrides.items():
        problem = picture_problem(key, value, "override_settings.")
        if problem:
            raise InvalidRequest(problem)
    fields: dict[str, Any] = {}
    if "samples_format" in overrides:
        fields["output_format"] = output_format_option(overrides["samples_format"], "override_settings.")
    for key, field in (("jpeg_quality", "output_quality"), ("webp_lossless", "output_lossless")):
        if key in overrides:
            fields[field] = save_option(key, overrides[key], "override_settings.")
    return fields


def webui_only_changes(options: dict[str, Any], stored: dict[str, Any]) -> dict[str, Any] | None:
    """POST /options for the options Darkroom only keeps: all checked, then the new store (None: no change).

    Picture-changing ones are refused unless at Darkroom's value (nothing to keep); unknown keys are
    ignored, as before (the webui's extensions add their own options, which Darkroom has no use for).
    """
    store = dict(stored)
    for key, value in options.items():
        if key in _APPLIED or key not in DEFAULTS:
            continue
        problem = picture_problem(key, value)
        if problem:
            raise InvalidRequest(problem)
        if key in PICTURE:
            continue
        kept, expected = stored_value(key, value)
        if expected:
            raise InvalidRequest(f"{key} should be {expected} (its default is {DEFAULTS[key]!r}), not {value!r}")
        store[key] = kept
    return store if store != stored else None


def webui_options_view(stored: dict[str, Any]) -> dict[str, Any]:
    """GET /options for the options Darkroom does not apply: defaults, Darkroom's values, what clients stored."""
    view = {k: v for k, v in DEFAULTS.items() if k not in _APPLIED}
    view.update({key: accepted[0] for key, accepted in PICTURE.items()})
    view.update({k: v for k, v in stored.items() if k in view and k not in PICTURE})
    return view


def _clip_skip(value: Any, where: str) -> int:
    """A webui clip skip (a whole number, also as text); 1.5, NaN, infinity or true are refused, not rounded."""
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(value)
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"{where}CLIP_stop_at_last_layers must be a whole number, not {value!r}") from None
    if not 1 <= n <= 12:
        raise InvalidRequest(f"{where}CLIP_stop_at_last_layers {n} is out of range (1-12)")
    return n


# --- txt2img and img2img requests ---------------------------------------------------------------------


class ProcessingRequest(BaseModel):
    """What the webui's txt2img and img2img bodies share: its field names and defaults (unknown fields are ignored).

    Defaults follow the webui's own (StableDiffusionProcessing): 50 steps, and the legacy
    `sampler_index` "Euler" when neither sampler field is given.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float | None = 0.0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None

    @field_validator("*")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        """Text that is not Unicode is refused in every field, also those only echoed back (styles, comments):
        the answer could not be encoded. Same rule as GenerationRequest's."""
        problem = next(filter(None, map(unicode_problem, _strings(value))), None)
        if problem:
            raise ValueError(problem)
        return value


def _strings(value: Any):
    """Every str inside `value` (lists and dicts walked, keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


class Txt2ImgRequest(ProcessingRequest):
    """The webui's txt2img body; `denoising_strength` is the hires fix's (0.7 when unset, as webuiapi sends)."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(ProcessingRequest):
    """The webui's img2img body, with its defaults (StableDiffusionProcessingImg2Img).

    Note the webui's inpainting defaults: masked content "fill" (0) and "only masked" on with
    padding 0. `mask_blur`, when given, sets both `mask_blur_x` and `mask_blur_y`.
    """

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


def _unset(value: Any) -> bool:
    return value in (None, "", "None")


# (field, "does this value ask for something we cannot do?", message): supporting one = deleting its row.
# Rows whose field a body does not have (img2img has no hires fix) do not apply to it.
UNSUPPORTED: tuple[tuple[str, Any, str], ...] = (
    ("seed_resize_from_w", lambda v: v is not None and v > 0, "seed_resize_from_w (seed resize) is not supported yet"),
    ("seed_resize_from_h", lambda v: v is not None and v > 0, "seed_resize_from_h (seed resize) is not supported yet"),
    ("alwayson_scripts", lambda v: bool(_other_scripts(v)),
     "alwayson_scripts other than ControlNet (webui extensions) are not supported"),
    ("refiner_checkpoint", lambda v: not _unset(v), "refiner_checkpoint (SDXL refiner pass) is not supported yet"),
    ("s_churn", lambda v: v not in (None, 0), "s_churn (sampler noise settings) is not supported yet"),
    ("s_noise", lambda v: v not in (None, 1), "s_noise (sampler noise settings) is not supported yet"),
    ("initial_noise_multiplier", lambda v: v not in (None, 1),
     "initial_noise_multiplier (img2img extra noise) is not supported yet"),
    ("latent_mask", lambda v: not _unset(v), "latent_mask (a separate latent mask) is not supported yet"),
    ("mask_round", lambda v: v is False, "mask_round false (a soft latent mask) is not supported yet"),
)

# the webui's "use the first pass's" choices for the hires pass
_SAME = {"hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "Use same sampler",
         "hr_scheduler": "Use same scheduler"}
LATENT_UPSCALERS = ("Latent", "Latent (nearest)")
IMAGE_UPSCALERS = ("Lanczos", "Nearest")


def _other_scripts(scripts: dict[str, Any]) -> list[str]:
    """The alwayson scripts a body asks for besides ControlNet (matched in any case, as the webui matches titles)."""
    return [name for name in scripts if name.lower() != CONTROLNET_SCRIPT]


def _refuse_unsupported(body: ProcessingRequest) -> None:
    for name, asks, message in UNSUPPORTED:
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        if asks(value):
            detail = f" ({', '.join(_other_scripts(value))})" if name == "alwayson_scripts" else f" (got {value!r})"
            raise InvalidRequest(message + detail)


def _with_infotext(body: ProcessingRequest) -> ProcessingRequest:
    """The webui's `infotext` field: a pasted infotext fills the fields the request left unset."""
    from darkroom.api import pasted_schedule
    from darkroom.metadata.infotext import request_from_infotext

    if not body.infotext:
        return body
    pasted = pasted_schedule(request_from_infotext(body.infotext))
    fill = {"prompt": pasted.prompt, "negative_prompt": pasted.negative_prompt, "steps": pasted.steps,
            "sampler_name": pasted.sampler, "scheduler": pasted.schedule, "cfg_scale": pasted.cfg_scale,
            "seed": pasted.seed, "width": pasted.width, "height": pasted.height,
            "tiling": True if pasted.tiling else None, "restore_faces": True if pasted.restore_faces else None}
    if pasted.subseed_strength > 0:
        fill.update(subseed=pasted.subseed, subseed_strength=pasted.subseed_strength)
    if pasted.enable_hr and isinstance(body, Txt2ImgRequest):
        fill.update(enable_hr=True, hr_scale=pasted.hr_scale, hr_upscaler=pasted.hr_upscaler,
                    hr_second_pass_steps=pasted.hr_second_pass_steps, hr_resize_x=pasted.hr_resize_x,
                    hr_resize_y=pasted.hr_resize_y, denoising_strength=pasted.denoising_strength)
    update = {k: v for k, v in fill.items() if k not in body.model_fields_set and v is not None}
    overrides = dict(body.override_settings or {})
    if pasted.clip_skip != 1 and "CLIP_stop_at_last_layers" not in overrides:
        overrides["CLIP_stop_at_last_layers"] = pasted.clip_skip
    # the infotext's noise source (no RNG key: the webui's GPU) and ENSD, as the webui applies them
    overrides.setdefault("randn_source", pasted.randn_source)
    if pasted.eta_noise_seed_delta:
        overrides.setdefault("eta_noise_seed_delta", pasted.eta_noise_seed_delta)
    if overrides != (body.override_settings or {}):
        update["override_settings"] = overrides
    return body.model_copy(update=update)


def _eta_for(spec: samplers.Sampler, eta: float | None) -> float | None:
    """Pass eta on only where it changes the picture and differs from the sampler's default.

    webuiapi sends eta=1.0 with every request; for a deterministic sampler the webui ignores
    it, and at a sampler's default it is not recorded, so neither should it be here.
    """
    if eta is None:
        return None
    if spec.name == "DDIM":
        return None if eta == 0.0 else eta
    if spec.stochastic:
        return None if eta == 1.0 else eta
    return None


def hires_upscaler(value: str | None) -> str:
    """The webui's hr_upscaler as ours: unset = its default latent mode, "None" = a Lanczos resize.

    In the webui, "None" means no upscaler model, and the image is resized with Lanczos (the
    same pixels as its "Lanczos" upscaler). The other latent modes (bicubic, antialiased,
    nearest-exact) would give other pictures, so they are refused; upscaler model files (ESRGAN,
    ...) are looked up by `hires_upscaler_for`.
    """
    if value in (None, ""):
        return "Latent"
    if value == "None":
        return "Lanczos"
    for name in (*LATENT_UPSCALERS, *IMAGE_UPSCALERS):
        if value.strip().lower() == name.lower():
            return name
    raise InvalidRequest(f"hr_upscaler {value!r} is not supported; choose one of: "
                         + ", ".join(("None", *LATENT_UPSCALERS, *IMAGE_UPSCALERS)))


def hires_upscaler_for(value: str | None, studio: Studio) -> str:
    """`hires_upscaler`, or an upscaler model file in the models folders by the name users type
    ("R-ESRGAN 4x+", "4x-UltraSharp"); anything else is refused naming every choice."""
    try:
        return hires_upscaler(value)
    except InvalidRequest:
        files = studio.engine.upscalers.files()
        try:
            return studio.engine.upscalers.file(value or "").name
        except InvalidRequest:
            names = ("None", *LATENT_UPSCALERS, *IMAGE_UPSCALERS, *(f.name for f in files))
            raise InvalidRequest(f"hr_upscaler {value!r} is not supported; choose one of: " + ", ".join(names)
                                 + ("" if files else " (or put upscaler model files in models/upscalers)")) from None


def _hires_fields(body: Txt2ImgRequest, fields: dict[str, Any], spec: samplers.Sampler, schedule: str,
                  studio: Studio) -> dict[str, Any]:
    """The hires fix's GenerationRequest fields; a second pass that differs from the first is refused."""
    if body.firstphase_width or body.firstphase_height:
        raise InvalidRequest("firstphase_width/firstphase_height (the old hires fix) are not supported;"
                             " use hr_scale or hr_resize_x/hr_resize_y")
    if not _unset(body.hr_checkpoint_name) and body.hr_checkpoint_name != _SAME["hr_checkpoint_name"]:
        wanted = find_model(studio, body.hr_checkpoint_name, rescan=False)
        used = fields.get("model") or getattr(current_model_info(studio), "path", None)
        if wanted is None or wanted.path != used:
            raise InvalidRequest(f"hr_checkpoint_name (a different checkpoint for the hires pass) is not supported"
                                 f" yet (got {body.hr_checkpoint_name!r}); leave it empty")
    if not _unset(body.hr_sampler_name) and body.hr_sampler_name != _SAME["hr_sampler_name"]:
        if samplers.resolve(body.hr_sampler_name, schedule)[0].name != spec.name:
            raise InvalidRequest(f"hr_sampler_name (a different sampler for the hires pass) is not supported yet"
                                 f" (got {body.hr_sampler_name!r}); leave it empty")
    if not _unset(body.hr_scheduler) and body.hr_scheduler != _SAME["hr_scheduler"]:
        if samplers.resolve(spec.name, body.hr_scheduler)[1] != schedule:
            raise InvalidRequest(f"hr_scheduler (a different schedule for the hires pass) is not supported yet"
                                 f" (got {body.hr_scheduler!r}); leave it empty")
    for name, first in (("hr_prompt", fields["prompt"]), ("hr_negative_prompt", fields["negative_prompt"])):
        value = getattr(body, name) or ""
        if value and value != first:
            raise InvalidRequest(f"{name} (a different prompt for the hires pass) is not supported yet; leave it empty")
    strength = 0.7 if body.denoising_strength is None else body.denoising_strength
    return {"enable_hr": True, "hr_scale": body.hr_scale, "hr_upscaler": hires_upscaler_for(body.hr_upscaler, studio),
            "hr_second_pass_steps": body.hr_second_pass_steps, "hr_resize_x": body.hr_resize_x,
            "hr_resize_y": body.hr_resize_y, "denoising_strength": strength}


def _image_field(value: Any, field: str) -> bytes:
    """A base64 image from the request, checked to be a readable, undamaged image (else a 422 naming `field`)."""
    data = decode_base64_image(value, field=field)
    open_image(data, name=field).close()
    return data


def _init_image(body: Img2ImgRequest) -> bytes:
    images = [im for im in (body.init_images or []) if not _unset(im)]
    if not images:
        raise InvalidRequest("init_images: img2img needs an image (a base64 PNG, JPEG or WebP, or a data: URL)")
    if any(im != images[0] for im in images[1:]):
        # the webui gives each image of the batch its own init image; Darkroom has one per request
        raise InvalidRequest(f"init_images: one image per request is supported yet (got {len(images)} different)")
    return _image_field(images[0], "init_images[0]")


def _img2img_fields(body: Img2ImgRequest) -> dict[str, Any]:
    """The img2img and inpainting GenerationRequest fields; the images are decoded and checked here."""
    fields: dict[str, Any] = {
        "init_image": _init_image(body), "resize_mode": body.resize_mode,
        "denoising_strength": 0.75 if body.denoising_strength is None else body.denoising_strength,
    }
    if _unset(body.mask):
        return fields
    if body.inpainting_mask_invert not in (0, 1):
        raise InvalidRequest(f"inpainting_mask_invert must be 0 or 1, not {body.inpainting_mask_invert!r}")
    blur = body.mask_blur if body.mask_blur is not None else max(body.mask_blur_x, body.mask_blur_y)
    fields.update(mask=_image_field(body.mask, "mask"), mask_blur=blur, inpainting_fill=body.inpainting_fill,
                  inpaint_full_res=body.inpaint_full_res, inpaint_full_res_padding=body.inpaint_full_res_padding,
                  inpainting_mask_invert=bool(body.inpainting_mask_invert))
    return fields


def to_generation_request(body: ProcessingRequest, studio: Studio) -> GenerationRequest:
    """The webui request as a GenerationRequest; raises 4xx DarkroomErrors for what cannot be done."""
    _refuse_unsupported(body)
    check_script_name(body.script_name)  # the X/Y/Z plot is queued by the route (darkroom/server/a1111_scripts.py)
    overrides = body.override_settings or {}
    _check_fixed(overrides, "override_settings.")
    output = override_fields(overrides)
    sampler = body.sampler_name or body.sampler_index or "Euler"
    schedule = samplers.as_the_webui_reads(sampler, body.scheduler)  # DDIM + "normal" (SillyTavern) runs as there
    spec, concrete_schedule = samplers.resolve(sampler, schedule)
    fields: dict[str, Any] = {
        "prompt": body.prompt or "", "negative_prompt": body.negative_prompt or "", "sampler": sampler,
        "schedule": schedule, "steps": body.steps, "cfg_scale": body.cfg_scale, "seed": body.seed,
        "width": body.width, "height": body.height, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "eta": _eta_for(spec, body.eta), "styles": list(body.styles or []), "tiling": bool(body.tiling),
        "restore_faces": bool(body.restore_faces),
    }
    if not _unset(overrides.get("sd_model_checkpoint")):
        fields["model"] = require_model(studio, str(overrides["sd_model_checkpoint"])).path
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        fields["clip_skip"] = _clip_skip(overrides["CLIP_stop_at_last_layers"], "override_settings.")
    if "sd_vae" in overrides:
        fields["vae"] = studio.vae_choice(overrides["sd_vae"])
    fields.update(output)
    # the noise options: per request, else the stored options (darkroom/settings.py)
    fields["randn_source"] = randn_source_option(overrides.get("randn_source") or studio.settings.get("randn_source"),
                                                 "override_settings.")
    ensd = overrides.get("eta_noise_seed_delta")
    fields["eta_noise_seed_delta"] = ensd_option(studio.settings.get("eta_noise_seed_delta") if ensd is None else ensd,
                                                 "override_settings.")
    fields.update(_token_merging_fields(overrides, studio, img2img=isinstance(body, Img2ImgRequest)))
    # seeds are resolved here, as the webui does, so all_seeds is known even for an interrupted job
    from darkroom.engine.generate import random_seed

    if fields["seed"] == -1:
        fields["seed"] = random_seed()
    if body.subseed_strength:
        fields["subseed_strength"] = body.subseed_strength
        fields["subseed"] = random_seed() if body.subseed == -1 else body.subseed
    if isinstance(body, Txt2ImgRequest) and body.enable_hr:
        fields.update(_hires_fields(body, fields, spec, concrete_schedule, studio))
    if isinstance(body, Img2ImgRequest):
        fields.update(_img2img_fields(body))
    # ControlNet units (alwayson_scripts.controlnet.args): darkroom/server/control_units.py
    fields["controlnet"] = a1111_units(body.alwayson_scripts, studio, img2img=isinstance(body, Img2ImgRequest))
    try:
        return GenerationRequest(**fields)
    except pydantic.ValidationError as e:
        raise InvalidRequest(validation_message(e.errors())) from None


def _token_merging_fields(overrides: dict[str, Any], studio: Studio, *, img2img: bool) -> dict[str, float]:
    """The webui's token merging options (stored, or this request's override_settings) as the request's ratios,
    by its rule: img2img takes token_merging_ratio when this request overrides it, else the img2img option,
    else the common one; the hires pass its own option, else the first pass's (0 here)."""
    def option(key: str) -> float:
        value = overrides[key] if key in overrides else studio.settings.get(key)
        if value is None:
            return 0.0
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_TOKEN_MERGING:
            raise InvalidRequest(f"{'override_settings.' if key in overrides else ''}{key} must be a number from 0"
                                 f" to {MAX_TOKEN_MERGING}, not {value!r}")
        return float(value)

    first = option("token_merging_ratio")
    if img2img and not (first and "token_merging_ratio" in overrides):
        first = option("token_merging_ratio_img2img") or first
    return {"token_merging_ratio": first, "token_merging_ratio_hr": option("token_merging_ratio_hr")}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _timestamp(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y%m%d%H%M%S") if t else "0"


def _denoising_of(req: GenerationRequest, body: ProcessingRequest) -> float | None:
    """The strength the generation used (img2img, hires fix); otherwise what was sent, as the webui reports."""
    return req.denoising_strength if req.is_img2img or req.enable_hr else body.denoising_strength


def _image_prompts(job: Job, key: str, asked: str, count: int) -> list[str]:
    """Each image's prompt as it was drawn (styles applied, dynamic prompts expanded), read back from its
    infotext, as the webui's all_prompts; the prompt asked for when no image was made."""
    from darkroom.metadata.infotext import parse_infotext

    if not job.images:
        return [asked] * count
    return [parse_infotext(im.infotext)[key] for im in job.images]


def _face_model(job: Job) -> str | None:
    """The face restoration model the images were made with (their infotext's), else None."""
    from darkroom.metadata.infotext import parse_infotext

    return parse_infotext(job.images[0].infotext).get("Face restoration") if job.images else None


def _controlnet_params(job: Job) -> dict[str, str]:
    """The `ControlNet N` entries the extension adds to extra_generation_params, read from the infotext."""
    from darkroom.metadata.infotext import parse_infotext

    if not job.images or not job.request.controlnet:
        return {}
    params = parse_infotext(job.images[0].infotext)
    return {k: v for k, v in params.items() if k.startswith("ControlNet ") and k[11:].isdigit()}


def job_info(job: Job, body: ProcessingRequest) -> dict[str, Any]:
    """The webui's `Processed.js()` fields for a finished job (sent as a JSON *string*)."""
    req = job.request
    runs = len(getattr(job.plan, "requests", None) or [None])  # a ControlNet batch: its runs repeat the seeds
    count = req.image_count
    seeds = [req.seed + i for i in range(count)] * runs
    subseed = req.subseed if req.subseed_strength > 0 else body.subseed
    subseeds = seeds if subseed == -1 else [subseed + i for i in range(count)] * runs
    return {
        "prompt": req.prompt, "all_prompts": _image_prompts(job, "Prompt", req.prompt, count),
        "negative_prompt": req.negative_prompt,
        "all_negative_prompts": _image_prompts(job, "Negative prompt", req.negative_prompt, count),
        "seed": req.seed, "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height, "sampler_name": req.sampler,
        "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "n_iter": req.n_iter,
        "restore_faces": req.restore_faces, "face_restoration_model": _face_model(job),
        "sd_model_name": job.model_name or None, "sd_model_hash": job.model_hash or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": _denoising_of(req, body), "extra_generation_params": _controlnet_params(job),
        "index_of_first_image": 0,
        "infotexts": [im.infotext for im in job.images], "styles": list(body.styles or []),
        "job_timestamp": _timestamp(job.started), "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False, "version": VERSION,
    }


def _job_failed(job: Job) -> DarkroomError:
    error = DarkroomError(job.error or "the generation failed (details in logs/darkroom.log)",
                          code=job.error_code or "DR-INTERNAL")
    # the queue keeps only the message; a status recorded with it (if the queue ever does) is used
    error.status = getattr(job, "error_status", None) or 500
    return error
