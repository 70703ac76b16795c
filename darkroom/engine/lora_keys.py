"""LoRA key layouts and base-model guessing, from tensor names, shapes and metadata alone.

kohya-ss / CivitAI keys (`lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*` with
`.lora_down.weight`, `.lora_up.weight`, `.alpha`) and diffusers/PEFT keys
(`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, the older
`.lora.down.weight` / `_lora.down.weight` layouts) are grouped by target module (`_group_keys`);
`guess_base` tells the model family a LoRA was made for. Nothing here reads tensor data or
imports torch, so listings (`darkroom models list`) can use it cheaply; `darkroom.engine.lora`
re-exports these names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from darkroom.models.families import FAMILIES

# --------------------------------------------------------------------------- parsing files

_KOHYA_PREFIXES = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te1"))
_KOHYA_ROLES = {
    "lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid",
    "alpha": "alpha", "scale": "scale", "dora_scale": "dora",
}
_DIFFUSERS_COMPONENTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te1"))
_DIFFUSERS_ROLES = (
    (re.compile(r"\.lora_A(?:\.[^.]+)?\.weight$"), "down"),
    (re.compile(r"\.lora_B(?:\.[^.]+)?\.weight$"), "up"),
    (re.compile(r"\.lora(?:_linear_layer)?\.down\.weight$"), "down"),
    (re.compile(r"\.lora(?:_linear_layer)?\.up\.weight$"), "up"),
    (re.compile(r"_lora\.down\.weight$"), "down"),  # attention processors: attn1.processor.to_q_lora
    (re.compile(r"_lora\.up\.weight$"), "up"),
    (re.compile(r"\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$"), "dora"),
)
_UNET_TOPS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.", "add_embedding.")
_TE_PROCESSOR = re.compile(r"(.*\bself_attn)\.to_(q|k|v|out)$")
# LyCORIS network types we recognise but do not apply (yet)
_LYCORIS = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "oft_": "OFT", "diff": "full-weight difference",
            "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm"}
_COMPONENT_LABEL = {"unet": "UNet", "te1": "text encoder", "te2": "text encoder 2"}
_ADAPTER_PREFIX = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class _Group:
    """The tensors of one target module, by role, before they are read."""

    component: str  # unet / te1 / te2
    lookup: str  # underscored module path inside the component (text encoders: without text_model_)
    name: str  # the module as the file names it (for messages)
    prefix: str  # lora_unet_ / lora_te_ / lora_te1_ / lora_te2_ / unet. / text_encoder. / ...
    keys: dict[str, str] = field(default_factory=dict)  # role -> tensor key

    @property
    def kind(self) -> str | None:
        """None for a LoRA/LoCon layer, else the name of the unsupported network type."""
        if "dora" in self.keys:
            return "DoRA"
        if "down" in self.keys and "up" in self.keys:
            return None
        for role in self.keys:
            for start, label in _LYCORIS.items():
                if role.startswith(start):
                    return label
        return "incomplete LoRA layer" if ("down" in self.keys or "up" in self.keys) else "unknown"


def _split_kohya(key: str) -> tuple[str, str, str, str, str] | None:
    for prefix, component in _KOHYA_PREFIXES:
        if key.startswith(prefix):
            base, _, role = key.partition(".")
            lookup = base[len(prefix):]
            if component != "unet":
                lookup = lookup.removeprefix("text_model_")
            return component, lookup, base, prefix, _KOHYA_ROLES.get(role, role)
    return None


def _split_diffusers(key: str) -> tuple[str, str, str, str, str] | None:
    k = key.removeprefix("base_model.model.")
    component = prefix = None
    for p, c in _DIFFUSERS_COMPONENTS:
        if k.startswith(p):
            component, prefix, k = c, p, k[len(p):]
            break
    else:
        if k.startswith(_UNET_TOPS):
            component, prefix = "unet", ""
    if component is None:
        return None
    role = None
    if k.endswith(".alpha"):
        role, k = "alpha", k[: -len(".alpha")]
    for pattern, r in _DIFFUSERS_ROLES:
        m = pattern.search(k)
        if m:
            role, k = role or r, k[: m.start()]
            break
    if role is None:
        return None
    path = k.replace(".processor.", ".")
    if component == "unet":
        path = re.sub(r"\.to_out$", ".to_out.0", path)  # attention-processor name `to_out_lora`
    else:
        path = path.removeprefix("text_model.")
        if m := _TE_PROCESSOR.match(path):
            path = f"{m.group(1)}.{m.group(2)}_proj"
    return component, path.replace(".", "_"), f"{prefix}{k}", prefix, role


def _group_keys(keys: Iterable[str]) -> tuple[dict[tuple[str, str], _Group], list[str]]:
    """LoRA tensor keys grouped by target module; and the keys that are no LoRA layer at all."""
    groups: dict[tuple[str, str], _Group] = {}
    ignored: list[str] = []
    for key in keys:
        parts = _split_kohya(key) or _split_diffusers(key)
        if parts is None:
            ignored.append(key)  # e.g. kohya's bundled embeddings (bundle_emb.*)
            continue
        component, lookup, name, prefix, role = parts
        group = groups.setdefault((component, lookup), _Group(component, lookup, name, prefix))
        group.keys[role] = key
    return groups, ignored


# --------------------------------------------------------------------------- base model guess

# real widths: (cross-attention context of the UNet, single text encoder width) per family
_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
_TE_WIDTH = {768: "sd1", 1024: "sd2"}
_OTHER_ARCH = (("double_blocks", "Flux"), ("single_blocks", "Flux"), ("joint_blocks", "SD3"))


@dataclass(frozen=True)
class BaseGuess:
    """What model a LoRA was made for: family ids (several when only a group is known)."""

    families: frozenset[str] = frozenset()
    other: str | None = None  # an architecture Darkroom does not run (Flux, SD3, ...)
    evidence: str = ""

    @property
    def label(self) -> str | None:
        if self.other:
            return self.other
        if not self.families:
            return None
        return "/".join(FAMILIES[f].label for f in sorted(self.families, key=list(FAMILIES).index))


def _metadata_family(meta: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(family id, other architecture) from kohya/modelspec metadata."""
    version = str(meta.get("ss_base_model_version", "")).lower()
    arch = str(meta.get("modelspec.architecture", "")).lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return ("sdxl-refiner" if "refiner" in version + arch else "sdxl"), None
    if version.startswith("sd_v2") or str(meta.get("ss_v2", "")) == "True" or arch.startswith("stable-diffusion-v2"):
        return "sd2", None
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return "sd1", None
    for probe, label in (("flux", "Flux"), ("sd3", "SD3"), ("stable-diffusion-v3", "SD3"), ("auraflow", "AuraFlow"),
                         ("pixart", "PixArt"), ("hunyuan", "Hunyuan-DiT"), ("stable-cascade", "Stable Cascade")):
        if version.startswith(probe) or arch.startswith(probe):
            return None, label
    return None, None


def guess_base(groups: Mapping[tuple[str, str], _Group], shape_of: Callable[[str], tuple[int, ...] | None],
               metadata: Mapping[str, str]) -> BaseGuess:
    """The model family a LoRA was made for, from its structure, widths and metadata.

    In order: an architecture we do not run (Flux/SD3 block names or metadata); SDXL's
    first text encoder (`lora_te1_`); the real widths (UNet cross-attention input 768 SD1,
    1024 SD2, 2048 SDXL, 1280 refiner); the bigG encoder alone (`lora_te2_`,
    `text_encoder_2.`): SDXL or its refiner; a single text encoder's width (768 SD1, 1024
    SD2); `ss_base_model_version` / `ss_v2` / `modelspec.architecture` metadata; a single
    CLIP text encoder (`lora_te_`) alone says "not SDXL". Tiny test models have none of the
    real widths: those fall through to the metadata, or to nothing (then only the shape
    check decides). `ss_sd_model_name` (a file name users choose) is not used.
    """
    for g in groups.values():
        for probe, label in _OTHER_ARCH:
            if probe in g.lookup:
                return BaseGuess(other=label, evidence=f"layer {g.name}")
    meta_family, meta_other = _metadata_family(metadata)
    if meta_other:
        return BaseGuess(other=meta_other, evidence="metadata")
    prefixes = {g.prefix for g in groups.values()}
    if "lora_te1_" in prefixes:
        return BaseGuess(frozenset({"sdxl"}), evidence="SDXL's two text encoders")
    xl = frozenset({"sdxl", "sdxl-refiner"}) if prefixes & {"lora_te2_", "text_encoder_2."} else None

    def width(g: _Group) -> int | None:
        shape = shape_of(g.keys["down"]) if "down" in g.keys else None
        return shape[1] if shape is not None and len(shape) >= 2 else None

    for g in groups.values():
        if g.component == "unet" and g.lookup.endswith(("attn2_to_k", "attn2_to_v")):
            w = width(g)
            if w in _CROSS_WIDTH:
                return BaseGuess(frozenset({_CROSS_WIDTH[w]}), evidence=f"cross-attention width {w}")
    if xl is not None:  # bigG alone: SDXL's second encoder, or the refiner's only one
        found = {meta_family} & xl if meta_family else set()
        return BaseGuess(frozenset(found or xl), evidence="SDXL's second text encoder")
    for g in groups.values():
        if g.component == "te1" and g.lookup.endswith("self_attn_q_proj"):
            w = width(g)
            if w in _TE_WIDTH:
                return BaseGuess(frozenset({_TE_WIDTH[w]}), evidence=f"text encoder width {w}")
    if meta_family:
        return BaseGuess(frozenset({meta_family}), evidence="metadata")
    if "lora_te_" in prefixes:
        return BaseGuess(frozenset({"sd1", "sd2"}), evidence="one text encoder")
    return BaseGuess()
