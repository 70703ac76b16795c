"""User settings that outlive a process (the selected model, clip skip), kept in settings.json.

A table of known settings, each with its default and the A1111 option name it maps to, so
the web UI, the A1111 `/options` route and the CLI read the same values.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkroom.errors import InvalidRequest


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    a1111: str
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting("current_model", None, "sd_model_checkpoint", "Checkpoint used when a request names none."),
    Setting("clip_skip", 1, "CLIP_stop_at_last_layers", "Default clip skip for requests that leave it at 1."),
    Setting("vae", None, "sd_vae", "Separate VAE used when a request names none (None: the checkpoint's own)."),
    Setting("models_dirs", [], "", "Extra model folders used in place (A1111/Forge or ComfyUI roots, plain folders)."),
    Setting("samples_format", "png", "samples_format", "Image format of saved outputs (png only for now)."),
)
_BY_NAME = {s.name: s for s in SETTINGS}


class Settings:
    """Thread-safe, atomically persisted key/value settings."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
        if path is not None and path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                saved = {}  # a damaged file falls back to defaults; it is rewritten on the next change
            self._values.update({k: v for k, v in saved.items() if k in _BY_NAME})

    def get(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def update(self, **changes: Any) -> None:
        unknown = [k for k in changes if k not in _BY_NAME]
        if unknown:
            raise InvalidRequest(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(_BY_NAME)}")
        with self._lock:
            self._values.update(changes)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(json.dumps(self._values, indent=2), encoding="utf-8")
                os.replace(tmp, self.path)
