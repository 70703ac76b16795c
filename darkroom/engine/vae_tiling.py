"""Tiled VAE decode and encode: big images in overlapping tiles with blended seams.

An untiled decode of a big image is one call whose peak memory grows with the square of the
latent area (the mid-block's self-attention) and with the full-resolution activations, so it
may not fit. Tiled, it runs diffusers' own AutoencoderKL tiling (`tiled_decode`,
`_tiled_encode`: tiles overlapping by `TILE_OVERLAP` of a tile, linearly blended over the
overlap by its `blend_v`/`blend_h`), one image at a time (its slicing). The tiling switches
and sizes are set on the shared VAE for one call only and put back after (`tiled`). Tile
sizes are ours: `TILE_PIXELS` pixels = TILE_PIXELS / f latent cells for a VAE with scale
factor f (8 for every real SD VAE, less for tiny test ones), the latent side a multiple of 4
so the overlaps land on whole latent cells in both units.

`mode`: "never" (today's single call), "always" (tile whatever is larger than one tile),
"auto" (tile when `should_tile`: the estimated untiled peak is over HEADROOM of the memory
available). The engine's `vae_tiling` attribute is the mode it passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D

from darkroom.engine import memory, vae_bands
from darkroom.engine.memory import TILE_PIXELS
from darkroom.errors import InvalidRequest
from darkroom.models.loader import LoadedModel

__all__ = ["TILE_PIXELS", "TILE_OVERLAP", "MODES", "should_tile", "untiled_decode_bytes", "available_bytes",
           "decode", "encode", "tiled", "tile_latent_size"]

TILE_OVERLAP = 0.25  # of a tile's side, blended linearly
MODES = ("auto", "always", "never")
HEADROOM = 0.75  # "auto" tiles when the untiled estimate is over this share of the memory available


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidRequest(f"unknown VAE tiling mode {mode!r}; choose one of: " + ", ".join(MODES))
    return mode


def _scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def tile_latent_size(scale_factor: int, tile_pixels: int = TILE_PIXELS) -> int:
    """A tile's side in latent cells: tile_pixels / f, rounded down to a multiple of 4 (at least 4)."""
    return max(4, (tile_pixels // scale_factor) // 4 * 4)


def untiled_decode_bytes(vae: AutoencoderKL, height: int, width: int, batch: int = 1,
                         dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> int:
    """The untiled decode's peak memory in bytes for `batch` images of height x width: the admission
    estimate's own VAE formula (memory.vae_activations: the widest full-resolution maps, the output
    buffers, and on a GPU the mid-block's quadratic attention), so what admission assumes tiling
    rescues is what this module tiles."""
    dtype = dtype or vae.dtype
    channels = tuple(vae.config.block_out_channels)
    arch = memory.Arch("vae", 0, 0, 0, (), 0, (), channels)
    return memory.vae_activations(arch, width, height, batch, torch.empty((), dtype=dtype).element_size(),
                                  decode=True, quadratic_attention=torch.device(device).type != "cpu")


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a decode (memory.available_memory: MemAvailable, or CUDA's free memory)."""
    return memory.available_memory(device)


def should_tile(model: LoadedModel, height: int, width: int, batch: int, available_bytes: int | None) -> bool:
    """True when the untiled decode of `batch` height x width images is estimated not to fit in
    HEADROOM of `available_bytes` (None: unknown, decode untiled as always)."""
    if available_bytes is None:
        return False
    need = untiled_decode_bytes(model.vae, height, width, batch, model.vae_dtype, model.device)
    return need > HEADROOM * available_bytes


def _decide(model: LoadedModel, mode: str, height: int, width: int, batch: int, available: int | None) -> bool:
    mode = check_mode(mode)
    if mode != "auto":
        return mode == "always"
    if available is None:
        available = available_bytes(model.device)
    return should_tile(model, height, width, batch, available)


@contextmanager
def tiled(vae: AutoencoderKL, tile_pixels: int = TILE_PIXELS) -> Iterator[AutoencoderKL]:
    """diffusers' tiling (and slicing: one image at a time) switched on with our tile sizes for the
    block; the VAE's own settings are put back after, however the block ends."""
    f = _scale_factor(vae)
    latent = tile_latent_size(f, tile_pixels)
    names = ("use_tiling", "use_slicing", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    saved = {n: getattr(vae, n) for n in names}
    try:
        vae.use_tiling, vae.use_slicing = True, True
        vae.tile_latent_min_size, vae.tile_sample_min_size = latent, latent * f
        vae.tile_overlap_factor = TILE_OVERLAP
        yield vae
    finally:
        for n, v in saved.items():
            setattr(vae, n, v)


def decode(model: LoadedModel, latents: torch.Tensor, *, mode: str = "auto", tile_pixels: int = TILE_PIXELS,
           available: int | None = None) -> torch.Tensor:
    """Scaled latents [n, c, h, w] -> pixels [n, 3, h*f, w*f] in -1..1 (float32, on the model's device)."""
    vae = model.vae
    f = model.vae_scale_factor
    z = (latents / vae.config.scaling_factor).to(model.device, model.vae_dtype)
    n, _, h, w = z.shape
    if model.device.type == "cpu":
        memory.return_freed_memory()  # the sampling's freed heap, before the generation's biggest activations
    tile = _decide(model, mode, h * f, w * f, n, available)
    with _returning_freed_memory(vae.decoder.up_blocks, model.device.type == "cpu"):
        if tile:
            with tiled(vae, tile_pixels):
                return vae.decode(z).sample.float()
        return vae.decode(z).sample.float()


@contextmanager
def _returning_freed_memory(blocks: Iterable[torch.nn.Module], on: bool) -> Iterator[None]:
    """The VAE keeps freed blocks for reuse (memory.keep_large_allocations: 1.3-1.4x faster than
    glibc's mmap per block, which faults and zeroes every activation anew), and hands the freed heap
    back to the system where the activations change size: before each 2x up- or downsampler, and
    before each resnet whose input is big (vae_bands.big: SDXL's 1024x1024 maps, where a hole left by
    the last block would add to the peak). The decode is a generation's memory peak: kept blocks
    alone raise it (SD1.5 512x512 2.98 -> 3.28 GiB); trimmed here, 3.15 GiB (2.91 with
    speed.py's resnet forward on the VAE; benchmarks/README.md)."""
    if not on:
        yield
        return

    def before(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, (Upsample2D, Downsample2D)) or (
                args and isinstance(args[0], torch.Tensor) and vae_bands.big(args[0])):
            memory.return_freed_memory()

    hooks = [m.register_forward_pre_hook(before) for block in blocks
             for m in (*block.resnets, *(getattr(block, "upsamplers", None) or ()),
                       *(getattr(block, "downsamplers", None) or ()))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def encode(model: LoadedModel, pixels: torch.Tensor, *, mode: str = "auto", tile_pixels: int = TILE_PIXELS,
           available: int | None = None) -> torch.Tensor:
    """Pixels [n, 3, H, W] in -1..1 -> scaled latents (the distribution's mode, float32).

    The encoder's peak is of the same order as the decoder's, so the same estimate decides.
    """
    vae = model.vae
    x = pixels.to(model.device, model.vae_dtype)
    n, _, height, width = x.shape
    tile = _decide(model, mode, height, width, n, available)
    if model.device.type == "cpu":
        memory.return_freed_memory()  # e.g. the first pass's freed heap, before a hires pass's encode
    with _returning_freed_memory(vae.encoder.down_blocks, model.device.type == "cpu"):
        if tile:
            with tiled(vae, tile_pixels):
                latent = vae.encode(x).latent_dist.mode()
        else:
            latent = vae.encode(x).latent_dist.mode()
    return latent.float() * vae.config.scaling_factor
