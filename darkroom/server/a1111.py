"""The AUTOMATIC1111 web API (/sdapi/v1), so that clients written for the webui work unchanged.

webuiapi, Open WebUI, SillyTavern, LibreChat and Krita's plugin speak this dialect. Routes here
only translate webui requests to a `GenerationRequest` (and back); every generation joins the
one job queue. Facts about the dialect: shared/reference/a1111-api.md.

txt2img (with the hires fix and variation seeds) and img2img (with inpainting) are served.
Fields that would change the picture in the webui but that Darkroom cannot honour yet (seed
resize, scripts, a different hires checkpoint/sampler/prompt, ...) are refused with
a 422 naming the field, never dropped: an image that silently differs from what was asked is
worse than an error.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel

from darkroom.engine import samplers, schedules
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.metadata.images import encode_file, read_image_metadata
from darkroom.request import GenerationRequest
from darkroom.server.a1111_requests import (
    _OUR_NAME,
    FIXED_OPTIONS,
    LATENT_UPSCALERS,
    Img2ImgRequest,
    ProcessingRequest,
    Txt2ImgRequest,
    _b64,
    _check_fixed,
    _clip_skip,
    _job_failed,
    _timestamp,
    _unset,
    _with_infotext,
    ensd_option,
    job_info,
    output_format_option,
    randn_source_option,
    save_option,
    to_generation_request,
    webui_only_changes,
    webui_options_view,
)
from darkroom.server.a1111_scripts import (
    XYZRequest,
    is_sd_upscale,
    is_xyz,
    parse_sd_upscale,
    parse_xyz,
    sd_upscale_info,
)
from darkroom.server.common import StudioDep, current_model_info, png_info_of, require_model, wait_for
from darkroom.server.uploads import decode_base64_image
from darkroom.services.jobs import ERROR, QUEUED, Job
from darkroom.services.studio import Studio
from darkroom.settings import LIMIT_SETTINGS, SETTINGS

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])


async def _generate(body: ProcessingRequest, studio: Studio) -> Job:
    """Translate, queue and wait; a failed job answers with its error's status (422 bad input, ...)."""

    def submit() -> Job:
        request = to_generation_request(body, studio)
        private = not body.save_images or body.do_not_save_samples
        xyz = _xyz(body)  # the X/Y/Z plot script: an X/Y grid job (each cell checked before anything runs)
        sd_upscale = _sd_upscale(body, studio)  # the SD upscale script: checked and one tile admitted when queued
        return studio.queue.submit(request, private=private, source="a1111", xy=(xyz.x, xyz.y) if xyz else None,
                                   sd_upscale=sd_upscale)

    job = await wait_for(await run_in_threadpool(submit))
    if job.state == ERROR:
        raise _job_failed(job)
    return job


def _xyz(body: ProcessingRequest) -> XYZRequest | None:
    if not is_xyz(body.script_name):
        return None
    return parse_xyz(body.script_args, img2img=isinstance(body, Img2ImgRequest), seed_was_random=body.seed == -1)


def _sd_upscale(body: ProcessingRequest, studio: Studio):
    if not is_sd_upscale(body.script_name):
        return None
    from darkroom.services.sd_upscale import upscaler_names

    return parse_sd_upscale(body.script_args, img2img=isinstance(body, Img2ImgRequest),
                            upscalers=upscaler_names(studio.engine.upscalers))


def _encoded(png: bytes, infotext: str | None, req: GenerationRequest) -> bytes:
    """An image as the webui's API sends it: in the samples_format, with the infotext where that format keeps it."""
    fmt = (req.output_format or "png").lower()
    if fmt == "png":
        return png
    with Image.open(io.BytesIO(png)) as image:
        return encode_file(image, infotext, fmt, quality=req.output_quality or 80, lossless=bool(req.output_lossless))


def _response(job: Job, body: ProcessingRequest, parameters: dict[str, Any]) -> dict:
    """The webui's answer; for the X/Y/Z plot the grid first (twice with include_sub_grids, as the webui's one
    Z sub-grid), then the cells when include_lone_images; an interrupted plot answers with the cells done."""
    pictures = [(im.png, im.infotext) for im in job.images]
    info = job_info(job, body)
    xyz = _xyz(body)
    if xyz is not None and job.grid_png:
        grid = (job.grid_png, read_image_metadata(job.grid_png).parameters)
        pictures = [grid] * (2 if xyz.include_sub_grids else 1) + (pictures if xyz.include_lone_images else [])
        info.update(infotexts=[text for _, text in pictures], index_of_first_image=1)
    info.update(sd_upscale_info(job.plan))  # an SD upscale's seeds: one image per upscale (nothing otherwise)
    return {
        "images": [_b64(_encoded(png, text, job.request)) for png, text in pictures] if body.send_images else [],
        "parameters": parameters,
        "info": json.dumps(info),
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
    image = None if job.private else job.preview_png  # a private job's picture is for its owner's UI only
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
    """All the webui's options (darkroom/webui_options.py): Darkroom's settings, the values its pictures match,
    and what clients stored; the current model as its title."""
    ours = studio.settings.as_dict()
    options: dict[str, Any] = {s.a1111: ours[s.name] for s in SETTINGS if s.a1111}
    current = current_model_info(studio)
    options["sd_model_checkpoint"] = current.title if current else studio.current_model()
    options["sd_checkpoint_hash"] = current.sha256 if current else None
    options["sd_vae"] = ours.get("vae") or "Automatic"
    options.update({key: allowed[0] for key, allowed in FIXED_OPTIONS.items()})
    return {**webui_options_view(ours["webui_options"]), **options}


@router.post("/options")
def set_options(options: dict[str, Any], studio: StudioDep) -> None:
    """Change Darkroom's settings and keep the webui's other options; unknown ones are ignored.

    Everything is checked before anything changes, so a bad value leaves all settings as they were;
    a picture-changing option Darkroom does not apply is refused unless set to Darkroom's value.
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
            changes[name] = output_format_option(value, "")
        elif name in ("jpeg_quality", "webp_lossless"):
            changes[name] = save_option(name, value, "")
        elif name == "randn_source":
            changes[name] = randn_source_option(value, "")
        elif name == "eta_noise_seed_delta":
            changes[name] = ensd_option(value, "")
        elif name in LIMIT_SETTINGS:  # darkroom_max_side, ...: validated by Settings.update (docs/limits.md)
            changes[name] = value
        elif name == "face_restoration_model":  # the webui's names, any case; Settings.update checks the rest
            changes[name] = {"codeformer": "CodeFormer", "gfpgan": "GFPGAN"}.get(str(value).strip().lower(), value)
        elif name in ("code_former_weight", "token_merging_ratio", "token_merging_ratio_img2img",
                      "token_merging_ratio_hr"):  # Settings.update checks the value
            changes[name] = value
    store = webui_only_changes(options, studio.settings.get("webui_options"))
    if store is not None:
        changes["webui_options"] = store
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
    """As the webui: options.scheduler is the sampler's default schedule's name ("karras"), where it has one."""
    return [{"name": s.name, "aliases": list(s.aliases),
             "options": {"scheduler": s.webui_scheduler} if s.webui_scheduler else {}} for s in samplers.SAMPLERS]


@router.get("/schedulers")
def scheduler_list() -> list[dict]:
    """The webui's twelve schedule types in its shape; clients send `name` (or `label`) as `scheduler`."""
    return [{"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": s.default_rho,
             "need_inner_model": s.need_inner_model} for s in schedules.SCHEDULES]


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


@router.get("/latent-upscale-modes")
def latent_upscale_modes() -> list[dict]:
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/prompt-styles")
def prompt_styles(studio: StudioDep) -> list[dict]:
    """The styles in the styles.csv files Darkroom reads (darkroom/text/styles.py), as the webui lists them."""
    return [style.as_a1111() for style in studio.engine.prompts.styles.styles().values()]


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
    from darkroom.metadata.infotext import parse_infotext

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
