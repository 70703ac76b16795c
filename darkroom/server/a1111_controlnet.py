"""The sd-webui-controlnet extension's own routes (/controlnet/*), in its shapes, so clients written
for the webui with that extension (webuiapi's controlnet_* calls, Krita and Photoshop plug-ins)
list models and preprocessors and detect control maps unchanged. Units in txt2img/img2img bodies
are translated in darkroom/server/control_units.py."""

from __future__ import annotations

import base64
import io

from fastapi import APIRouter, Body, Depends
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from darkroom.control_unit import MAX_UNITS
from darkroom.errors import InvalidRequest
from darkroom.server.common import get_studio
from darkroom.server.control_units import check_module, controlnet_files, model_titles, run_detect
from darkroom.server.uploads import decode_base64_image
from darkroom.services.studio import Studio

router = APIRouter(prefix="/controlnet", tags=["a1111-controlnet"])

API_VERSION = 2  # the extension's external_code.get_api_version(): clients check it before sending units
MAX_DETECT_IMAGES = 16
MAX_RENDER_PIXELS = 4096 * 4096

# the extension's control types: (type, words that pick its preprocessors and models, default preprocessor); the
# default is the extension's except where Darkroom runs another of the type's preprocessors and not that one
CONTROL_TYPES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("All", (), "none"),
    ("Canny", ("canny",), "canny"),
    ("Depth", ("depth",), "depth_midas"),
    ("NormalMap", ("normal",), "normal_bae"),
    ("OpenPose", ("openpose",), "openpose"),
    ("MLSD", ("mlsd",), "mlsd"),
    ("Lineart", ("lineart",), "lineart_standard (from white bg & black line)"),
    ("SoftEdge", ("softedge", "hed", "pidi"), "softedge_hed"),
    ("Scribble/Sketch", ("scribble", "sketch"), "scribble_xdog"),
    ("Segmentation", ("seg",), "seg_ofade20k"),
    ("Shuffle", ("shuffle",), "shuffle"),
    ("Tile/Blur", ("tile", "blur"), "tile_resample"),
    ("Inpaint", ("inpaint",), "inpaint_only"),
    ("InstructP2P", ("ip2p",), "none"),
    ("Reference", ("reference",), "reference_only"),
    ("IP-Adapter", ("ip-adapter", "ip_adapter"), "ip-adapter_clip_sd15"),  # darkroom.control.ipadapter
    # t2iadapter_* models, t2ia_* preprocessors (darkroom.control.adapter; the style one: control.vision_prompt)
    ("T2I-Adapter", ("t2i", "clip_vision"), "none"),
    ("Revision", ("revision",), "revision_clipvision"),  # model-free (darkroom.control.vision_prompt)
    ("Instant-ID", ("instant_id",), "instant_id_face_embedding"),  # its IP-Adapter, then its ControlNet
)


class DetectBody(BaseModel):
    """The extension's /controlnet/detect body; webuiapi sends the images as `controlnet_images`."""

    model_config = ConfigDict(extra="ignore")
    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field([], max_length=MAX_DETECT_IMAGES)
    controlnet_images: list[str] = Field([], max_length=MAX_DETECT_IMAGES)
    controlnet_masks: list[str] = Field([], max_length=MAX_DETECT_IMAGES)
    controlnet_processor_res: int = Field(-1, ge=-1, le=4096)
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    low_vram: bool = False


@router.get("/version")
def version() -> dict:
    return {"version": API_VERSION}


@router.get("/model_list")
def model_list(update: bool = True, studio: Studio = Depends(get_studio)) -> dict:
    """Titles "name [hash8]"; like the extension, "None" is not listed. The folders are read on every call."""
    return {"model_list": model_titles(controlnet_files(studio))}


@router.get("/module_list")
def module_list(alias_names: bool = False) -> dict:
    """{"module_list": [...], "module_detail": {name: {"model_free", "sliders"}}}, as the extension answers."""
    from darkroom.control.preprocess import module_list as modules

    return modules(alias_names=alias_names)


@router.get("/settings")
def settings() -> dict:
    return {"control_net_unit_count": MAX_UNITS}


@router.get("/control_types")
def control_types(studio: Studio = Depends(get_studio)) -> dict:
    """Preprocessors and models grouped by kind (the extension's UI filter), matched by name."""
    from darkroom.control.preprocess import module_list as modules

    names = modules(alias_names=False)["module_list"]
    titles = model_titles(controlnet_files(studio))
    out = {}
    for kind, words, default in CONTROL_TYPES:
        def pick(items: list[str], words=words) -> list[str]:
            return [x for x in items if not words or any(w in x.lower() for w in words)]

        chosen_modules = pick(names)
        chosen_models = pick(titles)
        if words and "none" in names and "none" not in chosen_modules:
            chosen_modules = ["none", *chosen_modules]
        out[kind] = {"module_list": chosen_modules, "model_list": ["None", *chosen_models],
                     "default_option": default if default in chosen_modules else "none",
                     "default_model": chosen_models[0] if words and chosen_models else "None"}
    return {"control_types": out}


@router.post("/detect")
def detect(body: DetectBody, studio: Studio = Depends(get_studio)) -> dict:
    """Control maps of the images: {"images": [base64 PNG], "info": "Success"}, as the extension answers; the
    pose modules add "poses", one OpenPose JSON per image (darkroom.control.annotators.poses)."""
    check_module(body.controlnet_module, "controlnet_module")  # first, as the extension answers
    images = body.controlnet_input_images or body.controlnet_images
    if not images:
        raise InvalidRequest("controlnet_input_images: no image selected")
    if body.controlnet_masks and len(body.controlnet_masks) != len(images):
        raise InvalidRequest(f"controlnet_masks: one mask per image ({len(images)} images,"
                             f" {len(body.controlnet_masks)} masks)")
    field = "controlnet_input_images" if body.controlnet_input_images else "controlnet_images"
    resolution = 512 if body.controlnet_processor_res == -1 else body.controlnet_processor_res
    out: list[str] = []
    poses: list[dict] = []
    for i, value in enumerate(images):
        image = decode_base64_image(value, field=f"{field}[{i}]")
        mask = (decode_base64_image(body.controlnet_masks[i], field=f"controlnet_masks[{i}]")
                if body.controlnet_masks else None)
        png = run_detect(body.controlnet_module, image, mask=mask, resolution=resolution,
                         threshold_a=body.controlnet_threshold_a, threshold_b=body.controlnet_threshold_b,
                         studio=studio, field="controlnet_module", image_field=f"{field}[{i}]",
                         mask_field=f"controlnet_masks[{i}]", poses=poses)
        out.append(base64.b64encode(png).decode("ascii"))
    answer: dict = {"info": "Success"}
    if poses:
        answer["poses"] = poses
    answer["images"] = out
    return answer


@router.post("/render_openpose_json")
def render_openpose_json(body: list[dict] = Body([], max_length=MAX_DETECT_IMAGES)) -> dict:
    """Pose JSON (what /controlnet/detect returned, or an editor changed) drawn as openpose maps:
    {"images": [base64 PNG], "info": "Success"}, as the extension answers."""
    from darkroom.control.annotators.poses import PoseSet

    if not body:
        return {"info": "No pose data detected."}
    images = []
    for i, pose in enumerate(body):
        canvas = PoseSet.from_json(pose, f"pose[{i}]")
        if canvas.height * canvas.width > MAX_RENDER_PIXELS:
            raise InvalidRequest(f"pose[{i}]: a {canvas.width}x{canvas.height} canvas is larger than"
                                 f" {MAX_RENDER_PIXELS >> 20} megapixels")
        buffer = io.BytesIO()
        Image.fromarray(canvas.render()).save(buffer, format="PNG")
        images.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return {"images": images, "info": "Success"}
