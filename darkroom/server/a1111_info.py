"""The rest of the webui's /sdapi/v1 lists and small routes, answered in the webui's shapes.

Clients ask for these at start-up and loop over the answer to fill dropdowns (webuiapi's
get_hypernetworks, get_face_restorers, get_scripts; SillyTavern and the Photoshop plugin list
scripts and extensions): a 404 there hands them an error object where they expect a list. So each
answers with what Darkroom really has: nothing for hypernetworks and extensions, the models whose
files are found for face restorers, and the scripts list names exactly the scripts Darkroom runs
(the X/Y/Z plot, SD upscale).
Shapes: the webui's modules/api/models.py and api.py (v1.10).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from darkroom.errors import InvalidRequest
from darkroom.server.a1111_scripts import script_info as scripts_info
from darkroom.server.a1111_scripts import script_names
from darkroom.server.common import StudioDep

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])


@router.get("/hypernetworks")
def hypernetworks() -> list[dict]:
    """Darkroom loads no hypernetworks (the webui's items are {name, path})."""
    return []


@router.get("/face-restorers")
def face_restorers(studio: StudioDep) -> list[dict]:
    """The face restorers usable now ({name, cmd_dir} each): those whose model and detector files are found."""
    return studio.engine.faces.available()


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    """The scripts each tab runs (webuiapi asks at start-up to see which it may use)."""
    return script_names()


@router.get("/script-info")
def script_info(studio: StudioDep) -> list[dict[str, Any]]:
    """Each script's arguments in `script_args` order, with labels, defaults and the axis and upscaler choices."""
    from darkroom.services.sd_upscale import upscaler_names

    return scripts_info(upscaler_names(studio.engine.upscalers))


@router.get("/extensions")
def extensions() -> list[dict]:
    """Darkroom runs no webui extensions ({name, remote, branch, commit_hash, version, commit_date, enabled})."""
    return []


@router.post("/refresh-embeddings")
def refresh_embeddings(studio: StudioDep) -> None:
    """Rescan the embeddings folders now (new and changed files are read; the next list shows them)."""
    studio.engine.embeddings.scan()


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str | None = ""
    model: str | None = "clip"


@router.post("/interrogate")
def interrogate(body: InterrogateRequest) -> dict:
    """Captioning needs a CLIP interrogator or DeepDanbooru model, which Darkroom does not ship (nothing is
    downloaded at run time), so the request is refused with the reason instead of a 404."""
    raise InvalidRequest(f"interrogate (model {body.model!r}) is not available: it needs a captioning model"
                         " (CLIP interrogator, BLIP or DeepDanbooru) that Darkroom does not ship or download;"
                         " write the prompt yourself, or read one from an image with /sdapi/v1/png-info")
