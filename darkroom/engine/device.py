"""Choose where and at which precision to run: probed when asked, never at import time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from darkroom.errors import InvalidRequest

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype
    reason: str

    @property
    def precision(self) -> str:
        return next(name for name, dt in PRECISIONS.items() if dt == self.dtype)

    def vae_dtype(self, family_id: str) -> torch.dtype:
        """SDXL's VAE overflows in fp16 (NaN/black images): run it in fp32 there."""
        if self.dtype == torch.float16 and family_id.startswith("sdxl"):
            return torch.float32
        return self.dtype


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively, about twice as fast as fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return bool(mkldnn and flags and torch.ops.mkldnn._is_mkldnn_bf16_supported() and "avx512" in flags)
    except (AttributeError, RuntimeError):
        return False


def choose_device(device: str | None = None, precision: str | None = None) -> DeviceChoice:
    """CUDA fp16, else MPS fp16, else CPU bf16 where the CPU has it, else CPU fp32."""
    device = (device or "auto").lower()
    precision = (precision or "auto").lower()
    if precision not in ("auto", *PRECISIONS):
        raise InvalidRequest(f"unknown precision {precision!r}; use one of auto, {', '.join(PRECISIONS)}")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidRequest(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("--device cuda asked for, but this PyTorch build sees no CUDA GPU")
    if precision != "auto":
        return DeviceChoice(dev, PRECISIONS[precision], f"{precision} as asked")
    if dev.type in ("cuda", "mps"):
        return DeviceChoice(dev, torch.float16, f"fp16 on {dev.type}")
    if cpu_has_fast_bf16():
        return DeviceChoice(dev, torch.bfloat16, "bf16: this CPU has native bf16 (AVX512-BF16/AMX)")
    return DeviceChoice(dev, torch.float32, "fp32: this CPU has no native bf16")
