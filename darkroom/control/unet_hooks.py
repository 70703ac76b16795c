"""Hooks a pass's units put on the UNet while it samples (ControlNet-LLLite, IP-Adapter), removed however the
pass ends: the cached UNet itself is never changed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


class HookSession:
    """A pass's units of one kind hooked into `unet`; a subclass's `install` registers them into `handles`."""

    def __init__(self, control, units: list, unet: nn.Module):
        self.control = control
        self.units = units
        self.unet = unet
        self.handles: list = []

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


@contextlib.contextmanager
def hooked(session: HookSession | None) -> Iterator[None]:
    """For the block, `session`'s hooks on (none when it is None); removed on exit, however the block ends."""
    if session is None:
        yield
        return
    try:
        session.install()
        yield
    finally:
        session.remove()
