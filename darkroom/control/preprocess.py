"""Preprocessors ("annotators"): a user's picture to a control map, as the sd-webui-controlnet extension makes it.

Module names, display labels, slider defaults and the /controlnet/module_list shape are the extension's,
so A1111 clients work unchanged; the maps follow its formulas (darkroom/control/annotators). Nets load
only from local files (`annotator_dirs`); what Darkroom cannot run says so and how to go on.
`fit` and `pixel_perfect_resolution` are the extension's rules for meeting the generation size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from darkroom.control.annotators import files, simple
from darkroom.control.annotators.fit import fit, pixel_perfect_resolution
from darkroom.control.annotators.imageops import hwc3, short_side_size
from darkroom.errors import InvalidRequest, TooLarge
from darkroom.home import Home, is_folder

__all__ = ["MODULES", "annotator_dirs", "canonical_module", "detect", "fit", "module_list", "module_status",
           "pixel_perfect_resolution", "thresholds"]

MAX_WORK_PIXELS = 4096 * 4096
"""The largest picture a preprocessor works on after its resolution resize (the nets need gigabytes there)."""
MAX_INPUT_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class Slider:
    """One slider of the extension's UI, as /controlnet/module_list describes it."""

    name: str
    value: float
    min: float
    max: float
    step: float = 0.01

    def api_json(self) -> dict:
        return {"name": self.name, "value": self.value, "min": self.min, "max": self.max, "step": self.step}


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)


@dataclass(frozen=True)
class Module:
    """A preprocessor Darkroom runs. `run(img, res, a, b, ctx)` gets the uint8 picture at its input size."""

    name: str  # the extension's key (module_list)
    label: str  # its display name (module_list?alias_names=true)
    run: Callable
    sliders: tuple[Slider | None, Slider | None] = (None, None)
    uses_resolution: bool = True
    resolution_slider: bool = True  # shown in module_detail (the extension hides shuffle's)
    priority: int = 0  # the extension's sorting_priority: higher first
    weights: tuple[tuple[str, str], ...] = ()  # (file, the extension's downloads sub-folder)
    needs_mask: bool = False
    colour_fix: bool = False  # the extension also fixes the result's colours while sampling (annotators.tile)
    model_free: bool = False  # runs with no ControlNet model (the reference modules, darkroom.control.reference)
    face_pack: str | None = None  # the InsightFace pack folder it needs too (annotators.insightface: FaceID)
    resolution: Slider = RESOLUTION  # its resolution slider (softedge_anyline's defaults to 1280)


@dataclass
class _Context:
    mask: np.ndarray | None
    dirs: Sequence[Path]
    seed: int
    device: str | None = None
    poses: list | None = None  # where the pose modules put their PoseSet (annotators.poses)


def _hed(scribble: bool, safe: bool) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import hed

        return hed.detect(img, res, ctx.dirs, safe=safe, scribble=scribble, device=ctx.device)
    return run


def _lineart(kind: str) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import lineart

        return lineart.detect(img, res, ctx.dirs, kind, device=ctx.device)
    return run


def _openpose(hand: bool = False, face: bool = False, body: bool = True) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import openpose

        return openpose.detect(img, res, ctx.dirs, device=ctx.device, hand=hand, face=face, body=body,
                               found=ctx.poses)
    return run


def _dw_openpose(img, res, a, b, ctx):
    from darkroom.control.annotators import dwpose

    return dwpose.detect(img, res, ctx.dirs, found=ctx.poses)


def _animal_openpose(img, res, a, b, ctx):
    from darkroom.control.annotators import dwpose

    return dwpose.detect_animals(img, res, ctx.dirs, found=ctx.poses)


def _depth_anything(v2: bool) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import depth

        return depth.detect(img, res, ctx.dirs, device=ctx.device, v2=v2)
    return run


def _depth_leres(img, res, a, b, ctx):
    from darkroom.control.annotators import leres

    return leres.detect(img, res, ctx.dirs, a, b, device=ctx.device)


def _depth_zoe(img, res, a, b, ctx):
    from darkroom.control.annotators import zoe

    return zoe.detect(img, res, ctx.dirs, device=ctx.device)


def _oneformer(kind: str) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import oneformer

        return oneformer.detect(img, res, ctx.dirs, kind, device=ctx.device)
    return run


def _picture(img, res, a, b, ctx):
    return img


_CLIP_H, _CLIP_G, _CLIP_L = "clip_h.pth", "clip_g.pth", "clip_vitl.pth"


def _face_keypoints(img, res, a, b, ctx):
    from darkroom.control.annotators import instantid

    return instantid.keypoints_map(img, ctx.dirs)


def _segmentation(img, res, a, b, ctx):
    from darkroom.control.annotators import uniformer

    return uniformer.detect(img, res, ctx.dirs, device=ctx.device)


def _depth_midas(img, res, a, b, ctx):
    from darkroom.control.annotators import depth

    return depth.detect_midas(img, res, ctx.dirs, device=ctx.device)


def _normal_midas(img, res, a, b, ctx):
    from darkroom.control.annotators import depth

    return depth.detect_midas_normal(img, res, ctx.dirs, a, device=ctx.device)


def _normal_dsine(img, res, a, b, ctx):
    from darkroom.control.annotators import dsine

    return dsine.detect(img, res, ctx.dirs, fov=a, iterations=int(b), device=ctx.device)


def _normal_bae(img, res, a, b, ctx):
    from darkroom.control.annotators import normalbae

    return normalbae.detect(img, res, ctx.dirs, device=ctx.device)


def _mlsd(img, res, a, b, ctx):
    from darkroom.control.annotators import mlsd

    return mlsd.detect(img, res, ctx.dirs, a, b, device=ctx.device)


def _pidinet(scribble: bool, safe: bool, sketch: bool = False) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import pidinet

        return pidinet.detect(img, res, ctx.dirs, safe=safe, scribble=scribble, sketch=sketch, device=ctx.device)
    return run


def _teed(img, res, a, b, ctx):
    from darkroom.control.annotators import teed

    return teed.detect(img, res, ctx.dirs, safe_steps=int(a), device=ctx.device)


def _anyline(img, res, a, b, ctx):
    from darkroom.control.annotators import teed

    return teed.detect_anyline(img, res, ctx.dirs, safe_steps=int(a), device=ctx.device)


def _manga_line(img, res, a, b, ctx):
    from darkroom.control.annotators import manga_line

    return manga_line.detect(img, res, ctx.dirs, device=ctx.device)


def _densepose(cmap: str) -> Callable:
    def run(img, res, a, b, ctx):
        from darkroom.control.annotators import densepose

        return densepose.detect(img, res, ctx.dirs, cmap=cmap, device=ctx.device)

    return run


def _anime_face(img, res, a, b, ctx):
    from darkroom.control.annotators import anime_face

    return anime_face.detect(img, res, ctx.dirs, device=ctx.device)


def _inpaint(img, res, a, b, ctx):
    return simple.inpaint(img, ctx.mask)


_HED = (("ControlNetHED.pth", "hed"),)
_PIDI = (("table5_pidinet.pth", "pidinet"),)
_BODY = ("body_pose_model.pth", "openpose")
_VARIATION = Slider("Variation", 8.0, 3.0, 32.0, 1.0)
_SAFE_STEPS = Slider("Safe Steps", 2, 0, 10, 1)
_FIDELITY = Slider("Style Fidelity (only for Balanced mode)", 0.5, 0.0, 1.0)
MODULES: dict[str, Module] = {m.name: m for m in (
    Module("none", "none", lambda img, res, a, b, ctx: img, uses_resolution=False, priority=10),
    Module("invert", "invert (from white bg & black line)", lambda img, res, a, b, ctx: simple.invert(img),
           uses_resolution=False, priority=20),
    Module("canny", "canny", lambda img, res, a, b, ctx: simple.canny(img, res, a, b),
           (Slider("Low Threshold", 100, 1, 255, 1), Slider("High Threshold", 200, 1, 255, 1)), priority=100),
    Module("threshold", "threshold", lambda img, res, a, b, ctx: simple.threshold(img, res, a),
           (Slider("Binarization Threshold", 127, 0, 255), None)),
    Module("scribble_xdog", "scribble_xdog", lambda img, res, a, b, ctx: simple.scribble_xdog(img, res, a),
           (Slider("XDoG Threshold", 32, 1, 64), None)),
    Module("lineart_standard", "lineart_standard (from white bg & black line)",
           lambda img, res, a, b, ctx: simple.lineart_standard(img, res), priority=100),
    Module("tile_resample", "tile_resample", lambda img, res, a, b, ctx: simple.tile_resample(img, a),
           (Slider("Down Sampling Rate", 1.0, 1.0, 8.0), None), uses_resolution=False, priority=100),
    # the map is the picture; the colour fix acts on the latents while sampling (annotators.tile)
    Module("tile_colorfix", "tile_colorfix", lambda img, res, a, b, ctx: img, (_VARIATION, None),
           uses_resolution=False, colour_fix=True),
    Module("tile_colorfix+sharp", "tile_colorfix+sharp", lambda img, res, a, b, ctx: img,
           (_VARIATION, Slider("Sharpness", 1.0, 0.0, 2.0)), uses_resolution=False, colour_fix=True),
    Module("blur_gaussian", "blur_gaussian", lambda img, res, a, b, ctx: simple.blur_gaussian(img, res, a),
           (Slider("Sigma", 9.0, 0.01, 64.0), None)),
    Module("color", "t2ia_color_grid", lambda img, res, a, b, ctx: simple.color_grid(img, res)),
    Module("recolor_luminance", "recolor_luminance",
           lambda img, res, a, b, ctx: simple.recolor_luminance(img, a),
           (Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001), None), uses_resolution=False, priority=100),
    Module("recolor_intensity", "recolor_intensity", lambda img, res, a, b, ctx: simple.recolor_intensity(img, a),
           (Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001), None), uses_resolution=False),
    Module("shuffle", "shuffle", lambda img, res, a, b, ctx: simple.shuffle(img, res, ctx.seed),
           resolution_slider=False),
    Module("inpaint", "inpaint_global_harmonious", _inpaint, uses_resolution=False, needs_mask=True),
    Module("inpaint_only", "inpaint_only", _inpaint, uses_resolution=False, priority=100, needs_mask=True),
    # the same map; LaMa's fill is made while preparing the unit (darkroom.control.inpaint_only)
    Module("inpaint_only+lama", "inpaint_only+lama", _inpaint, uses_resolution=False, needs_mask=True,
           weights=(("ControlNetLama.pth", "lama"),)),
    Module("hed", "softedge_hed", _hed(False, False), weights=_HED),
    Module("hed_safe", "softedge_hedsafe", _hed(False, True), weights=_HED),
    Module("scribble_hed", "scribble_hed", _hed(True, False), weights=_HED),
    # the extension hides PiDiNet's resolution slider; the map still comes at the unit's resolution
    Module("pidinet", "softedge_pidinet", _pidinet(False, False), resolution_slider=False, priority=100,
           weights=_PIDI),
    Module("pidinet_safe", "softedge_pidisafe", _pidinet(False, True), resolution_slider=False, weights=_PIDI),
    Module("pidinet_scribble", "scribble_pidinet", _pidinet(True, False), resolution_slider=False, priority=100,
           weights=_PIDI),
    Module("pidinet_sketch", "t2ia_sketch_pidi", _pidinet(False, False, sketch=True), resolution_slider=False,
           weights=_PIDI),
    # the extension's newer preprocessor registry: key and label are both softedge_teed (old key: te_hed)
    Module("softedge_teed", "softedge_teed", _teed, (_SAFE_STEPS, None), weights=(("7_model.pth", "TEED"),)),
    Module("softedge_anyline", "softedge_anyline", _anyline, (_SAFE_STEPS, None), weights=(("MTEED.pth", "TEED"),),
           resolution=Slider("Resolution", 1280, 64, 2048, 8)),
    Module("mlsd", "mlsd", _mlsd, (Slider("MLSD Value Threshold", 0.1, 0.01, 2.0),
                                   Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0)),
           priority=100, weights=(("mlsd_large_512_fp32.pth", "mlsd"),)),
    Module("lineart", "lineart_realistic", _lineart("realistic"), weights=(("sk_model.pth", "lineart"),)),
    Module("lineart_coarse", "lineart_coarse", _lineart("coarse"), weights=(("sk_model2.pth", "lineart"),)),
    Module("lineart_anime", "lineart_anime", _lineart("anime"), weights=(("netG.pth", "lineart_anime"),)),
    # the extension hides its resolution slider; the map still comes at the unit's resolution
    Module("lineart_anime_denoise", "lineart_anime_denoise", _manga_line, resolution_slider=False,
           weights=(("erika.pth", "manga_line"),)),
    Module("openpose", "openpose", _openpose(), weights=(_BODY,)),
    # the extension hides the resolution slider of all but openpose and openpose_full
    Module("openpose_hand", "openpose_hand", _openpose(hand=True), resolution_slider=False,
           weights=(_BODY, ("hand_pose_model.pth", "openpose"))),
    Module("openpose_face", "openpose_face", _openpose(face=True), resolution_slider=False,
           weights=(_BODY, ("facenet.pth", "openpose"))),
    Module("openpose_faceonly", "openpose_faceonly", _openpose(face=True, body=False), resolution_slider=False,
           weights=(_BODY, ("facenet.pth", "openpose"))),
    Module("openpose_full", "openpose_full", _openpose(hand=True, face=True), priority=100,
           weights=(_BODY, ("hand_pose_model.pth", "openpose"), ("facenet.pth", "openpose"))),
    # ONNX graphs run by onnxruntime on the CPU, as the extension runs them on the CPU through OpenCV
    Module("dw_openpose_full", "dw_openpose_full", _dw_openpose,
           weights=(("yolox_l.onnx", "openpose"), ("dw-ll_ucoco_384.onnx", "openpose"))),
    Module("animal_openpose", "animal_openpose", _animal_openpose,
           weights=(("yolox_l.onnx", "openpose"),
                    ("rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx", "openpose"))),
    Module("depth", "depth_midas", _depth_midas, priority=100,
           weights=(("dpt_hybrid-midas-501f0c75.pt", "midas"),)),
    # the extension hides depth_anything's and normal_bae's resolution slider; the map still comes at the unit's
    # resolution
    Module("depth_anything", "depth_anything", _depth_anything(False), resolution_slider=False,
           weights=(("depth_anything_vitl14.pth", "depth_anything"),)),
    # found under its other names too (files.ALSO_AS: the .pth ComfyUI keeps, the ViT-B and ViT-S files)
    Module("depth_anything_v2", "depth_anything_v2", _depth_anything(True), resolution_slider=False,
           weights=(("depth_anything_v2_vitl.safetensors", "depth_anything_v2"),)),
    Module("anime_face_segment", "seg_anime_face", _anime_face, weights=(("UNet.pth", "anime_face_segment"),)),
    Module("densepose", "densepose (pruple bg & purple torso)", _densepose("viridis"),  # the extension's spelling
           weights=(("densepose_r50_fpn_dl.torchscript", "densepose"),)),
    Module("densepose_parula", "densepose_parula (black bg & blue torso)", _densepose("parula"),
           weights=(("densepose_r50_fpn_dl.torchscript", "densepose"),)),
    Module("segmentation", "seg_ufade20k", _segmentation, weights=(("upernet_global_small.pth", "uniformer"),)),
    # the extension hides OneFormer's resolution slider; the map still comes at the unit's resolution
    Module("oneformer_ade20k", "seg_ofade20k", _oneformer("ade20k"), resolution_slider=False, priority=100,
           weights=(("250_16_swin_l_oneformer_ade20k_160k.pth", "oneformer"),)),
    Module("oneformer_coco", "seg_ofcoco", _oneformer("coco"), resolution_slider=False,
           weights=(("150_16_swin_l_oneformer_coco_100ep.pth", "oneformer"),)),
    Module("depth_leres", "depth_leres", _depth_leres,
           (Slider("Remove Near %", 0, 0, 100, 0.1), Slider("Remove Background %", 0, 0, 100, 0.1)),
           weights=(("res101.pth", "leres"),)),
    Module("depth_zoe", "depth_zoe", _depth_zoe, weights=(("ZoeD_M12_N.pt", "zoedepth"),)),
    Module("normal_map", "normal_midas", _normal_midas, (Slider("Normal Background Threshold", 0.4, 0.0, 1.0), None),
           weights=(("dpt_hybrid-midas-501f0c75.pt", "midas"),)),
    Module("normal_dsine", "normal_dsine", _normal_dsine,
           (Slider("Fov", 60, 0, 360, 0.1), Slider("Iterations", 5, 1, 20, 1)),
           weights=(("dsine.pt", "normal_dsine"),)),
    Module("normal_bae", "normal_bae", _normal_bae, resolution_slider=False, priority=100,
           weights=(("scannet.pt", "normal_bae"),)),
    # IP-Adapter: the picture itself; the unit embeds it with the CLIP vision tower (darkroom.control.ipadapter)
    Module("ip-adapter_clip_sd15", "ip-adapter_clip_h", _picture, uses_resolution=False, priority=100,
           weights=((_CLIP_H, "clip_vision"),)),
    Module("ip-adapter_clip_sdxl", "ip-adapter_clip_g", _picture, uses_resolution=False,
           weights=((_CLIP_G, "clip_vision"),)),
    Module("ip-adapter_clip_sdxl_plus_vith", "ip-adapter_clip_sdxl_plus_vith", _picture, uses_resolution=False,
           weights=((_CLIP_H, "clip_vision"),)),
    Module("ip-adapter-auto", "ip-adapter-auto", _picture, uses_resolution=False),
    # FaceID: InsightFace's embedding of the largest face (annotators.insightface), + CLIP ViT-H for Plus
    Module("ip-adapter_face_id", "ip-adapter_face_id", _picture, uses_resolution=False, face_pack="buffalo_l"),
    Module("ip-adapter_face_id_plus", "ip-adapter_face_id_plus", _picture, uses_resolution=False,
           weights=((_CLIP_H, "clip_vision"),), face_pack="buffalo_l"),
    # InstantID (annotators.instantid, on antelopev2): the face for its IP-Adapter, the keypoints for its ControlNet
    Module("instant_id_face_embedding", "instant_id_face_embedding", _picture, uses_resolution=False,
           face_pack="antelopev2"),
    Module("instant_id_face_keypoints", "instant_id_face_keypoints", _face_keypoints, uses_resolution=False,
           face_pack="antelopev2"),
    # CLIP vision into the prompt's conditioning (darkroom.control.vision_prompt): the T2I-Adapter style model's
    # input, and SDXL's model-free ReVision
    Module("clip_vision", "t2ia_style_clipvision", _picture, uses_resolution=False,
           weights=((_CLIP_L, "clip_vision"),)),
    *(Module(name, name, _picture, (Slider("Noise Augmentation", 0.0, 0.0, 1.0), None), uses_resolution=False,
             priority=100 if name == "revision_clipvision" else 0, model_free=True, weights=((_CLIP_G, "clip_vision"),))
      for name in ("revision_clipvision", "revision_ignore_prompt")),
    # model-free: the picture itself, VAE-encoded while sampling (darkroom.control.reference)
    *(Module(name, name, _picture, (_FIDELITY, None), uses_resolution=False,
             priority=100 if name == "reference_only" else 0, model_free=True)
      for name in ("reference_only", "reference_adain", "reference_adain+attn")),
)}

# The extension's v1.0 names that map onto a module it still has.
_OLD_NAMES = {"fake_scribble": "scribble_hed",  # v1.0: HED made into a scribble
              "te_hed": "softedge_teed",  # the key of its first, since retired, registry entry
              "manga_line": "lineart_anime_denoise"}  # v1.0's name of the same net

# What the extension offers and Darkroom cannot run yet: key -> display name.
_NOT_YET = {
    "depth_leres++": "depth_leres++",
    "depth_hand_refiner": "depth_hand_refiner", "mediapipe_face": "mediapipe_face",
}

_ADVICE = {
    "depth_leres++": "its multi-resolution merge is not built; use depth_leres (the same network, one pass)",
}


def _lookup() -> dict[str, str]:
    table = {}
    for m in MODULES.values():
        table[m.name.lower()] = m.name
        table[m.label.lower()] = m.name
    for old, new in _OLD_NAMES.items():
        table[old] = new
    return table


def canonical_module(name: str) -> str:
    """The extension's key of a preprocessor given by key, display name or old name (any case).

    One Darkroom cannot run yet, or an unknown name, is an InvalidRequest that says what to do instead."""
    text = str(name or "none").strip()
    key = _lookup().get(text.lower())
    if key is not None:
        return key
    lowered = text.lower()
    for k, label in _NOT_YET.items():
        if lowered in (k.lower(), label.lower()):
            advice = next((text for prefix, text in _ADVICE.items() if k.startswith(prefix)),
                          "make the control map with another tool (the A1111 extension, ComfyUI), then give"
                          " that map as the control image with module none")
            raise InvalidRequest(f"Darkroom cannot run the {label} preprocessor yet: {advice}")
    if lowered.startswith(("ip-adapter", "instant_id", "face_id")):
        raise InvalidRequest(f"Darkroom cannot run the {text} preprocessor: of the IP-Adapter family it runs the"
                             " CLIP vision ones (ip-adapter_clip_h, ip-adapter_clip_g, ip-adapter-auto), FaceID's"
                             " (ip-adapter_face_id, ip-adapter_face_id_plus) and InstantID's; PuLID is not built")
    raise InvalidRequest(f"unknown ControlNet preprocessor {text!r}; available: {', '.join(_sorted_names(False))}")


def _sorted_names(alias_names: bool) -> list[str]:
    """The extension's order: none first, then by priority (higher first) and name, descending."""
    rest = sorted((m for m in MODULES.values() if m.name != "none"),
                  key=lambda m: str(m.priority).zfill(8) + m.label, reverse=True)
    return [m.label if alias_names else m.name for m in (MODULES["none"], *rest)]


def module_list(alias_names: bool = False) -> dict:
    """The extension's /controlnet/module_list answer, for the preprocessors Darkroom runs."""
    names = _sorted_names(alias_names)
    detail = {}
    for name in names:
        m = MODULES[canonical_module(name)]
        sliders = [m.resolution] if m.uses_resolution and m.resolution_slider else []
        sliders += [s for s in m.sliders if s is not None]
        detail[name] = {"model_free": m.model_free, "sliders": [s.api_json() for s in sliders]}
    return {"module_list": names, "module_detail": detail}


def module_status(module: str, dirs: Sequence[Path] = ()) -> tuple[bool, str | None]:
    """(usable, problem) for the UI: False with the message `detect` would raise when a file is missing or
    the preprocessor is not one Darkroom runs."""
    try:
        m = MODULES[canonical_module(module)]
        _weights(m, dirs)
    except InvalidRequest as e:
        return False, str(e)
    return True, None


def _weights(m: Module, dirs: Sequence[Path]) -> list[Path]:
    found = []
    for file, kind in m.weights:
        path = files.find(file, kind, dirs)
        if path is None:
            also = files.ALSO_AS.get(file, ())
            name = f"{file} (or {also[0]})" if also else file
            raise InvalidRequest(
                f"{m.label} needs {name}; put it in {Path(dirs[0]) if dirs else '<home>/models/annotators'},"
                f" or keep it in an install Darkroom reads (<A1111>/extensions/sd-webui-controlnet/annotator/"
                f"downloads/{kind}, <Forge>/models/ControlNetPreprocessor, <ComfyUI>/custom_nodes/"
                f"comfyui_controlnet_aux/ckpts/lllyasviel/Annotators)",
                hint="searched: " + ", ".join(str(d) for d in dirs) if dirs else "no annotator folders were given")
        found.append(path)
    if m.face_pack:
        from darkroom.control.annotators import insightface

        found.append(insightface.pack_dir(m.face_pack, dirs))
    return found


def annotator_dirs(home: Home) -> list[Path]:
    """The home's models/annotators, then each extra install's annotator folder that exists; the CLIP vision
    folders IP-Adapters take their tower from (models/clip_vision: Forge's, ComfyUI's and the home's) and the
    InsightFace folders FaceID takes its face model from (models/insightface) too."""
    dirs = [home.root / "models" / "annotators", home.root / "models" / "clip_vision",
            home.root / "models" / "insightface"]
    for extra in home.extra_model_dirs:
        dirs += [extra / sub for sub in (*files.INSTALL_DIRS, "models/clip_vision", "models/insightface")
                 if is_folder(extra / sub)]
        try:  # the extension unpacked under another folder name (a zip download: sd-webui-controlnet-main)
            dirs += sorted(p for p in extra.glob("extensions/*controlnet*/annotator/downloads") if is_folder(p))
        except OSError:
            pass
        if is_folder(extra / "annotator" / "downloads"):  # the extension's own folder given directly
            dirs.append(extra / "annotator" / "downloads")
    return list(dict.fromkeys(dirs))


def _mask_array(mask: Image.Image | None, height: int, width: int) -> np.ndarray | None:
    if mask is None:
        return None
    if not isinstance(mask, Image.Image):
        raise InvalidRequest("the ControlNet mask must be an image")
    gray = mask.convert("L")
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(gray) > 127


def _slider(value: float, slider: Slider | None, what: str) -> float:
    """The value, or the slider's default when it is -1 or outside the slider's range: the extension resets
    such values so (webuiapi sends threshold_a=64 to every module, and tile_resample must not shrink 64x)."""
    if slider is None:
        return 0.0
    if value is None:
        return float(slider.value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{what} {value!r} must be a number") from None
    if not np.isfinite(value):
        raise InvalidRequest(f"{what} must be a number")
    return value if slider.min <= value <= slider.max else float(slider.value)


def thresholds(module: str, threshold_a: float = -1, threshold_b: float = -1) -> tuple[float, float]:
    """The threshold values `detect` uses (-1 or out of range: the slider's default), for the infotext, which
    the extension writes resolved; a value the module has no slider for is given back unchanged."""
    m = MODULES[canonical_module(module)]
    a, b = (threshold if slider is None else _slider(threshold, slider, name)
            for threshold, slider, name in ((threshold_a, m.sliders[0], "threshold_a"),
                                            (threshold_b, m.sliders[1], "threshold_b")))
    return a, b


def detect(module: str, image: Image.Image, *, resolution: int = 512, threshold_a: float = -1,
           threshold_b: float = -1, mask: Image.Image | None = None, annotator_dirs: Sequence[Path] = (),
           seed: int = 0, device=None, poses: list | None = None) -> np.ndarray:
    """The control map of `image`: float32 HxWx3 in [0, 1] (-1 where an inpaint module's mask is set).
    A pose module appends what it found to `poses` (an annotators.poses.PoseSet, the extension's pose JSON).

    Modules that work at a resolution first resize the picture so its short side is `resolution`
    (-1: 512); the rest keep the input size. -1 thresholds take the module's defaults. The nets run on
    `device` (a torch device or its name; None: the CPU)."""
    m = MODULES[canonical_module(module)]
    if not isinstance(image, Image.Image):
        raise InvalidRequest("the ControlNet input must be an image")
    try:
        resolution = m.resolution.value if resolution is None else int(resolution)
    except (TypeError, ValueError):
        raise InvalidRequest(f"preprocessor resolution {resolution!r} must be a whole number") from None
    if resolution < 1:  # -1 (and, as the extension, any value below its range): the default
        resolution = int(m.resolution.value)
    w, h = image.size
    if w < 1 or h < 1:
        raise InvalidRequest("the ControlNet input image is empty")
    work_h, work_w = short_side_size(h, w, resolution) if m.uses_resolution else (h, w)
    if work_h * work_w > MAX_WORK_PIXELS or h * w > MAX_INPUT_PIXELS:
        raise TooLarge(f"{m.label} would work on {work_w}x{work_h} pixels from a {w}x{h} picture; at most"
                       f" {MAX_WORK_PIXELS >> 20} megapixels (lower the preprocessor resolution)")
    a = _slider(threshold_a, m.sliders[0], "threshold_a")
    b = _slider(threshold_b, m.sliders[1], "threshold_b")
    if m.needs_mask and mask is None:
        raise InvalidRequest(f"{m.label} needs a mask (white where the picture is to be repainted)")
    try:
        seed = int(seed)
    except (TypeError, ValueError):
        raise InvalidRequest(f"seed {seed!r} must be a whole number") from None
    ctx = _Context(_mask_array(mask, h, w) if m.needs_mask else None, [Path(d) for d in annotator_dirs], seed,
                   None if device is None else str(device), poses)
    if m.weights:
        _weights(m, ctx.dirs)
    out = m.run(hwc3(image), resolution, a, b, ctx)
    if out.dtype != np.uint8:  # inpaint: already float in [0, 1] with -1
        return np.ascontiguousarray(out, dtype=np.float32)
    if out.ndim == 2:
        out = out[:, :, None]
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return out.astype(np.float32) / 255.0
