"""The native /api's model library routes the web UI's welcome and Models page use: where models
go, files in the wrong folder, importing from a path (a USB drive), using a webui's folder in place."""

from __future__ import annotations

import ipaddress

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from darkroom.errors import DarkroomError
from darkroom.server.common import get_studio
from darkroom.services.studio import Studio

router = APIRouter(prefix="/api/library", tags=["native"])


class ImportBody(BaseModel):
    """Files or folders on the server's machine to copy in, checked by SHA-256 (`darkroom models import`)."""

    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(min_length=1, max_length=100)
    kind: str = "auto"


class FoldersBody(BaseModel):
    """The `models_dirs` setting: A1111/Forge or ComfyUI roots (or plain folders) used in place."""

    model_config = ConfigDict(extra="forbid")
    folders: list[str] = Field(max_length=50)


class OtherMachine(DarkroomError):
    """A server path given by a browser that is not on the server's machine."""

    status = 403
    code = "DR-ACCESS-REFUSED"


def same_machine(request: Request) -> None:
    """Paths name files on the server's machine: only a browser on that machine may give them.

    With `--listen`, a phone or another computer with the access token must not be able to copy
    arbitrary server files into the library, point the library at any folder, or learn from the
    answers which paths exist there."""
    host = request.client.host if request.client else ""
    try:
        local = ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise OtherMachine("adding models from a path works only in a browser on the machine Darkroom runs on"
                            " (the path is on that machine); there, use this page, or run `darkroom models import"
                            " PATH`")


def library_state(studio: Studio) -> dict:
    """Where checkpoints are read from and imported to, and the files found in the wrong folder."""
    from darkroom.models.starter import builtin_dirs
    from darkroom.services.model_manager import ModelManager

    manager = ModelManager(studio.home, studio.engine.library.hashes)
    builtin = {str(d) for d in builtin_dirs(studio.home)}
    misplaced = [{"name": f.path.name, "path": str(f.path), "kind": f.detection.kind if f.detection else None,
                  "reason": f.note}
                 for f in manager.files(["checkpoint"], lora_bases=False) if f.note]
    return {"checkpoints_folder": str(studio.home.checkpoints),
            "folders": [str(d) for d in manager.folders("checkpoint") if str(d) not in builtin],
            "models_dirs": list(studio.settings.get("models_dirs") or []),
            "misplaced": misplaced, "importing": studio.importing}


@router.get("")
def library(studio: Studio = Depends(get_studio)) -> dict:
    return library_state(studio)


@router.post("/import", status_code=202, dependencies=[Depends(same_machine)])
def start_import(body: ImportBody, studio: Studio = Depends(get_studio)) -> dict:
    """Start copying model files in; GET /api/library/import follows it."""
    studio.import_models(body.paths, kind=body.kind)
    return {"importing": studio.importing}


@router.get("/import")
def import_state(studio: Studio = Depends(get_studio)) -> dict:
    """The running or last import: label, bytes done of total, and each file's outcome when it ends."""
    return {"importing": studio.importing}


@router.put("/folders", dependencies=[Depends(same_machine)])
def set_folders(body: FoldersBody, studio: Studio = Depends(get_studio)) -> dict:
    studio.set_models_dirs(body.folders)
    return library_state(studio)
