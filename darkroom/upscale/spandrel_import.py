"""Import spandrel without torchvision.

spandrel's package metadata requires torchvision, which Darkroom never installs (PyPI's torchvision
does not import with the CPU build of torch pinned here), and `import spandrel` imports it in two
architectures upscaling never uses: LaMa (inpainting) and RestoreFormer (face restoration). So
spandrel is installed with `--no-deps` (requirements-nodeps.txt) and imported here, once, with a
stand-in module that holds exactly the names those two files import. The stand-in is in
`sys.modules` only while spandrel is imported and is removed right after, so transformers and
diffusers (which probe `importlib.util.find_spec("torchvision")`) never believe torchvision exists.
Calling one of the stand-in's functions (running LaMa or RestoreFormer) raises a clear error.
"""

from __future__ import annotations

import enum
import sys
import threading
import types
from typing import Any

from darkroom.errors import ModelLoadError

_STAND_IN = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
_lock = threading.Lock()


class _InterpolationMode(enum.Enum):
    """The values of torchvision's enum that LaMa's module refers to at import time."""

    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _missing(*_args: Any, **_kwargs: Any) -> Any:
    raise ModelLoadError("this model needs torchvision, which Darkroom does not install: only upscaler models"
                         " (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...) are supported")


def _stand_ins() -> dict[str, types.ModuleType]:
    root, transforms, functional = (types.ModuleType(name) for name in _STAND_IN)
    functional.InterpolationMode = _InterpolationMode
    functional.rotate = functional.normalize = _missing
    root.transforms, transforms.functional = transforms, functional
    return dict(zip(_STAND_IN, (root, transforms, functional), strict=True))


def import_spandrel() -> types.ModuleType:
    """The spandrel module (imported on first use, under a lock, with the stand-in present meanwhile)."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    with _lock:
        if "spandrel" in sys.modules:
            return sys.modules["spandrel"]
        real = any(name in sys.modules for name in _STAND_IN)  # a real torchvision already imported: use it
        added = {} if real else _stand_ins()
        sys.modules.update(added)
        try:
            import spandrel
        except ImportError as e:
            raise ModelLoadError(f"upscaler models need the spandrel package ({e}); run scripts/setup, which"
                                 " installs requirements-nodeps.txt") from None
        finally:
            for name, module in added.items():
                if sys.modules.get(name) is module:
                    del sys.modules[name]
        return spandrel
