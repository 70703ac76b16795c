"""ControlNet-LLLite (kohya-ss): tiny networks that steer the UNet's attention inputs from a control map.

An LLLite file (`controllllite_*.safetensors`, SDXL; the A1111 extension runs them as ControlNet units) holds
one small module per hooked attention projection, named after the original UNet's layout:
`lllite_unet_{input|output}_blocks_{i}_1_transformer_blocks_{j}_{attn1|attn2}_to_{q|k|v}` (the middle block as
`middle_block_1_...`). Each module turns the control map into an embedding once per pass (`conditioning1`:
convolutions with stride = kernel, down to the block's token grid: x8, x16 or x32 for depth 1, 2, 3) and, at
every UNet call, adds to the projection's input x: up(mid([embedding, down(x)])) x weight, with ReLUs between
(`down`, `mid`, `up` are Linear layers; a variant with 1x1 convolutions, which no released file uses, is refused).

Running follows the extension (its port of kohya's ComfyUI node): the map goes in as [-1, 1] at the
generation's pixel size, every row of the CFG batch gets the same term (no control mode, guess mode or soft
injection), the unit acts in its start/end window, and not at all in the hires fix's second pass. Several units
on one projection add their terms computed from the same input. Hooks (forward pre-hooks on the diffusers
UNet's Linear layers) are on only while a pass samples (`hooked`), so the cached UNet is never changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from darkroom.control import unet_hooks
from darkroom.control.config import Kind
from darkroom.control.load import LoadedControlNet
from darkroom.control.unet_hooks import HookSession
from darkroom.errors import ModelLoadError

LAYOUT = "lllite"
PREFIX = "lllite_unet_"
_NAME = re.compile(r"lllite_unet_(input_blocks_(\d+)|output_blocks_(\d+)|middle_block)_1_transformer_blocks_(\d+)"
                   r"_(attn[12])_to_([qkv])$")


def target_path(name: str, layers_per_block: int = 2) -> str:
    """The diffusers UNet module a module named `name` hooks, e.g. lllite_unet_input_blocks_4_1_transformer_
    blocks_0_attn1_to_q -> down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q (ValueError if unknown).
    The original UNet numbers its blocks through the levels: `layers_per_block` (SDXL: 2) blocks and a
    downsampler per level on the way down, one more block per level on the way up."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not an LLLite module name")
    _, down, up, block, attn, proj = m.groups()
    if down is not None:
        i = int(down)
        level, within = divmod(i - 1, layers_per_block + 1)
        if i < 1 or within == layers_per_block:
            raise ValueError(f"{name!r}: input block {i} has no transformer")
        parent = f"down_blocks.{level}.attentions.{within}"
    elif up is not None:
        level, within = divmod(int(up), layers_per_block + 1)
        parent = f"up_blocks.{level}.attentions.{within}"
    else:
        parent = "mid_block.attentions.0"
    return f"{parent}.transformer_blocks.{block}.{attn}.to_{proj}"


def lllite_kind(shapes: Mapping[str, tuple[int, ...]]) -> Kind | None:
    """The Kind of an LLLite file (None when it is not one). All released LLLite models are SDXL; one with a
    module on input block 1 (a transformer there is SD1/SD2's first level) is refused."""
    names = {k.split(".", 1)[0] for k in shapes if k.startswith(PREFIX)}
    if not names:
        return None
    unknown = sorted(n for n in names if _NAME.match(n) is None)
    if unknown:
        return Kind(False, detail=f"a ControlNet-LLLite model whose layout is not recognised ({unknown[0]})")
    if any(n.startswith(PREFIX + "input_blocks_1_") for n in names):
        return Kind(False, detail="an SD1/SD2 ControlNet-LLLite model (only SDXL ones run)")
    return Kind(True, LAYOUT, "sdxl")


class LLLiteModule(nn.Module):
    """One hooked projection's network; parameter names are the file's (conditioning1.k, down.0, mid.0, up.0)."""

    def __init__(self, in_dim: int, mlp_dim: int, cond_dim: int, depth: int):
        super().__init__()
        half = cond_dim // 2
        layers: list[nn.Module] = [nn.Conv2d(3, half, 4, stride=4)]
        if depth == 1:
            layers += [nn.ReLU(), nn.Conv2d(half, cond_dim, 2, stride=2)]
        elif depth == 2:
            layers += [nn.ReLU(), nn.Conv2d(half, cond_dim, 4, stride=4)]
        else:
            layers += [nn.ReLU(), nn.Conv2d(half, half, 4, stride=4), nn.ReLU(), nn.Conv2d(half, cond_dim, 2, stride=2)]
        self.conditioning1 = nn.Sequential(*layers)
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))

    def embed(self, cond: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The map's embedding as tokens [1, h*w, C] on the block's `grid` (h, w), from [1, 3, H, W] in [-1, 1].
        At SDXL's usual sizes (multiples of 32) the convolutions land on the grid exactly, as in the extension;
        otherwise the embedding is resized to it (nearest, the extension's own rule when it knows the block's
        shape)."""
        e = self.conditioning1(cond)
        if tuple(e.shape[-2:]) != tuple(grid):
            e = nn.functional.interpolate(e, grid, mode="nearest-exact")
        return e.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        e = embedding.expand(x.shape[0], *embedding.shape[1:])
        return self.up(self.mid(torch.cat([e, self.down(x)], dim=2)))


class LLLiteNet(nn.Module):
    """Every module of a file, as attributes named as in the file, so its state dict loads strictly."""

    def __init__(self, specs: Mapping[str, tuple[int, int, int, int]]):
        super().__init__()
        for name, spec in specs.items():
            self.add_module(name, LLLiteModule(*spec))

    def items(self) -> Iterator[tuple[str, LLLiteModule]]:
        return ((name, m) for name, m in self.named_children() if isinstance(m, LLLiteModule))


def _specs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int, int, int]]:
    """Each module's (in_dim, mlp_dim, cond_dim, depth) from its tensors (ValueError for the 1x1-convolution
    variant, which hooks convolutions the diffusers UNet's attention does not have)."""
    specs = {}
    for name in sorted({k.split(".", 1)[0] for k in state}):
        down = state[f"{name}.down.0.weight"]
        if down.ndim != 2:
            raise ValueError(f"{name} is the convolution variant, which hooks no attention projection")
        depth = 3 if f"{name}.conditioning1.4.weight" in state else (
            2 if state[f"{name}.conditioning1.2.weight"].shape[-1] == 4 else 1)
        cond_dim = 2 * int(state[f"{name}.conditioning1.0.weight"].shape[0])
        specs[name] = (int(down.shape[1]), int(down.shape[0]), cond_dim, depth)
    return specs


@dataclass
class LoadedLLLite(LoadedControlNet):
    """An LLLite model ready to hook (model: LLLiteNet)."""

    is_lllite: ClassVar[bool] = True
    noun: ClassVar[str] = "ControlNet-LLLite"


def load_tensors(tensors: Mapping[str, torch.Tensor], path: Path, *, dtype: torch.dtype, device) -> LoadedLLLite:
    """A LoadedLLLite from a file's tensors; a tensor that does not fit is a ModelLoadError naming the file."""
    kind = lllite_kind({k: tuple(v.shape) for k, v in tensors.items()})
    if kind is None or not kind.supported:
        raise ModelLoadError(f"{path.name}: {kind.detail if kind else 'not a ControlNet-LLLite model'}")
    try:
        with torch.device("meta"):
            net = LLLiteNet(_specs(tensors))
        net.load_state_dict(dict(tensors), strict=True, assign=True)
    except (KeyError, IndexError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ModelLoadError(f"{path.name}: the ControlNet-LLLite weights do not fit their layout ({first})") from None
    net = net.to(device=device, dtype=dtype).eval()
    net.requires_grad_(False)
    return LoadedLLLite(net, kind.family, path, dtype, torch.device(device))


# --- running ---------------------------------------------------------------------------------------------------


class _Session(HookSession):
    """A pass's LLLite units hooked into the UNet; `control.at` says which step the UNet call is for."""

    def __init__(self, control, units, unet: nn.Module):
        super().__init__(control, units, unet)
        self.embeddings: dict[tuple, torch.Tensor] = {}
        self.latent: tuple[int, int] = (0, 0)  # the UNet input's latent size, recorded at each call

    def install(self) -> None:
        config = getattr(self.unet, "config", None)
        per_level = int(getattr(config, "layers_per_block", 2))
        levels = len(getattr(config, "block_out_channels", (0, 0, 0)))
        modules = dict(self.unet.named_modules())
        targets: dict[str, list[tuple[object, str, LLLiteModule]]] = {}
        for unit in self.units:
            for name, module in unit.controlnet.model.items():
                try:
                    path = target_path(name, per_level)
                except ValueError:
                    path = name
                layer = modules.get(path)
                if not isinstance(layer, nn.Linear) or layer.in_features != module.down[0].in_features:
                    raise ModelLoadError(f"{unit.controlnet.path.name}: {name} has no place in the checkpoint's UNet"
                                         " (this ControlNet-LLLite model is for another UNet)")
                targets.setdefault(path, []).append((unit, name, module))
        self.handles.append(self.unet.register_forward_pre_hook(self._record, with_kwargs=True))
        for path, hooked in targets.items():
            level = (levels - 1 if path.startswith("mid_block.") else int(path.split(".")[1]) if
                     path.startswith("down_blocks.") else levels - 1 - int(path.split(".")[1]))
            self.handles.append(modules[path].register_forward_pre_hook(self._hook(hooked, level)))

    def _record(self, unet, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        if sample is not None:
            self.latent = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _hook(self, hooked, level: int):
        def add(layer, args):
            x = args[0]
            step, total = self.control.at
            h, w = self.latent
            for _ in range(level):  # the UNet's stride-2 downsamplers round up
                h, w = -(-h // 2), -(-w // 2)
            extra = None
            for unit, name, module in hooked:
                if not unit.covers(step, total) or unit.weight == 0:
                    continue
                term = module(x.to(unit.controlnet.dtype), self._embedding(unit, name, module, x.device, (h, w)))
                extra = term * unit.weight if extra is None else extra + term * unit.weight
            if extra is None:
                return None
            return (x + extra.to(x.dtype), *args[1:])
        return add

    def _embedding(self, unit, name: str, module: LLLiteModule, device, grid: tuple[int, int]) -> torch.Tensor:
        key = (id(unit), name, grid)
        e = self.embeddings.get(key)
        if e is None:
            with torch.no_grad():
                e = module.embed(unit.hint.to(device=device, dtype=unit.controlnet.dtype) * 2 - 1, grid)
            self.embeddings[key] = e
        return e


def hooked(control, unet: nn.Module):
    """A context: for the block, `control`'s LLLite units hooked into `unet` (none in a hires pass, as the
    extension); removed on exit, however the block ends."""
    units = [u for u in control.units if getattr(u.controlnet, "is_lllite", False)] if control else []
    return unet_hooks.hooked(_Session(control, units, unet) if units and not control.hires else None)
