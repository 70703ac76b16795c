"""The webui's Extras over /sdapi/v1: upscaling one image or a batch (the Photoshop and Krita plugins'
upscale buttons, webuiapi's extra_single_image / extra_batch_images), and the upscaler listings.

Request and response shapes are the webui's (modules/api/models.py: ExtrasBaseRequest, ...). The
upscale itself is darkroom.upscale (the webui's scale, crop and blend rules); it runs in a worker
thread so the server keeps answering, after its memory need was checked against what is free.
Face restoration (gfpgan/codeformer visibility > 0, darkroom/faces) runs after the upscale, GFPGAN
then CodeFormer: the order of the webui's postprocessing scripts (Upscale 1000, GFPGAN 2000,
CodeFormer 3000), which since v1.0 ignores the API's `upscale_first`.
"""

from __future__ import annotations

import html
from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from darkroom.engine import memory
from darkroom.errors import InvalidRequest
from darkroom.server.a1111_requests import _b64
from darkroom.server.common import StudioDep
from darkroom.server.uploads import decode_base64_image, open_image
from darkroom.services.studio import Studio
from darkroom.upscale import NONE, RESIZERS, Extras, Resize, encode_extras_png, postprocessing_text

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
MAX_BATCH = 64
"""Images in one /extra-batch-images request (each one is decoded and kept until the answer)."""


class ExtrasBase(BaseModel):
    resize_mode: Literal[0, 1] = Field(0, description="0: upscale by upscaling_resize; 1: to upscaling_resize_w x _h.")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: float = Field(2, gt=0, le=16, allow_inf_nan=False)
    upscaling_resize_w: int = Field(512, ge=1, le=32768)
    upscaling_resize_h: int = Field(512, ge=1, le=32768)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False

    def faces(self) -> list[tuple[str, float, float | None]]:
        """(model, visibility, CodeFormer weight) of each face restoration asked for, in the webui's order."""
        steps: list[tuple[str, float, float | None]] = []
        if self.gfpgan_visibility > 0:
            steps.append(("GFPGAN", self.gfpgan_visibility, None))
        if self.codeformer_visibility > 0:
            steps.append(("CodeFormer", self.codeformer_visibility, self.codeformer_weight))
        return steps

    def extras(self) -> Extras:
        resize = Resize(self.resize_mode, self.upscaling_resize, self.upscaling_resize_w, self.upscaling_resize_h,
                        self.upscaling_crop)
        return Extras(resize, self.upscaler_1, self.upscaler_2, self.extras_upscaler_2_visibility)


class ExtrasSingleImage(ExtrasBase):
    image: str = Field("", description="The image, base64 (plain or a data: URL).")


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImages(ExtrasBase):
    imageList: list[FileData] = Field(..., max_length=MAX_BATCH)  # noqa: N815 (the webui's name)


def _html(text: str) -> str:
    """The webui's plaintext_to_html: lines escaped and joined by <br>, in one paragraph."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _admit(studio: Studio, sizes: list[tuple[int, int]], extras: Extras) -> None:
    """Refuse (422) an upscale that would not fit in the free memory, naming the largest scale that would."""
    ups = studio.engine.upscalers
    device = studio.engine.cache.device.device
    free = memory.available_memory(device)
    if free is None:
        return
    names = [extras.upscaler_1] + ([extras.upscaler_2] if extras.blends else [])

    def need(w: int, h: int, scale: float) -> int:
        return sum(ups.working_bytes(w, h, scale, name) for name in names)

    for w, h in sizes:
        scale = extras.resize.factor(_Size(w, h))
        if need(w, h, scale) <= free:
            continue
        fits = [s / 2 for s in range(int(scale * 2) - 1, 1, -1) if need(w, h, s / 2) <= free]
        where = "this machine" if device.type in ("cpu", "mps") else "the GPU"
        hint = f"at most x{fits[0]:g} fits" if fits else "a smaller image or a lighter upscaler may fit"
        raise InvalidRequest(f"upscaling {w}x{h} by {scale:g} needs about {memory.human_gb(need(w, h, scale))} of"
                             f" memory; {where} has {memory.human_gb(free)} free: {hint}")


class _Size:
    """What Resize.factor reads of an image."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height


def _run(studio: Studio, items: list[tuple[str, str]], extras: Extras,
         faces: list[tuple[str, float, float | None]] = ()) -> tuple[list[str], str]:
    """Decode, check, upscale, restore faces and encode every image (in a worker thread); the last one's info
    as HTML."""
    from darkroom.metadata.images import read_image_metadata

    ups = studio.engine.upscalers
    extras = Extras(extras.resize, ups.canonical(extras.upscaler_1),
                    ups.canonical(extras.upscaler_2) if extras.blends else NONE, extras.visibility)
    extras.check()
    for name, _, _ in faces:
        studio.engine.faces.check(name)  # missing files: a 422 naming them, before any work
    decoded = []
    for field, value in items:
        data = decode_base64_image(value, field=field)
        decoded.append((data, open_image(data, name=field)))
    _admit(studio, [im.size for _, im in decoded], extras)
    images, text = [], ""
    for data, image in decoded:
        result, info = ups.postprocess(image, extras)
        for name, visibility, weight in faces:
            result = studio.engine.faces.restore(result, name, weight=weight, visibility=visibility)
            info[f"{name} visibility"] = round(visibility, 3)  # the webui's postprocessing keys
            if weight is not None:
                info["CodeFormer weight"] = round(weight, 3)
        text = postprocessing_text(info)
        try:
            parameters = read_image_metadata(data).parameters
        except Exception:  # metadata is kept when it can be read; a picture without any is fine
            parameters = None
        images.append(_b64(encode_extras_png(result, parameters, info)))
    return images, _html(text)


@router.post("/extra-single-image")
async def extra_single_image(body: ExtrasSingleImage, studio: StudioDep) -> dict:
    """Upscale one image: {"image": base64 PNG, "html_info": the postprocessing text as HTML}."""
    images, info = await run_in_threadpool(_run, studio, [("image", body.image)], body.extras(), body.faces())
    return {"html_info": info, "image": images[0]}


@router.post("/extra-batch-images")
async def extra_batch_images(body: ExtrasBatchImages, studio: StudioDep) -> dict:
    """Upscale every image of imageList (same settings): {"images": [...], "html_info": ...}."""
    if not body.imageList:
        raise InvalidRequest("imageList: give at least one image ({\"data\": base64, \"name\": file name})")
    items = [(f"imageList.{i}" + (f" ({f.name})" if f.name else ""), f.data) for i, f in enumerate(body.imageList)]
    images, info = await run_in_threadpool(_run, studio, items, body.extras(), body.faces())
    return {"html_info": info, "images": images}


@router.get("/upscalers")
def upscalers(studio: StudioDep) -> list[dict]:
    """None, Lanczos, Nearest, then the upscaler model files found, in the webui's shape."""
    builtins = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": scale}
                for name, scale in ((NONE, 1), *((r, 4) for r in RESIZERS))]
    return builtins + [f.to_webui() for f in studio.engine.upscalers.files()]


@router.get("/realesrgan-models")
def realesrgan_models(studio: StudioDep) -> list[dict]:
    """The Real-ESRGAN files found (the webui's RealESRGAN folder, or its built-in files by name)."""
    return [{"name": f.name, "path": str(f.path), "scale": f.scale}
            for f in studio.engine.upscalers.files() if f.realesrgan]
