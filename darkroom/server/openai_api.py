"""OpenAI-compatible image generation (/v1/images/generations, /v1/images/edits, /v1/models).

Open WebUI, SillyTavern, LibreChat and the official `openai` client speak it. Like the webui
API this only translates to a `GenerationRequest` and joins the one job queue. Errors are in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) so that the clients raise
their usual exceptions (BadRequestError, NotFoundError, ...) with a readable message; the
route class below renders them, since app-wide handlers answer in Darkroom's own shape.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

import pydantic
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.request import GenerationRequest
from darkroom.server.common import StudioDep, find_model, location, validation_message, wait_for
from darkroom.server.uploads import open_image, read_upload
from darkroom.services.jobs import ERROR, Job
from darkroom.services.studio import Studio

log = logging.getLogger("darkroom.server.openai")

MAX_N = 10
_SIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


class OpenAIError(DarkroomError):
    """An error to render in OpenAI's shape; `param` names the request field at fault."""

    code = "DR-INVALID-REQUEST"

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.status = status
        self.param = param


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    # OpenAI answers invalid values with 400, where FastAPI and Darkroom use 422; `code` is Darkroom's DR-...
    status = 400 if status == 422 else status
    kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


class OpenAIRoute(APIRoute):
    """Renders this router's errors (bad body, DarkroomError, crash) in OpenAI's error shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def handle(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as e:
                first = next(iter(e.errors()), {})
                return openai_error(400, validation_message(e.errors()), location(first.get("loc", ())) or None,
                                    "DR-INVALID-REQUEST")
            except OpenAIError as e:
                return openai_error(e.status, str(e), e.param, e.code)
            except DarkroomError as e:
                return openai_error(e.status, str(e), code=e.code)
            except StarletteHTTPException as e:  # FastAPI's own: a body that is not JSON (b"\x80"), ...
                return openai_error(e.status_code, str(e.detail))
            except Exception as e:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return openai_error(500, f"internal error: {type(e).__name__} (details in logs/darkroom.log)",
                                    code="DR-INTERNAL")

        return handle


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


class ImageGenerationRequest(BaseModel):
    """OpenAI's images.generate body; fields we have no use for (quality, style, user, ...) are ignored.

    OpenAI has no seed or steps; Darkroom also reads the GenerationRequest fields below when
    sent (the openai client's `extra_body`), so a caller can reproduce an image or go faster.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str  # empty or blank: refused by _check_common in OpenAI's shape; bad text by GenerationRequest
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = None
    response_format: str = "url"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    # Darkroom extensions; None = GenerationRequest's default
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None


EXTENSIONS = ("negative_prompt", "seed", "steps", "cfg_scale", "sampler", "schedule")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"WxH" -> (W, H); None or "auto" -> the model's native size (None, None)."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = _SIZE_RE.match(size)
    if not match:
        raise OpenAIError(f"size {size!r} is not WIDTHxHEIGHT (e.g. 512x512)", param="size")
    return int(match[1]), int(match[2])


def _check_common(body: ImageGenerationRequest) -> None:
    if not body.prompt.strip():
        raise OpenAIError("prompt must not be empty", param="prompt")
    if body.response_format not in ("url", "b64_json"):
        raise OpenAIError(f"response_format {body.response_format!r} must be 'url' or 'b64_json'",
                          param="response_format")


def _build(body: ImageGenerationRequest, studio: Studio, **fields: Any) -> GenerationRequest:
    """A library checkpoint named by `model` is used; other names (dall-e-3, ...) get the current model."""
    width, height = parse_size(body.size)
    # no rescan: most clients send an OpenAI model name here, which is expected to miss
    model = find_model(studio, body.model, rescan=False) if body.model else None
    extra = {k: getattr(body, k) for k in EXTENSIONS if getattr(body, k) is not None}
    try:
        return GenerationRequest(prompt=body.prompt, width=width, height=height, batch_size=body.n,
                                 model=model.path if model else None, **extra, **fields)
    except pydantic.ValidationError as e:
        error = next(iter(e.errors()))
        field = str(error["loc"][0]) if error["loc"] else None
        message = str(error["msg"]).removeprefix("Value error, ")
        if field in ("width", "height"):
            raise OpenAIError(f"size {body.size!r}: {message}", param="size") from None
        raise OpenAIError(f"{field}: {message}" if field else message, param=field) from None


def to_generation_request(body: ImageGenerationRequest, studio: Studio) -> GenerationRequest:
    _check_common(body)
    return _build(body, studio)


def _finished_or_error(job: Job) -> Job:
    if job.state == ERROR:
        status = getattr(job, "error_status", None) or 500
        raise OpenAIError(job.error or "the generation failed (details in logs/darkroom.log)", status=status,
                          code=job.error_code or "DR-INTERNAL")
    if not job.images:
        raise OpenAIError("the generation was interrupted before any image was finished", status=409,
                          code="DR-INTERRUPTED")
    return job


async def _run(make: Callable[[], GenerationRequest], response_format: str, request: Request,
               studio: Studio) -> dict:
    """Queue one job of batch size n and answer in OpenAI's shape.

    "url" saves the images (history links); "b64_json" writes nothing.
    """
    private = response_format == "b64_json"

    def submit() -> Job:
        return studio.queue.submit(make(), private=private, source="openai")

    job = _finished_or_error(await wait_for(await run_in_threadpool(submit)))
    data: list[dict[str, Any]] = []
    for n, im in enumerate(job.images):
        if private:
            data.append({"b64_json": base64.b64encode(im.png).decode("ascii"), "revised_prompt": None})
        else:
            path = f"api/images/{im.history_id}" if im.history_id else f"api/jobs/{job.id}/images/{n}"
            data.append({"url": f"{request.base_url}{path}", "revised_prompt": None})
    req = job.request
    return {"created": int(job.finished or time.time()), "data": data, "output_format": "png",
            "size": f"{req.width}x{req.height}" if req.width and req.height else None}


@router.post("/images/generations")
async def generate(body: ImageGenerationRequest, request: Request, studio: StudioDep) -> dict:
    return await _run(lambda: to_generation_request(body, studio), body.response_format, request, studio)


# --- edits: img2img and inpainting ------------------------------------------------------------------------


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of OpenAI's images.edit form, plus Darkroom's extensions.

    `strength` (alias `denoising_strength`) is how far the edit may move from the image (0.75);
    `inpainting_fill` and `mask_blur` are the webui's inpainting settings.
    """

    strength: float | None = Field(None, ge=0.0, le=1.0)
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)
    inpainting_fill: int | None = Field(None, ge=0, le=3)
    mask_blur: int | None = Field(None, ge=0, le=64)


def _png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _transparent(image):
    """255 where the image is fully transparent (alpha 0), else 0."""
    return image.convert("RGBA").getchannel("A").point(lambda v: 255 if v == 0 else 0)


def edit_mask(image_data: bytes, mask_data: bytes | None) -> tuple[bytes | None, bool]:
    """OpenAI's mask as Darkroom's (white = repaint), and whether it came from the image's own transparency.

    OpenAI edits where the mask is fully transparent (alpha 0); a mask without an alpha channel
    is read as Darkroom's own (white = repaint). Without a mask, the image's fully transparent
    pixels are the area to edit, as for OpenAI's dall-e-2; an opaque image is edited as a whole.
    """
    from PIL import ImageOps

    try:
        image = ImageOps.exif_transpose(open_image(image_data, name="image"))
    except InvalidRequest as e:
        raise OpenAIError(str(e), status=e.status, param="image", code=e.code) from None
    if mask_data is None:
        mask = _transparent(image) if _has_alpha(image) else None
        return (_png(mask), True) if mask is not None and mask.getbbox() else (None, False)
    try:
        source = ImageOps.exif_transpose(open_image(mask_data, name="mask"))
    except InvalidRequest as e:
        raise OpenAIError(str(e), status=e.status, param="mask", code=e.code) from None
    if _has_alpha(source):
        mask = _transparent(source)
        if mask.getbbox() is None:
            raise OpenAIError("mask: no pixel is fully transparent, so there is nothing to edit (transparent ="
                              " the area to edit)", param="mask")
    else:
        mask = source.convert("L").point(lambda v: 255 if v >= 128 else 0)
        if mask.getbbox() is None:
            raise OpenAIError("mask: it is all black, so there is nothing to edit (use a PNG whose transparent"
                              " pixels, or white ones, mark the area to edit)", param="mask")
    return _png(mask), False


def edit_request(body: ImageEditRequest, image: bytes, mask: bytes | None, studio: Studio) -> GenerationRequest:
    _check_common(body)
    strength = body.strength if body.strength is not None else body.denoising_strength
    repaint, from_alpha = edit_mask(image, mask)
    fields: dict[str, Any] = {"init_image": image, "denoising_strength": 0.75 if strength is None else strength}
    if repaint is not None:
        # transparent pixels hide what was there: fill the hole from around it; else start from the original
        fill = body.inpainting_fill if body.inpainting_fill is not None else 0 if from_alpha else 1
        fields.update(mask=repaint, inpainting_fill=fill)
        if body.mask_blur is not None:
            fields["mask_blur"] = body.mask_blur
    return _build(body, studio, **fields)


async def _read(part, param: str) -> bytes:
    try:
        return await read_upload(part)
    except InvalidRequest as e:
        raise OpenAIError(str(e), status=e.status, param=param) from None


def _file_parts(form, *names: str) -> list:
    parts = [v for name in names for v in form.getlist(name)]
    for part in parts:
        if isinstance(part, str):
            raise OpenAIError(f"{names[0]} must be an uploaded file (multipart/form-data), not text", param=names[0])
    return parts


_EDIT_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "The picture to edit (also sent as image[])."},
        "mask": {"type": "string", "format": "binary",
                 "description": "PNG whose fully transparent pixels mark the area to edit."},
        **{name: {"type": kind} for name, kind in (
            ("prompt", "string"), ("model", "string"), ("n", "integer"), ("size", "string"),
            ("response_format", "string"), ("strength", "number"), ("negative_prompt", "string"),
            ("seed", "integer"), ("steps", "integer"), ("cfg_scale", "number"), ("sampler", "string"),
            ("schedule", "string"), ("inpainting_fill", "integer"), ("mask_blur", "integer"))},
    }}}}}}


@router.post("/images/edits", openapi_extra=_EDIT_FORM)
async def edit(request: Request, studio: StudioDep) -> dict:
    """OpenAI's images.edit: multipart `image` (or `image[]`), optional `mask`, `prompt`, `n`, `size`, ...

    Without `size` the result has the image's own size (rounded down to 8 pixels).
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise OpenAIError("send the edit as multipart/form-data with an `image` file", param="image")
    try:
        form = await request.form(max_files=8, max_fields=100)
    except StarletteHTTPException as e:  # a malformed form, too many parts, ...
        raise OpenAIError(f"could not read the form: {e.detail}", status=e.status_code) from None
    try:
        images = _file_parts(form, "image", "image[]")
        masks = _file_parts(form, "mask")
        if not images:
            raise OpenAIError("image is required: the picture to edit (PNG, JPEG or WebP)", param="image")
        if len(images) > 1:
            raise OpenAIError(f"one image per edit is supported (got {len(images)})", param="image")
        if len(masks) > 1:
            raise OpenAIError("only one mask may be sent", param="mask")
        text = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        try:
            body = ImageEditRequest(**text)
        except pydantic.ValidationError as e:
            first = next(iter(e.errors()), {})
            param = location(first.get("loc", ())) or None
            raise OpenAIError(validation_message(e.errors()), param=param) from None
        image = await _read(images[0], "image")
        mask = await _read(masks[0], "mask") if masks else None
    finally:
        await form.close()
    return await _run(lambda: edit_request(body, image, mask, studio), body.response_format, request, studio)


def _model_row(name: str, path: str) -> dict[str, Any]:
    try:
        created = int(os.path.getmtime(path))
    except OSError:
        created = 0
    return {"id": name, "object": "model", "created": created, "owned_by": "darkroom"}


@router.get("/models")
def models(studio: StudioDep) -> dict:
    return {"object": "list", "data": [_model_row(m.name, m.path) for m in studio.models() if not m.error]}


@router.get("/models/{model_id:path}")  # ids may hold a slash ("org/model", as some OpenAI-style servers name them)
def model(model_id: str, studio: StudioDep) -> dict:
    found = find_model(studio, model_id)
    if found is None:
        raise OpenAIError(f"no model {model_id!r}; GET /v1/models lists them", status=404, param="model")
    return _model_row(found.name, found.path)

