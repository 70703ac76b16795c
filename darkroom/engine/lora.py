"""LoRA: the `<lora:...>` prompt tags, the LoRA folders, and merging LoRA weights into a model.

What users have are kohya-ss / CivitAI files (`lora_unet_*`, `lora_te_*`, `lora_te1_*`,
`lora_te2_*` with `.lora_down.weight`, `.lora_up.weight`, `.alpha`) and diffusers/PEFT files
(`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`, the older
`.lora.down.weight` / `_lora.down.weight` layouts). Each is parsed into one normalised form:
for every target module its `down` (A), `up` (B), optional `mid` (LoCon/LyCORIS CP "tucker")
and scale (alpha / rank; no alpha -> 1, as the webui does).

Module names: kohya names the UNet either with underscored diffusers paths
(`lora_unet_down_blocks_0_attentions_0_..._attn1_to_q`, SD1 LoRAs) or with the original LDM
paths (`lora_unet_input_blocks_1_1_..._attn1_to_q`, SDXL LoRAs). Both are resolved through
one table built from the loaded model: every Linear/Conv2d of the diffusers UNet and of the
text encoders under its underscored path, plus the UNet's LDM path derived from its config
(`darkroom.models.ldm_export.unet_to_ldm`, the inverse of diffusers' converter).

Applying merges `W += weight * scale * up @ down` (in float32, cast back to the module
dtype) into the weights in place, after saving a copy of every touched weight; leaving the
context copies the saved weights back, so the model is bit-for-bit what it was. Everything
that can go wrong (wrong base model, shapes that do not fit, layers that do not exist) is
found before the first weight changes.

The webui (AUTOMATIC1111 `extensions-builtin/Lora`) is the reference for the tag syntax,
the alias (`ss_output_name`), the `Lora hashes` infotext and the hash it uses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkroom.errors import InvalidRequest, ModelLoadError, ModelNotFound
from darkroom.home import Home
from darkroom.models.families import FAMILIES, detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import SafetensorsHeader, read_header

if TYPE_CHECKING:
    from darkroom.models.loader import LoadedModel

log = logging.getLogger("darkroom.lora")

LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth")
MAX_UNMATCHED_FRACTION = 0.10  # more layers than this without a counterpart: a LoRA for another model
MAX_TRIGGER_WORDS = 20

# --------------------------------------------------------------------------- prompt tags

# The webui's extra-network syntax is `<(\w+):([^>]+)>`; `lyco` is an alias of `lora` there
# since 1.5. We match the two case-insensitively and leave every other `<...>` in the text.
_TAG = re.compile(r"<(lora|lyco):([^>]+)>", re.IGNORECASE)


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:name:te:unet>` tag of a prompt."""

    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    text: str = ""  # the tag as written


def _number(value: str, what: str, tag: str) -> float:
    try:
        x = float(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"{tag}: the {what} {value.strip()!r} is not a number (write e.g. <lora:name:0.8>)"
        ) from None
    if not math.isfinite(x):
        raise InvalidRequest(f"{tag}: the {what} must be a finite number, not {value.strip()!r}")
    return x


def _parse_tag(tag: str, args: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        if "=" in item:
            key, value = item.split("=", 1)
            named[key.strip()] = value
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise InvalidRequest(f"{tag}: no LoRA name given (write <lora:name> or <lora:name:0.8>)")
    te = _number(positional[1], "text-encoder weight", tag) if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(named["te"], "text-encoder weight", tag)
    unet = _number(positional[2], "UNet weight", tag) if len(positional) > 2 else te
    if "unet" in named:
        unet = _number(named["unet"], "UNet weight", tag)
    # positional[3] / dyn= (the webui's dynamic rank) is accepted and ignored
    return LoraTag(name, te, unet, tag)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its LoRA tags, and the tags in order.

    Syntax as in the webui: `<lora:name>` (weight 1), `<lora:name:w>` (w for the text
    encoder and the UNet), `<lora:name:te:unet>` (first number: text encoder, second: UNet),
    also `te=`/`unet=` named values; `<lyco:...>` is the same. Tags are removed and the text
    around them is left as it is (the webui does the same). A tag without a name inside
    (`<lora:>`) is not a tag for the webui's pattern and stays in the text; a tag whose
    weight is not a number raises InvalidRequest. A name given twice: the last tag wins
    (its weights, at its position).
    """
    found: dict[str, LoraTag] = {}

    def take(m: re.Match[str]) -> str:
        tag = _parse_tag(m.group(0), m.group(2))
        found.pop(tag.name, None)
        found[tag.name] = tag
        return ""

    cleaned = _TAG.sub(take, prompt)
    return cleaned, list(found.values())


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


# --------------------------------------------------------------------------- files


def addnet_hash(path: Path) -> str:
    """SHA-256 of a .safetensors file's tensor data (everything after the header).

    This is what the webui hashes LoRAs with (kohya's / sd-webui-additional-networks'
    "addnet" hash, CivitAI's "AutoV3"); editing the metadata does not change it.
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(n + 8)
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _parse_tag_frequency(meta: Mapping[str, str]) -> list[str]:
    raw = meta.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        doc = json.loads(raw)
    except ValueError:
        return []
    counts: dict[str, float] = {}
    if isinstance(doc, dict):
        for tags in doc.values():
            if not isinstance(tags, dict):
                continue
            for tag, count in tags.items():
                tag = str(tag).strip()
                if tag and isinstance(count, (int, float)):
                    counts[tag] = counts.get(tag, 0) + count
    order = {t: i for i, t in enumerate(counts)}
    return sorted(counts, key=lambda t: (-counts[t], order[t]))[:MAX_TRIGGER_WORDS]


@dataclass
class LoraModule:
    """One target module of a LoRA, read and normalised."""

    component: str
    lookup: str
    name: str
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None
    scale: float  # alpha / rank, or 1 without alpha

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, weight_shape: torch.Size, device: torch.device) -> torch.Tensor:
        """up @ down (with the CP core for LoCon "tucker" layers), float32, shaped like the weight."""
        up = self.up.to(device, torch.float32).flatten(1)
        down = self.down.to(device, torch.float32).flatten(1)
        if self.mid is not None:
            d = torch.einsum("n m k l, i n, m j -> i j k l", self.mid.to(device, torch.float32), up, down)
        else:
            d = up @ down
        return d.reshape(weight_shape)


class LoraFile:
    """A LoRA .safetensors file: header and metadata at once, tensors when first applied."""

    def __init__(self, path: str | Path, header: SafetensorsHeader | None = None):
        self.path = Path(path)
        self.name = self.path.stem
        if self.path.suffix.lower() != ".safetensors":
            raise ModelLoadError(
                f"LoRA '{self.name}' ({self.path.name}): pickled LoRA files (.pt/.ckpt) can run arbitrary code"
                " when loaded and are not supported; use a .safetensors version of it"
            )
        self.header = header or read_header(self.path)
        kind = detect(self.header)
        if kind.kind in ("checkpoint", "vae", "embedding"):
            what = {"checkpoint": f"{kind.label} checkpoint", "vae": "VAE", "embedding": "textual inversion embedding"}
            where = {"checkpoint": "models/checkpoints", "vae": "models/vae", "embedding": "models/embeddings"}
            raise ModelLoadError(
                f"LoRA '{self.name}' ({self.path.name}) is a {what[kind.kind]}, not a LoRA; move it to"
                f" {where[kind.kind]}"
            )
        self.groups, self.ignored = _group_keys(self.header.tensors)
        if not self.groups:
            raise ModelLoadError(f"LoRA '{self.name}' ({self.path.name}): no LoRA layers found in the file")
        self._modules: list[LoraModule] | None = None
        self._hash: str | None = None

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def alias(self) -> str:
        """`ss_output_name`, as the webui shows and resolves it (the file name when absent)."""
        return self.metadata.get("ss_output_name") or self.name

    @property
    def trigger_words(self) -> list[str]:
        return _parse_tag_frequency(self.metadata)

    @property
    def base(self) -> BaseGuess:
        return guess_base(self.groups, self.header.shape, self.metadata)

    @property
    def short_hash(self) -> str:
        """The 12 hex digits the webui writes in `Lora hashes`: `sshs_model_hash` metadata
        (kohya's precomputed hash) when valid, else the addnet hash of the file."""
        if self._hash is None:
            meta_hash = str(self.metadata.get("sshs_model_hash", "")).strip().lower()
            if re.fullmatch(r"[0-9a-f]{64}", meta_hash):
                self._hash = meta_hash
            else:
                self._hash = addnet_hash(self.path)
        return self._hash[:12]

    def modules(self) -> list[LoraModule]:
        """Read the tensors (once) and normalise them; unsupported network types raise."""
        if self._modules is None:
            self._modules = self._read()
        return self._modules

    def _read(self) -> list[LoraModule]:
        bad: dict[str, list[str]] = {}
        for g in self.groups.values():
            if g.kind is not None:
                bad.setdefault(g.kind, []).append(g.name)
        if bad:
            kind, names = next(iter(bad.items()))
            raise InvalidRequest(
                f"LoRA '{self.name}' uses {kind} layers ({len(names)}, e.g. {names[0]}), which Darkroom cannot apply"
                " yet; LoRA and LoCon files are supported"
            )
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as fh:
                tensors = {k: fh.get_tensor(k) for g in self.groups.values() for k in g.keys.values()}
        except Exception as e:  # safetensors raises its own error types for corrupt data
            raise ModelLoadError(f"LoRA '{self.name}' ({self.path.name}): cannot read tensors ({e})") from None
        return parse_lora_tensors(tensors, self.metadata, groups=self.groups)

    def targets(self, model: LoadedModel) -> dict[str, tuple[str, str]]:
        """{layer name in the file: (component, module path in the model)} for the layers that exist."""
        maps = _TargetMaps(model)
        out = {}
        for g in self.groups.values():
            hit = maps.find(g.component, g.lookup)
            if hit is not None:
                out[g.name] = (g.component, hit[0])
        return out


def _adapter_scale(meta: Mapping[str, str], component: str, dotted: str, rank: int) -> float | None:
    """PEFT/diffusers `lora_adapter_metadata` (lora_alpha, r, alpha_pattern, use_rslora) -> scale."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    prefix = _ADAPTER_PREFIX[component] + "."
    conf = {k[len(prefix):]: v for k, v in doc.items() if k.startswith(prefix)} if isinstance(doc, dict) else {}
    if "lora_alpha" not in conf:
        return None
    alpha = float(conf["lora_alpha"])
    for pattern, value in (conf.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", dotted):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if conf.get("use_rslora") else rank)


def parse_lora_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                       groups: Mapping[tuple[str, str], _Group] | None = None) -> list[LoraModule]:
    """A LoRA state dict (kohya or diffusers/PEFT keys) -> normalised modules.

    Scale per module: an explicit `scale`, else alpha / rank (rank = rows of `down`), else
    PEFT adapter metadata, else 1 (as the webui does for files without alpha).
    """
    metadata = metadata or {}
    if groups is None:
        groups, _ = _group_keys(tensors)
    out = []
    for g in groups.values():
        if g.kind is not None:
            raise InvalidRequest(f"LoRA layer {g.name} is a {g.kind} layer, which Darkroom cannot apply yet")
        down, up = tensors[g.keys["down"]], tensors[g.keys["up"]]
        mid = tensors[g.keys["mid"]] if "mid" in g.keys else None
        rank = int(down.shape[0])
        if "scale" in g.keys:
            scale = float(tensors[g.keys["scale"]].float().item())
        elif "alpha" in g.keys:
            scale = float(tensors[g.keys["alpha"]].float().item()) / rank
        else:
            adapter = _adapter_scale(metadata, g.component, g.name.removeprefix(g.prefix), rank)
            scale = 1.0 if adapter is None else adapter
        out.append(LoraModule(g.component, g.lookup, g.name, down, up, mid, scale))
    return out


# --------------------------------------------------------------------------- the library


@dataclass
class LoraEntry:
    """One LoRA file as listings show it (header only: nothing large is read)."""

    name: str  # file stem: what `<lora:name>` uses
    path: Path
    size: int
    alias: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None  # "SD1", "SDXL", "SD1/SD2", "Flux" ... or None when unknown
    trigger_words: list[str] = field(default_factory=list)
    short_hash: str | None = None  # the webui's 12-digit LoRA hash; None when not computed yet
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The webui's /sdapi/v1/loras fields (name, alias, path, metadata) and ours."""
        return {"name": self.name, "alias": self.alias or self.name, "path": str(self.path),
                "metadata": self.metadata, "base_model": self.base_model, "trigger_words": self.trigger_words,
                "short_hash": self.short_hash, "size": self.size, "error": self.error}


class LoraLibrary:
    """The LoRA files of a Home: `models/loras`, and `models/Lora` (+ `models/LyCORIS`) of
    AUTOMATIC1111/Forge roots or `models/loras` of ComfyUI roots among its extra model
    folders, searched recursively. Parsed files are kept in a small LRU cache."""

    def __init__(self, home: Home, hashes: HashCache | None = None, *, cache_size: int = 4):
        self.home = home
        self.hashes = hashes or HashCache(home.cache_db)
        self.cache_size = cache_size
        self._files: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()

    def folders(self) -> list[Path]:
        dirs = [self.home.loras]
        for extra in self.home.extra_model_dirs:
            for sub in ("models/Lora", "models/LyCORIS", "models/loras"):
                if (extra / sub).is_dir():
                    dirs.append(extra / sub)
        unique: list[Path] = []
        seen: set[str] = set()
        for d in dirs:
            key = str(d.resolve()) if d.exists() else str(d)
            if key not in seen:
                seen.add(key)
                unique.append(d)
        return unique

    def files(self) -> list[Path]:
        out: list[Path] = []
        for folder in self.folders():
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                rel = path.relative_to(folder)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if path.is_file() and path.suffix.lower() in LORA_SUFFIXES:
                    out.append(path)
        return out

    def load(self, path: Path) -> LoraFile:
        """The LoraFile for `path` (cached by path, size and mtime)."""
        path = Path(path)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in self._files:
            self._files.move_to_end(key)
            return self._files[key]
        lora = LoraFile(path)
        self._files[key] = lora
        while len(self._files) > self.cache_size:
            self._files.popitem(last=False)
        return lora

    def resolve(self, name: str) -> LoraFile:
        """By file stem (exact, then ignoring case; `.safetensors` may be included), then by
        the `ss_output_name` alias (exact, then ignoring case). The first folder wins when
        two folders hold the same name; a pickled file (.pt/.ckpt) raises ModelLoadError."""
        wanted = name.strip()
        if wanted.lower().endswith(LORA_SUFFIXES):
            wanted = Path(wanted).stem
        # a .safetensors file wins over a pickled one of the same name (which could only be refused)
        files = sorted(self.files(), key=lambda p: p.suffix.lower() != ".safetensors")
        for match in (lambda p: p.stem == wanted, lambda p: p.stem.lower() == wanted.lower()):
            for path in files:
                if match(path):
                    return self.load(path)
        lowered = wanted.lower()
        aliases: list[tuple[str, Path]] = []
        for path in files:
            if path.suffix.lower() != ".safetensors":
                continue
            try:
                alias = read_header(path).metadata.get("ss_output_name")
            except ModelLoadError:
                continue
            if alias:
                aliases.append((alias, path))
        for match in (lambda a: a == wanted, lambda a: a.lower() == lowered):
            for alias, path in aliases:
                if match(alias):
                    return self.load(path)
        folders = ", ".join(str(f) for f in self.folders())
        raise ModelNotFound(f"no LoRA named '{name}' in {folders}",
                            hint="put its .safetensors file in one of these folders")

    def uses(self, tags: Iterable[LoraTag]) -> list[LoraUse]:
        """Resolve prompt tags to what `apply_loras` takes (missing names raise ModelNotFound)."""
        return [LoraUse(self.resolve(t.name), t.te_weight, t.unet_weight, name=t.name) for t in tags]

    def describe(self, path: Path, *, hashes: bool = False) -> LoraEntry:
        entry = LoraEntry(path.stem, path, path.stat().st_size)
        try:
            lora = self.load(path)
        except (ModelLoadError, InvalidRequest) as e:
            entry.error = str(e)
            return entry
        entry.alias = lora.alias
        entry.metadata = dict(lora.metadata)
        entry.base_model = lora.base.label
        entry.trigger_words = lora.trigger_words
        if hashes or lora._hash is not None or "sshs_model_hash" in lora.metadata:
            entry.short_hash = lora.short_hash
        return entry

    def list(self, *, hashes: bool = False) -> list[LoraEntry]:
        """Every LoRA file; `hashes=True` computes missing short hashes (reads whole files)."""
        return [self.describe(p, hashes=hashes) for p in self.files()]

    def sha256(self, lora: LoraFile | LoraEntry) -> str:
        """The whole file's SHA-256 (CivitAI's "SHA256"), cached in the home's hash cache."""
        return self.hashes.sha256(lora.path)


# --------------------------------------------------------------------------- applying


@dataclass
class LoraUse:
    """A LoRA with its weights: `te_weight` for the text encoders, `unet_weight` (None: the
    same) for the UNet; `name` is what the prompt called it (for the infotext)."""

    lora: LoraFile
    te_weight: float = 1.0
    unet_weight: float | None = None
    name: str | None = None

    @property
    def unet(self) -> float:
        return self.te_weight if self.unet_weight is None else self.unet_weight

    @property
    def mentioned_name(self) -> str:
        return self.name or self.lora.name


class _TargetMaps:
    """Underscored module path -> (dotted path, module) for every Linear/Conv2d of the model."""

    def __init__(self, model: LoadedModel):
        self.model = model
        self.roots: dict[str, torch.nn.Module] = {"unet": model.unet}
        encoders = [slot.model for slot in model.text_encoders]
        if model.family.id == "sdxl-refiner":
            self.roots["te2"] = encoders[0]
        else:
            for component, enc in zip(("te1", "te2"), encoders, strict=False):
                self.roots[component] = enc
        self._maps: dict[str, dict[str, tuple[str, torch.nn.Module]]] = {}

    def _build(self, component: str) -> dict[str, tuple[str, torch.nn.Module]]:
        root = self.roots[component]
        table: dict[str, tuple[str, torch.nn.Module]] = {}
        modules = dict(root.named_modules())
        for name, mod in modules.items():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                path = name if component == "unet" else name.removeprefix("text_model.")
                table.setdefault(path.replace(".", "_"), (name, mod))
        if component == "unet":
            from darkroom.models.ldm_export import unet_to_ldm

            keys = [k for k in root.state_dict() if k.endswith(".weight")]
            try:
                ldm = unet_to_ldm({k: k for k in keys}, dict(root.config), prefix="")
            except (ValueError, KeyError, IndexError) as e:  # an unusual UNet: LDM names are then unknown
                log.warning("no LDM names for this UNet (%s); LoRAs with LDM layer names will not match", e)
                ldm = {}
            for ldm_key, key in ldm.items():
                name = key[: -len(".weight")]
                if name in modules and isinstance(modules[name], (torch.nn.Linear, torch.nn.Conv2d)):
                    table.setdefault(ldm_key[: -len(".weight")].replace(".", "_"), (name, modules[name]))
        return table

    def find(self, component: str, lookup: str) -> tuple[str, torch.nn.Module] | None:
        if component not in self.roots:
            return None
        if component not in self._maps:
            self._maps[component] = self._build(component)
        return self._maps[component].get(lookup)


def _squeeze(shape: Iterable[int]) -> tuple[int, ...]:
    s = tuple(shape)
    while len(s) > 1 and s[-1] == 1:
        s = s[:-1]
    return s


def _fits(weight: torch.Size, m: LoraModule) -> bool:
    down, up = tuple(m.down.shape), tuple(m.up.shape)
    if len(down) < 2 or len(up) < 2 or up[0] != weight[0]:
        return False
    up_in = math.prod(up[1:])
    if m.mid is not None:
        mid = tuple(m.mid.shape)
        if len(mid) != 4 or mid[0] != up_in or mid[1] != down[0] or math.prod(down[2:]) != 1:
            return False
        lora_in = (down[1], *mid[2:])
    else:
        if up_in != down[0]:
            return False
        lora_in = down[1:]
    return _squeeze(lora_in) == _squeeze(weight[1:])


def _shape(t: torch.Tensor | torch.Size) -> str:
    return "[" + ", ".join(str(s) for s in (t.shape if isinstance(t, torch.Tensor) else t)) + "]"


class AppliedLoras:
    """LoRAs merged into a model's weights for the duration of a `with` block.

    Built by `apply_loras`, which checks everything first; entering merges, leaving (also
    on an exception) copies the saved weights back. `uses` keeps every requested LoRA, in
    order (also those at weight 0, which change nothing: the webui lists them in the
    infotext too); `layers` counts the layers applied per LoRA.
    """

    def __init__(self, model: LoadedModel, uses: list[LoraUse],
                 patches: dict[int, tuple[torch.nn.Parameter, list[tuple[LoraModule, float]]]],
                 layers: dict[str, tuple[int, int]]):
        self.model = model
        self.uses = uses
        self.layers = layers
        self._patches = patches
        self._backups: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    @property
    def changed(self) -> int:
        """How many weight tensors are (or will be) modified."""
        return len(self._patches)

    @torch.no_grad()
    def merge(self) -> None:
        if self._backups:
            raise RuntimeError("these LoRAs are already merged")
        try:
            for param, deltas in self._patches.values():
                total = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
                for module, factor in deltas:
                    total.add_(module.delta(param.shape, param.device), alpha=factor)
                self._backups.append((param, param.detach().to("cpu", copy=True)))
                param.copy_((param.float() + total).to(param.dtype))
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        """Put every saved weight back, bit for bit (safe to call twice)."""
        while self._backups:
            param, saved = self._backups.pop()
            param.copy_(saved)

    def __enter__(self) -> AppliedLoras:
        self.merge()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _family_label(family_id: str) -> str:
    return FAMILIES[family_id].label


def _as_use(item: LoraUse | tuple) -> LoraUse:
    if isinstance(item, LoraUse):
        return item
    lora, *weights = item
    if len(weights) not in (1, 2):
        raise TypeError("a LoRA is given as LoraUse, (LoraFile, weight) or (LoraFile, te_weight, unet_weight)")
    return LoraUse(lora, float(weights[0]), float(weights[-1]))


def apply_loras(model: LoadedModel, loras: Iterable[LoraUse | tuple]) -> AppliedLoras:
    """Check `loras` against `model` and return the context manager that merges them.

        with apply_loras(model, [(lora, 0.8)]) as applied:   # or LoraUse / (lora, te, unet)
            ...generate...
        infotext["Lora hashes"] = lora_hashes_infotext(applied)

    Raises InvalidRequest, before any weight changes, for a LoRA made for another model
    family, one whose layers mostly do not exist in the model (more than 10% missing), one
    whose shapes do not fit, or an unsupported network type (LoHa, LoKr, DoRA, ...). A LoRA
    at weight 0 (both weights) is not read at all.
    """
    uses = [_as_use(item) for item in loras]
    maps = _TargetMaps(model)
    family = model.family.id
    model_label = f"the model '{model.name}' is {_family_label(family)}"
    patches: dict[int, tuple[torch.nn.Parameter, list[tuple[LoraModule, float]]]] = {}
    layers: dict[str, tuple[int, int]] = {}
    for use in uses:
        lora, name = use.lora, use.mentioned_name
        if use.te_weight == 0 and use.unet == 0:
            layers[name] = (0, len(lora.groups))
            continue
        base = lora.base
        if base.other:
            raise InvalidRequest(f"LoRA '{name}' is for {base.other}, which Darkroom does not run; {model_label}")
        if base.families and family not in base.families:
            raise InvalidRequest(
                f"LoRA '{name}' is for {base.label} but {model_label}; pick an {base.label} checkpoint or another LoRA"
                if len(base.families) == 1 else
                f"LoRA '{name}' is for {base.label} but {model_label}; pick a matching checkpoint or another LoRA"
            )
        modules = lora.modules()
        matched: list[tuple[LoraModule, str, torch.nn.Module]] = []
        missing: list[str] = []
        for m in modules:
            hit = maps.find(m.component, m.lookup)
            if hit is None:
                missing.append(m.name)
            else:
                matched.append((m, *hit))
        if not matched or len(missing) > MAX_UNMATCHED_FRACTION * len(modules):
            raise InvalidRequest(
                f"LoRA '{name}' does not fit: {len(missing)} of its {len(modules)} layers (e.g. {missing[0]}) do not"
                f" exist in the model '{model.name}' ({_family_label(family)}); it was probably made for another kind"
                " of model"
            )
        for m, path, module in matched:
            weight = module.weight
            if not _fits(weight.shape, m):
                hint = ""
                if m.lookup.endswith(("attn2_to_k", "attn2_to_v")) and m.down.dim() == 2:
                    width = int(m.down.shape[1])
                    made_for = f", as {_family_label(_CROSS_WIDTH[width])} has" if width in _CROSS_WIDTH else ""
                    hint = f" (its cross-attention input is {width} wide{made_for})"
                mid = f", mid {_shape(m.mid)}" if m.mid is not None else ""
                raise InvalidRequest(
                    f"LoRA '{name}' does not fit the model '{model.name}' ({_family_label(family)}): its layer"
                    f" {m.name} has down {_shape(m.down)}, up {_shape(m.up)}{mid} but the model's"
                    f" {_COMPONENT_LABEL[m.component]} {path} weight is {_shape(weight)}; the LoRA was made for"
                    f" another model{hint}"
                )
        if missing:
            log.warning("LoRA %s: %d of %d layers not in the model, skipped (e.g. %s)",
                        name, len(missing), len(modules), missing[0])
        applied = 0
        for m, _path, module in matched:
            w = use.unet if m.component == "unet" else use.te_weight
            if w == 0:
                continue
            entry = patches.setdefault(id(module.weight), (module.weight, []))
            entry[1].append((m, w * m.scale))
            applied += 1
        layers[name] = (applied, len(modules))
        log.info("LoRA %s: %d of %d layers (text encoder x%g, UNet x%g)",
                 name, applied, len(modules), use.te_weight, use.unet)
    return AppliedLoras(model, uses, patches, layers)


def lora_hashes_infotext(applied: AppliedLoras | Iterable[LoraUse]) -> str:
    """The value of the webui's `Lora hashes` infotext key: `name: 0123456789ab, name2: ...`.

    Names are as written in the prompt, without ':' and ',' (as the webui writes them);
    one entry per name. The infotext writer quotes the whole value.
    """
    uses = applied.uses if isinstance(applied, AppliedLoras) else list(applied)
    hashes: dict[str, str] = {}
    for use in uses:
        key = use.mentioned_name.translate(str.maketrans("", "", ":,"))
        if use.lora.short_hash:
            hashes[key] = use.lora.short_hash
    return ", ".join(f"{k}: {v}" for k, v in hashes.items())

