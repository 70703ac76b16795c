"""Loading ControlNets: every layout users have, as a diffusers `ControlNetModel`, cached.

Layouts: the original single file (`control_model.*` keys or the same without the prefix;
.safetensors, or a pickle read with `torch.load(weights_only=True)`), a single file with
diffusers keys (SDXL ControlNets, our starter ControlNet), and a diffusers folder. The model is
built from a config inferred from the tensors (darkroom.control.config), on the meta device,
and the file's tensors are assigned to it strictly: a missing or extra tensor is an error
naming the file, never a silently random layer.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from darkroom.control.config import (
    FAMILY_LABELS,
    RUNS,
    Kind,
    classify,
    controlnet_config,
    diffusers_shapes,
    yaml_global_pooling,
)
from darkroom.control.keys import ORIGINAL_PREFIX, original_to_diffusers
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.models.header import read_header

SUPPORTED_CLASSES = ("ControlNetModel", "ControlNetUnionModel")
KNOWN_CLASSES = {"ControlNetXSAdapter": "a ControlNet-XS model", "SparseControlNetModel": "a SparseCtrl model",
                 "MultiAdapter": "a saved group of T2I-Adapters (MultiAdapter; use each adapter's own folder)"}
"""Diffusers folder classes that are recognised but not run (ControlNets, union models and T2I-Adapters are)."""
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass
class LoadedControlNet:
    """A ControlNet ready to run: the diffusers model (eval, on its device and dtype) and what it is for."""

    model: Any  # diffusers ControlNetModel
    family: str
    path: Path
    dtype: torch.dtype
    device: torch.device
    base_key: tuple | None = None  # a Control-LoRA's: the checkpoint weights it was built on (control_lora.py)
    noun: ClassVar[str] = "ControlNet"  # what messages call it (T2I-Adapter, ControlNet-LLLite, IP-Adapter)

    @property
    def name(self) -> str:
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, self.family)

    @property
    def global_pooling(self) -> bool:
        """Shuffle-type models: the control is averaged over the image and given to the prompt half only."""
        return bool(getattr(getattr(self.model, "config", None), "global_pool_conditions", False))

    @property
    def hint_channels(self) -> int:
        """Channels of the control map the model takes: 3 (RGB) for nearly all, 1 for greyscale ones."""
        return int(getattr(getattr(self.model, "config", None), "conditioning_channels", 3))

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def unsupported(kind: Kind, name: str) -> InvalidRequest:
    return InvalidRequest(f"{name} is {kind.detail}; {RUNS}")


def check_family(controlnet_family: str | None, controlnet_name: str, model_family: str, model_name: str,
                 noun: str = "ControlNet") -> None:
    """InvalidRequest naming both when a ControlNet (or a T2I-Adapter: `noun`) does not match the checkpoint's
    family."""
    if controlnet_family is None or controlnet_family == model_family:
        return
    want = FAMILY_LABELS.get(model_family, model_family)
    raise InvalidRequest(f"{controlnet_name} is an {FAMILY_LABELS.get(controlnet_family, controlnet_family)}"
                         f" {noun}; the checkpoint {model_name} is {want}; pick an {want} {noun}")


def folder_class(folder: Path) -> str | None:
    """A diffusers folder's `_class_name` (None when config.json is missing or unreadable)."""
    try:
        doc = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc.get("_class_name") if isinstance(doc, dict) else None


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The ControlNet's tensors of a file (a 1.0 release file's bundled SD model skipped) and its metadata."""
    if path.suffix.lower() == ".safetensors":
        from darkroom.models.tensor_file import read_tensors

        header = read_header(path)  # validates the file first: a clear error for a truncated one
        keys = list(header.tensors)
        if any(k.startswith(ORIGINAL_PREFIX) for k in keys):
            keys = [k for k in keys if k.startswith(ORIGINAL_PREFIX)]
        # plain reads, not a memory map: a drive pulled out mid-read is a ModelLoadError, not SIGBUS
        return read_tensors(path, keys, header=header), dict(header.metadata)
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that is damaged or holds more than tensors
        raise ModelLoadError(f"{path.name} could not be read as a weights-only PyTorch file: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if isinstance(data, dict) and isinstance(data.get("image_proj"), dict) and isinstance(data.get("ip_adapter"), dict):
        from darkroom.control.ipadapter import flatten  # the IP-Adapter authors' nested .bin layout

        data = flatten(data)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} does not hold a dictionary of tensors")
    tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(ORIGINAL_PREFIX) for k in tensors):
        tensors = {k: v for k, v in tensors.items() if k.startswith(ORIGINAL_PREFIX)}
    return tensors, {}


def _build(config: dict, state: dict[str, torch.Tensor], name: str):
    from diffusers import ControlNetModel

    try:
        with torch.device("meta"):
            model = ControlNetModel(**config)
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{name}: the ControlNet's weights do not fit its inferred layout ({first})") from None
    return model


def load_controlnet(path: str | Path, *, dtype: torch.dtype, device: str | torch.device = "cpu",
                    base=None) -> LoadedControlNet:
    """Load the ControlNet at `path` (file or diffusers folder) as a `ControlNetModel` in `dtype` on `device`;
    a Control-LoRA is built on `base` (darkroom.control.control_lora.BaseUNet: the checkpoint's UNet)."""
    path = Path(path)
    if path.is_dir() and folder_class(path) == "T2IAdapter":  # darkroom.control.adapter
        from darkroom.control.adapter import load_folder

        return load_folder(path, dtype=dtype, device=device, weight_names=WEIGHT_NAMES)
    if path.is_dir():
        model, family = _load_folder(path, dtype)
    else:
        if not path.is_file():
            raise ModelLoadError(f"ControlNet file {path} not found")
        tensors, metadata = _read_tensors(path)
        kind = classify({k: tuple(v.shape) for k, v in tensors.items()}, metadata)
        if not kind.supported:
            raise unsupported(kind, path.name)
        if kind.layout == "t2i-style":  # the T2I-Adapter style model (darkroom.control.vision_prompt)
            from darkroom.control.vision_prompt import load_style

            return load_style(tensors, metadata, path, device=device)
        if (kind.layout or "").startswith("t2i-"):  # a T2I-Adapter (darkroom.control.adapter)
            from darkroom.control.adapter import load_tensors

            return load_tensors(tensors, metadata, path, dtype=dtype, device=device)
        if kind.layout == "ip-adapter":  # darkroom.control.ipadapter
            from darkroom.control.ipadapter import load_tensors as load_ipadapter

            return load_ipadapter(tensors, metadata, path, dtype=dtype, device=device)
        if kind.layout == "lllite":  # kohya's ControlNet-LLLite (darkroom.control.lllite)
            from darkroom.control.lllite import load_tensors as load_lllite

            return load_lllite(tensors, path, dtype=dtype, device=device)
        if kind.layout == "control-lora":  # low-rank differences from the checkpoint's UNet
            from darkroom.control.control_lora import build_control_lora

            return build_control_lora(path, tensors, kind.family, base, dtype=dtype, device=device)
        if kind.union:  # a ControlNet Union model (darkroom.control.union)
            from darkroom.control.union import build_union

            model = build_union(tensors, metadata, path.name).to(device=device, dtype=dtype).eval()
            model.requires_grad_(False)
            return LoadedControlNet(model, kind.family, path, dtype, torch.device(device))
        if kind.layout == "original":
            own = {k[len(ORIGINAL_PREFIX):] if k.startswith(ORIGINAL_PREFIX) else k: v for k, v in tensors.items()}
            try:
                state = original_to_diffusers(own)
            except ValueError as e:
                raise ModelLoadError(f"{path.name}: {e}") from None
        else:
            state = tensors
        try:
            config = controlnet_config({k: tuple(v.shape) for k, v in state.items()}, kind.family, metadata)
        except (ValueError, KeyError, StopIteration) as e:
            raise ModelLoadError(f"{path.name}: the ControlNet's layout is not recognised ({e})") from None
        yaml = path.with_suffix(".yaml")
        if yaml.is_file() and yaml_global_pooling(yaml.read_text(encoding="utf-8", errors="replace")):
            config["global_pool_conditions"] = True
        model = _build(config, state, path.name)
        family = kind.family
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return LoadedControlNet(model, family, path, dtype, torch.device(device))


def _load_folder(folder: Path, dtype: torch.dtype):
    from diffusers import ControlNetModel

    cls = folder_class(folder)
    if cls is None:
        raise ModelLoadError(f"{folder.name}: no readable config.json; not a diffusers ControlNet folder")
    if cls not in SUPPORTED_CLASSES:
        raise InvalidRequest(f"{folder.name} is {KNOWN_CLASSES.get(cls, cls)}; only ControlNets, ControlNet Union"
                             " models and T2I-Adapters are supported for now")
    variant = None
    if not (folder / WEIGHT_NAMES[0]).is_file() and (folder / WEIGHT_NAMES[1]).is_file():
        variant = "fp16"
    from darkroom.control.union import is_union_folder, load_union_folder

    if is_union_folder(folder):
        model = load_union_folder(folder, dtype, variant)
        return model, classify({k: tuple(v.shape) for k, v in model.state_dict().items()}).family
    try:
        model = ControlNetModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype,
                                                variant=variant, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"{folder.name}: the diffusers ControlNet could not be loaded ({e})") from None
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return model, classify(shapes).family


def header_kind(path: Path) -> Kind | None:
    """A file's kind from its safetensors header (no weights read); None for pickles (unknown until loaded)."""
    if path.is_dir():
        cls = folder_class(path)
        if cls == "T2IAdapter":
            from darkroom.control.adapter import folder_kind

            return folder_kind(path)
        if cls not in SUPPORTED_CLASSES:
            return Kind(False, detail=KNOWN_CLASSES.get(cls or "", f"a {cls or 'model'} folder"))
        try:
            cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        family = "sdxl" if cfg.get("addition_embed_type") == "text_time" else {
            768: "sd1", 1024: "sd2"}.get(cfg.get("cross_attention_dim"))
        if family is None:
            family = "sd2" if cfg.get("use_linear_projection") else "sd1"
        from darkroom.control.union import is_union_folder

        return Kind(True, "diffusers", family, union=is_union_folder(path))
    if path.suffix.lower() != ".safetensors":
        return None
    header = read_header(path)
    return classify({k: v.shape for k, v in header.tensors.items()}, header.metadata)


def parameter_count(path: Path) -> int | None:
    """The ControlNet's parameter count from its safetensors header(s), nothing loaded; None for a pickle."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), None)
        return None if weights is None else parameter_count(weights)
    if path.suffix.lower() != ".safetensors":
        return None
    tensors = read_header(path).tensors
    if "lora_controlnet" in tensors:  # a Control-LoRA: the ControlNet it builds, not its low-rank factors
        from darkroom.control.control_lora import parameter_count as control_lora_parameters

        return control_lora_parameters({k: v.shape for k, v in tensors.items()})
    keys = [k for k in tensors if k.startswith(ORIGINAL_PREFIX)] or list(tensors)
    return sum(math.prod(tensors[key].shape) for key in keys)


def shapes_of(path: Path) -> dict[str, tuple[int, ...]]:
    """diffusers-named shapes of a safetensors ControlNet (for estimates), without reading weights."""
    header = read_header(path)
    shapes = {k: v.shape for k, v in header.tensors.items()}
    return diffusers_shapes(shapes, classify(shapes).layout or "diffusers")


class ControlNetCache:
    """The last few loaded ControlNets, keyed by (path, mtime, size, dtype, device), so that the next
    generation with the same units does not read the files again. A file changed on disk is reloaded."""

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self._items: OrderedDict[tuple, LoadedControlNet] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many times a file was actually read (tests check the cache with it)

    @staticmethod
    def _key(path: Path, dtype: torch.dtype, device) -> tuple:
        weights = path
        if path.is_dir():
            weights = next((path / n for n in WEIGHT_NAMES if (path / n).is_file()), path / "config.json")
        try:
            st = weights.stat()
        except OSError:
            raise ModelLoadError(f"ControlNet {path} not found") from None
        return (str(path.resolve()), st.st_mtime_ns, st.st_size, str(dtype), str(torch.device(device)))

    def get(self, path: str | Path, *, dtype: torch.dtype, device: str | torch.device = "cpu",
            base=None) -> LoadedControlNet:
        """`base`: the checkpoint a Control-LoRA is built on (control_lora.BaseUNet); a Control-LoRA is kept
        under its base's key too, so one built on another checkpoint (or other merged LoRAs) is never reused."""
        path = Path(path)
        key = self._key(path, dtype, device)
        based = key + (base.key,) if base is not None else None
        with self._lock:
            for k in (key, based):
                if k is not None and k in self._items:
                    self._items.move_to_end(k)
                    return self._items[k]
            loaded = load_controlnet(path, dtype=dtype, device=device, base=base)
            self.loads += 1
            if loaded.base_key is not None:
                key = key + (loaded.base_key,)
            self._items[key] = loaded
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
