"""The loaded-model cache: one model kept in memory between generations of a process."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import torch

from darkroom.engine.device import DeviceChoice
from darkroom.models.loader import LoadedModel, LoadOptions, load_checkpoint


class ModelCache:
    """Keeps the last loaded model; loading another frees it first (peak memory = one model)."""

    placement = None  # a darkroom.engine.placement.Placement (low-VRAM offload, fp8) or None: all on the device

    def __init__(self, device: DeviceChoice, *, allow_pickle: bool = False, v_prediction: bool | None = None):
        self.device = device
        self.allow_pickle = allow_pickle
        self.v_prediction = v_prediction  # None: as detected from the file (metadata, v_pred key, sidecar .yaml)
        self._model: LoadedModel | None = None
        self._key: tuple | None = None
        self._lock = threading.Lock()
        # caches of models that go with the checkpoint (the engine's ControlNets): emptied with it, so
        # unloading really frees the memory and a switch to another model keeps one model's worth
        self.companions: list = []

    @property
    def current(self) -> LoadedModel | None:
        return self._model

    def get(self, path: Path) -> LoadedModel:
        path = Path(path).resolve()
        v_prediction = self.v_prediction
        st = path.stat()
        key = (str(path), st.st_mtime_ns, v_prediction)
        with self._lock:
            if self._model is not None and self._key == key:
                return self._model
            self.unload()
            family_hint = "sdxl" if self._looks_sdxl(path) else "sd"
            opts = LoadOptions(
                device=self.device.device,
                dtype=self.device.dtype,
                vae_dtype=self.device.vae_dtype(family_hint),
                allow_pickle=self.allow_pickle,
                v_prediction=v_prediction,
                # a single file's UNet/VAE weights are stored NHWC as they load (no second copy)
                channels_last=self.device.device.type == "cpu",
            )
            if self.placement is not None:  # may offload: load in CPU memory, then place (engine/placement.py)
                opts.device = self.placement.load_device(opts.device)
            model = load_checkpoint(path, opts)
            if self.placement is not None:
                self.placement.install(model, self.device.device)
            if model.device.type == "cpu":
                # oneDNN's convolutions are faster on NHWC weights, most of all at bf16 (a no-op
                # for weights loaded NHWC already; converts a diffusers folder's)
                model.unet.to(memory_format=torch.channels_last)
                model.vae.to(memory_format=torch.channels_last)
            from darkroom.engine.speed import optimize_cached  # exact CPU speed-ups; compile opt-in

            optimize_cached(self, model)
            self._model = model
            self._key = key
            return self._model

    @staticmethod
    def _looks_sdxl(path: Path) -> bool:
        if path.is_dir():
            return (path / "text_encoder_2").exists()
        if path.suffix.lower() != ".safetensors":
            return False
        from darkroom.models.header import read_header

        return read_header(path).has_prefix("conditioner.")

    def unload(self) -> None:
        self._model = None
        self._key = None
        for companion in self.companions:
            companion.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
