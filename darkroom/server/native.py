"""The native /api the web UI speaks: jobs with live progress (server-sent events), history, models."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import darkroom
from darkroom.control_unit import MAX_UNITS
from darkroom.engine import samplers
from darkroom.engine.admission import Limits
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.request import GenerationRequest
from darkroom.server.common import get_studio, png_info_of
from darkroom.server.control_units import NativeUnit, native_units
from darkroom.server.uploads import decode_base64_image, read_upload
from darkroom.services.history import HistoryItem
from darkroom.services.jobs import Job, JobNotFound
from darkroom.services.studio import Studio

router = APIRouter(prefix="/api", tags=["native"])


class XYAxes(BaseModel):
    """Axes as "name=values" in the webui's X/Y plot syntax, e.g. "steps=10-30 (+10)"."""

    model_config = ConfigDict(extra="forbid")
    x: str | None = None
    y: str | None = None


class JobRequest(GenerationRequest):
    """A generation request plus how to treat its output; images come as base64 or data: URLs."""

    model_config = ConfigDict(extra="forbid")
    private: bool = False  # nothing written to disk or history
    init_image: str | None = None  # type: ignore[assignment]
    mask: str | None = None  # type: ignore[assignment]
    xy: XYAxes | None = None  # an X/Y grid over this request
    controlnet: list[NativeUnit] = Field([], max_length=MAX_UNITS)  # type: ignore[assignment]

    def to_request(self, studio: Studio | None = None) -> GenerationRequest:
        # only the fields the client sent: a preset fills the ones it left out (model_fields_set)
        data = self.model_dump(exclude={"private", "init_image", "mask", "xy", "controlnet"}, exclude_unset=True)
        if self.controlnet:  # images decoded, models resolved to library files (darkroom/server/control_units.py)
            if studio is None:
                raise InvalidRequest("controlnet: units need the server's model library")
            data["controlnet"] = native_units(self.controlnet, studio, img2img=bool(self.init_image))
        if self.init_image:
            data["init_image"] = decode_base64_image(self.init_image, field="init_image")
        if self.mask:
            data["mask"] = decode_base64_image(self.mask, field="mask")
        return GenerationRequest(**data)


class SelectModel(BaseModel):
    model: str


def job_state(job: Job, studio: Studio, viewer: str | None = None, *, owner: bool = True) -> dict:
    """A job as the UI shows it. A private job seen by anyone but its owner (`owner=False` and a
    `viewer` that is not the client that sent it) is only its progress: no prompt, images or id."""
    mine = viewer is not None and bool(job.client) and hmac.compare_digest(viewer, job.client or "")
    if job.private and not owner and not mine:
        return private_job_state(job, studio)
    images = []
    for n, im in enumerate(job.images):
        url = f"/api/images/{im.history_id}" if im.history_id else f"/api/jobs/{job.id}/images/{n}"
        images.append({"url": url, "seed": im.seed, "infotext": im.infotext, "history_id": im.history_id})
    return {
        "id": job.id, "state": job.state, "position": studio.queue.position(job), "step": job.step,
        "steps": job.steps, "phase": job.phase, "batch": job.batch, "batches": job.batches,
        "progress": round(job.progress, 4),
        "eta": None if job.eta is None else round(job.eta, 1), "private": job.private, "source": job.source,
        "preview_url": f"/api/jobs/{job.id}/preview?rev={job.preview_rev}" if job.preview_png else None,
        "grid_url": (f"/api/images/{job.grid_history_id}" if job.grid_history_id
                     else f"/api/jobs/{job.id}/grid" if job.grid_png else None),
        "images": images, "error": job.error, "error_code": job.error_code, "request": job.request.describe(),
        "model_name": job.model_name,
        **progress_fields(job), "mine": mine,
    }


def progress_fields(job: Job) -> dict:
    """What every viewer may know of a job's progress: its stage and how many of its images are done."""
    return {"stage": job.stage, "images_done": len(job.images), "images_total": job.images_total}


def private_alias(job: Job) -> str:
    return "private-" + hashlib.sha256(job.id.encode()).hexdigest()[:16]


def private_job_state(job: Job, studio: Studio) -> dict:
    """Someone else's private job: where the queue is, nothing about what it makes. The id is an
    alias that opens nothing (the real id is what reads a job)."""
    return {"id": private_alias(job), "state": job.state, "position": studio.queue.position(job), "step": job.step,
            "steps": job.steps, "phase": job.phase, "batch": job.batch, "batches": job.batches,
            "progress": round(job.progress, 4), "eta": None if job.eta is None else round(job.eta, 1),
            "private": True, "source": job.source, "preview_url": None, "grid_url": None, "images": [],
            "error": None, "request": None, "model_name": None, **progress_fields(job), "mine": False}


def history_item(item: HistoryItem) -> dict:
    from darkroom.metadata.infotext import request_from_infotext

    try:
        request = request_from_infotext(item.infotext).model_dump() if item.infotext else None
    except DarkroomError:
        request = None
    return {"id": item.id, "url": f"/api/images/{item.id}", "created": item.created, "prompt": item.prompt,
            "negative_prompt": item.negative_prompt, "seed": item.seed, "width": item.width, "height": item.height,
            "model": item.model, "sampler": item.sampler, "steps": item.steps, "cfg_scale": item.cfg_scale,
            "infotext": item.infotext, "request": request, "favourite": item.favourite,
            "thumb_url": f"/api/history/{item.id}/thumb",
            # an img2img image's source and inpainting mask, kept with it ("Use these settings" restores them)
            "source_url": f"/api/history/{item.id}/source" if item.source else None,
            "mask_url": f"/api/history/{item.id}/mask" if item.mask else None}


def card_of(path: str | Path) -> dict | None:
    """The model card beside a model file (NAME.json, NAME.civitai.info: darkroom.models.cards); None if none."""
    from darkroom.models.cards import read_card

    card = read_card(Path(path))
    return None if card.empty and not card.problems else card.to_dict()


def model_rows(studio: Studio, refresh: bool = False) -> list[dict]:
    """Checkpoints as the UI lists them; `builtin` marks Darkroom's own (the 128-px starter)."""

    from darkroom.models.starter import builtin_dirs

    builtin = [d.resolve() for d in builtin_dirs(studio.home)]
    return [{"name": m.name, "title": m.title, "family": m.family, "size": m.size, "hash": m.hash,
             "native_size": m.native_size, "current": m.current, "error": m.error, "path": m.path,
             "builtin": Path(m.path).resolve().parent in builtin,
             "preview_url": f"/api/models/{quote(m.name)}/preview" if m.preview else None, "card": card_of(m.path)}
            for m in studio.models(refresh=refresh)]


@router.get("/status")
def status(studio: Studio = Depends(get_studio)) -> dict:
    device = studio.engine.cache.device
    return {"version": darkroom.__version__, "device": str(device.device), "precision": device.precision,
            "current_model": studio.current_model(),
            "queue": {"pending": studio.queue.pending(), "running": studio.queue.current is not None},
            "history": studio.history.count(), "hashing": studio.hashing,
            "limits": Limits.from_settings(studio.settings).as_dict()}  # the web UI's input maxima (docs/limits.md)


@router.get("/models")
def models(studio: Studio = Depends(get_studio)) -> list[dict]:
    return model_rows(studio)


@router.get("/models/{name}/preview", responses={200: {"content": {"image/*": {}}}})
def model_preview(name: str, studio: Studio = Depends(get_studio)) -> FileResponse:
    """A model's preview image; only files found beside a listed model are ever served."""
    from darkroom.services.history import NotFound

    for m in studio.models():
        if m.name == name and m.preview:
            return FileResponse(m.preview, headers={"cache-control": "private, max-age=3600"})
    raise NotFound(f"no preview image for model {name!r}")


@router.post("/models/rescan")
def rescan(studio: Studio = Depends(get_studio)) -> list[dict]:
    return model_rows(studio, refresh=True)


@router.post("/models/select")
def select(body: SelectModel, studio: Studio = Depends(get_studio)) -> list[dict]:
    studio.select_model(body.model)
    return model_rows(studio)


@router.get("/samplers")
def sampler_list() -> list[dict]:
    return [{"name": s.name, "aliases": list(s.aliases), "schedules": ["Automatic", *s.schedules]}
            for s in samplers.SAMPLERS]


@router.get("/loras")
def lora_list(studio: Studio = Depends(get_studio)) -> list[dict]:
    """LoRA files with the trigger words their training recorded (`ss_tag_frequency`) and their model card
    (activation text and preferred weight, which the UI's picker adds with the LoRA, as the webui does)."""
    return [{"name": e.name, "alias": e.alias or e.name, "trigger_words": e.trigger_words, "base": e.base_model,
             "hash": e.short_hash, "error": e.error, "card": card_of(e.path)} for e in studio.engine.loras.list()]


@router.get("/embeddings")
def embedding_list(studio: Studio = Depends(get_studio)) -> dict:
    data = studio.embeddings()
    return {"loaded": [{"name": n, "vectors": e.get("vectors")} for n, e in data["loaded"].items()],
            "skipped": [{"name": n, "reason": e.get("error") or "does not fit the loaded model"}
                        for n, e in data["skipped"].items()]}


@router.get("/vaes")
def vae_list(studio: Studio = Depends(get_studio)) -> list[str]:
    return [e.name for e in studio.engine.vaes.scan()]


@router.get("/xy/axes")
def xy_axes() -> list[dict]:
    from darkroom.services.xyplot import AXES

    examples = {int: "10,20,30", float: "1.5-7.5 (+1.5)", str: "a,b"}
    return [{"name": a.name, "field": a.field, "example": examples.get(a.kind, "")} for a in AXES]


@router.get("/schedules")
def schedule_list() -> list[str]:
    return list(samplers.SCHEDULE_NAMES)


@router.get("/presets")
def preset_list() -> list[dict]:
    """Few-step presets for a job's `preset` field ("auto" detects one from the model and LoRAs)."""
    from darkroom.engine.presets import PRESETS

    return [p.to_dict() for p in PRESETS]


@router.get("/styles")
def style_list(studio: Studio = Depends(get_studio)) -> list[dict]:
    """Prompt styles for a job's `styles` field: the webui's styles.csv files (darkroom/text/styles.py)."""
    return [{**s.as_a1111(), "description": s.description, "file": str(s.path)}
            for s in studio.engine.prompts.styles.styles().values()]


class TokensBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field("", max_length=100_000)
    steps: int = Field(20, ge=1, le=10_000)


@router.post("/tokens")
def tokens(body: TokensBody) -> dict:
    """The prompt token counter: {tokens, chunks, limit} as the webui counts them (darkroom/text/token_count.py)."""
    from darkroom.text.token_count import count_tokens

    return count_tokens(body.text, body.steps)


@router.get("/wildcards")
def wildcard_list(studio: Studio = Depends(get_studio)) -> dict:
    """The `__name__` wildcards a prompt can use, and the folders they are read from."""
    wildcards = studio.engine.prompts.wildcards
    return {"names": wildcards.names(), "folders": [str(d) for d in wildcards.dirs()]}


@router.post("/jobs", status_code=202)
def submit(body: JobRequest, studio: Studio = Depends(get_studio),
           client: str | None = Header(None, alias="x-darkroom-client", max_length=64)) -> dict:
    """Queue a job. The web UI sends its per-tab id in X-Darkroom-Client, and the event stream it
    opens with the same id shows it its private jobs in full (everyone else sees their progress)."""
    xy = (body.xy.x or None, body.xy.y or None) if body.xy else None
    job = studio.queue.submit(body.to_request(studio), private=body.private, source="ui", xy=xy, client=client)
    return {"job": job_state(job, studio)}


@router.get("/jobs/{job_id}")
def job(job_id: str, studio: Studio = Depends(get_studio)) -> dict:
    return job_state(studio.queue.get(job_id), studio)


@router.post("/jobs/{job_id}/interrupt")
def interrupt_job(job_id: str, studio: Studio = Depends(get_studio)) -> dict:
    return job_state(studio.queue.interrupt(job_id), studio)


@router.get("/queue")
def queue_listing(studio: Studio = Depends(get_studio), client: str | None = Query(None, max_length=64)) -> dict:
    """Every job in the queue (running, waiting in order, the last few that ended), from any tab or API
    client, shown to `client` (the web UI's per-tab id) as the event stream shows them."""
    queue = studio.queue
    return {"pending": queue.pending(), "running": queue.current is not None,
            "jobs": [job_state(j, studio, client, owner=False) for j in queue.listing()]}


@router.post("/queue/{job_ref}/cancel")
def cancel_queued(job_ref: str, studio: Studio = Depends(get_studio),
                  client: str | None = Header(None, alias="x-darkroom-client", max_length=64)) -> dict:
    """Drop a waiting job, or stop the running one, by its id or the alias a private job is listed under
    (the alias stops the job but opens nothing of it)."""
    queue = studio.queue
    job = next((j for j in queue.listing(finished=0) if job_ref in (j.id, private_alias(j))), None)
    if job is None:
        raise JobNotFound(f"no job {job_ref!r} is waiting or running")
    queue.interrupt(job.id)
    return job_state(job, studio, client, owner=False)


@router.post("/skip")
def skip_current(studio: Studio = Depends(get_studio)) -> dict:
    """Abandon the running job's current batch and go on with its next one."""
    job = studio.queue.skip()
    return {"skipped": job is not None}  # no id: the running job may be someone's private one


@router.post("/interrupt")
def interrupt_current(studio: Studio = Depends(get_studio)) -> dict:
    job = studio.queue.interrupt()
    return {"interrupted": job.id if job else None}


@router.get("/jobs/{job_id}/preview", responses={200: {"content": {"image/png": {}}}})
def preview(job_id: str, studio: Studio = Depends(get_studio)) -> Response:
    job = studio.queue.get(job_id)
    if not job.preview_png:
        return Response(status_code=204)
    return Response(job.preview_png, media_type="image/png", headers={"cache-control": "no-store"})


@router.get("/jobs/{job_id}/grid", responses={200: {"content": {"image/png": {}}}})
def job_grid(job_id: str, studio: Studio = Depends(get_studio)) -> Response:
    job = studio.queue.get(job_id)
    if not job.grid_png:
        raise JobNotFound(f"job {job_id} has no grid")
    return Response(job.grid_png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})


@router.get("/jobs/{job_id}/images/{n}", responses={200: {"content": {"image/png": {}}}})
def job_image(job_id: str, n: int, studio: Studio = Depends(get_studio)) -> Response:
    job = studio.queue.get(job_id)
    if not 0 <= n < len(job.images):
        raise JobNotFound(f"job {job_id} has no image {n}")
    return Response(job.images[n].png, media_type="image/png", headers={"cache-control": "private, max-age=3600"})


@router.get("/events")
async def events(request: Request, studio: Studio = Depends(get_studio),
                 client: str | None = Query(None, max_length=64)) -> StreamingResponse:
    """Server-sent events: `job` (a JobState) whenever a job changes, `queue` with the counts.
    `client` is the web UI's per-tab id: private jobs are shown in full only to the client that
    sent them."""
    queue = studio.queue

    def state(job: Job) -> dict:
        return job_state(job, studio, client, owner=False)

    def frame(event: str, data: dict) -> str:
        return f"event: {event}\ndata: {json.dumps(data)}\n\n"

    async def stream():
        last = queue.version
        yield "retry: 1000\n\n"
        yield frame("queue", {"pending": queue.pending(), "running": queue.current is not None})
        if queue.current is not None:
            yield frame("job", state(queue.current))
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            version = queue.version
            if version != last:
                for job in queue.jobs():
                    if job.rev > last:
                        yield frame("job", state(job))
                yield frame("queue", {"pending": queue.pending(), "running": queue.current is not None})
                last = version
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 15:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
            await asyncio.sleep(0.15)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


@router.get("/history")
def history(q: str = "", page: int = Query(1, ge=1), per_page: int = Query(24, ge=1, le=500),
            favourites: bool = False, studio: Studio = Depends(get_studio)) -> dict:
    """Newest first; `q` words match prompt, negative prompt, model, sampler or the seed."""
    total, items = studio.history.search(q, page=page, per_page=per_page, favourites=favourites)
    return {"total": total, "page": page, "per_page": per_page, "items": [history_item(i) for i in items]}


class Favourite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    favourite: bool


class DeleteMany(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ids: list[int] = Field(min_length=1, max_length=500)


@router.post("/history/delete")
def delete_many(body: DeleteMany, studio: Studio = Depends(get_studio)) -> dict:
    """Delete several images in one request (links are removed, never what they point to)."""
    deleted, missing = studio.history.delete_many(body.ids)
    return {"deleted": deleted, "missing": missing}


@router.put("/history/{item_id}/favourite")
def favourite(item_id: int, body: Favourite, studio: Studio = Depends(get_studio)) -> dict:
    return history_item(studio.history.set_favourite(item_id, body.favourite))


@router.get("/history/{item_id}/thumb", responses={200: {"content": {"image/webp": {}}}})
def thumb(item_id: int, studio: Studio = Depends(get_studio),
          if_none_match: str | None = Header(None)) -> Response:
    """A small WebP of a history image (made once, cached on disk); revalidated by its ETag."""
    path = studio.history.thumbnail(studio.history.get(item_id))
    st = path.stat()
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    headers = {"cache-control": "private, no-cache", "etag": etag}
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type="image/webp", headers=headers)


_SOURCE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}


@router.get("/history/{item_id}/source", responses={200: {"content": {"image/*": {}}}})
def history_source(item_id: int, studio: Studio = Depends(get_studio)) -> FileResponse:
    """The source image an img2img history image was made from (404 when it has none)."""
    path = studio.history.source_file(studio.history.get(item_id), "source")
    return FileResponse(path, media_type=_SOURCE_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"cache-control": "private, max-age=86400"})  # named by its hash: never changes


@router.get("/history/{item_id}/mask", responses={200: {"content": {"image/*": {}}}})
def history_mask(item_id: int, studio: Studio = Depends(get_studio)) -> FileResponse:
    """The inpainting mask an inpainted history image was made with (404 when it has none)."""
    path = studio.history.source_file(studio.history.get(item_id), "mask")
    return FileResponse(path, media_type=_SOURCE_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"cache-control": "private, max-age=86400"})


@router.get("/history/{item_id}")
def history_one(item_id: int, studio: Studio = Depends(get_studio)) -> dict:
    return history_item(studio.history.get(item_id))


@router.delete("/history/{item_id}")
def delete(item_id: int, studio: Studio = Depends(get_studio)) -> dict:
    studio.history.delete(item_id)
    return {"deleted": item_id}


@router.get("/images/{item_id}", responses={200: {"content": {"image/png": {}}}})
def image(item_id: int, studio: Studio = Depends(get_studio)) -> FileResponse:
    item = studio.history.get(item_id)
    path = studio.history.file_of(item)
    media = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(path.suffix.lower(), "image/png")
    return FileResponse(path, media_type=media, headers={"cache-control": "private, max-age=86400"})


@router.post("/png-info")
async def png_info(file: UploadFile = File(...)) -> dict:
    data = await read_upload(file)
    return png_info_of(data, file.filename or "upload")
