"""Low-VRAM operation: which parts of a model sit on the GPU, and when.

Three placements, chosen from the free VRAM (`plan_placement`) or forced by the user
(`--vram high|medium|low`, webui aliases `--medvram`/`--lowvram`):

- **full**: every component (text encoders, UNet, VAE) lives on the GPU.
- **model-offload** (medvram): components live in CPU memory; when a component's forward
  starts it is moved to the GPU and the component that ran before it is moved off (the
  same idea as diffusers' `enable_model_cpu_offload`). Peak VRAM = the largest component
  plus its activations.
- **block-offload** (lowvram): the UNet does not fit even alone, so its blocks are streamed:
  each block's weights are copied to the GPU when that block's forward starts and dropped
  when it ends (the CPU copy is kept, pinned, so nothing is copied back). The text encoders
  and the VAE are model-offloaded, and the VAE decodes in tiles.

Optional **fp8 weight storage** (`fp8=True`): the UNet's Linear/Conv weights are stored as
`torch.float8_e4m3fn` (half the bytes of fp16) and upcast one layer at a time to the compute
dtype (fp16/bf16) just before that layer runs.

Everything is installed with forward pre-/post-hooks on the model's own modules (no module
is replaced, every Parameter keeps its identity, so LoRA merging, VAE swapping and the
model cache keep working) and removed exactly by `Installed.remove()`. The engine needs no
change: the model's `device` stays the execution device, so inputs are created there, and
the hooks bring the weights to them.

Sizes are measured from the loaded modules' parameters; the activation margins are stated
estimates (`unet_margin`, `vae_margin`, calibrated against benchmarks/gpu_check.py's peak-VRAM
measurements once it has run on a CUDA machine).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from darkroom.engine.memory import TILE_PIXELS, free_vram
from darkroom.errors import InvalidRequest

GiB = 2**30
MiB = 2**20

# user-facing names -> the plan's mode; "auto" decides from the free VRAM
MODES = {
    "auto": "auto",
    "high": "full", "full": "full", "highvram": "full", "normal": "full", "normalvram": "full",
    "medium": "model-offload", "med": "model-offload", "medvram": "model-offload", "model-offload": "model-offload",
    "low": "block-offload", "lowvram": "block-offload", "block-offload": "block-offload",
}
SAFETY = 0.9  # plan with this share of the free VRAM: the CUDA context, allocator fragmentation, cuDNN workspaces
UNET_BYTES_PER_LATENT_PIXEL = 64 * 1024  # per sample (CFG runs 2), fp16, SDPA attention: estimate (2 GiB SDXL 1024)
VAE_BYTES_PER_PIXEL = 2400  # per output pixel and image, decoding (fp32 SDXL VAE worst case): estimate
TEXT_MARGIN = 256 * MiB
MIN_BLOCK = 16 * MiB
MAX_BLOCK = 512 * MiB


def parse_vram(value: str | None) -> tuple[str, int | None]:
    """`--vram` value -> (mode, budget bytes or None). A size ("4GB", "6G", "3500MB") means auto with that budget."""
    value = (value or "auto").strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(g|gb|gib|m|mb|mib)", value)
    if m:
        scale = GiB if m.group(2).startswith("g") else MiB
        return "auto", int(float(m.group(1)) * scale)
    if value not in MODES:
        raise InvalidRequest(f"unknown VRAM mode {value!r}; use auto, high, medium (medvram), low (lowvram)"
                             " or a budget such as 4GB")
    return MODES[value], None


def unet_margin(width: int, height: int, batch: int = 2, factor: int = 8) -> int:
    """Estimated UNet activation peak for `batch` samples (CFG: 2 per image) at width x height pixels."""
    return int(UNET_BYTES_PER_LATENT_PIXEL * batch * (width // factor) * (height // factor))


def vae_margin(width: int, height: int, images: int = 1) -> int:
    """Estimated VAE decode activation peak for `images` images at width x height pixels (untiled)."""
    return int(VAE_BYTES_PER_PIXEL * images * width * height)


@dataclass(frozen=True)
class Plan:
    mode: str  # "full" | "model-offload" | "block-offload"
    vae_tiling: bool = False
    block_bytes: int = MAX_BLOCK  # block-offload: the largest module streamed as one unit
    fp8: bool = False
    reason: str = ""
    estimates: dict = field(default_factory=dict)

    def describe(self) -> str:
        extra = (", VAE tiling" if self.vae_tiling else "") + (", fp8 weights" if self.fp8 else "")
        return f"{self.mode}{extra}: {self.reason}"


def plan_placement(component_sizes: dict[str, int], free_vram: int | None, mode: str = "auto", *,
                   width: int = 512, height: int = 512, batch: int = 2, vae_tiling: bool | None = None,
                   fp8: bool = False) -> Plan:
    """Where each component runs, from the weights' sizes (bytes, keys: text_encoder*, unet, vae) and the
    free VRAM (None: unknown, e.g. on CPU: all on the device). `mode` ("auto" or an explicit mode/alias)
    wins over the budget; `vae_tiling` (None: decided) wins over the decision."""
    mode = MODES.get(mode, mode)
    if mode not in ("auto", "full", "model-offload", "block-offload"):
        raise InvalidRequest(f"unknown VRAM mode {mode!r}")
    unet = component_sizes.get("unet", 0) // (2 if fp8 else 1)
    vae = component_sizes.get("vae", 0)
    texts = [v for k, v in component_sizes.items() if k.startswith("text")]
    u_need = unet + unet_margin(width, height, batch)
    v_need = vae + vae_margin(width, height, max(1, batch // 2))
    t_need = max(texts, default=0) + TEXT_MARGIN
    budget = None if free_vram is None else int(free_vram * SAFETY)
    total = unet + vae + sum(texts) + max(u_need - unet, v_need - vae, TEXT_MARGIN)
    est = {"budget": budget, "all": total, "unet": u_need, "vae": v_need, "text": t_need}
    if mode == "auto":
        if budget is None or total <= budget:
            mode, reason = "full", "everything fits" if budget is not None else "no VRAM budget (not a GPU)"
        elif max(u_need, t_need) <= budget:
            mode, reason = "model-offload", "the UNet fits, the whole model does not"
        else:
            mode, reason = "block-offload", "the UNet alone does not fit"
        reason += f" ({_gib(total)} needed{'' if budget is None else f', {_gib(budget)} usable'})"
    else:
        reason = "as asked"
    if vae_tiling is None:
        vae_tiling = mode == "block-offload" or (budget is not None and mode != "full" and v_need > budget)
    block = MAX_BLOCK
    if budget is not None:
        block = max(MIN_BLOCK, min(MAX_BLOCK, (budget - (u_need - unet)) // 4))
    return Plan(mode, vae_tiling=vae_tiling, block_bytes=block, fp8=fp8, reason=reason, estimates=est)


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def component_sizes(model) -> dict[str, int]:
    """{name: bytes of weights} of a LoadedModel's components, as loaded."""
    sizes = {"unet": module_bytes(model.unet), "vae": module_bytes(model.vae)}
    for i, slot in enumerate(model.text_encoders):
        sizes[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = module_bytes(slot.model)
    return sizes


# --------------------------------------------------------------------------- the hooks


def _to_device(obj, device: torch.device):
    if torch.is_tensor(obj):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class _Swap:
    """A module's tensors swapped for `transform(tensor)` during its forward and put back after.

    The stored tensors are kept, not copied back: weights do not change inside a forward,
    and a change made between forwards (a LoRA merge, in place) lands in the stored tensor.
    """

    def __init__(self, module: torch.nn.Module, transform: Callable[[torch.Tensor], torch.Tensor],
                 only: Callable[[torch.nn.Module, str, torch.Tensor], bool] = lambda m, n, t: True):
        self.module = module
        self.transform = transform
        self.slots = [(m, kind, name) for m in module.modules()
                      for kind in ("_parameters", "_buffers")
                      for name, t in getattr(m, kind).items() if t is not None and only(m, name, t)]
        self.saved: list[torch.Tensor] | None = None
        self.handles = [module.register_forward_pre_hook(self.enter, prepend=True),
                        module.register_forward_hook(self.exit, always_call=True)]

    def enter(self, _module, _args):
        if self.saved is not None:  # the last forward raised: the GPU copy is still in place
            return
        saved = []
        for m, kind, name in self.slots:
            t = getattr(m, kind)[name]
            saved.append(t.data)
            _set(m, kind, name, self.transform(t.data))
        self.saved = saved

    def exit(self, _module, _args, _output):
        if self.saved is None:
            return
        for (m, kind, name), t in zip(self.slots, self.saved, strict=True):
            _set(m, kind, name, t)
        self.saved = None

    def remove(self) -> None:
        self.exit(None, None, None)
        for h in self.handles:
            h.remove()


def _set(module: torch.nn.Module, kind: str, name: str, t: torch.Tensor) -> None:
    if kind == "_parameters":
        module._parameters[name].data = t
    else:
        module._buffers[name] = t


def _streamed_units(module: torch.nn.Module, limit: int) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """Split `module` into units of at most `limit` bytes (or leaves), plus the modules whose own
    (direct) tensors stay resident because their subtree was split."""
    units, resident = [], []

    def walk(m: torch.nn.Module) -> None:
        children = list(m.children())
        if module_bytes(m) <= limit or not children:
            if module_bytes(m):
                units.append(m)
            return
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            resident.append(m)
        for c in children:
            walk(c)

    walk(module)
    return units, resident


FP8_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass
class _Component:
    name: str
    module: torch.nn.Module
    kind: str  # "resident" | "swap" | "stream"
    followers: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # ControlNets moved with it (adopt)


class Installed:
    """A plan installed on a LoadedModel; `remove()` takes every hook off and puts the weights on `device`."""

    def __init__(self, model, plan: Plan, device: torch.device, offload: torch.device, pin: bool):
        self.model, self.plan, self.device, self.offload, self.pin = model, plan, device, offload, pin
        self.components: list[_Component] = []
        self.current: _Component | None = None
        self.handles: list = []
        self.swaps: list[_Swap] = []
        self.fp8_dtype: torch.dtype | None = None
        self.moves = 0  # component moves to the device (for tests and logs)
        self.streamed = 0  # streamed block entries
        self._tiling_before: tuple | None = None
        self.adopted: weakref.WeakSet = weakref.WeakSet()  # ControlNets placed with the model (weak: the
        self._visitor: weakref.ref | None = None  # ControlNet cache may drop them); block-offload's one in

    # -- building
    def install(self) -> Installed:
        model, plan = self.model, self.plan
        parts = [(f"text_encoder{'' if i == 0 else f'_{i + 1}'}", s.model) for i, s in enumerate(model.text_encoders)]
        parts += [("unet", model.unet), ("vae", model.vae)]
        if plan.fp8:
            self._install_fp8(model.unet, model.dtype)
        for name, module in parts:
            if plan.mode == "full":
                kind = "resident"
            elif plan.mode == "block-offload" and name == "unet":
                kind = "stream"
            else:
                kind = "swap"
            comp = _Component(name, module, kind)
            self.components.append(comp)
            if kind == "resident":
                module.to(self.device)
                continue
            self._to(module, self.offload, pin=kind == "stream" and self.pin)
            self._trigger(comp)
            if kind == "stream":
                self._install_stream(module)
        if plan.vae_tiling:
            vae = model.vae
            self._tiling_before = (vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size, vae.tile_latent_min_size)
            f = model.vae_scale_factor
            # the same tile size as darkroom.engine.vae_tiling (whose per-call `tiled()` saves and restores these)
            vae.tile_sample_min_size = min(vae.tile_sample_min_size, TILE_PIXELS)
            vae.tile_latent_min_size = min(vae.tile_latent_min_size, TILE_PIXELS // f)
            vae.use_tiling, vae.use_slicing = True, True
        model.device = self.device
        model.placement = self
        return self

    @staticmethod
    def _to(module: torch.nn.Module, device: torch.device, pin: bool = False) -> None:
        module.to(device)
        if pin and device.type == "cpu":  # streamed weights: pinned once, copied asynchronously every step
            for m in module.modules():
                for kind in ("_parameters", "_buffers"):
                    for name, t in getattr(m, kind).items():
                        if t is not None and not t.is_pinned():
                            _set(m, kind, name, t.data.pin_memory())

    def _trigger(self, comp: _Component) -> None:
        """Any forward of the component (or of a direct child: `vae.decode` calls `vae.decoder`)
        brings it to the device and sends the one before it off; inputs follow to the device."""

        def hook(_module, args, kwargs):
            if self.current is not comp:
                self.activate(comp)
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        for m in (comp.module, *comp.module.children()):
            self.handles.append(m.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    def activate(self, comp: _Component) -> None:
        self._send_visitor_off()
        if self.current is not None and self.current.kind == "swap":
            self.current.module.to(self.offload)
            for follower in list(self.current.followers):
                follower.to(self.offload)
        if comp.kind == "swap":
            comp.module.to(self.device)
            for follower in list(comp.followers):
                follower.to(self.device)
            self.moves += 1
        self.current = comp

    def _send_visitor_off(self) -> None:
        visitor = self._visitor() if self._visitor is not None else None
        if visitor is not None:
            visitor.to(self.offload)
        self._visitor = None

    def controlnet_device(self) -> torch.device:
        """Where to load a ControlNet for this model: the device when everything stays there, else the
        offload device (`adopt` brings it in when it runs)."""
        return self.device if self.plan.mode == "full" else self.offload

    def adopt(self, module: torch.nn.Module) -> None:
        """Place a ControlNet as the UNet it feeds is placed (once per module; the A1111 extension's
        `low_vram` unit flag is this, for every unit). full: on the device. model-offload (medvram): it
        moves with the UNet, so its forward brings the UNet in too and the VAE's sends both off.
        block-offload (lowvram): it comes in alone for its forward and goes off when the UNet's starts,
        so it never shares the device with the UNet's streamed blocks."""
        if module in self.adopted:
            return
        self.adopted.add(module)
        unet = next(c for c in self.components if c.name == "unet")
        if unet.kind == "resident":
            module.to(self.device)
            return
        on = self.current is unet and unet.kind == "swap"
        module.to(self.device if on else self.offload)
        if unet.kind == "swap":
            unet.followers.add(module)
        ref = weakref.ref(module)

        def hook(_module, args, kwargs):
            if unet.kind == "swap":
                if self.current is not unet:
                    self.activate(unet)
            else:
                if self.current is not None and self.current.kind == "swap":
                    self.current.module.to(self.offload)  # the text encoder, before the first step
                self.current = None  # so the UNet's next forward activates it, sending this one off
                if self._visitor is None or self._visitor() is not ref():
                    self._send_visitor_off()
                    ref().to(self.device)
                    self._visitor = ref
                    self.moves += 1
            return _to_device(args, self.device), _to_device(kwargs, self.device)

        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True, prepend=True))

    def _install_stream(self, module: torch.nn.Module) -> None:
        units, resident = _streamed_units(module, self.plan.block_bytes)
        for m in resident:  # their own tensors only (e.g. a norm's), small
            for kind in ("_parameters", "_buffers"):
                for name, t in getattr(m, kind).items():
                    if t is not None:
                        _set(m, kind, name, t.data.to(self.device))
        device = self.device

        def bring(t: torch.Tensor) -> torch.Tensor:
            self.streamed += 1
            return t.to(device, non_blocking=t.is_pinned())

        for unit in units:
            self.swaps.append(_Swap(unit, bring))

    def _install_fp8(self, module: torch.nn.Module, compute: torch.dtype) -> None:
        fp8 = getattr(torch, "float8_e4m3fn", None)
        if fp8 is None:
            raise InvalidRequest("fp8 weights need PyTorch 2.1 or newer")
        self.fp8_dtype = fp8
        dtype = compute  # fp16/bf16 on a GPU (fp32 where the model computes in fp32)

        def is_weight(m, name, _t):
            return name == "weight" and isinstance(m, FP8_LAYERS)

        for layer in [m for m in module.modules() if isinstance(m, FP8_LAYERS)]:
            w = layer.weight
            w.data = w.data.to(fp8)
            # registered before any stream hook: as both prepend, the stream hook's pre runs first
            self.swaps.append(_Swap(layer, lambda t, d=dtype: t.to(d), only=is_weight))

    # -- taking it off
    def remove(self, device: torch.device | None = None) -> None:
        """Every hook off, fp8 weights back to the compute dtype, all components on `device` (default: the
        execution device), VAE tiling as it was. Afterwards the model runs as if never placed."""
        device = device or self.device
        for s in reversed(self.swaps):
            s.remove()
        self.swaps.clear()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if self.fp8_dtype is not None:
            for layer in [m for m in self.model.unet.modules() if isinstance(m, FP8_LAYERS)]:
                if layer.weight.dtype == self.fp8_dtype:
                    layer.weight.data = layer.weight.data.to(self.model.dtype)
        for comp in self.components:
            comp.module.to(device)
        for module in list(self.adopted):
            module.to(device)
        self.adopted = weakref.WeakSet()
        self._visitor = None
        self.current = None
        if self._tiling_before is not None:
            vae = self.model.vae
            vae.use_tiling, vae.use_slicing, vae.tile_sample_min_size, vae.tile_latent_min_size = self._tiling_before
        self.model.device = device
        if getattr(self.model, "placement", None) is self:
            self.model.placement = None

    def hooks(self) -> Iterator:
        yield from self.handles
        for s in self.swaps:
            yield from s.handles


def apply(model, plan: Plan, device: torch.device, *, offload_device: torch.device | str = "cpu",
          pin: bool | None = None) -> Installed:
    """Install `plan` on a LoadedModel whose components may sit anywhere; returns the handle to remove it.

    `device` is where computation happens (the model's `device` afterwards), `offload_device` where
    offloaded weights wait (CPU memory; pinned for fast, asynchronous copies when `device` is CUDA).
    """
    device = torch.device(device)
    offload = torch.device(offload_device)
    existing = getattr(model, "placement", None)
    if existing is not None:
        existing.remove()
    pin = (device.type == "cuda" and offload.type == "cpu") if pin is None else pin
    return Installed(model, plan, device, offload, pin).install()


class Placement:
    """What the model cache uses: load on the CPU when offloading may be needed, then plan and apply.

    `vram`: "auto" (default; the free VRAM decides), "high", "medium"/"medvram", "low"/"lowvram", or a
    budget such as "4GB" (auto within that budget). `fp8`: store the UNet's weights as float8_e4m3fn.
    """

    def __init__(self, vram: str | None = None, *, fp8: bool = False, vae_tiling: bool | None = None):
        self.mode, self.budget = parse_vram(vram)
        self.fp8 = fp8
        self.vae_tiling = vae_tiling
        self.last_plan: Plan | None = None

    def load_device(self, device: torch.device) -> torch.device:
        """Where the loader should put the weights: the CPU when this placement may offload on a GPU."""
        if device.type == "cuda" and (self.mode != "full" or self.fp8):
            return torch.device("cpu")
        return device

    def install(self, model, device: torch.device) -> None:
        """Plan for `model` (at its native size, CFG batch of 2) and install the plan; `model.device` becomes
        `device`. On a CPU with mode auto and no fp8 this is a no-op."""
        device = torch.device(device)
        free = self.budget if self.budget is not None else free_vram(device)
        if device.type != "cuda" and self.mode == "auto" and self.budget is None and not self.fp8:
            self.last_plan = plan_placement({}, None)
            return
        size = model.native_size
        plan = plan_placement(component_sizes(model), free, self.mode, width=size, height=size,
                              vae_tiling=self.vae_tiling, fp8=self.fp8)
        self.last_plan = plan
        apply(model, plan, device)
