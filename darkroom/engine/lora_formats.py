"""LoRA tensors in their normalised form, and where they go in a loaded model.

`parse_lora_tensors` turns a LoRA state dict (kohya or diffusers/PEFT keys, grouped by
`darkroom.engine.lora_keys`) into `LoraModule`s: `down` (A), `up` (B), optional `mid`
(LoCon/LyCORIS CP "tucker") and scale (alpha / rank; no alpha -> 1, as the webui does).
`_TargetMaps` resolves their module paths in a loaded model (underscored diffusers paths and
the UNet's LDM paths); `_fits` checks their shapes against the model's weights.
`darkroom.engine.lora` re-exports these names.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from darkroom.engine.lora_keys import _ADAPTER_PREFIX, _Group, _group_keys
from darkroom.errors import InvalidRequest

if TYPE_CHECKING:
    from darkroom.models.loader import LoadedModel

log = logging.getLogger("darkroom.lora")


# --------------------------------------------------------------------------- normalised modules


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

# --------------------------------------------------------------------------- targets in a model


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
            from darkroom.models.ldm_unet_keys import unet_to_ldm

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
