"""The one contract that crosses every layer: GenerationRequest in, GenerationResult out.

The CLI, the native API, the A1111 API and the OpenAI API only translate to and from
these. Field names follow the AUTOMATIC1111 API where one exists, so translation is thin.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_SIDE = 4096


class GenerationRequest(BaseModel):
    """Everything that decides the pixels of a txt2img generation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = Field("DPM++ 2M", description="A1111 sampler name, e.g. 'Euler a'.")
    schedule: str = Field("Automatic", description="Schedule type: Automatic, Karras, ...")
    steps: int = Field(20, ge=1, le=500)
    cfg_scale: float = Field(7.0, ge=0.0, le=100.0)
    seed: int = Field(-1, ge=-1, lt=2**64, description="-1 picks a random seed (ComfyUI seeds are 64-bit).")
    width: int | None = Field(None, ge=8, le=MAX_SIDE, description="None: the model's native size.")
    height: int | None = Field(None, ge=8, le=MAX_SIDE, description="None: the model's native size.")
    batch_size: int = Field(1, ge=1, le=64, description="Images sampled together.")
    n_iter: int = Field(1, ge=1, le=1000, description="Batches run one after another.")
    clip_skip: int = Field(1, ge=1, le=12, description="1 = last layer (A1111 'Clip skip').")
    model: str | None = Field(None, description="Checkpoint name, short hash or path.")
    eta: float | None = Field(None, ge=0.0, le=1.0, description="Ancestral noise; None = default.")

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

    @property
    def image_count(self) -> int:
        return self.batch_size * self.n_iter


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
