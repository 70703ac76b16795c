"""The webui's upscaling rules, on any upscaler (a model, or a Lanczos/Nearest resize).

As AUTOMATIC1111's modules/upscaler.py and scripts/postprocessing_upscale.py do:

- upscaling by `scale` aims at (floor(w*scale/8)*8, floor(h*scale/8)*8); a model runs at its own
  scale up to 3 times until the image is at least that large (a 4x model asked for x2 runs once),
  and the result is resized to the aim with Lanczos. Lanczos and Nearest resize to
  (int(w*scale), int(h*scale)) and then, when that is not the aim, to the aim with Lanczos;
- "scale to" W x H upscales by max(W/w, H/h); with crop, the result is pasted centered on a black
  W x H canvas ((W//2 - w'//2, H//2 - h'//2)), cropping what overflows;
- upscaler 1 "None" leaves the image as it is; a second upscaler (not "None") with visibility > 0
  upscales the same source the same way and is blended over the first: Image.blend(first, second, v);
- the keys written to the image's `postprocessing` text: "Postprocess upscale by" or "... upscale to",
  "Postprocess crop to", "Postprocess upscaler", "Postprocess upscaler 2".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from darkroom.errors import InvalidRequest

ModelPass = Callable[[Image.Image], Image.Image]
"""One pass of an upscaler model at its native scale."""
MAX_PASSES = 3


def aim(width: int, height: int, scale: float) -> tuple[int, int]:
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def resample_of(name: str) -> int:
    return Image.NEAREST if name == "Nearest" else Image.LANCZOS


def upscale_by(image: Image.Image, scale: float, *, resizer: str | None = None,
               model_pass: ModelPass | None = None) -> Image.Image:
    """`image` upscaled by `scale` with a resizer ("Lanczos", "Nearest") or a model's pass, as the webui does."""
    dest = aim(image.width, image.height, scale)
    if dest[0] < 1 or dest[1] < 1:
        raise InvalidRequest(f"upscaling {image.width}x{image.height} by {scale:g} gives less than 8 pixels a side;"
                             " use a larger scale")
    if model_pass is None:
        image = image.resize((int(image.width * scale), int(image.height * scale)), resample_of(resizer or "Lanczos"))
    else:
        for _ in range(MAX_PASSES):
            before = image.size
            image = model_pass(image)
            if image.size == before or (image.width >= dest[0] and image.height >= dest[1]):
                break
    if image.size != dest:
        image = image.resize(dest, Image.LANCZOS)
    return image


def resize_to(image: Image.Image, width: int, height: int, *, resizer: str | None = None,
              model_pass: ModelPass | None = None) -> Image.Image:
    """The hires fix's image-space upscale (the webui's resize_image, mode "just resize"): upscale by
    max(W/w, H/h) when that is over 1, then resize to exactly W x H with Lanczos."""
    if model_pass is None:
        return image.resize((width, height), resample_of(resizer or "Lanczos"))
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(image, scale, model_pass=model_pass)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image


@dataclass(frozen=True)
class Resize:
    """What the extras ask: by `scale` (mode 0) or to `width` x `height` (mode 1, optionally cropped)."""

    mode: int = 0
    scale: float = 2.0
    width: int = 512
    height: int = 512
    crop: bool = True

    def check(self) -> None:
        if self.mode not in (0, 1):
            raise InvalidRequest(f"resize mode {self.mode} is not 0 (scale by) or 1 (scale to width x height)")
        if self.mode == 0 and not (self.scale > 0):
            raise InvalidRequest(f"upscaling scale {self.scale} must be over 0")
        if self.mode == 1 and (self.width < 1 or self.height < 1):
            raise InvalidRequest(f"target size {self.width}x{self.height} must be at least 1x1")

    def factor(self, image: Image.Image) -> float:
        return self.scale if self.mode == 0 else max(self.width / image.width, self.height / image.height)

    def output_size(self, image: Image.Image) -> tuple[int, int]:
        if self.mode == 1 and self.crop:
            return self.width, self.height
        return aim(image.width, image.height, self.factor(image))


def upscale_one(image: Image.Image, resize: Resize, info: dict[str, object], *, resizer: str | None = None,
                model_pass: ModelPass | None = None) -> Image.Image:
    """One upscaler's result for the extras (the webui's ScriptPostprocessingUpscale.upscale), noting
    its keys in `info`."""
    if resize.mode == 1:
        info["Postprocess upscale to"] = f"{resize.width}x{resize.height}"
    else:
        info["Postprocess upscale by"] = resize.scale
    image = upscale_by(image, resize.factor(image), resizer=resizer, model_pass=model_pass)
    if resize.mode == 1 and resize.crop:
        canvas = Image.new("RGB", (resize.width, resize.height))
        canvas.paste(image, (resize.width // 2 - image.width // 2, resize.height // 2 - image.height // 2))
        image = canvas
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image
