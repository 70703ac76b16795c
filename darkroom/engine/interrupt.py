"""Interrupt and Skip that answer inside a model call, not only between sampling steps.

One SDXL step at 1024x1024 takes minutes on a CPU and a big VAE decode is one long call, so
checking `cancel`/`skip` between steps is not enough. For the duration of a phase,
`answering(modules, cancel, skip)` puts a forward pre-hook on each of the model's units
(`units_of`: every ResNet block, attention, transformer block, feed-forward, down/upsampler
and the input conv, in the UNet and in the VAE's decoder or encoder), and the hook raises
`Interrupted` when `cancel` is set or the private `Skipped` when `skip` is. The gap between
two checks is one such unit: a small fraction of a step (the UNet of SD1.5 has ~100 of them),
or of one VAE tile. The hooks are removed on exit, always (the model is cached and shared),
and only act on the thread that installed them.

`stoppable(fn, ...)` runs a phase and turns the exceptions into the engine's outcomes:
the value, None (cancelled) or SKIPPED.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from darkroom.errors import Interrupted

__all__ = ["SKIPPED", "Skipped", "answering", "answering_any", "stoppable", "units_of"]

SKIPPED = object()  # what a phase gives when Skip abandoned the current batch

# diffusers' building blocks, by class name (stable across diffusers versions, no private imports)
UNIT_TYPES = frozenset({"ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock", "Attention", "FeedForward",
                        "Downsample2D", "Upsample2D"})

T = TypeVar("T")


class Skipped(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a checkpoint when Skip is set: the batch in progress is abandoned."""


def units_of(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `root` (a UNet, a VAE's decoder or encoder) that get a checkpoint, in model order."""
    units = [m for m in root.modules() if type(m).__name__ in UNIT_TYPES]
    conv_in = getattr(root, "conv_in", None)
    return ([conv_in] if isinstance(conv_in, torch.nn.Module) else []) + units


@contextmanager
def answering(modules: Iterable[torch.nn.Module], cancel: threading.Event | None,
              skip: threading.Event | None = None) -> Iterator[None]:
    """Inside the block, entering any of `modules` raises Interrupted (cancel set) or Skipped (skip set).

    The hooks act only on this thread (another user of the shared model is never stopped) and are
    removed when the block ends, however it ends.
    """
    if cancel is None and skip is None:
        yield
        return
    owner = threading.get_ident()

    def check(module: torch.nn.Module, args) -> None:
        if threading.get_ident() != owner:
            return
        if cancel is not None and cancel.is_set():
            raise Interrupted("interrupted")
        if skip is not None and skip.is_set():
            raise Skipped()

    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(check))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def answering_any(cancel: threading.Event | None) -> Iterator[None]:
    """Inside the block, entering any module at all on this thread raises Interrupted once `cancel` is set.

    For phases whose networks are built inside them (the ControlNet preprocessors: a depth or pose net loaded
    from its file for one picture), where there is no model to put hooks on beforehand. A global forward
    pre-hook, removed when the block ends; other threads pass through it untouched."""
    if cancel is None:
        yield
        return
    owner = threading.get_ident()

    def check(module: torch.nn.Module, args) -> None:
        if threading.get_ident() == owner and cancel.is_set():
            raise Interrupted("interrupted")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def stoppable(fn: Callable[[], T], modules: Iterable[torch.nn.Module], cancel: threading.Event | None,
              skip: threading.Event | None = None) -> T | None | object:
    """fn() with checkpoints on `modules`: its value, None when cancelled, SKIPPED when skipped."""
    try:
        with answering(modules, cancel, skip):
            return fn()
    except Interrupted:
        return None
    except Skipped:
        return SKIPPED
