"""How much memory a generation will need at its peak, estimated before anything is allocated.

The estimate is the sum of (docs/limits.md has the calibration table):

- **weights**: every tensor the loader keeps (UNet, VAE, text encoders; EMA copies are not
  loaded), element counts from the safetensors header times the compute dtype's size (the
  VAE's own dtype for the VAE). When the model is already loaded, what is resident is counted.
- **overhead**: a fixed allowance for what a running generation holds besides weights and
  activations (oneDNN/cuDNN workspaces, allocator slack, the scheduler's state).
- the largest **phase** (phases run one after another, so only the largest counts):
  - UNet at the latent size for the UNet batch (batch size, doubled by CFG when cfg_scale > 1):
    the skip connections the down path keeps plus the working set of the widest block
    (transformer blocks: GEGLU feed-forward, 14 channels' worth per channel; resnets: 6),
    both linear in pixels (attention runs through scaled_dot_product_attention, whose flash /
    memory-efficient kernels are linear: measured on CPU, see docs/limits.md);
  - the hires second pass, the same at its size;
  - VAE decode of the whole batch at image size: the widest full-resolution feature maps
    (the up block's input is upsampled from the next level's channels) times a working factor,
    plus, on CUDA/MPS, the mid-block's single-head attention matrix ((h*w/64)^2 per image:
    its 512-wide head is outside the flash kernels there) - what blows up at 4096x4096.
    With tiled VAE (vae_tiling.py: "auto" tiles when the untiled decode would not fit, one image
    at a time) the phase is min(untiled, one TILE_PIXELS tile of one image + the batch's output
    buffers);
  - VAE encode (img2img's init image, the hires fix's non-latent upscalers), the same way;
  - the hires fix's upscaler model (an ESRGAN-like 4x network run in tiles: darkroom/upscale/tiled.py);
  - plus the finished images kept until the request ends (PNG bytes, 2 bytes a pixel: raw
    RGB is 3, PNG of a photo about half of that).

The activation constants were fitted to peak RSS of a full-size SD1.5 (benchmarks/memory_peak.py)
and multiplied by MARGIN, so the estimate errs on the high side.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from darkroom.models.families import FAMILIES, UNET, detect
from darkroom.models.header import read_header
from darkroom.request import GenerationRequest
from darkroom.upscale.tiled import working_bytes as upscale_working_bytes

__all__ = ["Arch", "Estimate", "SD15", "SDXL", "read_arch", "arch_of_loaded", "estimate", "estimate_for_model",
           "available_memory", "human_gb", "resident_bytes", "unet_activations", "vae_activations",
           "attention_bank_bytes"]

GiB = 2**30
MARGIN = 1.25
"""Every activation and overhead term is multiplied by this: the estimate errs 25% high."""
UNET_SKIP_FACTOR = 1.0
UNET_ATTN_WORK = 22  # channels' worth of live tensors in a transformer block (GEGLU 8 + 4 + 2, q/k/v...; fitted)
UNET_RES_WORK = 6  # in a resnet block (input with the concatenated skip, norm, silu, conv out)
VAE_WORK = 4  # live full-resolution maps of the widest channel count in a VAE block
RESULT_BYTES = 2  # per pixel and finished image: the PNG kept in memory until the request ends
OVERHEAD = int(0.3 * GiB)  # text encoding, sampler state, workspaces, allocator slack (measured 0.1-0.15 GiB)
ACT_BYTES_CPU_BF16 = 4  # the UNet in bf16 on CPU: its intermediates measure as fp32-sized (the VAE's do not)

UPSCALER_WEIGHTS = 200 * 2**20  # an upscaler model's weights (ESRGAN 4x: 67 MB; HAT-L, the largest common one: 160 MB)
TILE_PIXELS = 512
"""The side of one tile of the tiled VAE (darkroom/engine/vae_tiling.py), in pixels: 64 latent cells for SD."""
_SKIP_PREFIXES = ("model_ema.",)
_VAE = "first_stage_model."


@dataclass(frozen=True)
class Arch:
    """What the estimate needs to know about a model: parameter counts and widths."""

    family: str
    unet_params: int
    vae_params: int
    other_params: int  # text encoders and the rest the loader keeps
    unet_channels: tuple[int, ...]
    unet_layers: int  # resnets per level
    unet_attention: tuple[int, ...]  # transformer depth per level (0: none)
    vae_channels: tuple[int, ...]
    resident: int = 0  # bytes of the loaded model's weights when counted from memory, else 0

    @property
    def factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def native_size(self) -> int:
        return FAMILIES[self.family].native_size if self.family in FAMILIES else 512


@dataclass(frozen=True)
class Estimate:
    weights: int
    overhead: int
    unet: int  # the largest UNet pass's activations
    vae: int  # the largest VAE phase (tiled when that is smaller)
    results: int
    vae_untiled: int = 0

    @property
    def activations(self) -> int:
        return max(self.unet, self.vae)

    @property
    def peak(self) -> int:
        return self.weights + self.overhead + self.activations + self.results


# --------------------------------------------------------------------------------------------- arch


_cache: dict[tuple, Arch] = {}
_cache_lock = threading.Lock()


def read_arch(path: Path) -> Arch:
    """The model's Arch from its files (header and configs only; nothing loaded), cached per file version."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    arch = _arch_from_folder(path) if path.is_dir() else _arch_from_file(path)
    with _cache_lock:
        _cache[key] = arch
    return arch


def _arch_from_file(path: Path) -> Arch:
    from darkroom.models import configs

    h = read_header(path)
    family = detect(h).family or "sd1"
    unet = configs.unet_config(h, family)
    vae = configs.vae_config(h, family)
    counts = {"unet": 0, "vae": 0, "other": 0}
    for key, info in h.tensors.items():
        if key.startswith(_SKIP_PREFIXES):
            continue
        n = 1
        for d in info.shape:
            n *= d
        part = "unet" if key.startswith(UNET) else "vae" if key.startswith(_VAE) else "other"
        counts[part] += n
    return _arch(family, counts, unet, vae)


def _arch_from_folder(folder: Path) -> Arch:
    """A diffusers folder: parameter counts from each component's safetensors headers, widths from its configs."""
    counts = {"unet": 0, "vae": 0, "other": 0}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(sub.glob("*.safetensors"))
        plain = [f for f in files if ".fp16." not in f.name]
        part = sub.name if sub.name in ("unet", "vae") else "other"
        for f in plain or files[:1]:
            for info in read_header(f).tensors.values():
                n = 1
                for d in info.shape:
                    n *= d
                counts[part] += n
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
    family = "sdxl" if (folder / "text_encoder_2").exists() else "sd1"
    return _arch(family, counts, unet, vae)


def _arch(family: str, counts: dict[str, int], unet: dict, vae: dict) -> Arch:
    channels = tuple(unet["block_out_channels"])
    depths = unet.get("transformer_layers_per_block", 1)
    if isinstance(depths, int):
        depths = [depths] * len(channels)
    attention = tuple(d if t.startswith("CrossAttn") else 0 for d, t in zip(depths, unet["down_block_types"],
                                                                          strict=False))
    return Arch(family, counts["unet"], counts["vae"], counts["other"], channels, int(unet["layers_per_block"]),
                attention, tuple(vae["block_out_channels"]))


def arch_of_loaded(model) -> Arch:
    """The Arch of a loaded model, with `resident` = the bytes its weights occupy now."""
    def size(module) -> tuple[int, int]:
        tensors = [*module.parameters(), *module.buffers()]
        return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)

    unet_n, unet_b = size(model.unet)
    vae_n, vae_b = size(model.vae)
    other_n = other_b = 0
    for slot in model.text_encoders:
        n, b = size(slot.model if hasattr(slot, "model") else slot)
        other_n, other_b = other_n + n, other_b + b
    arch = _arch(model.family.id, {"unet": unet_n, "vae": vae_n, "other": other_n}, dict(model.unet.config),
                 dict(model.vae.config))
    return replace(arch, resident=unet_b + vae_b + other_b)


# --------------------------------------------------------------------------------------------- formulas


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def unet_activations(arch: Arch, width: int, height: int, batch: int, act_bytes: int) -> int:
    """Live activations of one UNet call on `batch` latents of width x height pixels."""
    n0 = (width // arch.factor) * (height // arch.factor)
    skips = work = 0.0
    for level, c in enumerate(arch.unet_channels):
        n = n0 / 4**level
        skips += (arch.unet_layers + 1) * c * n
        per = UNET_ATTN_WORK if arch.unet_attention[level] else UNET_RES_WORK
        work = max(work, per * c * n)
    return int(batch * (UNET_SKIP_FACTOR * skips + work) * act_bytes * MARGIN)


def attention_bank_bytes(arch: Arch, req: GenerationRequest, *, dtype: torch.dtype) -> int:
    """What one reference unit (darkroom/control/reference.py) keeps while the UNet runs: the input of every
    self-attention of its extra pass on the reference (tokens x channels per transformer block: down blocks,
    up blocks with one more, and the middle), for the CFG batch, at the larger pass's size, in the UNet's dtype
    (the bank holds copies of those inputs). An upper bound: a weight under 1 banks fewer layers."""
    act = _dtype_size(dtype)
    batch = req.batch_size * (2 if req.cfg_scale > 1 else 1)
    width, height = req.width or arch.native_size, req.height or arch.native_size
    if req.enable_hr:
        width, height = req.model_copy(update={"width": width, "height": height}).hires_size()
    n0 = (width // arch.factor) * (height // arch.factor)
    values = 0.0
    for level, (c, depth) in enumerate(zip(arch.unet_channels, arch.unet_attention, strict=True)):
        values += depth * (2 * arch.unet_layers + 1) * c * n0 / 4**level
    deepest = len(arch.unet_channels) - 1
    values += max(arch.unet_attention) * arch.unet_channels[-1] * n0 / 4**deepest  # the middle block
    return int(batch * values * act * MARGIN)


def vae_activations(arch: Arch, width: int, height: int, batch: int, act_bytes: int, *, decode: bool,
                    quadratic_attention: bool) -> int:
    """A VAE decode (or encode) of `batch` images of width x height pixels, untiled, output buffers included."""
    pixels = width * height
    channels = arch.vae_channels
    widest = 0.0
    for level in range(len(channels)):
        # decoding, the maps at a level come upsampled from the next level's width
        c = channels[min(level + 1, len(channels) - 1)] if decode else channels[level]
        widest = max(widest, c * pixels / 4**level)
    total = VAE_WORK * widest * act_bytes
    if quadratic_attention:
        tokens = pixels / arch.factor**2
        total = max(total, tokens * tokens * act_bytes + 3 * channels[-1] * tokens * act_bytes)
    return int(batch * (total * MARGIN + pixels * output_bytes(act_bytes)))


def output_bytes(vae_bytes: int) -> int:
    """Per pixel and image, the decode's output buffers: 3 channels of the decoded tensor (twice: the
    tiles and their blend), a float32 copy, the uint8 array and the PIL image."""
    return 3 * (2 * vae_bytes + 4 + 2)


def vae_phase(arch: Arch, width: int, height: int, batch: int, act_bytes: int, *, decode: bool,
              quadratic_attention: bool, tiled: bool) -> tuple[int, int]:
    """(the estimate used, the untiled estimate): tiled, min(untiled, one tile of one image + the outputs)."""
    untiled = vae_activations(arch, width, height, batch, act_bytes, decode=decode,
                              quadratic_attention=quadratic_attention)
    if not tiled or max(width, height) <= TILE_PIXELS:
        return untiled, untiled
    tile = vae_activations(arch, min(width, TILE_PIXELS), min(height, TILE_PIXELS), 1, act_bytes, decode=decode,
                           quadratic_attention=quadratic_attention)
    return min(untiled, tile + batch * width * height * output_bytes(act_bytes)), untiled


def estimate(arch: Arch, req: GenerationRequest, *, dtype: torch.dtype, vae_dtype: torch.dtype,
             device: torch.device | str = "cpu", tiled_vae: bool = True) -> Estimate:
    """The peak memory of `req` (its width and height already settled) on a model of `arch`."""
    device = torch.device(device)
    width, height = req.width or arch.native_size, req.height or arch.native_size
    size = _dtype_size(dtype)
    act = ACT_BYTES_CPU_BF16 if device.type == "cpu" and dtype == torch.bfloat16 else size
    vae_size = vae_act = _dtype_size(vae_dtype)
    quadratic = device.type != "cpu"
    weights = arch.resident or (arch.unet_params + arch.other_params) * size + arch.vae_params * vae_size

    unet_batch = req.batch_size * (2 if req.cfg_scale > 1 else 1)
    unet = unet_activations(arch, width, height, unet_batch, act)
    vae_kw = dict(quadratic_attention=quadratic, tiled=tiled_vae)
    vae, untiled = vae_phase(arch, width, height, req.batch_size, vae_act, decode=True, **vae_kw)
    if req.init_image is not None:
        enc, enc_untiled = vae_phase(arch, width, height, 1, vae_act, decode=False, **vae_kw)
        vae, untiled = max(vae, enc), max(untiled, enc_untiled)
    final_w, final_h = width, height
    if req.enable_hr:
        w2, h2 = req.model_copy(update={"width": width, "height": height}).hires_size()
        final_w, final_h = w2, h2
        unet = max(unet, unet_activations(arch, w2, h2, unet_batch, act))
        hires = [vae_phase(arch, w2, h2, req.batch_size, vae_act, decode=True, **vae_kw)]
        if not req.hr_upscaler.startswith("Latent"):
            hires.append(vae_phase(arch, w2, h2, 1, vae_act, decode=False, **vae_kw))
        if req.hr_upscaler not in ("Latent", "Latent (nearest)", "Lanczos", "Nearest"):
            # an upscaler model (darkroom/upscale/tiled.py) on one image at a time, at 4x: the common scale
            model_up = upscale_working_bytes(width, height, 4, weights=UPSCALER_WEIGHTS)
            hires.append((model_up, model_up))
        vae = max(vae, *(v for v, _ in hires))
        untiled = max(untiled, *(u for _, u in hires))
    results = req.image_count * final_w * final_h * RESULT_BYTES
    return Estimate(weights=int(weights), overhead=int(OVERHEAD * MARGIN), unet=unet, vae=vae, results=results,
                    vae_untiled=untiled)


def estimate_for_model(model, req: GenerationRequest, *, tiled_vae: bool = True) -> Estimate:
    """The estimate for a loaded model (its resident weights, its dtypes and device)."""
    return estimate(arch_of_loaded(model), req, dtype=model.dtype, vae_dtype=model.vae_dtype, device=model.device,
                    tiled_vae=tiled_vae)


# --------------------------------------------------------------------------------------------- available


def available_memory(device: torch.device | str, reclaimable: int = 0) -> int | None:
    """Bytes a generation may use on `device`, or None when that cannot be known (no check then).

    CPU: MemAvailable from /proc/meminfo; CUDA: `free_vram` (the driver's free memory, within the
    per-process cap when one is set) plus what this process's caching allocator holds unused. Both
    plus `reclaimable`: what the engine will free or reuse itself (the loaded model's weights, which
    the estimate counts again, and the activations of a generation running now, over before the next
    one starts).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free = free_vram(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        except (RuntimeError, AssertionError):
            return None
        return None if free is None else int(free + cached + reclaimable)
    if device.type in ("cpu", "mps"):  # MPS shares the system's memory
        free = _meminfo_available()
        return None if free is None else free + reclaimable
    return None


def free_vram(device: torch.device) -> int | None:
    """Bytes this process may still allocate on `device` (None for a CPU): the driver's free memory,
    lowered to the per-process cap when torch.cuda.set_per_process_memory_fraction set one."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(index)
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = None
    if getter is not None:
        try:
            fraction = float(getter(index))
        except (RuntimeError, TypeError):
            fraction = None
    fraction = _CAPS.get(index, fraction)
    if fraction is not None and fraction < 1.0:
        free = min(free, int(total * fraction) - torch.cuda.memory_reserved(index))
    return max(0, free)


_CAPS: dict[int, float] = {}


def note_memory_fraction(fraction: float, index: int = 0) -> None:
    """Sets torch's per-process cap and remembers it (older torch has no getter for it)."""
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    _CAPS[index] = fraction


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


_LIBC: list = []


def _libc():
    """glibc (ctypes), loaded once; None elsewhere (musl, macOS, Windows), where these tunings do nothing."""
    if not _LIBC:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _LIBC.append(libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
KEEP_FREED_BYTES = 2**31 - 1  # the largest value mallopt takes: big blocks come from the heap and stay mapped
_KEPT: list[bool] = []


def keep_large_allocations() -> bool:
    """Let glibc reuse big freed blocks instead of handing them back to the system after each op.

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
    `mmap` and unmaps it on free, and a thread other than the main one gets blocks above 64 MiB the
    same way. A UNet or VAE layer whose output is that large (an SDXL 64x64 feed-forward's 42 MiB
    GELU half, the VAE's full-resolution maps) then page-faults and zeroes every page of it on every
    call: a GEMM with such an output ran at half speed here (1,150 against 2,790 GFLOP/s;
    benchmarks/README.md). So the mmap threshold and the trim threshold go to mallopt's maximum and
    all threads share the main heap (generation runs on the job thread). Freed memory then stays in
    the heap for the next layer; `return_freed_memory()` still gives it back between phases, after
    each generation, and inside the VAE decode and encode wherever their maps change size (the decode
    is a generation's peak, where the heap's holes would add 0.2-0.7 GiB; vae_tiling). Called once per process
    by `build_engine`, before the job thread starts; $DARKROOM_MALLOC=default leaves glibc's defaults
    throughout. Elsewhere than glibc: nothing. Returns whether the settings were applied."""
    if _KEPT:
        return _KEPT[0]
    libc = _libc()
    applied = (libc is not None and os.environ.get("DARKROOM_MALLOC", "").strip().lower() != "default"
               and all(libc.mallopt(param, value) == 1 for param, value in (
                   (_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, KEEP_FREED_BYTES), (_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))))
    _KEPT.append(applied)
    return applied


GLIBC_MMAP_BYTES = 32 << 20  # where glibc's dynamic mmap threshold settles (its maximum); trim at twice it


@contextmanager
def lean_allocations(lean: bool = True) -> Iterator[None]:
    """glibc's own thresholds for the block (big blocks mmapped and unmapped on free: no heap holes
    adding to the peak), where keep_large_allocations applied; as they were afterwards. Process-wide.
    The engine no longer uses it (the VAE trims instead); benchmarks run other pipelines inside it, as
    they would run in a process of their own."""
    if not (lean and _KEPT and _KEPT[0]):
        yield
        return
    mallopt = _libc().mallopt
    mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_BYTES)
    mallopt(_M_TRIM_THRESHOLD, 2 * GLIBC_MMAP_BYTES)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
        mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)


def return_freed_memory() -> None:
    """Give the heap's freed pages back to the system before a phase that allocates a lot (the VAE decode,
    and inside it wherever its maps change size).

    glibc keeps memory freed by the previous phase (the sampling's activations below its 32 MiB mmap
    threshold, torn into pieces the next phase's tensors do not fit) in its arenas; it stays resident and
    the decode's tensors come on top of it. `malloc_trim(0)` returns it: measured 0.3-0.5 GiB off the
    SDXL 1024x1024 peak (benchmarks/README.md). It costs milliseconds. Elsewhere than glibc: nothing."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def human_gb(n: float) -> str:
    """Bytes as GB with a sensible precision: 0.4 GB, 18.2 GB, 310 GB."""
    gb = n / 1e9
    return f"{gb:.1f} GB" if gb < 100 else f"{gb:,.0f} GB"


def resident_bytes(model) -> int:
    return arch_of_loaded(model).resident if model is not None else 0




# Reference architectures (parameter counts of the public SD1.5 and SDXL base checkpoints, widths from their
# headers): for docs/limits.md and the tests. SDXL is scaled from its shapes: its activations were not measured.
SD15 = Arch("sd1", unet_params=859_520_964, vae_params=83_653_863, other_params=123_072_557,
            unet_channels=(320, 640, 1280, 1280), unet_layers=2, unet_attention=(1, 1, 1, 0),
            vae_channels=(128, 256, 512, 512))
SDXL = Arch("sdxl", unet_params=2_567_463_684, vae_params=83_653_863, other_params=817_720_398,
            unet_channels=(320, 640, 1280), unet_layers=2, unet_attention=(0, 2, 10),
            vae_channels=(128, 256, 512, 512))
