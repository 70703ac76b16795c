"""Model cards: what users keep beside a model file, read into one typed card.

Two formats are read, both as their tools write them beside `NAME.safetensors`:

- `NAME.json`: the webui's user metadata (Extra Networks, "Edit metadata"): "description",
  "activation text", "negative text", "preferred weight" (0: not set), "notes", "sd version".
- `NAME.civitai.info`: Civitai Helper's copy of the Civitai model version: "trainedWords",
  "baseModel", "model": {"name"}, "name" (the version), "description" (HTML).

Where both say something, the user's own `NAME.json` wins. A sidecar is read under the one rule
for files from outside (darkroom.fsutil): a regular file, really inside the model's folder (a link
out of it is not followed), at most `MAX_CARD_BYTES`; one that is malformed, too large or a link
out is ignored with a line in `ModelCard.problems`, never an exception.

`sidecars_of` lists every file that travels with a model (previews, `.yaml`, cards) under the
same rule: imports, exports and bundles carry exactly those.
"""

from __future__ import annotations

import functools
import html
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.fsutil import is_inside, open_regular

PREVIEW_SUFFIXES = (".preview.png", ".png", ".jpg", ".jpeg", ".webp", ".preview.jpg", ".preview.jpeg",
                    ".preview.webp")
USER_METADATA = ".json"
CIVITAI_INFO = ".civitai.info"
CARD_SUFFIXES = (USER_METADATA, CIVITAI_INFO)
SIDECAR_SUFFIXES = (*PREVIEW_SUFFIXES, ".yaml", ".yml", CIVITAI_INFO, USER_METADATA)
"""Files beside a model that travel with it (the .yaml can say v-prediction)."""
MAX_CARD_BYTES = 2 << 20
"""A card is a few kilobytes (a civitai.info with many images some hundred); a larger one is not read."""
_LIMITS = {"title": 200, "base_model": 80, "activation_text": 2000, "negative_text": 2000, "description": 8000,
           "notes": 8000}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_TAG = re.compile(r"<[^>]*>")
_BREAK = re.compile(r"<\s*(br\s*/?|/p|/li|/h\d|/div)\s*>", re.IGNORECASE)


@dataclass
class ModelCard:
    """What the sidecars beside one model say; every field None when nothing says it."""

    title: str | None = None
    description: str | None = None
    activation_text: str | None = None  # trigger words: added to the prompt with the LoRA
    negative_text: str | None = None
    preferred_weight: float | None = None  # the LoRA strength its user prefers
    notes: str | None = None
    base_model: str | None = None  # "SD 1.5", "SDXL 1.0", "SD1" ...
    sources: list[Path] = field(default_factory=list)  # the sidecar files read
    problems: list[str] = field(default_factory=list)  # sidecars ignored, and why

    @property
    def empty(self) -> bool:
        return all(getattr(self, k) is None for k in _LIMITS) and self.preferred_weight is None

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _LIMITS}, "preferred_weight": self.preferred_weight,
                "sources": [p.name for p in self.sources], "problems": list(self.problems)}


def model_stem(model: Path) -> str:
    """"x.vae" for `x.vae.safetensors`; a folder's own name for a diffusers folder."""
    if model.is_dir() or not model.suffix:
        return model.name
    return model.name[: -len(model.suffix)]


def _stays_inside(path: Path, folder: Path) -> bool:
    """A regular file (a link only when it leads to one inside `folder`), never a FIFO or a device."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and is_inside(path, folder)
    except OSError:
        return False


def sidecars_of(model: Path) -> list[Path]:
    """The files beside `model` that travel with it, in SIDECAR_SUFFIXES order (links out skipped)."""
    stem = model_stem(model)
    found = []
    for suffix in SIDECAR_SUFFIXES:
        side = model.with_name(stem + suffix)
        if _stays_inside(side, model.parent):
            found.append(side)
    return found


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    text = _CONTROL.sub("", value).strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + "…"
    return text or None


def _plain(markup: Any) -> Any:
    """Civitai's descriptions are HTML: the text of it, paragraphs as lines."""
    if not isinstance(markup, str):
        return None
    text = html.unescape(_TAG.sub("", _BREAK.sub("\n", markup)))
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", text))


def _weight(value: Any) -> float | None:
    """The webui's "preferred weight": a number, 0 meaning not set."""
    if isinstance(value, bool):
        return None
    try:
        w = float(value)
    except (TypeError, ValueError):
        return None
    return round(w, 4) if math.isfinite(w) and w != 0 and abs(w) <= 100 else None


def _from_user_metadata(doc: dict) -> dict[str, Any]:
    sd_version = _text(doc.get("sd version"), _LIMITS["base_model"])
    return {"description": doc.get("description"), "activation_text": doc.get("activation text"),
            "negative_text": doc.get("negative text"), "notes": doc.get("notes"),
            "preferred_weight": _weight(doc.get("preferred weight")),
            "base_model": None if sd_version in (None, "Unknown") else sd_version}


def _from_civitai(doc: dict) -> dict[str, Any]:
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    name, version = _text(model.get("name"), 160), _text(doc.get("name"), 60)
    words = doc.get("trainedWords")
    words = [w.strip() for w in words if isinstance(w, str) and w.strip()] if isinstance(words, list) else []
    return {"title": f"{name} ({version})" if name and version else name,
            "description": _plain(doc.get("description")) or _plain(model.get("description")),
            "activation_text": ", ".join(words) or None, "base_model": doc.get("baseModel")}


@functools.lru_cache(maxsize=512)
def _parse(path: str, size: int, mtime_ns: int, ino: int) -> tuple[dict | None, str | None]:
    """(fields, None) or (None, why not) for one sidecar; cached while the file is unchanged."""
    name = os.path.basename(path)
    if size > MAX_CARD_BYTES:
        return None, f"{name}: larger than {MAX_CARD_BYTES >> 20} MiB; ignored"
    try:
        with open_regular(path, what="a model card", within=os.path.dirname(path)) as fh:
            data = fh.read(MAX_CARD_BYTES + 1)
    except OSError as e:
        return None, f"{name}: cannot be read ({(e.strerror or str(e)).lower()}); ignored"
    if len(data) > MAX_CARD_BYTES:
        return None, f"{name}: larger than {MAX_CARD_BYTES >> 20} MiB; ignored"
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        return None, f"{name}: not UTF-8 text; ignored"
    except json.JSONDecodeError as e:
        return None, f"{name}: not valid JSON (line {e.lineno}: {e.msg}); ignored"
    except RecursionError:
        return None, f"{name}: nested too deeply; ignored"
    if not isinstance(doc, dict):
        return None, f"{name}: not a JSON object; ignored"
    return (_from_civitai(doc) if path.endswith(CIVITAI_INFO) else _from_user_metadata(doc)), None


def read_card(model: Path) -> ModelCard:
    """The card of `model` from the sidecars beside it (an empty card when there are none)."""
    model = Path(model)
    stem = model_stem(model)
    card = ModelCard()
    for suffix in (CIVITAI_INFO, USER_METADATA):  # the user's own metadata is read last: it wins
        side = model.with_name(stem + suffix)
        try:
            st = os.stat(side)
        except OSError:
            continue
        if not is_inside(side, model.parent):
            card.problems.append(f"{side.name}: a link to a file outside {model.parent}; not followed")
            continue
        if not stat.S_ISREG(st.st_mode):
            continue  # a folder or a FIFO of that name is not a card
        fields, problem = _parse(str(side), st.st_size, st.st_mtime_ns, st.st_ino)
        if problem:
            card.problems.append(problem)
            continue
        card.sources.append(side)
        for key, value in fields.items():
            value = value if key == "preferred_weight" else _text(value, _LIMITS[key])
            if value is not None:
                setattr(card, key, value)
    return card
