"""Load a checkpoint (single file or diffusers folder) into ready-to-run components, offline.

Configs come from the file's own tensor shapes (darkroom.models.configs) and the tokenizer
ships with the package, so nothing is ever fetched. Every failure a user can cause is a
ModelLoadError naming the file and the problem.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from darkroom.errors import ModelLoadError, UnsupportedModel
from darkroom.models import configs, convert
from darkroom.models.families import FAMILIES, Detection, Family, detect
from darkroom.models.header import SafetensorsHeader, TensorInfo, read_header
from darkroom.models.library import has_component, read_model_index
from darkroom.models.tensor_file import DTYPES as _DTYPES
from darkroom.models.tensor_file import check_layout


@dataclass
class LoadOptions:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    vae_dtype: torch.dtype = torch.float32
    allow_pickle: bool = False
    v_prediction: bool | None = None  # None: as detected
    channels_last: bool = False  # UNet/VAE 4-D weights stored NHWC as they load (oneDNN's fast layout on CPU)


@dataclass
class TextEncoderSlot:
    """One text encoder and how the webui pads its prompts (CLIP pads with EOS, OpenCLIP with 0)."""

    model: CLIPTextModel | CLIPTextModelWithProjection
    pad_id: int
    layout: str


@dataclass
class LoadedModel:
    name: str
    path: Path
    family: Family
    detection: Detection
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoderSlot]
    scheduler_config: dict[str, Any]
    dtype: torch.dtype
    vae_dtype: torch.dtype
    device: torch.device
    load_seconds: float = 0.0

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: 8 for every real SD VAE (3 downsamples), less for tiny ones."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side length the model was trained at: 512 SD1/SD2, 768 SD2-v, 1024 SDXL."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def v_prediction(self) -> bool:
        return self.scheduler_config["prediction_type"] == "v_prediction"


def _build(cls, config, sd: dict[str, torch.Tensor | None], what: str, path: Path, dtype: torch.dtype,
           source: _FileTensors | None = None, channels_last: bool = False):
    """Instantiate without allocating weights, check names and shapes, then fill in the tensors
    one at a time, each converted to `dtype` (and 4-D ones to channels_last when asked) as it
    arrives: at most one full copy of the weights exists, plus the tensor in flight.

    The values of `sd` are real tensors, or meta stand-ins from `source` (read from the file here)."""
    with init_empty_weights():
        model = cls(config) if not isinstance(config, dict) else cls.from_config(config)
    if what.startswith("text encoder"):
        sd = convert.fit_text_keys(model, sd)
    sd = {k: v for k, v in sd.items() if v is not None}  # diffusers' converters map absent keys to None
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    extra = sorted(set(sd) - expected)
    if missing or extra:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise ModelLoadError(f"{path.name}: the {what} weights do not match their detected layout ({detail})")
    # names and shapes are checked by torch on meta stand-ins, before anything is read or copied
    shapes = {k: v if v.is_meta else v.to("meta") for k, v in sd.items()}
    try:
        model.load_state_dict(shapes, strict=True, assign=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelLoadError(f"{path.name}: the {what} weights have unexpected shapes ({first})") from None
    del shapes
    _fill(model, sd, source, dtype, channels_last)
    # buffers created by __init__ that are not in the state dict (e.g. position_ids) are still meta
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                raise ModelLoadError(f"{path.name}: the {what} has an uninitialised buffer {name}")
    return model.eval().requires_grad_(False)


def _fill(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: _FileTensors | None, dtype: torch.dtype,
          channels_last: bool) -> None:
    """Replace the model's meta tensors by the real ones, reading each file tensor once (in file
    order) and converting it before the next is read."""
    by_source: dict[str | None, list[tuple[str, torch.Tensor, tuple | None]]] = {}
    for name, value in sd.items():
        key, view = source.origin(value) if source is not None and value.is_meta else (None, None)
        by_source.setdefault(key, []).append((name, value, view))
    order = sorted((k for k in by_source if k is not None), key=source.offset) if source is not None else []
    for name, value, _ in by_source.pop(None, []):
        _assign(model, name, _convert(value, dtype, channels_last))
    for key in order:
        targets = by_source[key]
        if len(targets) == 1 and targets[0][2] is None:  # the common case: one tensor, renamed
            name, value, _ = targets[0]
            _assign(model, name, source.read_into(key, dtype if value.is_floating_point() else value.dtype,
                                                  channels_last and value.dim() == 4))
            continue
        tensor = source.read(key)  # sliced or shared (q/k/v, 1x1 conv -> linear): read whole, then cut
        for name, _, view in targets:
            part = tensor if view is None else tensor.as_strided(*view)
            _assign(model, name, _convert(part, dtype, channels_last))
        del tensor, part


def _convert(t: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """The tensor as the model keeps it: compute dtype, contiguous (NHWC for 4-D ones when asked),
    owning exactly its own bytes (a slice of a bigger tensor is copied, never kept as a view)."""
    if t.is_floating_point():
        t = t.to(dtype)
    fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.contiguous_format
    t = t.contiguous(memory_format=fmt)
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone(memory_format=fmt)
    return t


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if leaf in module._parameters:
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


class _FileTensors:
    """A .safetensors file's tensors as meta stand-ins (shape and dtype only) that the converters
    rename and slice like real ones; `read` then loads one tensor at a time with a plain file read.

    Plain reads, not the safetensors memory map: pages of a mapped file count as this process's
    resident memory while the map is open, which would add the whole file to the peak."""

    def __init__(self, path: Path, header: SafetensorsHeader, keep: list[str]):
        self.path, self.header = path, header
        self.meta: dict[str, torch.Tensor] = {}
        self._key_of: dict[int, str] = {}
        for key in keep:
            info = header.tensors[key]
            stand_in = torch.empty(info.shape, dtype=_DTYPES.get(info.dtype) or torch.uint8, device="meta")
            self.meta[key] = stand_in
            self._key_of[id(stand_in)] = key
        self._data_start = 8 + header.header_size
        self._chunk: torch.Tensor | None = None

    def origin(self, t: torch.Tensor) -> tuple[str, tuple | None]:
        """(file key, as_strided arguments or None) that `t`, a stand-in or a view of one, comes from."""
        if id(t) in self._key_of:
            return self._key_of[id(t)], None
        base = t._base
        if base is not None and id(base) in self._key_of:
            return self._key_of[id(base)], (tuple(t.shape), t.stride(), t.storage_offset())
        raise ModelLoadError(f"{self.path.name}: cannot read tensors (a converted tensor is not a view of the file)")

    def offset(self, key: str) -> int:
        return self.header.tensors[key].offsets[0]

    CHUNK = 8 * 2**20

    def read_into(self, key: str, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
        """Tensor `key` as a new `dtype` tensor (NHWC when asked), filled straight from the file:
        in place when the file holds that dtype, else through one reused 8 MiB buffer, so no
        full-size temporary is made (nor left behind as heap fragments) per tensor."""
        info = self.header.tensors[key]
        src_dtype = _DTYPES.get(info.dtype)
        if src_dtype is None or len(info.shape) == 0 or 0 in info.shape:
            return _convert(self.read(key), dtype, channels_last)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty(info.shape, dtype=dtype, memory_format=fmt)
        begin, end = info.offsets
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._data_start + begin)
                if src_dtype == dtype and not channels_last:
                    self._fill_bytes(fh, out.view(-1).view(torch.uint8), key)
                    return out
                row = (end - begin) // info.shape[0]
                rows = max(1, self.CHUNK // max(row, 1))
                if self._chunk is None or self._chunk.numel() < rows * row:
                    self._chunk = torch.empty(max(self.CHUNK, row), dtype=torch.uint8)
                for r0 in range(0, info.shape[0], rows):
                    n = min(rows, info.shape[0] - r0)
                    part = self._chunk[: n * row]
                    self._fill_bytes(fh, part, key)
                    out[r0:r0 + n].copy_(part.view(src_dtype).view(n, *info.shape[1:]))
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{self.path.name}: cannot read tensors ({e})") from None
        return out

    def _fill_bytes(self, fh, buf: torch.Tensor, key: str) -> None:
        want = buf.numel()
        got = fh.readinto(memoryview(buf.numpy())) if want else 0
        if got != want:
            raise ModelLoadError(f"{self.path.name}: cannot read tensors (the file ends inside tensor {key!r};"
                                 " it was truncated while loading)")

    def read(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        dtype = _DTYPES.get(info.dtype)
        begin, end = info.offsets
        try:
            if dtype is None:  # check_layout refuses these when the file is opened
                raise ValueError(f"tensor {key!r} has dtype {info.dtype}, which Darkroom cannot read")
            buf = torch.empty(end - begin, dtype=torch.uint8)
            with open(self.path, "rb") as fh:
                fh.seek(self._data_start + begin)
                got = fh.readinto(memoryview(buf.numpy())) if end > begin else 0
            if got != end - begin:
                raise ValueError(f"the file ends inside tensor {key!r}; it was truncated while loading")
            return buf.view(dtype).reshape(info.shape)
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise ModelLoadError(f"{self.path.name}: cannot read tensors ({e})") from None


def _read_tensors(path: Path, header: SafetensorsHeader) -> _FileTensors:
    """Meta stand-ins for the file's tensors (EMA weights left out); nothing is read yet.

    The layout (offsets that tile the data, known dtypes) is checked from the header alone, as
    safetensors would, without mapping the file (a drive pulled out mid-read would be SIGBUS)."""
    keep = [k for k in header.tensors if not k.startswith("model_ema.")]
    check_layout(header)
    return _FileTensors(path, header, keep)


def _header_from_tensors(path: Path, sd: dict[str, torch.Tensor]) -> SafetensorsHeader:
    tensors = {k: TensorInfo(str(v.dtype), tuple(v.shape), (0, 0)) for k, v in sd.items() if torch.is_tensor(v)}
    return SafetensorsHeader(path, tensors)


def _read_pickle(path: Path, allow: bool) -> dict[str, torch.Tensor]:
    if not allow:
        raise ModelLoadError(
            f"{path.name}: pickled checkpoints (.ckpt/.pt) can run arbitrary code when loaded, so Darkroom"
            " refuses them by default; prefer a .safetensors version of this model, or pass --allow-pickle"
            " to load it with torch.load(weights_only=True)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        what = f"{type(e).__name__}: {e}"
        raise ModelLoadError(f"{path.name}: cannot be loaded as a restricted pickle ({what})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name}: not a checkpoint (the pickle holds no state dict)")
    return {k: v for k, v in obj.items() if torch.is_tensor(v) and not k.startswith("model_ema.")}


def load_checkpoint(path: Path, opts: LoadOptions) -> LoadedModel:
    path = Path(path)
    start = time.perf_counter()
    if path.is_dir():
        model = _load_diffusers_folder(path, opts)
        model.load_seconds = time.perf_counter() - start
        return model
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        header = read_header(path)
        detection = _require_checkpoint(path, detect(header))
        source: _FileTensors | None = _read_tensors(path, header)
        sd: dict[str, torch.Tensor] = source.meta
    elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
        sd = _read_pickle(path, opts.allow_pickle)
        source = None
        header = _header_from_tensors(path, sd)
        detection = _require_checkpoint(path, detect(header))
    else:
        raise ModelLoadError(
            f"{path.name}: not a checkpoint file (expected .safetensors, or .ckpt with --allow-pickle)")

    family = FAMILIES[detection.family]
    overrides = configs.metadata_overrides(header)
    v_pred = detection.v_prediction if opts.v_prediction is None else opts.v_prediction
    try:
        unet_cfg = configs.unet_config(header, family.id, overrides.get("unet"), v_prediction=v_pred)
        vae_cfg = configs.vae_config(header, family.id, overrides=overrides.get("vae"))
        cl = opts.channels_last
        unet = _build(UNet2DConditionModel, unet_cfg, convert.unet_state_dict(sd, unet_cfg), "UNet", path,
                      opts.dtype, source, cl)
        vae = _build(AutoencoderKL, vae_cfg, convert.vae_state_dict(sd, vae_cfg), "VAE", path, opts.vae_dtype,
                     source, cl)
        encoders = []
        for i, (prefix, layout) in enumerate(family.text_encoders):
            is_sdxl_g = family.id.startswith("sdxl") and layout == "openclip"
            te_cfg = configs.text_encoder_config(
                header, prefix, layout, drop_last_layer=family.id == "sd2", with_projection=is_sdxl_g,
                overrides=overrides.get("text_encoder_2" if i == 1 or family.id == "sdxl-refiner" else "text_encoder"),
            )
            config = CLIPTextConfig(**te_cfg)
            if layout == "hf":
                te_sd = convert.hf_clip_state_dict(sd, prefix)
            else:
                te_sd = convert.openclip_state_dict(sd, prefix, te_cfg["num_hidden_layers"])
            cls = CLIPTextModelWithProjection if is_sdxl_g else CLIPTextModel
            if not is_sdxl_g:
                te_sd.pop("text_projection.weight", None)
            te = _build(cls, config, te_sd, f"text encoder {i + 1}", path, opts.dtype, source)
            del te_sd
            encoders.append(TextEncoderSlot(te, pad_id=49407 if layout == "hf" else 0, layout=layout))
    except (KeyError, StopIteration, IndexError) as e:
        raise ModelLoadError(f"{path.name}: incomplete {family.label} checkpoint (missing {e})") from None
    del sd, source
    gc.collect()  # the converters' dicts and the pickle's tensors: nothing of the file stays referenced
    return LoadedModel(
        name=path.stem, path=path, family=family, detection=detection,
        unet=unet.to(opts.device), vae=vae.to(opts.device), text_encoders=_to(encoders, opts.device),
        scheduler_config=configs.scheduler_config(v_pred), dtype=opts.dtype, vae_dtype=opts.vae_dtype,
        device=opts.device, load_seconds=time.perf_counter() - start,
    )


def _to(encoders: list[TextEncoderSlot], device: torch.device) -> list[TextEncoderSlot]:
    for slot in encoders:
        slot.model.to(device)
    return encoders


def _require_checkpoint(path: Path, d: Detection) -> Detection:
    if d.kind == "checkpoint":
        return d
    if d.kind == "unsupported":
        raise UnsupportedModel(f"{path.name}: not supported yet: detected {d.detail}")
    if d.kind in ("lora", "embedding", "vae"):
        where = {"lora": "models/loras", "embedding": "models/embeddings", "vae": "models/vae"}[d.kind]
        raise ModelLoadError(
            f"{path.name}: this is a {d.detail}, not a checkpoint; put it in {where} and use it with a checkpoint"
        )
    raise ModelLoadError(f"{path.name}: not a Stable Diffusion checkpoint (no UNet, VAE and text encoder found)")


def _load_diffusers_folder(folder: Path, opts: LoadOptions) -> LoadedModel:
    index = read_model_index(folder)
    has1, has2 = has_component(index, "text_encoder"), "text_encoder_2" in index
    kw = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=opts.dtype, **kw)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=opts.vae_dtype, **kw)
        encoders: list[TextEncoderSlot] = []
        if has1:
            te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=opts.dtype, **kw)
            openclip = te.config.hidden_act == "gelu"
            layout = "openclip" if openclip else "hf"
            encoders.append(TextEncoderSlot(te, pad_id=0 if openclip else 49407, layout=layout))
        if has_component(index, "text_encoder_2"):
            te2 = CLIPTextModelWithProjection.from_pretrained(
                folder, subfolder="text_encoder_2", torch_dtype=opts.dtype, **kw
            )
            encoders.append(TextEncoderSlot(te2, pad_id=0, layout="openclip"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder.name}: incomplete diffusers folder ({str(e).splitlines()[0]})") from None
    if has2:
        family_id = "sdxl" if has1 else "sdxl-refiner"
    else:
        family_id = "sd2" if encoders and encoders[0].layout == "openclip" else "sd1"
    prediction = _prediction_type(folder)
    v_pred = prediction == "v_prediction" if opts.v_prediction is None else opts.v_prediction
    detection = Detection("checkpoint", family_id, inpainting=unet.config.in_channels == 9, v_prediction=v_pred)
    for slot in encoders:
        slot.model.eval().requires_grad_(False)
    return LoadedModel(
        name=folder.name, path=folder, family=FAMILIES[family_id], detection=detection,
        unet=unet.eval().requires_grad_(False).to(opts.device), vae=vae.eval().requires_grad_(False).to(opts.device),
        text_encoders=_to(encoders, opts.device), scheduler_config=configs.scheduler_config(v_pred),
        dtype=opts.dtype, vae_dtype=opts.vae_dtype, device=opts.device,
    )


def _prediction_type(folder: Path) -> str:
    """What the folder's scheduler_config.json says (epsilon when it has none), checked like model_index.json."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.exists():
        return "epsilon"
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        config = json.loads(path.read_text(encoding="utf-8"))
        prediction = config.get("prediction_type", "epsilon")
        if not isinstance(prediction, str):
            raise ValueError(f"prediction_type is {json.dumps(prediction)[:40]}, not a name")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        what = e if not isinstance(e, AttributeError) else "not a JSON object"
        raise ModelLoadError(f"{folder.name}: unreadable scheduler/scheduler_config.json ({what})") from None
    return prediction
