"""A separate VAE used in place of a checkpoint's own (the webui's "SD VAE" setting).

Files users have: LDM-layout `.safetensors` (`encoder.down.0.block.0...`, `quant_conv`,
sometimes under `first_stage_model.`, or a whole checkpoint whose VAE part is wanted),
diffusers `AutoencoderKL` weights (`encoder.down_blocks.0.resnets.0...`, as a file or a
folder with config.json), and legacy pickles (`.pt`/`.ckpt`, only with allow_pickle and
then with `torch.load(weights_only=True)`). The config comes from the tensor shapes; the
scaling factor is the model's (SD 0.18215, SDXL 0.13025), as a VAE file does not say.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from darkroom.errors import InvalidRequest, ModelLoadError, ModelNotFound
from darkroom.fsutil import unique_dirs
from darkroom.home import Home, is_folder
from darkroom.models import configs, convert
from darkroom.models.configs import _indices
from darkroom.models.families import detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import SafetensorsHeader, read_header
from darkroom.models.library import folder_size, walk_models
from darkroom.models.loader import LoadedModel, _build, _header_from_tensors, _read_pickle
from darkroom.models.tensor_file import read_tensors

VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
AUTOMATIC, NONE = "Automatic", "None"
"""The webui's choices meaning "no separate VAE" (Automatic also takes a `<checkpoint>.vae.*` beside it)."""
_PREFIXES = ("", "first_stage_model.", "vae.")
_LDM_PROBE = "encoder.down.0.block.0.conv1.weight"
_DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# diffusers renamed the mid-block attention; old AutoencoderKL files still carry these names
_OLD_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _layout(keys: set[str]) -> tuple[str, str] | None:
    """(layout, prefix) of the VAE weights among `keys`: layout "ldm" or "diffusers"."""
    for prefix in _PREFIXES:
        if prefix + _LDM_PROBE in keys:
            return "ldm", prefix
        if prefix + _DIFFUSERS_PROBE in keys:
            return "diffusers", prefix
    return None


def _diffusers_config(h: SafetensorsHeader, prefix: str, family: str) -> dict[str, Any]:
    keys = [k[len(prefix):] for k in h.tensors if k.startswith(prefix)]
    shape = lambda k: h.tensors[prefix + k].shape  # noqa: E731
    levels = _indices(keys, r"encoder\.down_blocks\.(\d+)\.")
    channels = [shape(f"encoder.down_blocks.{i}.resnets.0.conv2.weight")[0] for i in levels]
    layers = len(_indices(keys, r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))
    return configs.vae_config_from(shape, channels, layers, family)


def _diffusers_state_dict(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if not name.startswith(_VAE_PARTS):
            continue
        if ".attentions." in name:
            for old, new in _OLD_ATTENTION.items():
                head, sep, tail = name.rpartition("." + old)
                if sep:
                    name = f"{head}.{new}{tail}"
                    break
            if value.ndim == 4:
                value = value[:, :, 0, 0]  # 1x1 conv attention -> linear
        out[name] = value
    return out


def describe_vae(config: Any) -> str:
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k)
    levels = len(get("block_out_channels"))
    return (f"{get('latent_channels')} latent channels, block widths {list(get('block_out_channels'))}"
            f" ({2 ** (levels - 1)}x downscale)")


def check_fits(config: dict[str, Any], like: LoadedModel, name: str) -> None:
    """Raise InvalidRequest when a VAE of `config` cannot replace `like`'s own VAE."""
    own = like.vae.config
    fits = (
        config["latent_channels"] == own.latent_channels
        and len(config["block_out_channels"]) == len(own.block_out_channels)
        and config["in_channels"] == own.in_channels
        and config["out_channels"] == own.out_channels
    )
    if not fits:
        raise InvalidRequest(
            f"VAE {name} does not fit model {like.name}: the VAE has {describe_vae(config)}, the model's VAE has"
            f" {describe_vae(own)}; choose a VAE made for {like.family.label} models"
        )


def _read_selected(path: Path, keys: list[str], header: SafetensorsHeader) -> dict[str, torch.Tensor]:
    """Plain reads, not a memory map: a drive pulled out mid-read is a ModelLoadError naming the file, not SIGBUS."""
    return read_tensors(path, keys, header=header)


def _not_a_vae(path: Path, header: SafetensorsHeader) -> ModelLoadError:
    d = detect(header)
    what = f" (this is a {d.label} file)" if d.kind in ("lora", "embedding", "unsupported") else ""
    return ModelLoadError(
        f"{path.name}: no VAE weights found{what}; expected encoder./decoder. keys in the LDM or diffusers layout"
    )


def load_vae_file(path: str | Path, *, like: LoadedModel | None = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, allow_pickle: bool = False) -> AutoencoderKL:
    """An AutoencoderKL from a VAE file or diffusers folder, checked to fit `like` (the model it
    will decode for: its scaling factor is kept). Device and dtype default to `like`'s VAE's.
    Errors: ModelLoadError for unreadable files (the checkpoint loader's messages), InvalidRequest
    for a VAE of another architecture than `like`'s."""
    path = Path(path)
    device = device or (like.device if like is not None else torch.device("cpu"))
    dtype = dtype or (like.vae_dtype if like is not None else torch.float32)
    family = like.family.id if like is not None else "sd1"
    if path.is_dir():
        vae = _load_diffusers_folder(path, dtype)
        config = dict(vae.config)
        if like is not None:
            check_fits(config, like, path.name)
            vae.register_to_config(scaling_factor=like.vae.config.scaling_factor)
        return _finish(vae, like, device)
    if not path.exists():
        raise ModelNotFound(f"VAE file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        header = read_header(path)
        found = _layout(set(header.tensors))
        if found is None:
            raise _not_a_vae(path, header)
        layout, prefix = found
        sd = _read_selected(path, [k for k in header.tensors if k.startswith(prefix) and not k.startswith("model_ema.")
                                   and k[len(prefix):].startswith(_VAE_PARTS)], header)
    elif suffix in (".pt", ".ckpt", ".pth", ".bin"):
        sd = _read_pickle(path, allow_pickle)
        header = _header_from_tensors(path, sd)
        found = _layout(set(sd))
        if found is None:
            raise _not_a_vae(path, header)
        layout, prefix = found
    else:
        raise ModelLoadError(f"{path.name}: not a VAE file (expected .safetensors, or .pt/.ckpt with --allow-pickle)")

    try:
        if layout == "ldm":
            overrides = configs.metadata_overrides(header).get("vae")
            config = configs.vae_config(header, family, prefix=prefix, overrides=overrides)
        else:
            config = _diffusers_config(header, prefix, family)
    except (KeyError, TypeError, IndexError) as e:
        raise ModelLoadError(f"{path.name}: incomplete VAE (missing {e})") from None
    keys = {k[len(prefix):] for k in header.tensors if k.startswith(prefix)}
    config["use_quant_conv"] = "quant_conv.weight" in keys
    config["use_post_quant_conv"] = "post_quant_conv.weight" in keys
    config["mid_block_add_attention"] = any(k.startswith(("encoder.mid.attn_1.", "encoder.mid_block.attentions."))
                                            for k in keys)
    if like is not None:
        check_fits(config, like, path.name)
        config["scaling_factor"] = like.vae.config.scaling_factor
        config["sample_size"] = like.vae.config.sample_size
    try:
        state = convert.vae_state_dict(sd, config, prefix=prefix) if layout == "ldm" else _diffusers_state_dict(
            sd, prefix)
    except (KeyError, IndexError) as e:
        raise ModelLoadError(f"{path.name}: incomplete VAE (missing {e})") from None
    vae = _build(AutoencoderKL, config, state, "VAE", path, dtype)
    return _finish(vae, like, device)


def _load_diffusers_folder(folder: Path, dtype: torch.dtype) -> AutoencoderKL:
    sub = None if (folder / "config.json").exists() else "vae"
    if sub and not (folder / sub / "config.json").exists():
        raise ModelLoadError(f"{folder.name}: not a diffusers VAE folder (no config.json, nor vae/config.json)")
    try:
        vae = AutoencoderKL.from_pretrained(folder, subfolder=sub, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder.name}: incomplete diffusers VAE folder ({str(e).splitlines()[0]})") from None
    return vae.eval().requires_grad_(False)


def _finish(vae: AutoencoderKL, like: LoadedModel | None, device: torch.device) -> AutoencoderKL:
    vae = vae.to(device)
    if like is not None:
        weight = like.vae.decoder.conv_in.weight
        if weight.ndim == 4 and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
            vae.to(memory_format=torch.channels_last)  # as the model cache does on CPU
    return vae


@contextmanager
def swap_vae(model: LoadedModel, vae: AutoencoderKL | None) -> Iterator[LoadedModel]:
    """Decode (and encode) with `vae` inside the block; the model's own VAE is put back after,
    even on errors. `None` leaves the model's own VAE in place."""
    if vae is None or vae is model.vae:
        yield model
        return
    original = model.vae
    model.vae = vae
    try:
        yield model
    finally:
        model.vae = original


# --------------------------------------------------------------------------- folders


@dataclass
class VaeEntry:
    name: str  # what the webui shows, chooses by and writes as `VAE:`: the file name
    path: Path
    size: int

    @property
    def weights(self) -> Path:
        """The file whose hash identifies it (a diffusers folder: its weights file)."""
        if self.path.is_dir():
            for base in (self.path, self.path / "vae"):
                for fn in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                           "diffusion_pytorch_model.bin"):
                    if (base / fn).exists():
                        return base / fn
        return self.path


@dataclass
class SeparateVae:
    """A loaded VAE file and what the infotext records about it."""

    entry: VaeEntry
    vae: AutoencoderKL
    short_hash: str

    def infotext(self) -> dict[str, str]:
        """{"VAE hash": 10 hex digits, "VAE": file name}, the webui's two infotext keys."""
        return {"VAE hash": self.short_hash, "VAE": self.entry.name}


VAE_FILE_SUFFIXES = (".safetensors", ".pt", ".ckpt")


def _is_vae_folder(p: Path) -> bool:
    """A diffusers AutoencoderKL folder (its config.json says so; a huge or odd one is not read)."""
    cfg = p / "config.json"
    try:
        if not cfg.is_file() or cfg.stat().st_size > 1 << 20:
            return False
        return '"AutoencoderKL"' in cfg.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


class VaeLibrary:
    """VAE files in `models/vae`, an A1111 root's `models/VAE` and a ComfyUI root's
    `models/vae`, plus `*.vae.safetensors|pt|ckpt` among the checkpoints (as the webui lists).
    Keeps the last loaded VAE, so a run of generations with one VAE reads it once."""

    def __init__(self, home: Home, hashes: HashCache | None = None, *, allow_pickle: bool = False):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)
        self.allow_pickle = allow_pickle
        self._last: tuple[tuple, SeparateVae] | None = None
        self._lock = threading.Lock()

    def dirs(self) -> list[Path]:
        dirs = [self.home.vae]
        for extra in self.home.extra_model_dirs:
            for sub in ("models/VAE", "models/vae"):
                if (extra / sub).is_dir():
                    dirs.append(extra / sub)
        return unique_dirs(dirs)

    def scan(self) -> list[VaeEntry]:
        entries: list[VaeEntry] = []
        seen: set[Path] = set()

        def add(p: Path) -> None:
            key = p.resolve()
            if key in seen:
                return
            seen.add(key)
            size = folder_size(p) if p.is_dir() else p.stat().st_size
            entries.append(VaeEntry(p.name, p, size))

        def weights(name: str) -> bool:
            return name.lower().endswith(VAE_FILE_SUFFIXES)

        # one bounded walk (see walk_models): a models folder may be anything a user typed
        for folder in self.dirs():
            if is_folder(folder):
                for p in walk_models(folder, weights, bundle=_is_vae_folder):
                    add(p)
        for folder in self.home.checkpoint_dirs():
            if is_folder(folder):
                for p in walk_models(folder, lambda name: ".vae." in name.lower() and weights(name)):
                    add(p)
        return entries

    def resolve(self, choice: str | Path | None, checkpoint: Path | None = None) -> VaeEntry | None:
        """The VAE a user chose: None for the checkpoint's own ("Automatic", "None", ""); a path;
        or a name (file name, with or without extension, any case) or short hash. "Automatic"
        with `checkpoint` takes a `<checkpoint stem>.vae.*` file beside it, as the webui does."""
        if choice is None:
            return None
        text = str(choice).strip()
        if text in ("", NONE) or text.lower() == "none":
            return None
        if text == AUTOMATIC or text.lower() == "automatic":
            if checkpoint is not None:
                for suffix in (".safetensors", ".pt", ".ckpt"):
                    beside = Path(checkpoint).with_name(Path(checkpoint).stem + ".vae" + suffix)
                    if beside.is_file():
                        return VaeEntry(beside.name, beside, beside.stat().st_size)
            return None
        candidate = Path(text).expanduser()
        if candidate.exists():
            return VaeEntry(candidate.name, candidate.resolve(), 0 if candidate.is_dir() else candidate.stat().st_size)
        entries = self.scan()
        lowered = text.lower()
        for test in (lambda e: e.name == text, lambda e: e.name.lower() == lowered,
                     lambda e: e.path.stem.lower() == lowered):
            for e in entries:
                if test(e):
                    return e
        if 8 <= len(lowered) <= 64 and all(c in "0123456789abcdef" for c in lowered):
            for e in entries:
                if self.hashes.sha256(e.weights).startswith(lowered[:10]):
                    return e
        names = ", ".join(e.name for e in entries) or "none"
        raise ModelNotFound(f"no VAE named {text!r} in {', '.join(str(d) for d in self.dirs())} (available: {names})")

    def short_hash(self, entry: VaeEntry) -> str:
        """The webui's `VAE hash`: the first 10 hex digits of the file's SHA-256."""
        return self.hashes.short_hash(entry.weights)

    def load(self, choice: str | Path | None, like: LoadedModel, *, checkpoint: Path | None = None
             ) -> SeparateVae | None:
        """Resolve and load the chosen VAE for `like` (None: use the model's own)."""
        entry = self.resolve(choice, checkpoint)
        if entry is None:
            return None
        st = entry.weights.stat()
        own = like.vae.config
        key = (str(entry.path.resolve()), st.st_size, st.st_mtime_ns, str(like.path), str(like.device),
               like.vae_dtype, own.scaling_factor, own.latent_channels, tuple(own.block_out_channels))
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
            self._last = None  # free the previous one before reading the next
            vae = load_vae_file(entry.path, like=like, allow_pickle=self.allow_pickle)
            loaded = SeparateVae(entry, vae, self.short_hash(entry))
            self._last = (key, loaded)
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._last = None
