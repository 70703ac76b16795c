"""Model families and their detection from a safetensors header (keys and shapes only).

Detection is structural (which components exist and in which layout), not by widths, so
tiny test models and the starter model are detected like the real thing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from darkroom.models.header import SafetensorsHeader

UNET = "model.diffusion_model."


@dataclass(frozen=True)
class Family:
    id: str
    label: str
    native_size: int
    vae_scaling: float
    # where each text encoder lives in the LDM file and in which layout ("hf" or "openclip")
    text_encoders: tuple[tuple[str, str], ...]


FAMILIES: dict[str, Family] = {
    f.id: f
    for f in (
        Family("sd1", "SD1", 512, 0.18215, (("cond_stage_model.transformer.", "hf"),)),
        Family("sd2", "SD2", 512, 0.18215, (("cond_stage_model.model.", "openclip"),)),
        Family("sdxl", "SDXL", 1024, 0.13025,
               (("conditioner.embedders.0.transformer.", "hf"), ("conditioner.embedders.1.model.", "openclip"))),
        Family("sdxl-refiner", "SDXL-refiner", 1024, 0.13025, (("conditioner.embedders.0.model.", "openclip"),)),
    )
}


@dataclass(frozen=True)
class Detection:
    """What a file is. `kind` is checkpoint/lora/vae/embedding/unsupported/unknown."""

    kind: str
    family: str | None = None
    inpainting: bool = False
    v_prediction: bool = False
    detail: str = ""

    @property
    def label(self) -> str:
        if self.kind != "checkpoint" or self.family is None:
            return self.detail or self.kind
        label = FAMILIES[self.family].label
        if self.v_prediction:
            label += "-v"
        return label + (" inpainting" if self.inpainting else "")


def _any(h: SafetensorsHeader, pred: Callable[[str], bool]) -> bool:
    return any(pred(k) for k in h.tensors)


def _is_lora_key(k: str) -> bool:
    return k.startswith(("lora_unet_", "lora_te", "lycoris_")) or any(
        part in k for part in (".lora_down.", ".lora_A.", ".hada_w1_a")
    )


def _both(h: SafetensorsHeader, a: str, b: str) -> bool:
    return _any(h, lambda k: a in k) and _any(h, lambda k: b in k)


# (kind, family or detail, probe) in order: the first probe that matches wins.
PROBES: list[tuple[str, str, Callable[[SafetensorsHeader], bool]]] = [
    ("unsupported", "SD3", lambda h: _any(h, lambda k: "joint_blocks." in k)),
    ("unsupported", "Flux", lambda h: _both(h, "double_blocks.", "single_blocks.")),
    ("unsupported", "Stable Cascade", lambda h: _both(h, "down_blocks.", ".channelwise.")),
    ("lora", "LoRA", lambda h: _any(h, _is_lora_key)),
    ("embedding", "textual inversion embedding",
     lambda h: _any(h, lambda k: k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param"))),
    ("checkpoint", "sdxl-refiner", lambda h: "conditioner.embedders.0.model.token_embedding.weight" in h.tensors),
    ("checkpoint", "sdxl", lambda h: "conditioner.embedders.1.model.token_embedding.weight" in h.tensors),
    ("checkpoint", "sd2", lambda h: "cond_stage_model.model.token_embedding.weight" in h.tensors),
    ("checkpoint", "sd1", lambda h: h.has_prefix("cond_stage_model.transformer.")),
    ("unsupported", "UNet-only file (no text encoder or VAE inside)",
     lambda h: h.has_prefix(UNET) or h.has_prefix("down_blocks.")),
    ("vae", "VAE", lambda h: _any(h, lambda k: k.startswith(("encoder.", "decoder.", "first_stage_model.encoder.")))),
]


def _is_v_prediction(h: SafetensorsHeader) -> bool:
    meta = {k.lower(): v.lower() for k, v in h.metadata.items()}
    if meta.get("v_pred") in ("true", "1") or meta.get("modelspec.prediction_type") == "v":
        return True
    if "v_pred" in h.tensors:
        return True
    for yaml in (h.path.with_suffix(".yaml"), h.path.with_suffix(".yml")):
        if yaml.exists():
            text = yaml.read_text(encoding="utf-8", errors="replace")
            if "parameterization" in text and ('"v"' in text or "'v'" in text or ": v\n" in text):
                return True
    return False


def detect(h: SafetensorsHeader) -> Detection:
    """Identify a safetensors file from its header."""
    for kind, what, probe in PROBES:
        if not probe(h):
            continue
        if kind != "checkpoint":
            return Detection(kind, detail=what)
        conv_in = h.shape(UNET + "input_blocks.0.0.weight")
        if conv_in is None or not h.has_prefix("first_stage_model."):
            missing = "UNet" if conv_in is None else "VAE"
            return Detection("unsupported", detail=f"{FAMILIES[what].label} file without its {missing}")
        channels = conv_in[1]
        if channels not in (4, 9):
            label = FAMILIES[what].label
            detail = f"{label} with {channels}-channel UNet input (e.g. instruct-pix2pix)"
            return Detection("unsupported", detail=detail)
        return Detection("checkpoint", what, inpainting=channels == 9, v_prediction=_is_v_prediction(h))
    return Detection("unknown", detail="not a Stable Diffusion checkpoint")
