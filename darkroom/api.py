"""The library API the CLI and (later) the server wrap: build an engine, generate, list, report."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from darkroom.home import Home
from darkroom.humanize import human_size
from darkroom.request import GenerationRequest, GenerationResult


def build_engine(home: Home, *, device: str | None = None, precision: str | None = None, allow_pickle: bool = False,
                 v_prediction: bool | None = None, vram: str | None = None, fp8: bool = False):
    """An Engine with its model cache and library, for one process.

    `vram`: "auto" (default: the free VRAM decides), "high", "medium" (medvram: one
    component on the GPU at a time), "low" (lowvram: the UNet's blocks streamed), or a budget such as
    "4GB"; `fp8`: store the UNet's weights as float8 (see darkroom/engine/placement.py, docs/gpu.md).
    """
    from darkroom.engine.cache import ModelCache
    from darkroom.engine.device import choose_device
    from darkroom.engine.generate import Engine
    from darkroom.engine.memory import keep_large_allocations
    from darkroom.engine.placement import Placement
    from darkroom.models.library import ModelLibrary
    from darkroom.models.starter import starter_path

    keep_large_allocations()  # before the job thread's first allocation: big layers reuse freed memory
    library = ModelLibrary(home)
    cache = ModelCache(choose_device(device, precision), allow_pickle=allow_pickle, v_prediction=v_prediction)
    cache.placement = Placement(vram, fp8=fp8)
    cache.compile_mode, cache.compile_home = compile_mode(home), home
    return Engine(library, cache, default_model=lambda: starter_path(home))


def compile_mode(home: Home) -> str:
    """torch.compile for models this process loads: $DARKROOM_COMPILE (set by `--compile`), else the home's
    `torch_compile` setting (darkroom/engine/speed.py says what each mode does and costs)."""
    from darkroom.engine.speed import COMPILE_MODES
    from darkroom.errors import InvalidRequest
    from darkroom.settings import Settings

    mode = os.environ.get("DARKROOM_COMPILE", "").strip().lower()
    if not mode:
        return Settings(home.root / "settings.json").get("torch_compile")
    if mode not in COMPILE_MODES:
        raise InvalidRequest(f"DARKROOM_COMPILE={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    return mode


def generate(request: GenerationRequest, *, home: Home | None = None, output_dir: Path | None = None,
             engine=None, **engine_options) -> GenerationResult:
    """One-call generation: `generate(GenerationRequest(prompt="a lighthouse"))`."""
    home = (home or Home.resolve()).ensure()
    engine = engine or build_engine(home, **engine_options)
    return engine.generate(request, output_dir=output_dir)


def output_folder(home: Home, kind: str = "txt2img") -> Path:
    return home.outputs / kind / dt.date.today().isoformat()


def request_from_png(path: Path) -> GenerationRequest:
    from darkroom.errors import InvalidRequest
    from darkroom.metadata.images import read_image_metadata
    from darkroom.metadata.infotext import request_from_infotext

    meta = read_image_metadata(path)
    if not meta.parameters:
        raise InvalidRequest(f"{path}: no generation parameters found in this image, nothing to rerun")
    return pasted_schedule(request_from_infotext(meta.parameters))


def pasted_schedule(req: GenerationRequest) -> GenerationRequest:
    """A recorded schedule read as the webui reads it (darkroom/engine/samplers.py as_the_webui_reads): Forge
    writes one for DDIM/PLMS/UniPC, which take none, and such an image reruns with Automatic."""
    from darkroom.engine import samplers

    schedule = samplers.as_the_webui_reads(req.sampler, req.schedule)
    return req if schedule == req.schedule else req.model_copy(update={"schedule": schedule})


def list_models(home: Home, *, hashes: bool = True) -> list[dict]:
    from darkroom.models.library import ModelLibrary

    library = ModelLibrary(home)
    rows = []
    for e in library.scan():
        if e.error:
            family = "error: " + e.error.split(": ", 1)[-1][:40]
        elif e.is_diffusers:
            family = "diffusers folder"
        else:
            family = e.detection.label if e.detection else "?"
        rows.append({
            "name": e.name, "family": family, "size": human_size(e.size),
            "hash": (library.short_hash(e) if hashes and not e.error else None), "path": str(e.path),
        })
    return rows


def doctor_report(home: Home, *, device: str | None = None, precision: str | None = None) -> str:
    """What `darkroom doctor` prints: device, versions, folders, the network guard, offline readiness."""
    from darkroom.offline.readiness import readiness, render_readiness

    return render_readiness(readiness(home, device=device, precision=precision))
