"""Read an upscaler file and build its network with spandrel (architecture detected from the weights).

safetensors files are read as tensors only. `.pth`/`.pt`/`.ckpt` files are pickles, which could run
code if unpickled freely; most upscalers are shared only as `.pth` (RealESRGAN_x4plus.pth,
4x-UltraSharp.pth), so they are read with `torch.load(weights_only=True)`, torch's restricted
unpickler that builds tensors and plain containers and refuses anything else (a class, a
function call), with no opt-in needed. A pickle that needs more is refused with a clear error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from darkroom.errors import ModelLoadError, ModelNotFound
from darkroom.fsutil import open_regular
from darkroom.upscale.spandrel_import import import_spandrel

PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt")


@dataclass
class LoadedUpscaler:
    """A ready network: `model(x)` maps [n, 3, h, w] in 0..1 to [n, 3, h*scale, w*scale]."""

    name: str
    path: Path
    architecture: str  # spandrel's name: "ESRGAN", "RealESRGAN Compact", "SwinIR", "HAT", "DAT", ...
    scale: int
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    multiple_of: int = 1  # the input's sides must be multiples of this (padded by the tiler)
    min_size: int = 0

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of an upscaler file; a clear ModelLoadError for a pickle that needs more than tensors
    or a damaged file."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"upscaler file not found: {path}")
    try:
        with open_regular(path, what="an upscaler model file"):  # a FIFO or a device is refused, never read
            pass
    except OSError as e:
        raise ModelLoadError(f"{path.name}: cannot be read ({e.strerror or e})") from None
    if path.suffix.lower() == ".safetensors":
        from darkroom.models.tensor_file import TensorReadError, read_tensors

        try:  # plain reads, not a memory map: a drive pulled out mid-read is this error, not SIGBUS
            return read_tensors(path)
        except ModelLoadError as e:
            why = e.reason if isinstance(e, TensorReadError) else str(e).removeprefix(f"{path.name}: ")
            raise ModelLoadError(f"{path.name}: not a readable safetensors file ({why})") from None
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: not an upscaler model file (expected .safetensors, .pth, .pt or .ckpt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path.name}: refused: this pickle holds more than tensors and plain data, so it"
                             f" cannot be loaded safely ({type(e).__name__}: {first[:200]})") from None
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name}: not an upscaler model (the pickle holds no state dict)")
    return obj


def build(path: Path, state: dict[str, Any], *, name: str, device: torch.device,
          dtype: torch.dtype) -> LoadedUpscaler:
    """Detect the architecture of `state` with spandrel and build it on `device`, in `dtype` when the
    architecture supports it (else fp32)."""
    spandrel = import_spandrel()
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise ModelLoadError(f"{path.name}: unknown upscaler architecture (spandrel recognises ESRGAN,"
                             " Real-ESRGAN, SwinIR, HAT, DAT, OmniSR, SPAN and more, not this file)") from None
    except Exception as e:  # a known architecture whose tensors do not fit it: a damaged or odd file
        raise ModelLoadError(f"{path.name}: cannot be built as an upscaler ({type(e).__name__}: {e})") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in ("SR", "Restoration"):
        raise ModelLoadError(f"{path.name}: a {descriptor.architecture.name} model ({descriptor.purpose}),"
                             " not an upscaler")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise ModelLoadError(f"{path.name}: takes {descriptor.input_channels} and gives"
                             f" {descriptor.output_channels} channels; only RGB upscalers are supported")
    supported = {torch.float32: True, torch.float16: descriptor.supports_half,
                 torch.bfloat16: descriptor.supports_bfloat16}
    dtype = dtype if supported.get(dtype, False) else torch.float32
    model = descriptor.model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    req = descriptor.size_requirements
    return LoadedUpscaler(name, path, descriptor.architecture.name, int(descriptor.scale), model, torch.device(device),
                          dtype, max(1, int(req.multiple_of)), int(req.minimum))


def detect_architecture(path: Path) -> tuple[str, int]:
    """(architecture, scale) of a file, built on the CPU in fp32."""
    up = build(path, read_state_dict(path), name=Path(path).stem,
               device=torch.device("cpu"), dtype=torch.float32)
    return up.architecture, up.scale


class UpscalerCache:
    """The last few loaded networks, by file version, device and dtype (a batch reuses one)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: OrderedDict[tuple, LoadedUpscaler] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, *, name: str, device: torch.device, dtype: torch.dtype) -> LoadedUpscaler:
        st = Path(path).stat()
        key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, str(device), dtype)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        loaded = build(path, read_state_dict(path), name=name, device=device, dtype=dtype)
        with self._lock:
            self._items[key] = loaded
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return loaded
