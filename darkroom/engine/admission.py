"""Admission control: refuse a request that is over the configured limits or would not fit in memory,
before anything is allocated, with one line that says what was asked and what would fit.

`admit(request, estimate, available, limits)` is the rule; `admit_engine(engine, request)` applies
it for an Engine without loading the model (the size of an img2img request comes from its init
image, a model's from its file header). Every interface reaches it: the job queue admits at
submission (HTTP 422 at once), `Engine.generate` admits again right before it runs (the CLI, the
library API, each X/Y plot cell). docs/limits.md describes the estimate and the settings.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from darkroom.engine import memory
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.request import GenerationRequest
from darkroom.settings import LIMIT_SETTINGS, SETTINGS

_DEFAULTS = {s.name: s.default for s in SETTINGS if s.name in LIMIT_SETTINGS}
_HOW = "a setting: POST /sdapi/v1/options darkroom_{name}, or settings.json"


@dataclass(frozen=True)
class Limits:
    """The maxima a request must keep to (settings of the same names; defaults in darkroom/settings.py)."""

    max_side: int = _DEFAULTS["max_side"]
    max_batch_size: int = _DEFAULTS["max_batch_size"]
    max_batch_count: int = _DEFAULTS["max_batch_count"]
    max_steps: int = _DEFAULTS["max_steps"]

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Limits:
        return cls(**{f.name: int(values.get(f.name, getattr(cls, f.name))) for f in fields(cls)})

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls.from_values(settings.as_dict())

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def limit_problems(req: GenerationRequest, limits: Limits) -> list[str]:
    """What in `req` (its size settled) is over `limits`, each naming the setting."""
    out = []

    def over(what: str, value: int, name: str) -> None:
        limit = getattr(limits, name)
        if value > limit:
            out.append(f"{what} {value} is over the limit {name} = {limit}")

    over("width", req.width or 0, "max_side")
    over("height", req.height or 0, "max_side")
    if req.enable_hr:
        w2, h2 = req.hires_size()
        over("the hires fix's width", w2, "max_side")
        over("the hires fix's height", h2, "max_side")
    over("batch size", req.batch_size, "max_batch_size")
    over("batch count", req.n_iter, "max_batch_count")
    over("steps", req.steps, "max_steps")
    if req.enable_hr:
        over("hires steps", req.hr_second_pass_steps, "max_steps")
    return out


def describe(req: GenerationRequest) -> str:
    """'4096x4096 x 64 images', '512x512 hires-fixed to 1024x1024 x 1 image', '512x512 x 10 batches of 4'."""
    size = f"{req.width}x{req.height}"
    if req.enable_hr:
        w2, h2 = req.hires_size()
        size += f" hires-fixed to {w2}x{h2}"
    if req.n_iter > 1:
        return f"{size} x {req.n_iter} batches of {req.batch_size}"
    return f"{size} x {req.batch_size} image{'s' if req.batch_size != 1 else ''}"


def resized(req: GenerationRequest, width: int, height: int, batch_size: int | None = None) -> GenerationRequest:
    """`req` at another first-pass size (hires targets scaled alike) and batch size."""
    update: dict[str, Any] = {"width": width, "height": height}
    if batch_size is not None:
        update["batch_size"] = batch_size
    sx, sy = width / (req.width or width), height / (req.height or height)
    if req.hr_resize_x:
        update["hr_resize_x"] = max(8, int(req.hr_resize_x * sx) // 8 * 8)
    if req.hr_resize_y:
        update["hr_resize_y"] = max(8, int(req.hr_resize_y * sy) // 8 * 8)
    return req.model_copy(update=update)


def _final_side(req: GenerationRequest) -> int:
    w, h = req.hires_size() if req.enable_hr else (req.width, req.height)
    return max(w or 0, h or 0)


def what_fits(req: GenerationRequest, estimate: Callable[[GenerationRequest], memory.Estimate], available: int | None,
              limits: Limits, native: int = 512) -> str:
    """Up to two alternatives within the limits and `available`: 'at most batch size 2 at 1024x1024, or 1 image
    at 2048x2048'; '' when nothing smaller fits either."""
    def fits(r: GenerationRequest) -> bool:
        return not limit_problems(r.model_copy(update={"n_iter": 1}), limits) and (
            available is None or estimate(r).peak <= available)

    def most_batch(r: GenerationRequest) -> int:
        top = min(req.batch_size, limits.max_batch_size)
        lo, hi = 0, top
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(resized(r, r.width, r.height, mid)):
                lo = mid
            else:
                hi = mid - 1
        return lo

    w, h = req.width, req.height
    side = max(w, h)
    # the requested shape within max_side (the final hires size too)
    shrink = min(1.0, limits.max_side / max(1, _final_side(req)))
    here = resized(req, max(8, int(w * shrink) // 8 * 8), max(8, int(h * shrink) // 8 * 8))
    out = []
    b = most_batch(here)
    if b >= 1:
        out.append(f"at most batch size {b} at {describe_size(here)}")
    else:
        if side > native:
            n = resized(req, max(8, int(w * native / side) // 8 * 8), max(8, int(h * native / side) // 8 * 8))
            b = most_batch(n)
            if b >= 1:
                out.append(f"at most batch size {b} at {describe_size(n)}")
        # the largest single image of the same shape, in steps of 64 pixels on the longer side
        lo, hi = 0, max(1, here.width if here.width >= here.height else here.height) // 64
        best = None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            s = mid * 64 / side
            r = resized(req, max(8, int(w * s) // 8 * 8), max(8, int(h * s) // 8 * 8), 1)
            if fits(r):
                lo, best = mid, r
            else:
                hi = mid - 1
        if best is not None:
            out.append(f"1 image at {describe_size(best)}")
    return ", or ".join(out)


def describe_size(req: GenerationRequest) -> str:
    size = f"{req.width}x{req.height}"
    if req.enable_hr:
        w2, h2 = req.hires_size()
        size += f" (hires {w2}x{h2})"
    return size


def admit(request: GenerationRequest, estimate: Callable[[GenerationRequest], memory.Estimate],
          available: int | None, limits: Limits, *, native: int = 512, where: str = "this machine") -> memory.Estimate:
    """Refuse `request` (width and height settled) with InvalidRequest (HTTP 422), one line, when it is over
    `limits` or its estimated peak is over `available` bytes (None: unknown, not checked).

    `estimate(request)` gives the peak of a request (called again for the alternatives the message
    proposes). Returns the request's estimate when admitted."""
    problems = limit_problems(request, limits)
    est = estimate(request)
    short = available is not None and est.peak > available
    if not problems and not short:
        return est
    asked = describe(request)
    free = f"{memory.human_gb(available)} free" if available is not None else ""
    alternatives = what_fits(request, estimate, available, limits, native)
    if problems:
        names = sorted({p.rsplit(" = ", 1)[0].rsplit(" ", 1)[1] for p in problems})
        how = _HOW.format(name=names[0] if len(names) == 1 else "<name>")
        line = f"{asked}: {'; '.join(problems)} ({how})"
        if alternatives:
            line += f"; within the limits{' and the ' + free if free else ''}: {alternatives}"
        raise InvalidRequest(line)
    line = f"{asked} needs about {memory.human_gb(est.peak)} of memory; {where} has {free}"
    line += f": {alternatives}" if alternatives else ": nothing smaller fits either (the model alone needs about" \
        f" {memory.human_gb(est.weights + est.overhead)})"
    raise InvalidRequest(line)


# --------------------------------------------------------------------------------------------- the engine's check


def settle_size(req: GenerationRequest, native: int) -> GenerationRequest:
    """Width and height as the engine will use them, without loading anything: the init image's
    (img2img, rounded down to 8 as prepare_source does), else the model's native size."""
    w, h = req.width, req.height
    if req.init_image is not None and (w is None or h is None):
        size = _image_size(req.init_image)
        if size is not None:
            w = w or max(8, size[0] // 8 * 8)
            h = h or max(8, size[1] // 8 * 8)
    w, h = w or native, h or native
    if (w, h) == (req.width, req.height):
        return req
    return req.model_copy(update={"width": w, "height": h})


def _image_size(data: bytes) -> tuple[int, int] | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return im.size
    except Exception:  # not an image: the engine says so when it decodes it
        return None


def admit_engine(engine, req: GenerationRequest) -> GenerationRequest:
    """Admit `req` for `engine` (its `limits`, model file, device and dtypes); returns it with its size settled.

    The memory check is skipped when the model's file cannot be read here (a .ckpt pickle, a damaged
    file: loading says what is wrong) or the free memory cannot be known."""
    limits: Limits = getattr(engine, "limits", None) or Limits()
    choice = engine.cache.device
    arch = None
    try:
        path = Path(engine.model_path(req))
        current = engine.cache.current
        if current is not None and Path(current.path).resolve() == path.resolve():
            arch = memory.arch_of_loaded(current)
        else:
            arch = memory.read_arch(path)
    except (DarkroomError, OSError, KeyError, ValueError, StopIteration):
        arch = None
    native = arch.native_size if arch is not None else 512
    settled = settle_size(req, native)
    if arch is None:
        problems = limit_problems(settled, limits)
        if problems:
            admit(settled, lambda r: memory.Estimate(0, 0, 0, 0, 0), None, limits, native=native)
        return settled
    tiled = getattr(engine, "vae_tiling", "auto") != "never"
    dtype, vae_dtype = choice.dtype, choice.vae_dtype(arch.family)

    control = control_weight_bytes(engine, req, dtype)
    # each reference unit keeps an attention bank
    references = sum(1 for u in req.controlnet
                     if u.active and u.model_free and u.module.lower().startswith("reference"))

    def estimate(r: GenerationRequest) -> memory.Estimate:
        est = memory.estimate(arch, r, dtype=dtype, vae_dtype=vae_dtype, device=choice.device, tiled_vae=tiled)
        if control:
            est = replace(est, weights=est.weights + control)
        if references:
            bank = memory.attention_bank_bytes(arch, r, dtype=dtype)
            est = replace(est, unet=est.unet + references * bank)
        return est

    available = memory.available_memory(choice.device, _reclaimable(engine))
    where = "this machine" if choice.device.type in ("cpu", "mps") else "the GPU"
    est = admit(settled, estimate, available, limits, native=native, where=where)
    lock = getattr(engine, "_lock", None)
    if lock is None or not lock.locked():
        engine._admission_running = est  # the estimate of what runs next (see _reclaimable)
    return settled


def control_weight_bytes(engine, req: GenerationRequest, dtype) -> int:
    """Rough bytes of the request's ControlNets' weights in `dtype` (each model once; from the file headers,
    a pickle by its file size); their activations are left to the UNet's margin. 0 when a name is unknown:
    generating says so."""
    names = {u.model for u in req.controlnet if u.active and not u.model_free}
    extra = clip_tower_bytes(engine, req, dtype) + face_pack_bytes(engine, req)
    if not names:
        return extra  # ReVision units: a tower, no model
    from darkroom.control.files import find_controlnets, resolve
    from darkroom.control.load import parameter_count

    files = find_controlnets(engine.library.home)
    paths = set()
    for name in names:
        try:
            paths.add(resolve(files, name).path)
        except DarkroomError:
            continue
    total = 0
    for path in paths:
        try:
            count = parameter_count(path)
            total += count * dtype.itemsize if count is not None else path.stat().st_size
        except (DarkroomError, OSError):
            continue
    return total + extra


def face_pack_bytes(engine, req: GenerationRequest) -> int:
    """Bytes of the InsightFace files (ONNX, fp32 as on disk) the request's FaceID and InstantID units load: the
    sessions stay loaded between requests (annotators.insightface keeps a few), so a first use needs their room."""
    from darkroom.control.annotators import insightface
    from darkroom.control.preprocess import MODULES, annotator_dirs, canonical_module

    packs = set()
    for unit in req.controlnet:
        try:
            pack = MODULES[canonical_module(unit.module)].face_pack if unit.active else None
        except (DarkroomError, KeyError):
            continue
        if pack is not None:
            packs.add(pack)
    total = 0
    dirs = annotator_dirs(engine.library.home) if packs else []
    for pack in packs:
        try:
            folder = insightface.pack_dir(pack, dirs)
            total += sum((folder / name).stat().st_size for name in insightface.PACK_FILES[pack])
        except (DarkroomError, OSError):
            continue  # missing: preparing the unit says so
    return total


def clip_tower_bytes(engine, req: GenerationRequest, dtype) -> int:
    """Rough bytes of the CLIP vision towers the request's IP-Adapter, style and ReVision units load while they
    are prepared (darkroom.control.ipadapter, .vision_prompt; freed before sampling, counted with the weights to
    be safe): each tower once, from its header's parameter count, or a pickle's size as fp32."""
    from darkroom.control import ipadapter, vision_prompt
    from darkroom.control.annotators import files
    from darkroom.control.preprocess import annotator_dirs, canonical_module
    from darkroom.models.header import read_header

    towers = set()
    for unit in req.controlnet:
        if not unit.active:
            continue
        try:
            module = canonical_module(unit.module)
        except DarkroomError:
            continue
        if module in ipadapter.MODULES:
            towers.add(ipadapter.MODULES[module] or "h")  # auto: ViT-H, the tower most adapters take
        elif ipadapter.FACE_MODULES.get(module):
            towers.add(ipadapter.FACE_MODULES[module])
        elif module in vision_prompt.TOWERS:
            towers.add(vision_prompt.TOWERS[module])
    total = 0
    dirs = annotator_dirs(engine.library.home) if towers else []
    for tower in towers:
        path = files.find(ipadapter.CLIP_FILES[tower], ipadapter.CLIP_KIND, dirs)
        if path is None:
            continue
        try:
            if path.suffix.lower() == ".safetensors":
                count = sum(math.prod(t.shape) for t in read_header(path).tensors.values())
            else:
                count = path.stat().st_size // 4
        except (DarkroomError, OSError):
            continue
        total += count * dtype.itemsize
    return total


def _reclaimable(engine) -> int:
    """Memory the engine holds that the request will get back: the loaded model's weights (counted again
    in the estimate, or freed to load another), and, while a generation runs (a job submitted behind
    it), that generation's activations, freed before this one starts."""
    out = memory.resident_bytes(engine.cache.current)
    lock = getattr(engine, "_lock", None)
    running = getattr(engine, "_admission_running", None)
    if lock is not None and lock.locked() and running is not None:
        out += running.peak - running.weights
    return out
