"""Few-step presets: the sampler, schedule, steps and CFG a distilled model wants, by name.

LCM, SD-Turbo/SDXL-Turbo, SDXL-Lightning, Hyper-SD, DMD2 and TCD models (checkpoints or
LoRAs) make an image in 1-8 steps, but only with the sampler, timestep spacing and CFG they
were distilled for; with the usual 20 steps of DPM++ 2M at CFG 7 they give a burnt mess. A
request names a preset (`preset="lightning"`) and the preset fills sampler, schedule, steps
and cfg_scale for each of those fields the request did not set itself (pydantic's
`model_fields_set`): explicit fields always win. `preset="auto"` uses the preset detected
from the LoRAs named in the prompt and the checkpoint (safetensors metadata, then file
name), or nothing when none is recognised. docs/few-step.md has the table and its sources.

CFG 1 (or less) already drops the unconditional half of the batch (`Engine._guidance`), which
is what the model cards' `guidance_scale=0` means in diffusers, and halves the UNet's work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from darkroom.errors import InvalidRequest
from darkroom.request import GenerationRequest

AUTO = "auto"
PRESET_FIELDS = ("sampler", "schedule", "steps", "cfg_scale")
MAX_NAMED_STEPS = 16
"""A step count read from a file name ("…_4step_lora", "…-8steps-…") is used up to this many."""


@dataclass(frozen=True)
class Preset:
    name: str
    sampler: str
    schedule: str
    steps: int
    cfg_scale: float
    description: str
    source: str
    pattern: str | None = None  # regex over a normalized name (see _normalize); None: never detected

    def fields(self) -> dict[str, object]:
        return {"sampler": self.sampler, "schedule": self.schedule, "steps": self.steps, "cfg_scale": self.cfg_scale}

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, **self.fields(), "description": self.description, "source": self.source}


def _word(text: str) -> str:
    """`text` as a whole word: no letter right before or after it ('calcium' is not 'lcm')."""
    return rf"(?<![a-z]){text}(?![a-z])"


PRESETS: tuple[Preset, ...] = (
    Preset("standard", "DPM++ 2M", "Automatic", 20, 7.0,
           "Ordinary (not distilled) checkpoints: the request defaults.",
           "AUTOMATIC1111 defaults"),
    Preset("lcm", "LCM", "Uniform", 4, 1.0,
           "LCM and LCM-LoRA: LCM sampler, 2-8 steps, CFG 1 (up to 2).",
           "https://huggingface.co/docs/diffusers/using-diffusers/inference_with_lcm_lora",
           _word("lcm")),
    Preset("turbo", "Euler a", "SGM Uniform", 1, 1.0,
           "SD-Turbo / SDXL-Turbo (ADD): 1-4 steps, trailing timesteps, no CFG, 512x512.",
           "https://huggingface.co/docs/diffusers/using-diffusers/sdxl_turbo",
           _word("turbo")),
    Preset("lightning", "Euler", "SGM Uniform", 4, 1.0,
           "SDXL-Lightning: Euler with trailing timesteps (sgm_uniform), no CFG, the step count of the file.",
           "https://huggingface.co/ByteDance/SDXL-Lightning",
           _word("lightning")),
    Preset("hyper-cfg", "DDIM", "SGM Uniform", 8, 5.0,
           "Hyper-SD CFG-preserving LoRAs (8/12 steps): DDIM trailing, CFG 5-8 with a negative prompt.",
           "https://huggingface.co/ByteDance/Hyper-SD",
           _word(r"hyper[ _.-]?sd(xl)?(?![a-z]).*(?<![a-z])cfg")),
    Preset("hyper", "DDIM", "SGM Uniform", 8, 1.0,
           "Hyper-SD LoRAs and UNets: DDIM with trailing timesteps, no CFG, the step count of the file.",
           "https://huggingface.co/ByteDance/Hyper-SD",
           _word(r"hyper[ _.-]?sd(xl)?")),
    Preset("dmd2", "LCM", "SGM Uniform", 4, 1.0,
           "DMD2: LCM sampler on timesteps 999, 749, 499, 249 (trailing), no CFG.",
           "https://huggingface.co/tianweiy/DMD2",
           _word("dmd2?")),
    Preset("tcd", "TCD", "Uniform", 4, 1.0,
           "TCD LoRAs: TCD sampler, 4-8 steps, no CFG, eta (gamma) 0.3 (raise it with more steps).",
           "https://huggingface.co/docs/diffusers/using-diffusers/inference_with_tcd_lora",
           _word("tcd")),
)
_BY_NAME = {p.name: p for p in PRESETS}
_STEPS = re.compile(r"(?<![0-9])([0-9]{1,2})[ _.-]?steps?(?![a-z])")
METADATA_KEYS = ("modelspec.title", "ss_output_name", "modelspec.tags", "modelspec.architecture", "name")
"""The safetensors `__metadata__` keys that name what a file is (ModelSpec and kohya's training keys)."""


def preset_names() -> list[str]:
    return [p.name for p in PRESETS]


def _unknown(name: str) -> InvalidRequest:
    return InvalidRequest(f"unknown preset {name!r}; choose one of: {', '.join([*preset_names(), AUTO])}")


def get_preset(name: str) -> Preset:
    preset = _BY_NAME.get(name.strip().lower())
    if preset is None:
        raise _unknown(name)
    return preset


def check_preset_name(name: str | None) -> None:
    """Raise InvalidRequest (listing the names) unless `name` is None, "auto" or a preset."""
    if name is not None and name.strip().lower() != AUTO:
        get_preset(name)


@dataclass(frozen=True)
class Detection:
    preset: str
    steps: int | None  # the step count the name states ("4step"), if any
    source: str  # what it was read from, for messages: "LoRA 'x'", "checkpoint metadata", ...


def _normalize(text: str) -> str:
    """Lowercase with camelCase split ("dreamshaperXL_turboDpmpp" -> "dreamshaper xl_turbo dpmpp")."""
    return re.sub(r"([a-z])([A-Z])", r"\1 \2", text).lower()


def detect_name(text: str) -> tuple[str, int | None] | None:
    """(preset, stated steps) for a file name, title or LoRA name that says what it is, else None."""
    norm = _normalize(text)
    for preset in PRESETS:
        if preset.pattern and re.search(preset.pattern, norm):
            m = _STEPS.search(norm)
            steps = int(m.group(1)) if m and 1 <= int(m.group(1)) <= MAX_NAMED_STEPS else None
            return preset.name, steps
    return None


def detect_metadata(metadata: Mapping[str, str]) -> tuple[str, int | None] | None:
    for key in METADATA_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value and (found := detect_name(value)):
            return found
    return None


def detect(*, loras: Iterable[tuple[str, Mapping[str, str]]] = (), checkpoint: str | Path | None = None,
           metadata: Mapping[str, str] | None = None) -> Detection | None:
    """The preset the files say they need: LoRAs first (name as written, then their metadata), then
    the checkpoint's metadata, then its file name."""
    for name, lora_meta in loras:
        found = detect_name(name) or detect_metadata(lora_meta)
        if found:
            return Detection(found[0], found[1], f"LoRA {name!r}")
    if metadata and (found := detect_metadata(metadata)):
        return Detection(found[0], found[1], "checkpoint metadata")
    if checkpoint is not None and (found := detect_name(Path(checkpoint).stem)):
        return Detection(found[0], found[1], f"checkpoint name {Path(checkpoint).name!r}")
    return None


def detect_preset(path: str | Path | None = None, *, metadata: Mapping[str, str] | None = None,
                  filename: str | None = None, prompt: str = "") -> str | None:
    """The preset name for a checkpoint (its safetensors metadata, else its name) and the LoRAs
    named in `prompt` (by their names as written), or None. LoRA files are not opened here;
    `Engine.detect_preset` also reads the LoRAs' metadata."""
    from darkroom.engine.lora import extract_lora_tags

    if metadata is None and path is not None and Path(path).suffix.lower() == ".safetensors":
        metadata = _file_metadata(Path(path))
    _, tags = extract_lora_tags(prompt)
    loras = [(t.name, {}) for t in tags if t.unet_weight != 0]
    found = detect(loras=loras, checkpoint=filename or path, metadata=metadata)
    return found.preset if found else None


def _file_metadata(path: Path) -> dict[str, str]:
    from darkroom.errors import DarkroomError
    from darkroom.models.header import read_header

    try:
        return read_header(path).metadata
    except (DarkroomError, OSError):  # a damaged file is reported when it is loaded, not here
        return {}


def apply_preset(req: GenerationRequest, detection: Detection | None = None) -> GenerationRequest:
    """`req` with its preset's fields filled where the request did not set them.

    "auto" takes `detection` (and the step count the file names, when it names one); the
    preset field then records what was applied. Applying twice changes nothing.
    """
    if req.preset is None:
        return req
    name = req.preset.strip().lower()
    steps = None
    if name == AUTO:
        if detection is None:
            return req
        name, steps = detection.preset, detection.steps
    preset = get_preset(name)
    values = preset.fields()
    if steps is not None:
        values["steps"] = steps
    update: dict[str, object] = {k: v for k, v in values.items() if k not in req.model_fields_set}
    if name != req.preset:
        update["preset"] = name
    return req.model_copy(update=update) if update else req
