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
(`darkroom.models.ldm_unet_keys.unet_to_ldm`, the inverse of diffusers' converter).

Applying merges `W += weight * scale * up @ down` (in float32, cast back to the module
dtype) into the weights in place, after saving a copy of every touched weight; leaving the
context copies the saved weights back, so the model is bit-for-bit what it was. Everything
that can go wrong (wrong base model, shapes that do not fit, layers that do not exist) is
found before the first weight changes.

The webui (AUTOMATIC1111 `extensions-builtin/Lora`) is the reference for the tag syntax,
the alias (`ss_output_name`), the `Lora hashes` infotext and the hash it uses.

Key layouts and base-model guessing live in `darkroom.engine.lora_keys` (no torch), the
normalised tensors and model-path mapping in `darkroom.engine.lora_formats`; both are
re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darkroom.engine.lora_formats import LoraModule, _fits, _shape, _TargetMaps, parse_lora_tensors
from darkroom.engine.lora_keys import _COMPONENT_LABEL, _CROSS_WIDTH, BaseGuess, _group_keys, guess_base
from darkroom.engine.lora_keys import _Group as _Group  # re-exported: the key grouping moved to lora_keys
from darkroom.engine.lora_keys import _metadata_family as _metadata_family
from darkroom.errors import InvalidRequest, ModelLoadError, ModelNotFound
from darkroom.fsutil import unique_dirs
from darkroom.home import Home, is_folder
from darkroom.models.families import FAMILIES, detect
from darkroom.models.hashing import HashCache
from darkroom.models.header import SafetensorsHeader, read_header
from darkroom.models.library import walk_models

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
        from darkroom.models.tensor_file import TensorReadError, read_tensors

        try:  # plain reads, not a memory map: a drive pulled out mid-read is this error, not SIGBUS
            tensors = read_tensors(self.path, [k for g in self.groups.values() for k in g.keys.values()])
        except ModelLoadError as e:  # the header read again: the file may have changed since it was listed
            why = e.reason if isinstance(e, TensorReadError) else str(e).removeprefix(f"{self.path.name}: ")
            raise ModelLoadError(f"LoRA '{self.name}' ({self.path.name}): cannot read tensors ({why})") from None
        self._check_finite(tensors)
        modules = parse_lora_tensors(tensors, self.metadata, groups=self.groups)
        bad = next((m for m in modules if not math.isfinite(m.scale)), None)
        if bad is not None:
            raise self._damaged(f"the scale (alpha) of layer {bad.name} is {bad.scale}")
        return modules

    def _check_finite(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """NaN or inf in a LoRA would make every image black: refuse the file, naming it, before merging."""
        for key, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise self._damaged(f"its tensor {key} holds NaN or infinite values")

    def _damaged(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"LoRA '{self.name}' ({self.path}): {what}; the file is damaged (download it again,"
                              " or remove it from the prompt)")

    def targets(self, model: LoadedModel) -> dict[str, tuple[str, str]]:
        """{layer name in the file: (component, module path in the model)} for the layers that exist."""
        maps = _TargetMaps(model)
        out = {}
        for g in self.groups.values():
            hit = maps.find(g.component, g.lookup)
            if hit is not None:
                out[g.name] = (g.component, hit[0])
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
        return unique_dirs(dirs)

    def files(self) -> list[Path]:
        """LoRA files in the folders, by the bounded walk every models folder gets (walk_models)."""
        out: list[Path] = []
        for folder in self.folders():
            if is_folder(folder):
                out += walk_models(folder, lambda name: Path(name).suffix.lower() in LORA_SUFFIXES)
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
                total.add_(param.float())
                # fp8-stored weights (placement's --fp8) take the merge in the compute dtype: e4m3's 3 mantissa
                # bits would round a LoRA's deltas (a few % of a weight) away; restore() puts the fp8 back
                store = self.model.dtype if param.dtype in _FP8 else param.dtype
                merged = total.to(store)
                if not (bool(torch.isfinite(total).all()) and bool(torch.isfinite(merged).all())):
                    raise self._overflow(deltas)
                self._backups.append((param, param.detach().to("cpu", copy=True)))
                if merged.dtype == param.dtype:
                    param.copy_(merged)
                else:
                    param.data = merged
        except BaseException:
            self.restore()
            raise

    def _overflow(self, deltas: list[tuple[LoraModule, float]]) -> InvalidRequest:
        """Finite LoRA values whose merge is not (huge values x weight, or past the model dtype's range)."""
        names = [use.mentioned_name for use in self.uses
                 if any(m is module for module, _ in deltas for m in use.lora.modules())]
        which = ", ".join(repr(n) for n in names) or "?"
        return InvalidRequest(
            f"LoRA {which} makes layer {deltas[0][0].name} overflow (the merged weights would be NaN or infinite);"
            " lower its weight in the prompt or use another LoRA")

    @torch.no_grad()
    def restore(self) -> None:
        """Put every saved weight back, bit for bit (safe to call twice)."""
        while self._backups:
            param, saved = self._backups.pop()
            if param.dtype == saved.dtype:
                param.copy_(saved)
            else:  # an fp8 weight merged in the compute dtype
                param.data = saved.to(param.device)

    def __enter__(self) -> AppliedLoras:
        self.merge()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


_FP8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


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

