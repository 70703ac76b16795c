"""What the routers share: the studio dependency, waiting for a job, model lookup by the names
clients use, one-line validation messages and PNG info. The routers (native, a1111, openai_api)
import this module and never each other.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from darkroom.errors import InvalidRequest, ModelNotFound
from darkroom.services.jobs import Job
from darkroom.services.studio import ModelInfo, Studio

POLL_SECONDS = 0.05  # how often a waiting request looks at its job (no thread is held while waiting)


def get_studio(request: Request) -> Studio:
    return request.app.state.studio


StudioDep = Annotated[Studio, Depends(get_studio)]


async def wait_for(job: Job) -> Job:
    """Wait for a job without blocking the event loop or holding a worker thread."""
    while not job.done_event.is_set():
        await asyncio.sleep(POLL_SECONDS)
    return job


def location(loc) -> str:
    """A pydantic error's location as `init_images.0`; a part that is not plain text is quoted.

    Locations name the client's own keys (an unknown field in a model that forbids them), so a key
    with a line break, a control character or a lone surrogate is written as Python's repr: the
    message stays one line and can be encoded as UTF-8.
    """
    parts = []
    for p in loc:
        if p in ("body", "query", "path"):
            continue
        text = str(p)
        parts.append(text if text and text.isprintable() and text.strip() == text else repr(text))
    return ".".join(parts)


def validation_message(errors) -> str:
    """pydantic/FastAPI errors as one line: `width: width 513 is not a multiple of 8 ...`."""
    parts = []
    for err in errors:
        loc = location(err.get("loc", ()))
        msg = " ".join(str(err.get("msg", "invalid")).removeprefix("Value error, ").split())
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid request: " + "; ".join(parts)


# --- models ----------------------------------------------------------------------------------------


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


# --- PNG info --------------------------------------------------------------------------------------

FORMAT_LABELS = {"a1111": "AUTOMATIC1111", "comfyui": "ComfyUI", "invokeai": "InvokeAI", "fooocus": "Fooocus",
                 "novelai": "NovelAI", "none": "none"}


def png_info_of(data: bytes, name: str) -> dict:
    from darkroom.api import pasted_schedule
    from darkroom.metadata.images import read_image_metadata
    from darkroom.metadata.infotext import request_from_infotext

    meta = read_image_metadata(data, name=name)
    label = FORMAT_LABELS.get(meta.source, meta.source)
    if meta.parameters and "Version: darkroom" in meta.parameters:
        label = "Darkroom"
    elif meta.parameters and meta.source == "a1111" and "stable-diffusion.cpp" in meta.parameters:
        label = "stable-diffusion.cpp"
    request = None
    if meta.parameters:
        try:
            request = pasted_schedule(request_from_infotext(meta.parameters)).model_dump()
        except InvalidRequest:
            request = None
    return {"format": label, "parameters": meta.parameters, "request": request, "items": meta.raw}
