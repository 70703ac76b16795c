"""The AUTOMATIC1111 web API (/sdapi/v1), so that clients written for the webui work unchanged.

webuiapi, Open WebUI, SillyTavern, LibreChat and Krita's plugin speak this dialect. Routes here
only translate webui requests to a `GenerationRequest` (and back); every generation joins the
one job queue. Facts about the dialect: shared/reference/a1111-api.md.

txt2img (with the hires fix and variation seeds) and img2img (with inpainting) are served.
Fields that would change the picture in the webui but that Darkroom cannot honour yet (face
restoration, tiling, scripts, a different hires checkpoint/sampler/prompt, ...) are refused with
a 422 naming the field, never dropped: an image that silently differs from what was asked is
worse than an error.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
from pathlib import Path
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict

import darkroom
from darkroom.engine import samplers
from darkroom.errors import DarkroomError, InvalidRequest, ModelNotFound
from darkroom.jobs import ERROR, QUEUED, Job
from darkroom.request import GenerationRequest
from darkroom.server.native import get_studio, png_info_of
from darkroom.server.uploads import decode_base64_image, open_image
from darkroom.settings import SETTINGS
from darkroom.studio import ModelInfo, Studio

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])

VERSION = f"darkroom-{darkroom.__version__}"
POLL_SECONDS = 0.05  # how often a waiting txt2img looks at its job (no thread is held while waiting)
StudioDep = Annotated[Studio, Depends(get_studio)]


class NotAvailable(DarkroomError):
    """A webui route whose feature Darkroom does not have yet: an honest 501, not a fake answer."""

    status = 501


# --- models ---------------------------------------------------------------------------------------


def find_model(studio: Studio, wanted: str, *, rescan: bool = True) -> ModelInfo | None:
    """The library checkpoint a client names, by webui title "name [hash]", name, file name or hash.

    Only checkpoints listed in the library match (never a path the client makes up), so an API
    caller cannot make the server open arbitrary files. With `rescan`, a miss rescans once, as a
    model may have been dropped into the folder since the last listing.
    """
    wanted = (wanted or "").strip()
    if not wanted:
        return None
    low = wanted.lower()
    base = low[: low.rindex(" [")] if low.endswith("]") and " [" in low else low
    for refresh in (False, True) if rescan else (False,):
        rows = [m for m in studio.models(refresh=refresh) if not m.error]
        for m in rows:
            if wanted in (m.title, m.name, Path(m.path).name):
                return m
        for m in rows:
            if base in (m.title.lower(), m.name.lower(), Path(m.path).name.lower()):
                return m
        if 8 <= len(low) <= 64 and all(c in "0123456789abcdef" for c in low):
            for m in rows:
                if m.sha256 and m.sha256.startswith(low):
                    return m
    return None


def require_model(studio: Studio, wanted: str) -> ModelInfo:
    model = find_model(studio, wanted)
    if model is None:
        titles = ", ".join(m.title for m in studio.models() if not m.error) or "none"
        raise ModelNotFound(f"no model named {wanted!r} (available: {titles}); see GET /sdapi/v1/sd-models")
    return model


def current_model_info(studio: Studio) -> ModelInfo | None:
    name = studio.current_model()
    return next((m for m in studio.models() if m.name == name), None)


# --- settings: webui option names <-> ours ------------------------------------------------------

_OUR_NAME = {s.a1111: s.name for s in SETTINGS}
# Webui options Darkroom has one fixed behaviour for: the accepted values (first = what we do).
# A client asking for another value would get a different picture, so it is refused.
FIXED_OPTIONS: dict[str, tuple[Any, ...]] = {
    "eta_noise_seed_delta": (0, None),
    "randn_source": ("CPU", "cpu"),
}


def _check_fixed(options: dict[str, Any], where: str) -> None:
    for key, allowed in FIXED_OPTIONS.items():
        if key in options and options[key] not in allowed:
            raise InvalidRequest(f"{where}{key} {options[key]!r} is not supported yet (Darkroom uses {allowed[0]!r})")


def _clip_skip(value: Any, where: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
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
    ("restore_faces", bool, "restore_faces (face restoration) is not supported yet"),
    ("tiling", bool, "tiling (seamless textures) is not supported yet"),
    ("seed_resize_from_w", lambda v: v is not None and v > 0, "seed_resize_from_w (seed resize) is not supported yet"),
    ("seed_resize_from_h", lambda v: v is not None and v > 0, "seed_resize_from_h (seed resize) is not supported yet"),
    ("script_name", lambda v: not _unset(v), "script_name (webui scripts) is not supported"),
    ("alwayson_scripts", bool, "alwayson_scripts (webui extensions) are not supported"),
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


def _refuse_unsupported(body: ProcessingRequest) -> None:
    for name, asks, message in UNSUPPORTED:
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        if asks(value):
            detail = f" ({', '.join(value)})" if name == "alwayson_scripts" else f" (got {value!r})"
            raise InvalidRequest(message + detail)


def _with_infotext(body: ProcessingRequest) -> ProcessingRequest:
    """The webui's `infotext` field: a pasted infotext fills the fields the request left unset."""
    from darkroom.infotext import request_from_infotext

    if not body.infotext:
        return body
    pasted = request_from_infotext(body.infotext)
    fill = {"prompt": pasted.prompt, "negative_prompt": pasted.negative_prompt, "steps": pasted.steps,
            "sampler_name": pasted.sampler, "scheduler": pasted.schedule, "cfg_scale": pasted.cfg_scale,
            "seed": pasted.seed, "width": pasted.width, "height": pasted.height}
    if pasted.subseed_strength > 0:
        fill.update(subseed=pasted.subseed, subseed_strength=pasted.subseed_strength)
    if pasted.enable_hr and isinstance(body, Txt2ImgRequest):
        fill.update(enable_hr=True, hr_scale=pasted.hr_scale, hr_upscaler=pasted.hr_upscaler,
                    hr_second_pass_steps=pasted.hr_second_pass_steps, hr_resize_x=pasted.hr_resize_x,
                    hr_resize_y=pasted.hr_resize_y, denoising_strength=pasted.denoising_strength)
    update = {k: v for k, v in fill.items() if k not in body.model_fields_set and v is not None}
    overrides = dict(body.override_settings or {})
    if pasted.clip_skip != 1 and "CLIP_stop_at_last_layers" not in overrides:
        update["override_settings"] = {**overrides, "CLIP_stop_at_last_layers": pasted.clip_skip}
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
    same pixels as its "Lanczos" upscaler). Upscaler models (ESRGAN, ...) and the other latent
    modes (bicubic, antialiased, nearest-exact) would give other pictures, so they are refused.
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
    return {"enable_hr": True, "hr_scale": body.hr_scale, "hr_upscaler": hires_upscaler(body.hr_upscaler),
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
    overrides = body.override_settings or {}
    _check_fixed(overrides, "override_settings.")
    sampler = body.sampler_name or body.sampler_index or "Euler"
    schedule = body.scheduler or "Automatic"
    spec, concrete_schedule = samplers.resolve(sampler, schedule)
    fields: dict[str, Any] = {
        "prompt": body.prompt or "", "negative_prompt": body.negative_prompt or "", "sampler": sampler,
        "schedule": schedule, "steps": body.steps, "cfg_scale": body.cfg_scale, "seed": body.seed,
        "width": body.width, "height": body.height, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "eta": _eta_for(spec, body.eta),
    }
    if not _unset(overrides.get("sd_model_checkpoint")):
        fields["model"] = require_model(studio, str(overrides["sd_model_checkpoint"])).path
    if overrides.get("CLIP_stop_at_last_layers") is not None:
        fields["clip_skip"] = _clip_skip(overrides["CLIP_stop_at_last_layers"], "override_settings.")
    if "sd_vae" in overrides:
        fields["vae"] = studio.vae_choice(overrides["sd_vae"])
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
    try:
        return GenerationRequest(**fields)
    except pydantic.ValidationError as e:
        from darkroom.server.app import validation_message

        raise InvalidRequest(validation_message(e.errors())) from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _timestamp(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y%m%d%H%M%S") if t else "0"


def _denoising_of(req: GenerationRequest, body: ProcessingRequest) -> float | None:
    """The strength the generation used (img2img, hires fix); otherwise what was sent, as the webui reports."""
    return req.denoising_strength if req.is_img2img or req.enable_hr else body.denoising_strength


def job_info(job: Job, body: ProcessingRequest) -> dict[str, Any]:
    """The webui's `Processed.js()` fields for a finished job (sent as a JSON *string*)."""
    req = job.request
    count = req.image_count
    seeds = [req.seed + i for i in range(count)]
    subseed = req.subseed if req.subseed_strength > 0 else body.subseed
    subseeds = seeds if subseed == -1 else [subseed + i for i in range(count)]
    return {
        "prompt": req.prompt, "all_prompts": [req.prompt] * count,
        "negative_prompt": req.negative_prompt, "all_negative_prompts": [req.negative_prompt] * count,
        "seed": req.seed, "all_seeds": seeds, "subseed": subseeds[0], "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength, "width": req.width, "height": req.height, "sampler_name": req.sampler,
        "cfg_scale": req.cfg_scale, "steps": req.steps, "batch_size": req.batch_size, "n_iter": req.n_iter,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": job.model_name or None, "sd_model_hash": job.model_hash or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": _denoising_of(req, body), "extra_generation_params": {}, "index_of_first_image": 0,
        "infotexts": [im.infotext for im in job.images], "styles": list(body.styles or []),
        "job_timestamp": _timestamp(job.started), "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False, "version": VERSION,
    }


def _job_failed(job: Job) -> DarkroomError:
    error = DarkroomError(job.error or "the generation failed (details in logs/darkroom.log)")
    # the queue keeps only the message; a status recorded with it (if the queue ever does) is used
    error.status = getattr(job, "error_status", None) or 500
    return error


async def wait_for(job: Job) -> Job:
    """Wait for a job without blocking the event loop or holding a worker thread."""
    while not job.done_event.is_set():
        await asyncio.sleep(POLL_SECONDS)
    return job


async def _generate(body: ProcessingRequest, studio: Studio) -> Job:
    """Translate, queue and wait; a failed job answers with its error's status (422 bad input, ...)."""

    def submit() -> Job:
        request = to_generation_request(body, studio)
        private = not body.save_images or body.do_not_save_samples
        return studio.queue.submit(request, private=private, source="a1111")

    job = await wait_for(await run_in_threadpool(submit))
    if job.state == ERROR:
        raise _job_failed(job)
    return job


def _response(job: Job, body: ProcessingRequest, parameters: dict[str, Any]) -> dict:
    return {
        "images": [_b64(im.png) for im in job.images] if body.send_images else [],
        "parameters": parameters,
        "info": json.dumps(job_info(job, body)),
    }


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, studio: StudioDep) -> dict:
    """Generate and answer when done (as the webui does); an interrupted job answers with what finished."""
    body = _with_infotext(body)
    job = await _generate(body, studio)
    return _response(job, body, body.model_dump())


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, studio: StudioDep) -> dict:
    """img2img, or inpainting with a `mask`; the echoed parameters carry the images only if include_init_images."""
    body = _with_infotext(body)
    job = await _generate(body, studio)
    parameters = body.model_dump()
    if not body.include_init_images:  # as the webui: no megabytes of base64 echoed back unasked
        parameters["init_images"] = None
        parameters["mask"] = None
    return _response(job, body, parameters)


# --- progress and control -----------------------------------------------------------------------


@router.get("/progress")
def progress(studio: StudioDep, skip_current_image: Annotated[bool, Query()] = False) -> dict:
    """Live state of the running job; job_count also counts the batches still waiting in the queue."""
    queue = studio.queue
    job = queue.current
    waiting = sum(j.batches for j in queue.jobs() if j.state == QUEUED)
    if job is None:
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": waiting, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    state = {
        "skipped": job.skip.is_set(), "interrupted": job.cancel.is_set(), "stopping_generation": False,
        "job": f"Batch {job.batch + 1} out of {job.batches}" if job.batches > 1 else "",
        "job_count": job.batches + waiting, "job_timestamp": _timestamp(job.started), "job_no": job.batch,
        "sampling_step": job.step, "sampling_steps": job.steps,
    }
    image = job.preview_png
    return {
        "progress": round(job.progress, 4), "eta_relative": round(job.eta or 0.0, 2), "state": state,
        "current_image": None if skip_current_image or not image else _b64(image),
        "textinfo": f"step {job.step} of {job.steps}, batch {job.batch + 1} of {job.batches}",
    }


@router.post("/interrupt")
def interrupt(studio: StudioDep) -> dict:
    studio.queue.interrupt()
    return {}


@router.post("/skip")
def skip(studio: StudioDep) -> dict:
    studio.queue.skip()
    return {}


# --- options -----------------------------------------------------------------------------------------


@router.get("/options")
def get_options(studio: StudioDep) -> dict:
    """The webui options Darkroom has: the current model (as its title), clip skip, output format."""
    ours = studio.settings.as_dict()
    options: dict[str, Any] = {s.a1111: ours[s.name] for s in SETTINGS}
    current = current_model_info(studio)
    options["sd_model_checkpoint"] = current.title if current else studio.current_model()
    options["sd_checkpoint_hash"] = current.sha256 if current else None
    options["sd_vae"] = ours.get("vae") or "Automatic"
    options.update({key: allowed[0] for key, allowed in FIXED_OPTIONS.items()})
    return options


@router.post("/options")
def set_options(options: dict[str, Any], studio: StudioDep) -> None:
    """Change the options Darkroom has; others are ignored, as the webui ignores unknown ones.

    Everything is checked before anything changes, so a bad value leaves all settings as they were.
    """
    _check_fixed(options, "")
    changes: dict[str, Any] = {}
    model = None
    for key, value in options.items():
        name = _OUR_NAME.get(key)
        if name == "current_model":
            model = require_model(studio, str(value)) if not _unset(value) else None
        elif name == "clip_skip":
            changes["clip_skip"] = _clip_skip(value, "")
        elif name == "vae":
            changes["vae"] = studio.vae_choice(value)
        elif name == "samples_format":
            if str(value).lower() != "png":
                raise InvalidRequest(f"samples_format {value!r} is not supported yet (Darkroom saves png)")
            changes["samples_format"] = "png"
    if model is not None:
        studio.select_model(model.path)
    if changes:
        studio.settings.update(**changes)
    return None


# --- lists ------------------------------------------------------------------------------------------


@router.get("/sd-models")
def sd_models(studio: StudioDep) -> list[dict]:
    return [{"title": m.title, "model_name": m.name, "hash": m.hash, "sha256": m.sha256, "filename": m.path,
             "config": None} for m in studio.models() if not m.error]


@router.get("/samplers")
def sampler_list() -> list[dict]:
    return [{"name": s.name, "aliases": list(s.aliases), "options": {}} for s in samplers.SAMPLERS]


@router.get("/schedulers")
def scheduler_list() -> list[dict]:
    return [{"name": label.lower().replace(" ", "_"), "label": label, "aliases": None,
             "default_rho": 7.0 if label == "Karras" else -1, "need_inner_model": False}
            for label in samplers.SCHEDULE_NAMES]


@router.get("/sd-vae")
def sd_vae(studio: StudioDep) -> list[dict]:
    return [{"model_name": e.name, "filename": str(e.path)} for e in studio.engine.vaes.scan()]


@router.get("/loras")
def loras(studio: StudioDep) -> list[dict]:
    return [{k: v for k, v in e.to_dict().items() if k in ("name", "alias", "path", "metadata")}
            for e in studio.engine.loras.list() if not e.error]


@router.get("/embeddings")
def embeddings(studio: StudioDep) -> dict:
    return studio.embeddings()


@router.get("/upscalers")
def upscalers() -> list[dict]:
    """The image-space upscalers the hires fix has ("None" resizes with Lanczos, as in the webui)."""
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": scale}
            for name, scale in (("None", 1), ("Lanczos", 4), ("Nearest", 4))]


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/prompt-styles")
def prompt_styles() -> list:
    return []


@router.get("/scripts")
def scripts() -> dict:
    """No webui scripts or extensions (webuiapi asks at start-up to see which it may use)."""
    return {"txt2img": [], "img2img": []}


@router.get("/cmd-flags")
def cmd_flags(studio: StudioDep) -> dict:
    home = studio.home
    device = studio.engine.cache.device
    return {"api": True, "nowebui": False, "data_dir": str(home.root), "ckpt_dir": str(home.checkpoints),
            "lora_dir": str(home.loras), "vae_dir": str(home.vae), "embeddings_dir": str(home.embeddings),
            "device": str(device.device), "precision": device.precision}


def _ram() -> dict[str, int]:
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
        total, free = info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0))
    except (OSError, ValueError, KeyError, IndexError):
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    return {"free": free, "used": total - free, "total": total}


def _cuda() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    try:
        free, total = torch.cuda.mem_get_info()
        stats = torch.cuda.memory_stats()
    except RuntimeError as e:
        return {"error": str(e)}

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)}}


@router.get("/memory")
def memory() -> dict:
    return {"ram": _ram(), "cuda": _cuda()}


# --- png-info ---------------------------------------------------------------------------------------


class PngInfoRequest(BaseModel):
    image: str = ""


def webui_parameters(infotext: str) -> dict[str, Any]:
    """The infotext parsed as the webui's PNG Info does, with "Size" also split into Size-1/Size-2."""
    from darkroom.infotext import parse_infotext

    params: dict[str, Any] = dict(parse_infotext(infotext))
    width, sep, height = str(params.get("Size", "")).partition("x")
    if sep and width.strip().isdigit() and height.strip().isdigit():
        params["Size-1"], params["Size-2"] = width.strip(), height.strip()
    return params


@router.post("/png-info")
def png_info(body: PngInfoRequest) -> dict:
    if not body.image.strip():
        return {"info": "", "items": {}, "parameters": {}}
    data = decode_base64_image(body.image, field="image")
    try:
        found = png_info_of(data, "image")
    except InvalidRequest:
        raise
    except DarkroomError as e:  # not an image, or a damaged one: the request is at fault
        raise InvalidRequest(str(e)) from None
    infotext = found["parameters"] or ""
    items = {k: v for k, v in (found["items"] or {}).items() if k != "parameters"}
    return {"info": infotext, "items": items, "parameters": webui_parameters(infotext) if infotext else {}}


# --- refresh and (un)load -------------------------------------------------------------------------------


@router.post("/refresh-checkpoints")
def refresh_checkpoints(studio: StudioDep) -> None:
    studio.models(refresh=True)


@router.post("/refresh-loras")
def refresh_loras() -> None:
    return None


@router.post("/refresh-vae")
def refresh_vae() -> None:
    return None


@router.post("/unload-checkpoint")
def unload_checkpoint(studio: StudioDep) -> dict:
    """Free the cached model's memory; a job already running keeps its own reference and finishes."""
    studio.engine.cache.unload()
    return {}


@router.post("/reload-checkpoint")
def reload_checkpoint() -> dict:
    return {}  # the selected model is loaded by the next job that needs it
