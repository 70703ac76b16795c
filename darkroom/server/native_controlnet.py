"""The native /api's ControlNet routes the web UI's ControlNet section uses: what can be picked
(models and preprocessors, with whether each can run here) and a preview of a detected control map."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from darkroom.server.common import get_studio
from darkroom.server.control_units import check_module, model_rows, module_rows, run_detect
from darkroom.server.uploads import decode_base64_image
from darkroom.services.studio import Studio

router = APIRouter(prefix="/api/controlnet", tags=["native"])


class ControlModel(BaseModel):
    name: str
    title: str = Field(description='The A1111 title, "name [hash8]".')
    family: str | None
    path: str
    kind: str = Field("ControlNet", description='"ControlNet" or "T2I-Adapter".')
    union_types: int | None = Field(None, description="A ControlNet Union model's number of control types (6, or 8"
                                                      " for promax): pick one per unit; null for other models.")


class ControlModule(BaseModel):
    name: str
    label: str
    model_free: bool = Field(description="Runs with no ControlNet model (e.g. reference-only).")
    sliders: list = Field(description="The extension's slider configs (processor_res, threshold_a/b).")
    available: bool = Field(description="Its weight files are present (or it needs none).")
    problem: str | None = Field(description="Why it cannot run here (the missing file), else null.")


class ControlListing(BaseModel):
    models: list[ControlModel]
    modules: list[ControlModule]


class DetectBody(BaseModel):
    """A picture to turn into a control map; images as base64 or data: URLs."""

    model_config = ConfigDict(extra="forbid")
    module: str = Field(min_length=1, max_length=200)
    image: str
    mask: str | None = None
    resolution: int = Field(512, ge=64, le=4096)
    threshold_a: float = -1
    threshold_b: float = -1


class DetectAnswer(BaseModel):
    image: str = Field(description="The control map as a data:image/png;base64 URL.")
    pose: dict | None = Field(None, description="What a pose module found, as the A1111 extension's OpenPose JSON"
                                                " (x and y as fractions of the map); null for other modules.")


@router.get("")
def listing(studio: Studio = Depends(get_studio)) -> ControlListing:
    return ControlListing(models=model_rows(studio), modules=module_rows(studio))


@router.post("/detect")
def detect(body: DetectBody, studio: Studio = Depends(get_studio)) -> DetectAnswer:
    """Run a preprocessor (sync: the threadpool keeps the event loop free while it works)."""
    check_module(body.module, "module")
    image = decode_base64_image(body.image, field="image")
    mask = decode_base64_image(body.mask, field="mask") if body.mask else None
    poses: list[dict] = []
    png = run_detect(body.module, image, mask=mask, resolution=body.resolution, threshold_a=body.threshold_a,
                     threshold_b=body.threshold_b, studio=studio, poses=poses)
    return DetectAnswer(image="data:image/png;base64," + base64.b64encode(png).decode("ascii"),
                        pose=poses[0] if poses else None)
