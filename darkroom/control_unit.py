"""One ControlNet unit as a request carries it: the sd-webui-controlnet extension's unit fields.

Names and defaults follow the extension's API (what webuiapi's `ControlNetUnit.to_dict()` sends),
so the A1111 translation is a rename at most. Enumerations accept the extension's strings and
its old integer codes and are kept as the strings the extension writes into infotexts.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
"""How the control image meets the generation size (the extension's names; 0/1/2 in old clients)."""
CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
"""Balanced: the same control for the prompt and the negative; the other two weaken the control's
shallow layers (the extension's "soft injection"), and "ControlNet is more important" also gives
the control to the conditional half only, so CFG amplifies it."""
HR_OPTIONS = ("Both", "Low res only", "High res only")
"""Which passes of a hires-fix generation the unit steers."""
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile",
                       "Inpaint")
"""A ControlNet Union model's control types, the extension's names in the model's index order (xinsir's)."""
UNION_UNKNOWN = "Unknown"
"""The extension's default: Darkroom then picks the type from the preprocessor (darkroom.control.union)."""
_UNION_WORDS = {"pose": 0, "openpose": 0, "depth": 1, "softedge": 2, "hed": 2, "pidi": 2, "scribble": 2, "ted": 2,
                "sketch": 2, "hardedge": 3, "canny": 3, "lineart": 3, "animelineart": 3, "mlsd": 3, "normal": 4,
                "normalmap": 4, "seg": 5, "segment": 5, "segmentation": 5, "tile": 6, "blur": 6, "inpaint": 7,
                "repaint": 7}
"""Other spellings clients use: the extension's from_str words, xinsir's and ComfyUI's names."""
MAX_UNITS = 8
MAX_BATCH_IMAGES = 1000  # pictures of one batch unit (the extension's input_mode "batch")
MODEL_FREE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn", "revision_clipvision",
                      "revision_ignore_prompt")
"""The extension's model-free preprocessors Darkroom runs (darkroom.control.reference, .vision_prompt): no
ControlNet file."""
CORE_ONLY = ("prepared",)
"""Darkroom's own unit fields, not the extension's: refused in A1111 unit dicts (a1111_unit)."""


def _pick(value: Any, names: tuple[str, ...], field: str) -> str:
    if isinstance(value, bool):
        raise ValueError(f"{field} must be one of {', '.join(names)}")
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    text = str(value).strip()
    if text.isdigit() and int(text) < len(names):
        return names[int(text)]
    for name in names:
        if text.lower() == name.lower():
            return name
    # the extension's older spellings
    aliases = {"envelope (outer fit)": "Resize and Fill", "scale to fit (inner fit)": "Crop and Resize",
               "inner fit": "Crop and Resize", "outer fit": "Resize and Fill"}
    if text.lower() in aliases and aliases[text.lower()] in names:
        return aliases[text.lower()]
    raise ValueError(f"{field} {value!r} is not one of: {', '.join(names)} (or 0-{len(names) - 1})")


class ControlUnit(BaseModel):
    """A ControlNet unit: which model, which control image and preprocessor, how strongly and when."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True
    model: str = Field("None", description="ControlNet file name (as /controlnet/model_list lists it, with or"
                                           " without its [hash]), or a path.")
    module: str = Field("none", description="Preprocessor: none (the image is the control map), canny, invert,"
                                            " scribble_xdog, tile_resample, inpaint_only, shuffle, ... (see"
                                            " /controlnet/module_list).")
    image: bytes | None = Field(None, repr=False, description="Control image (an encoded file). None in img2img:"
                                                              " the init image is used, as the extension does.")
    mask: bytes | None = Field(None, repr=False, description="Mask for this unit (white = masked), e.g. inpaint.")
    weight: float = Field(1.0, ge=0.0, le=2.0)
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Fraction of the steps where it starts.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Fraction of the steps where it stops.")
    control_mode: str = Field("Balanced", description=", ".join(CONTROL_MODES))
    resize_mode: str = Field("Crop and Resize", description=", ".join(RESIZE_MODES))
    processor_res: int = Field(512, ge=-1, le=4096, description="Preprocessor resolution (-1: its default).")
    threshold_a: float = Field(-1, description="The preprocessor's first slider (canny low threshold, ...);"
                                               " -1: its default.")
    threshold_b: float = Field(-1, description="The preprocessor's second slider; -1: its default.")
    pixel_perfect: bool = Field(False, description="Pick the preprocessor resolution from the generation size.")
    guess_mode: bool = Field(False, description="diffusers' guess mode: control on the conditional half only,"
                                                " deeper layers stronger; for use with no prompt.")
    low_vram: bool = Field(False, description="Accepted and ignored: every ControlNet follows the model's VRAM"
                                              " mode (docs/gpu.md), which is what this asks for.")
    hr_option: str = Field("Both", description=", ".join(HR_OPTIONS))
    union_control_type: str = Field(UNION_UNKNOWN, description="For a ControlNet Union model, the kind of control"
                                    " image: " + ", ".join(UNION_CONTROL_TYPES) + "; Unknown: picked from the"
                                    " preprocessor. Other models ignore it.")
    merge_images: list[bytes] | None = Field(
        None, repr=False, max_length=16, description="More pictures for the unit (the extension's input_mode"
        " \"merge\"): an IP-Adapter unit averages the tokens of `image` and these; any other unit runs once per"
        " picture, each at weight / their count.")
    batch_images: list[bytes] | None = Field(
        None, repr=False, max_length=MAX_BATCH_IMAGES, description="The extension's batch input (input_mode"
        " \"batch\"): the whole job runs once per picture, this unit taking the next one each time (with no mask),"
        " every run with the same seed; with several batch units, as many runs as the shortest list. Runs through"
        " the job queue.")
    merge_masks: list[bytes | None] | None = Field(
        None, repr=False, max_length=16, description="A mask for each of `merge_images` (None: no mask), as"
        " `mask` is for `image`: the extension's merge input gives every picture its own.")
    advanced_weighting: list[float] | None = Field(
        None, max_length=32, description="The extension's per-layer weights: ControlNets and T2I-Adapters take one"
        " factor per residual (13 for SD1/SD2 ControlNets, 10 for SDXL, 4 for adapters) in place of `weight` and the"
        " control mode's factors; other units ignore it, as in the extension.")
    effective_region_mask: bytes | None = Field(
        None, repr=False, description="The region the unit acts on (an encoded picture, white where it acts, its"
        " first channel read as 0-1), as the extension's field: ControlNets, T2I-Adapters and IP-Adapters.")
    prepared: bool = Field(False, description="The image is the control map already (a map stored in a"
                                              " Darkroom PNG): the preprocessor is not run again, but `module`"
                                              " is kept for the infotext (and an inpaint module's mask).")

    @field_validator("control_mode", mode="before")
    @classmethod
    def _control_mode(cls, v: Any) -> str:
        return _pick(v, CONTROL_MODES, "control_mode")

    @field_validator("resize_mode", mode="before")
    @classmethod
    def _resize_mode(cls, v: Any) -> str:
        return _pick(v, RESIZE_MODES, "resize_mode")

    @field_validator("hr_option", mode="before")
    @classmethod
    def _hr_option(cls, v: Any) -> str:
        return _pick(v, HR_OPTIONS, "hr_option")

    @field_validator("union_control_type", mode="before")
    @classmethod
    def _union_control_type(cls, v: Any) -> str:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", UNION_UNKNOWN.lower())):
            return UNION_UNKNOWN
        word = "".join(str(v).lower().split()).replace("_", "").replace("-", "")
        if word in _UNION_WORDS:
            return UNION_CONTROL_TYPES[_UNION_WORDS[word]]
        return _pick(v, UNION_CONTROL_TYPES, "union_control_type")

    @field_validator("model", "module")
    @classmethod
    def _name(cls, v: str, info) -> str:
        v = v.strip()
        if len(v) > 4096:
            raise ValueError(f"{info.field_name} is too long")
        return v

    @model_validator(mode="after")
    def _window(self) -> ControlUnit:
        if self.guidance_end < self.guidance_start:
            raise ValueError(f"guidance_end {self.guidance_end} is before guidance_start {self.guidance_start};"
                             " the unit steers the steps between the two fractions")
        return self

    @model_validator(mode="after")
    def _merge_masks(self) -> ControlUnit:
        if self.batch_images is not None and self.merge_images:
            raise ValueError("a unit takes either batch_images (one run per picture) or merge_images, not both")
        if self.merge_masks is not None and len(self.merge_masks) != len(self.merge_images or []):
            raise ValueError(f"merge_masks has {len(self.merge_masks)} entries for {len(self.merge_images or [])}"
                             " merge_images: give one mask (or null) per picture")
        return self

    @property
    def active(self) -> bool:
        """Enabled, with a model (or a model-free module), and not weighted to nothing."""
        return (self.enabled and (self.model_free or self.model.lower() not in ("", "none"))
                and self.weight > 0)

    @property
    def model_free(self) -> bool:
        """A reference or ReVision module: it runs on the checkpoint's UNet alone, its model ignored (the
        extension's rule)."""
        return self.module.lower() in MODEL_FREE_MODULES

    @field_validator("advanced_weighting")
    @classmethod
    def _advanced(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(w) and abs(w) <= 10 for w in v):
            raise ValueError("each advanced_weighting factor must be a number from -10 to 10")
        return v

    def describe(self) -> dict[str, Any]:
        data = self.model_dump(exclude={"image", "mask", "effective_region_mask", "merge_images", "merge_masks",
                                        "batch_images"})
        for key in ("image", "mask", "effective_region_mask"):
            value = getattr(self, key)
            data[key] = None if value is None else f"<{len(value)} bytes>"
        for key in ("merge_images", "merge_masks", "batch_images"):
            value = getattr(self, key)
            data[key] = None if value is None else [None if b is None else f"<{len(b)} bytes>" for b in value]
        return data
