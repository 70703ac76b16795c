"""Upscaler models (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ... through spandrel) and the webui's
Lanczos/Nearest resizes: found in the models folders (discover.py), loaded safely (load.py), run in
tiles (tiled.py) with the webui's scale, crop and blend rules (resize.py).

`UpscalerLibrary` is the one object the engine, the server's extras routes and `darkroom upscale`
use: names -> files, loading with a small cache, upscaling with progress and cancel, and the memory
an upscale needs (checked before it starts).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image, PngImagePlugin

from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.metadata.infotext import format_value
from darkroom.upscale import tiled
from darkroom.upscale.discover import (
    NONE,
    RESIZERS,
    WEBUI_NAMES,
    UpscalerFile,
    available_names,
    find_upscalers,
    resolve_file,
)
from darkroom.upscale.load import LoadedUpscaler, UpscalerCache, detect_architecture, read_state_dict
from darkroom.upscale.resize import MAX_PASSES, ModelPass, Resize, resize_to, upscale_by, upscale_one

__all__ = ["UpscalerLibrary", "UpscalerFile", "LoadedUpscaler", "Extras", "Resize", "Progress", "NONE", "RESIZERS",
           "WEBUI_NAMES", "detect_architecture", "read_state_dict", "postprocessing_text", "encode_extras_png",
           "is_model_upscaler"]

Progress = Callable[[int, int], None]
"""(tiles done, tiles in this pass): called after each tile."""


def is_model_upscaler(name: str) -> bool:
    """Whether `name` names a model file rather than None or a resizer (names are not checked here)."""
    return name.strip().lower() not in {n.lower() for n in (NONE, *RESIZERS)}


@dataclass(frozen=True)
class Extras:
    """The webui's extras upscale: upscaler 1, an optional upscaler 2 blended in at `visibility`."""

    resize: Resize = field(default_factory=Resize)
    upscaler_1: str = NONE
    upscaler_2: str = NONE
    visibility: float = 0.0

    def check(self) -> None:
        self.resize.check()
        if not 0.0 <= self.visibility <= 1.0:
            raise InvalidRequest(f"upscaler 2 visibility {self.visibility} must be between 0 and 1")

    @property
    def blends(self) -> bool:
        return self.upscaler_2.strip().lower() != NONE.lower() and self.visibility > 0


class UpscalerLibrary:
    """The upscalers of a Home, run on `device` in `dtype` where the model supports it (else fp32)."""

    def __init__(self, home: Home, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.home = home
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache = UpscalerCache()
        self.problems: list[str] = []
        self._run_lock = threading.Lock()  # one upscale at a time: each one sizes its tiles to the free memory

    # --- names -------------------------------------------------------------------------------
    def files(self) -> list[UpscalerFile]:
        return find_upscalers(self.home, self.problems)

    def names(self) -> list[str]:
        return available_names(self.files())

    def canonical(self, name: str) -> str:
        """The listed name for what a user typed: None, Lanczos, Nearest or a file's name; InvalidRequest
        listing what is available otherwise."""
        wanted = (name or "").strip()
        for builtin in (NONE, *RESIZERS):
            if wanted.lower() == builtin.lower():
                return builtin
        return resolve_file(self.files(), wanted).name

    def file(self, name: str) -> UpscalerFile:
        return resolve_file(self.files(), name)

    # --- running -----------------------------------------------------------------------------
    def load(self, name: str) -> LoadedUpscaler:
        f = self.file(name)
        return self.cache.get(f.path, name=f.name, device=self.device, dtype=self.dtype)

    def model_pass(self, loaded: LoadedUpscaler, *, cancel: threading.Event | None = None,
                   progress: Progress | None = None) -> ModelPass:
        """One pass of `loaded` over an image, tiled to fit the memory budget."""
        budget = tiled.tile_budget(self.device)
        size = torch.finfo(loaded.dtype).bits // 8
        tile = tiled.tile_size(loaded.scale, budget, loaded.architecture, size, max(8, loaded.multiple_of))

        def run(image: Image.Image) -> Image.Image:
            return tiled.run_tiled(loaded.model, image, loaded.scale, tile=tile, device=loaded.device,
                                   dtype=loaded.dtype, multiple_of=loaded.multiple_of, min_size=loaded.min_size,
                                   cancel=cancel, progress=progress)

        return run

    def _pass_for(self, name: str, cancel, progress) -> tuple[str | None, ModelPass | None]:
        canonical = self.canonical(name)
        if canonical in RESIZERS:
            return canonical, None
        return None, self.model_pass(self.load(canonical), cancel=cancel, progress=progress)

    def upscale(self, image: Image.Image, scale: float, upscaler: str, *, cancel: threading.Event | None = None,
                progress: Progress | None = None) -> Image.Image:
        """`image` upscaled by `scale` (the webui's rules: sides rounded down to multiples of 8)."""
        if self.canonical(upscaler) == NONE:
            return image.convert("RGB")
        resizer, model_pass = self._pass_for(upscaler, cancel, progress)
        with self._run_lock:
            return upscale_by(image.convert("RGB"), scale, resizer=resizer, model_pass=model_pass)

    def resize_to(self, image: Image.Image, width: int, height: int, upscaler: str, *,
                  cancel: threading.Event | None = None, progress: Progress | None = None) -> Image.Image:
        """The hires fix's upscale to exactly width x height ("None" is a Lanczos resize, as in the webui)."""
        name = "Lanczos" if self.canonical(upscaler) == NONE else upscaler
        resizer, model_pass = self._pass_for(name, cancel, progress)
        with self._run_lock:
            return resize_to(image.convert("RGB"), width, height, resizer=resizer, model_pass=model_pass)

    def postprocess(self, image: Image.Image, extras: Extras, *, cancel: threading.Event | None = None,
                    progress: Progress | None = None) -> tuple[Image.Image, dict[str, object]]:
        """The extras' upscale of one image and the postprocessing keys it adds (empty for upscaler 1 None)."""
        extras.check()
        info: dict[str, object] = {}
        source = image.convert("RGB")
        first = self.canonical(extras.upscaler_1)
        if first == NONE:
            return source, info
        second = self.canonical(extras.upscaler_2) if extras.blends else NONE
        resizer, model_pass = self._pass_for(first, cancel, progress)
        with self._run_lock:
            result = upscale_one(source, extras.resize, info, resizer=resizer, model_pass=model_pass)
        info["Postprocess upscaler"] = first
        if second != NONE:
            resizer, model_pass = self._pass_for(second, cancel, progress)
            with self._run_lock:
                other = upscale_one(source, extras.resize, info, resizer=resizer, model_pass=model_pass)
            result = Image.blend(result, other.convert(result.mode), extras.visibility)
            info["Postprocess upscaler 2"] = second
        return result, info

    # --- memory ------------------------------------------------------------------------------
    def working_bytes(self, width: int, height: int, scale: float, upscaler: str) -> int:
        """Peak memory of upscaling a width x height image by `scale` with `upscaler` (0 for None)."""
        name = self.canonical(upscaler)
        if name == NONE:
            return 0
        out = int(width * scale) * int(height * scale)
        if name in RESIZERS:
            return out * tiled.IMAGE_BYTES * 2 + width * height * tiled.IMAGE_BYTES
        f = self.file(name)
        passes = 1
        while passes < MAX_PASSES and f.scale ** passes < scale:
            passes += 1
        last_input = max(1, f.scale) ** (passes - 1)  # the largest pass is the last one
        weights = f.size * (2 if f.path.suffix.lower() != ".safetensors" else 1)  # a pickle is read, then copied
        return tiled.working_bytes(width * last_input, height * last_input, f.scale,
                                   budget=tiled.tile_budget(self.device), weights=weights)


def postprocessing_text(info: dict[str, object]) -> str:
    """The `postprocessing` text the webui writes: `key: value, key: value` (quoted where needed)."""
    def quote(text: str) -> str:
        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text

    return ", ".join(k if k == v else f"{k}: {quote(format_value(v))}" for k, v in info.items() if v is not None)


def encode_extras_png(image: Image.Image, parameters: str | None, info: dict[str, object]) -> bytes:
    """A PNG that keeps the source's generation parameters and adds the webui's `postprocessing` and
    `extras` texts (what the webui's extras tab saves)."""
    png = PngImagePlugin.PngInfo()
    if parameters:
        png.add_text("parameters", parameters)
    if info:
        text = postprocessing_text(info)
        png.add_text("postprocessing", text)
        png.add_text("extras", text)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=png, compress_level=6)
    return out.getvalue()
