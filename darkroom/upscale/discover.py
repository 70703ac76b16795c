"""Where upscaler model files are, and the names users type for them.

Files live in the Darkroom home's `models/upscalers` and, used in place, in the folders the
webuis read: AUTOMATIC1111/Forge's `models/ESRGAN`, `models/RealESRGAN`, `models/SwinIR`,
`models/DAT`, `models/HAT` and ComfyUI's `models/upscale_models`, under each extra models folder.
Listing reads no weights (the bounded walk of darkroom.models.library), so it is instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from darkroom.errors import InvalidRequest
from darkroom.home import Home, is_folder
from darkroom.models.library import has_suffix, install_folders, walk_models

UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
"""What the webuis' upscaler folders accept (.ckpt as ComfyUI's does); pickles load only on opt-in."""
INSTALL_DIRS = ("models/ESRGAN", "models/RealESRGAN", "models/SwinIR", "models/DAT", "models/HAT",
                "models/upscale_models")
RESIZERS = ("Lanczos", "Nearest")
"""The upscalers with no file: a PIL resize."""
NONE = "None"

# The AUTOMATIC1111 webui's built-in upscaler names -> the file each stands for (the name of the file
# it downloads; matched by stem, from modules/realesrgan_model.py, esrgan_model.py, swinir_model.py, dat_model.py).
WEBUI_NAMES: dict[str, tuple[str, int]] = {
    "R-ESRGAN General 4xV3": ("realesr-general-x4v3.pth", 4),
    "R-ESRGAN General WDN 4xV3": ("realesr-general-wdn-x4v3.pth", 4),
    "R-ESRGAN AnimeVideo": ("realesr-animevideov3.pth", 4),
    "R-ESRGAN 4x+": ("RealESRGAN_x4plus.pth", 4),
    "R-ESRGAN 4x+ Anime6B": ("RealESRGAN_x4plus_anime_6B.pth", 4),
    "R-ESRGAN 2x+": ("RealESRGAN_x2plus.pth", 2),
    "ESRGAN_4x": ("ESRGAN_4x.pth", 4),
    "SwinIR 4x": ("SwinIR_4x.pth", 4),
    "DAT x2": ("DAT_x2.pth", 2),
    "DAT x3": ("DAT_x3.pth", 3),
    "DAT x4": ("DAT_x4.pth", 4),
}
_BY_STEM = {file.rsplit(".", 1)[0].lower(): name for name, (file, _) in WEBUI_NAMES.items()}
_SCALE_HINT = re.compile(r"(?<![0-9])([1-8])[xX](?![a-zA-Z0-9])|(?<![a-zA-Z0-9])[xX]([1-8])(?![0-9])")


@dataclass(frozen=True)
class UpscalerFile:
    """One upscaler model file as listings show it (nothing read from it)."""

    name: str  # what users type and infotexts record: the webui's name for a known file, else the file stem
    path: Path
    size: int
    scale: int  # from the webui's table or the name ("4x-UltraSharp", "..._x2"); 4 when the name does not say
    folder: str  # the install folder it was found in ("RealESRGAN", "upscale_models", "upscalers")

    @property
    def realesrgan(self) -> bool:
        """Whether the webui lists it under /realesrgan-models (its RealESRGAN folder or a known R-ESRGAN file)."""
        return self.folder == "RealESRGAN" or self.name.startswith("R-ESRGAN")

    def to_webui(self) -> dict:
        """The webui's /sdapi/v1/upscalers item."""
        return {"name": self.name, "model_name": self.folder, "model_path": str(self.path), "model_url": None,
                "scale": self.scale}


def scale_hint(stem: str) -> int:
    """The scale a file name states ("4x-UltraSharp", "RealESRGAN_x2plus", "DAT_x3"), else 4 (the webui's default)."""
    m = _SCALE_HINT.search(stem)
    return int(m.group(1) or m.group(2)) if m else 4


def upscaler_dirs(home: Home) -> list[tuple[Path, str]]:
    """(folder, label) pairs: the home's upscalers folder, then each extra models folder's webui folders."""
    return install_folders(home.upscalers, "upscalers", home, INSTALL_DIRS)


def find_upscalers(home: Home, problems: list[str] | None = None) -> list[UpscalerFile]:
    """Every upscaler file, by name; the first folder wins when two hold the same name (as for checkpoints),
    and a .safetensors file wins over a pickle of the same name."""
    found: dict[str, UpscalerFile] = {}
    for folder, label in upscaler_dirs(home):
        if not is_folder(folder):
            continue
        paths = walk_models(folder, has_suffix(UPSCALER_SUFFIXES), problems=problems)
        for path in sorted(paths, key=lambda p: p.suffix.lower() != ".safetensors"):
            name = _BY_STEM.get(path.stem.lower(), path.stem)  # a .safetensors conversion keeps the webui's name
            if name in found:
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            scale = WEBUI_NAMES[name][1] if name in WEBUI_NAMES else scale_hint(path.stem)
            found[name] = UpscalerFile(name, path, size, scale, label)
    return sorted(found.values(), key=lambda f: f.name.lower())


def resolve_file(files: list[UpscalerFile], wanted: str) -> UpscalerFile:
    """The file a user names: its listed name, its file stem or file name, exactly, then ignoring case."""
    wanted = (wanted or "").strip()
    for exact in (True, False):
        for f in files:
            names = (f.name, f.path.stem, f.path.name)
            if wanted in names if exact else wanted.lower() in (n.lower() for n in names):
                return f
    raise InvalidRequest(f"no upscaler named {wanted!r}; available: {', '.join(available_names(files))}"
                        + ("" if files else " (put upscaler model files such as 4x-UltraSharp.pth in"
                           " models/upscalers, or point --models-dir at a webui install)"))


def available_names(files: list[UpscalerFile]) -> list[str]:
    return [NONE, *RESIZERS, *(f.name for f in files)]
