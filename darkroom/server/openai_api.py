"""OpenAI-compatible image generation (/v1/images/generations, /v1/models).

Open WebUI, SillyTavern, LibreChat and the official `openai` client speak it. Like the webui
API this only translates to a `GenerationRequest` and joins the one job queue. Errors are in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`) so that the clients raise
their usual exceptions (BadRequestError, NotFoundError, ...) with a readable message; the
route class below renders them, since app-wide handlers answer in Darkroom's own shape.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from darkroom.errors import DarkroomError
from darkroom.jobs import ERROR, Job
from darkroom.request import GenerationRequest
from darkroom.server.a1111 import find_model, wait_for
from darkroom.server.native import get_studio
from darkroom.studio import Studio

log = logging.getLogger("darkroom.server.openai")

MAX_N = 10
_SIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")
StudioDep = Annotated[Studio, Depends(get_studio)]


class OpenAIError(DarkroomError):
    """An error to render in OpenAI's shape; `param` names the request field at fault."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def openai_error(status: int, message: str, param: str | None = None) -> JSONResponse:
    # OpenAI answers invalid values with 400, where FastAPI and Darkroom use 422
    status = 400 if status == 422 else status
    kind = "server_error" if status >= 500 else "authentication_error" if status == 401 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
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
                loc = [str(p) for p in first.get("loc", ()) if p != "body"]
                from darkroom.server.app import validation_message

                return openai_error(400, validation_message(e.errors()), ".".join(loc) or None)
            except OpenAIError as e:
                return openai_error(e.status, str(e), e.param)
            except DarkroomError as e:
                return openai_error(e.status, str(e))
            except Exception as e:
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                return openai_error(500, f"internal error: {type(e).__name__} (details in logs/darkroom.log)")

        return handle


router = APIRouter(prefix="/v1", tags=["openai"], route_class=OpenAIRoute)


class ImageGenerationRequest(BaseModel):
    """OpenAI's images.generate body; fields we have no use for (quality, style, user, ...) are ignored.

    OpenAI has no seed or steps; Darkroom also reads the GenerationRequest fields below when
    sent (the openai client's `extra_body`), so a caller can reproduce an image or go faster.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., min_length=1)
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


def to_generation_request(body: ImageGenerationRequest, studio: Studio) -> GenerationRequest:
    """A library checkpoint named by `model` is used; other names (dall-e-3, ...) get the current model."""
    if not body.prompt.strip():
        raise OpenAIError("prompt must not be empty", param="prompt")
    if body.response_format not in ("url", "b64_json"):
        raise OpenAIError(f"response_format {body.response_format!r} must be 'url' or 'b64_json'",
                          param="response_format")
    width, height = parse_size(body.size)
    # no rescan: most clients send an OpenAI model name here, which is expected to miss
    model = find_model(studio, body.model, rescan=False) if body.model else None
    extra = {k: getattr(body, k) for k in EXTENSIONS if getattr(body, k) is not None}
    try:
        return GenerationRequest(prompt=body.prompt, width=width, height=height, batch_size=body.n,
                                 model=model.path if model else None, **extra)
    except pydantic.ValidationError as e:
        error = next(iter(e.errors()))
        field = str(error["loc"][0]) if error["loc"] else None
        message = str(error["msg"]).removeprefix("Value error, ")
        if field in ("width", "height"):
            raise OpenAIError(f"size {body.size!r}: {message}", param="size") from None
        raise OpenAIError(f"{field}: {message}" if field else message, param=field) from None


def _finished_or_error(job: Job) -> Job:
    if job.state == ERROR:
        status = getattr(job, "error_status", None) or 500
        raise OpenAIError(job.error or "the generation failed (details in logs/darkroom.log)", status=status)
    if not job.images:
        raise OpenAIError("the generation was interrupted before any image was finished", status=409)
    return job


@router.post("/images/generations")
async def generate(body: ImageGenerationRequest, request: Request, studio: StudioDep) -> dict:
    """One job of batch size n. "url" saves the images (history links); "b64_json" writes nothing."""
    private = body.response_format == "b64_json"

    def submit() -> Job:
        return studio.queue.submit(to_generation_request(body, studio), private=private, source="openai")

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


def _model_row(name: str, path: str) -> dict[str, Any]:
    try:
        created = int(os.path.getmtime(path))
    except OSError:
        created = 0
    return {"id": name, "object": "model", "created": created, "owned_by": "darkroom"}


@router.get("/models")
def models(studio: StudioDep) -> dict:
    return {"object": "list", "data": [_model_row(m.name, m.path) for m in studio.models() if not m.error]}


@router.get("/models/{model_id}")
def model(model_id: str, studio: StudioDep) -> dict:
    found = find_model(studio, model_id)
    if found is None:
        raise OpenAIError(f"no model {model_id!r}; GET /v1/models lists them", status=404, param="model")
    return _model_row(found.name, found.path)

