"""User settings that outlive a process (the selected model, clip skip), kept in settings.json.

A table of known settings, each with its default and the A1111 option name it maps to, so
the web UI, the A1111 `/options` route and the CLI read the same values.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkroom.errors import InvalidRequest
from darkroom.fsutil import read_error, write_atomic, writes_to
from darkroom.request import MAX_TOKEN_MERGING
from darkroom.webui_options import valid_store

log = logging.getLogger("darkroom.settings")
_ELSEWHERE = "use another home folder (--home)"
OUTPUT_FORMATS = ("png", "jpg", "jpeg", "webp")  # the webui's samples_format values


def _optional_name(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _clip_skip(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 12


def _whole(lo: int, hi: int, step: int = 1) -> Callable[[Any], bool]:
    """A whole number from lo to hi (a multiple of `step`); true/false and 2.0 are not numbers here."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi and v % step == 0


def _folders(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _ratio(top: float) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= top


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    a1111: str
    help: str
    valid: Callable[[Any], bool] = _optional_name
    expected: str = "a name or null"  # what `valid` accepts, for the message about a bad value


SETTINGS: tuple[Setting, ...] = (
    Setting("current_model", None, "sd_model_checkpoint", "Checkpoint used when a request names none."),
    Setting("clip_skip", 1, "CLIP_stop_at_last_layers", "Default clip skip for requests that leave it at 1.",
            _clip_skip, "a whole number from 1 to 12"),
    Setting("vae", None, "sd_vae", "Separate VAE used when a request names none (None: the checkpoint's own)."),
    Setting("models_dirs", [], "", "Extra model folders used in place (A1111/Forge or ComfyUI roots, plain folders).",
            _folders, "a list of folder paths"),
    Setting("samples_format", "png", "samples_format", "File format of saved outputs: png, jpg or webp (the infotext"
            " goes in a PNG text chunk, or the EXIF UserComment as the webui writes it).",
            lambda v: v in OUTPUT_FORMATS, "one of " + ", ".join(OUTPUT_FORMATS)),
    Setting("jpeg_quality", 80, "jpeg_quality", "Quality of saved JPEG and lossy WebP outputs (1-100).",
            _whole(1, 100), "a whole number from 1 to 100"),
    Setting("webp_lossless", False, "webp_lossless", "Save WebP outputs losslessly.",
            lambda v: isinstance(v, bool), "true or false"),
    # Token merging (darkroom/engine/token_merging.py): the webui's options, for requests that leave it unset.
    Setting("token_merging_ratio", 0.0, "token_merging_ratio", "Token merging ratio (ToMe): faster, changes the"
            " picture; 0 = off.", _ratio(MAX_TOKEN_MERGING), f"a number from 0 to {MAX_TOKEN_MERGING}"),
    Setting("token_merging_ratio_img2img", 0.0, "token_merging_ratio_img2img", "Token merging ratio for img2img;"
            " 0 = token_merging_ratio.", _ratio(MAX_TOKEN_MERGING), f"a number from 0 to {MAX_TOKEN_MERGING}"),
    Setting("token_merging_ratio_hr", 0.0, "token_merging_ratio_hr", "Token merging ratio for the hires pass;"
            " 0 = token_merging_ratio.", _ratio(MAX_TOKEN_MERGING), f"a number from 0 to {MAX_TOKEN_MERGING}"),
    # Face restoration (restore_faces: true; darkroom/faces): the webui's options of the same names and defaults.
    Setting("face_restoration_model", "CodeFormer", "face_restoration_model", "Model that restores faces when a"
            " request asks for it: CodeFormer or GFPGAN.", lambda v: v in ("CodeFormer", "GFPGAN"),
            '"CodeFormer" or "GFPGAN"'),
    Setting("code_former_weight", 0.5, "code_former_weight", "CodeFormer's fidelity: 0 restores the most, 1 keeps"
            " closest to the face as generated.", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            and 0 <= v <= 1, "a number from 0 to 1"),
    # The webui's options that cannot change a picture (UI, paths, ...), kept so A1111 clients read back what they
    # wrote (darkroom/webui_options.py); Darkroom does not use them.
    Setting("webui_options", {}, "", "The webui's options that do not change pictures, as A1111 clients set them.",
            valid_store, "an object of webui option names and values of their kind"),
    # The webui's noise options: the defaults of A1111 API requests that do not override them (darkroom/engine/rng.py).
    # CPU, not the webui's GPU: Darkroom's own default, the same noise on every machine.
    Setting("randn_source", "CPU", "randn_source", "Noise source of A1111 API requests: CPU, GPU (NVIDIA's numbers)"
            " or NV (the webui's RNG setting).", lambda v: v in ("CPU", "GPU", "NV"), '"CPU", "GPU" or "NV"'),
    Setting("eta_noise_seed_delta", 0, "eta_noise_seed_delta", "ENSD of A1111 API requests: ancestral/SDE steps draw"
            " their noise from seed + this (0: off).", _whole(0, 2**32 - 1), "a whole number from 0 to 4294967295"),
    # Limits every interface enforces before anything is allocated (darkroom/engine/admission.py; docs/limits.md).
    # Sides stop at the request format's 4096 (memory decides below that); batch size 16 is twice the webui's
    # slider (a UNet batch of 32 with CFG, past any throughput gain); batch count 100 is the webui's slider maximum
    # (more holds the one queue for hours); steps cost time, never memory, so their default is the request format's
    # 500, which API clients could always ask for (the webui's slider stops at 150: lower it for a shared server).
    # Memory is checked on top of these, so raising one never lets a request exhaust the machine.
    Setting("max_side", 4096, "darkroom_max_side", "Largest width or height in pixels (hires fix target included).",
            _whole(64, 4096, 8), "a multiple of 8 from 64 to 4096"),
    Setting("max_batch_size", 16, "darkroom_max_batch_size", "Most images sampled together in one batch.",
            _whole(1, 64), "a whole number from 1 to 64"),
    Setting("max_batch_count", 100, "darkroom_max_batch_count", "Most batches one request may run (batch count).",
            _whole(1, 1000), "a whole number from 1 to 1000"),
    Setting("max_steps", 500, "darkroom_max_steps", "Most sampling steps per pass (hires steps included).",
            _whole(1, 500), "a whole number from 1 to 500"),
    # torch.compile of the UNet on the CPU (darkroom/engine/speed.py): 1.09x per step once compiled, but the first
    # generation per size compiles for about a minute (its cache in <home>/cache/torch-compile makes a later start
    # fast), so it stays off unless asked for. Read when Darkroom starts; DARKROOM_COMPILE or --compile override it.
    Setting("torch_compile", "off", "", "torch.compile the UNet on the CPU: off or unet (about 1.09x faster steps"
            " after a one-minute compile per image size).", lambda v: v in ("off", "unet"), '"off" or "unet"'),
)
LIMIT_SETTINGS = ("max_side", "max_batch_size", "max_batch_count", "max_steps")
_BY_NAME = {s.name: s for s in SETTINGS}


class Settings:
    """Thread-safe, atomically persisted key/value settings.

    settings.json comes from outside (a hand edit, a restored backup), so reading it never fails:
    a value of the wrong type, or a file that is not a JSON object, falls back to the defaults and
    is listed in `problems` (and logged), so Darkroom stays usable, `darkroom doctor` says what was
    ignored, and `darkroom restore` can still run. The file itself is kept: before the first change
    is written over a file with problems, it is copied aside (settings.json.invalid-<time>).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
        self.problems: list[str] = []
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # called with all values after each change
        if path is not None and path.is_file():
            self._values.update(self._read(path))
        for line in self.problems:
            log.warning("%s", line)

    def _read(self, path: Path) -> dict[str, Any]:
        """The valid values in the file; a line in `problems` for each thing ignored."""
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else e
            saved = f"unreadable ({why})"
        if not isinstance(saved, dict):
            what = saved if isinstance(saved, str) else f"a JSON {_json_kind(saved)}, not an object"
            self.problems.append(f"{path} is {what}: all settings ignored, defaults used; fix or delete the file")
            return {}
        good: dict[str, Any] = {}
        for name, value in saved.items():
            setting = _BY_NAME.get(name)
            if setting is None:
                continue  # a setting of another version: ignored, as before
            if setting.valid(value):
                good[name] = value
            else:
                self.problems.append(f"{path}: {name!r} should be {setting.expected}, not {_brief(value)}; ignored,"
                                     f" using {json.dumps(setting.default)}")
        return good

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
        bad = [f"{k} should be {_BY_NAME[k].expected}, not {_brief(v)}" for k, v in changes.items()
               if not _BY_NAME[k].valid(v)]
        if bad:
            raise InvalidRequest(f"invalid setting(s): {'; '.join(bad)}")
        with self._lock:
            values = {**self._values, **changes}
            if self.path is not None:
                self._save(self.path, values)
            self._values = values  # only once saved: a failed save changes nothing, on disk or here
        for listener in list(self.listeners):
            listener(dict(values))

    def _save(self, path: Path, values: dict[str, Any]) -> None:
        """Replace settings.json all at once (a full or read-only disk leaves the old file as it was)."""
        doing = f"save the settings to {path}"
        with writes_to(path.parent, doing, instead=_ELSEWHERE):
            path.parent.mkdir(parents=True, exist_ok=True)
        self._keep_invalid_file()
        write_atomic(path, json.dumps(values, indent=2).encode("utf-8"), doing=doing, instead=_ELSEWHERE)

    def _keep_invalid_file(self) -> None:
        """Copy a file that had problems aside before it is replaced (once): it is the user's."""
        if not self.problems or self.path is None or not self.path.is_file():
            return
        aside = self.path.with_name(f"{self.path.name}.invalid-{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise read_error(e, self.path) from e
        write_atomic(aside, data, doing=f"keep the old {self.path} aside", instead=_ELSEWHERE)
        log.warning("%s had problems; kept as %s before saving the new settings", self.path, aside)
        self.problems = []


def _json_kind(value: Any) -> str:
    kinds = ((bool, "true/false"), (int, "number"), (float, "number"), (str, "string"), (list, "list"))
    return next((word for t, word in kinds if isinstance(value, t)), "null")


def _brief(value: Any) -> str:
    """A value as JSON, cut short."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return "a deeply nested value"
    return text if len(text) <= 40 else text[:37] + "..."
