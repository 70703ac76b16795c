"""The one contract that crosses every layer: GenerationRequest in, GenerationResult out.

The CLI, the native API, the A1111 API and the OpenAI API only translate to and from
these. Field names follow the AUTOMATIC1111 API where one exists, so translation is thin.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from darkroom.control_unit import MAX_UNITS, ControlUnit

MAX_SIDE = 4096
MAX_SEED = 2**64 - 1
"""Seeds are 0..2**64-1 (-1: random): what torch's generators take, and ComfyUI's 64-bit seeds.

The webui's seeds are 32-bit in practice; larger ones are accepted there too. Image k of a
request uses seed + k, so seed + images - 1 must also be in range: such a request is refused
(422 naming the field) rather than wrapped round to 0, since a wrapped seed is not what the
user asked for and the infotexts' seeds would jump from 2**64-1 to 0.
"""
MAX_ENSD = 2**32 - 1  # the webui takes any int; 32 bits keep seed + delta a seed in practice
RANDN_SOURCES = ("CPU", "GPU", "NV")
MAX_TEXT = 64 * 1024
"""Characters in a text field (prompt, negative prompt, names). CLIP reads 75 tokens a chunk, so a
longer prompt is a mistake (a pasted file, a runaway script): refused at once, never tokenized."""
TEXT_FIELDS = ("prompt", "negative_prompt", "sampler", "schedule", "model", "vae", "hr_upscaler", "preset")


MAX_TOKEN_MERGING = 0.9  # the webui's slider stops there (darkroom/engine/token_merging.py)


class GenerationRequest(BaseModel):
    """Everything that decides the pixels of a txt2img generation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = Field("DPM++ 2M", description="A1111 sampler name, e.g. 'Euler a'.")
    schedule: str = Field("Automatic", description="Schedule type: Automatic, Karras, ...")
    steps: int = Field(20, ge=1, le=500)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    seed: int = Field(-1, ge=-1, le=MAX_SEED, description="-1 picks a random seed (ComfyUI seeds are 64-bit).")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="None: the model's native size.")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="None: the model's native size.")
    batch_size: int = Field(1, ge=1, le=64, description="Images sampled together.")
    n_iter: int = Field(1, ge=1, le=1000, description="Batches run one after another.")
    clip_skip: int = Field(1, ge=1, le=12, description="1 = last layer (A1111 'Clip skip').")
    model: str | None = Field(None, description="Checkpoint name, short hash or path.")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="Ancestral noise; None = default.")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="Variation seed (-1 picks one when a strength is set).")
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0, description="How far the noise moves towards the subseed's.")
    randn_source: str = Field("CPU", description="Where the noise comes from, as the webui's 'RNG': CPU (the same"
                                                 " everywhere), GPU (NVIDIA's numbers) or NV (the webui's CPU copy"
                                                 " of NVIDIA's). See darkroom/engine/rng.py.")
    eta_noise_seed_delta: int = Field(0, ge=0, le=MAX_ENSD, description="The webui's ENSD: ancestral/SDE steps draw"
                                                                      " their noise from seed + this (0: off).")
    vae: str | None = Field(None, description="A separate VAE file (name in the VAE folders or path); None = the"
                                              " checkpoint's own.")
    preset: str | None = Field(
        None, description="Few-step preset (lcm, turbo, lightning, hyper, hyper-cfg, dmd2, tcd, standard) or 'auto'"
                          " (detected from the checkpoint and LoRAs): fills sampler, schedule, steps and cfg_scale"
                          " where the request does not set them. See docs/few-step.md.")
    styles: list[str] = Field([], max_length=64, description="Prompt styles (names in the webui's styles.csv),"
                                                             " applied to both prompts in this order.")
    dynamic_prompts: bool = Field(True, description="Expand {a|b} variants and __name__ wildcards per image (the"
                                                    " Dynamic Prompts extension's syntax); false sends the text as"
                                                    " written. Text without that syntax is never changed.")
    combinatorial: bool = Field(False, description="Dynamic prompts: one image per combination (the batch count"
                                                   " follows), instead of a random pick per image.")
    tiling: bool = Field(False, description="Seamless tiling: the image wraps around at its edges (A1111 'Tiling').")
    restore_faces: bool = Field(False, description="Restore faces after decoding with the face_restoration_model"
                                " setting (CodeFormer or GFPGAN; darkroom/faces).")
    token_merging_ratio: float | None = Field(
        None, ge=0.0, le=MAX_TOKEN_MERGING, description="Token merging (ToMe, the webui's option): share of the"
        " full-resolution self-attention tokens merged; faster, changes the picture. 0 = off; None = the"
        " token_merging_ratio setting (token_merging_ratio_img2img for img2img). See docs/speed.md.")
    token_merging_ratio_hr: float | None = Field(
        None, ge=0.0, le=MAX_TOKEN_MERGING, description="Token merging in the hires pass; 0 = the same as"
        " token_merging_ratio; None = the setting.")

    # img2img / inpainting (A1111 names); images are encoded files (PNG, JPEG, WebP)
    init_image: bytes | None = Field(None, repr=False, description="img2img source image.")
    mask: bytes | None = Field(None, repr=False, description="Inpainting mask: white = repaint.")
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0,
                                      description="img2img and hires fix: 0 keeps the image, 1 ignores it.")
    resize_mode: int = Field(0, ge=0, le=2, description="0 just resize, 1 crop and resize, 2 resize and fill.")
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(1, ge=0, le=3, description="0 fill, 1 original, 2 latent noise, 3 latent nothing.")
    inpaint_full_res: bool = Field(False, description="Inpaint only the masked area (at full resolution).")
    inpaint_full_res_padding: int = Field(32, ge=0, le=256)
    inpainting_mask_invert: bool = Field(False, description="Repaint the black part of the mask instead.")

    # ControlNet (darkroom/control): units applied together, as the sd-webui-controlnet extension does
    controlnet: list[ControlUnit] = Field([], max_length=MAX_UNITS, description="ControlNet units (the A1111"
                                          " extension's fields); disabled units and model 'None' are ignored.")

    # hires fix
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1.0, le=4.0)
    hr_upscaler: str = Field("Latent", description="Latent, Latent (nearest), Lanczos, Nearest, or an upscaler"
                             " model's name (4x-UltraSharp, R-ESRGAN 4x+: darkroom/upscale).")
    hr_second_pass_steps: int = Field(0, ge=0, le=500, description="0 = the same as steps.")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIDE)
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIDE)

    # how outputs are saved (not the picture): the webui's samples_format, jpeg_quality and webp_lossless
    output_format: Literal["png", "jpg", "jpeg", "webp"] | None = Field(
        None, description="File format of saved images; None = the samples_format setting (png by default).")
    output_quality: int | None = Field(None, ge=1, le=100, description="JPEG/WebP quality; None = the setting (80).")
    output_lossless: bool | None = Field(None, description="Lossless WebP; None = the webp_lossless setting.")

    @field_validator("styles")
    @classmethod
    def _valid_styles(cls, v: list[str]) -> list[str]:
        """Style names follow the text fields' rule (see _valid_text)."""
        for name in v:
            problem = "too long" if len(name) > MAX_TEXT else unicode_problem(name)
            if problem:
                raise ValueError(f"style {name[:40]!r}: {problem}")
        return v

    @field_validator(*TEXT_FIELDS)
    @classmethod
    def _valid_text(cls, v: str | None, info) -> str | None:
        """Refuse text that is not Unicode rather than replace it.

        A lone surrogate (half of an emoji cut by a client) or a byte that was not UTF-8 (a
        CLI argument in another encoding, which Python keeps as U+DC80-U+DCFF) cannot be
        tokenized or saved in a PNG. Replacing it with U+FFFD would draw something other
        than what was asked and record a prompt the user never wrote, so the field is named
        and the user fixes the text (or the terminal's encoding).
        """
        if v is None:
            return v
        if len(v) > MAX_TEXT:
            raise ValueError(f"{len(v):,} characters is too long (limit {MAX_TEXT:,}); shorten the text")
        problem = unicode_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _seeds_fit_images(self) -> GenerationRequest:
        """Image k uses seed + k (and subseed + k): the last one must still be a seed (see MAX_SEED)."""
        last = self.image_count - 1
        for name in ("seed", "subseed"):
            value = getattr(self, name)
            if value != -1 and value + last > MAX_SEED:
                raise ValueError(
                    f"{name} {value} is too large for {self.image_count} images: image k uses {name} + k, and seeds"
                    f" go up to 2**64-1, so {name} must be at most {MAX_SEED - last} (or -1 for a random one)")
        return self

    @field_validator("randn_source", mode="before")
    @classmethod
    def _known_source(cls, v: object) -> str:
        """Any case, as the webui's option names them (CPU, GPU, NV)."""
        canonical = str(v).strip().upper()
        if canonical not in RANDN_SOURCES:
            raise ValueError(f"randn_source {v!r} is not one of CPU, GPU, NV (the webui's 'RNG' settings)")
        return canonical

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None, info) -> int | None:
        if v is not None and v % 8:
            lo, hi = v - v % 8, v - v % 8 + 8
            raise ValueError(
                f"{info.field_name} {v} is not a multiple of 8 (the VAE works on 8x8 pixel"
                f" blocks); use {lo} or {hi}"
            )
        return v

    @field_validator("hr_resize_x", "hr_resize_y")
    @classmethod
    def _hr_multiple_of_8(cls, v: int, info) -> int:
        if v % 8:
            raise ValueError(f"{info.field_name} {v} is not a multiple of 8; use {v - v % 8} or {v - v % 8 + 8}")
        return v

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter

    @property
    def is_img2img(self) -> bool:
        return self.init_image is not None

    @property
    def steps_per_batch(self) -> int:
        """Sampling steps one batch really runs: img2img runs steps x strength; hires adds its second pass."""
        first = min(int(self.steps * self.denoising_strength), self.steps) if self.is_img2img else self.steps
        if self.enable_hr:
            first += min(int((self.hr_second_pass_steps or self.steps) * self.denoising_strength),
                         self.hr_second_pass_steps or self.steps)
        return first

    def hires_size(self) -> tuple[int, int]:
        """The second pass's size: hr_resize_x/y when given (one of them keeps the aspect), else hr_scale."""
        w, h = self.width or 0, self.height or 0
        if self.hr_resize_x or self.hr_resize_y:
            x = self.hr_resize_x or int(w * self.hr_resize_y / h) // 8 * 8
            y = self.hr_resize_y or int(h * self.hr_resize_x / w) // 8 * 8
            return x, y
        return int(w * self.hr_scale) // 8 * 8, int(h * self.hr_scale) // 8 * 8

    def describe(self) -> dict[str, Any]:
        """The request as JSON-safe data (images reduced to their byte counts)."""
        data = self.model_dump(exclude={"init_image", "mask", "controlnet"})
        data["controlnet"] = [unit.describe() for unit in self.controlnet]
        data["init_image"] = None if self.init_image is None else f"<{len(self.init_image)} bytes>"
        data["mask"] = None if self.mask is None else f"<{len(self.mask)} bytes>"
        return data


def unicode_problem(text: str) -> str | None:
    """What makes `text` impossible to encode as UTF-8 (and where), or None when it is fine.

    The one rule for request text (GenerationRequest's fields, and the API dialects' other
    fields that are echoed back): see GenerationRequest._valid_text for why it is refused.
    """
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        if 0xDC80 <= code <= 0xDCFF:  # Python's escape for an undecodable byte (os.fsdecode, sys.argv)
            return (f"the byte 0x{code - 0xDC00:02X} at character {e.start + 1} is not UTF-8; write the text in"
                    " UTF-8 (check the terminal's or the file's encoding)")
        return (f"a lone surrogate \\u{code:04x} at character {e.start + 1} is not valid Unicode (half of a"
                " character such as an emoji); send the whole character")
    return None


class GeneratedImage(BaseModel):
    """One finished image; `png` holds the encoded file with its infotext chunk."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    seed: int
    infotext: str
    png: bytes
    path: str | None = None


class GenerationResult(BaseModel):
    request: GenerationRequest
    images: list[GeneratedImage] = []
    interrupted: bool = False
    timings: dict[str, float] = {}
    model_name: str = ""
    model_hash: str = ""
    info: dict[str, Any] = {}

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self.images]

    @property
    def infotexts(self) -> list[str]:
        return [im.infotext for im in self.images]
