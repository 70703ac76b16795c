"""The built-in model used when the user has configured none.

The trained starter model (`darkroom/assets/starter/darkroom-starter.safetensors`, a tiny
SD1-architecture model trained from scratch on drawn shapes by scripts/train_starter.py) is
ships inside the package. If it has gone missing (a damaged install) and the user has no
checkpoint of their own, generating is a clear error that says how to fix it, not a stand-in
model that draws noise. `darkroom-tiny-random` is the name an older Darkroom gave such a stand-in
in `<home>/builtin`; one left there is still listed and described.
"""

from __future__ import annotations

from pathlib import Path

from darkroom.errors import ModelNotFound
from darkroom.home import Home

STARTER_FILE = Path(__file__).resolve().parent.parent / "assets" / "starter" / "darkroom-starter.safetensors"
RANDOM_NAME = "darkroom-tiny-random"
DESCRIPTIONS = {
    "darkroom-starter": "built-in starter model: a tiny demo model trained on synthetic shapes; add real checkpoints",
    RANDOM_NAME: "built-in tiny random demo model: proves the pipeline, makes abstract noise; add real checkpoints",
}


def builtin_dirs(home: Home) -> list[Path]:
    """Folders of Darkroom's own models, listed after the user's."""
    return [STARTER_FILE.parent, home.builtin]


def starter_path(home: Home) -> Path:
    """The trained starter model shipped with the package."""
    if not STARTER_FILE.exists():
        raise ModelNotFound(
            f"no checkpoint found, and the built-in starter model is missing ({STARTER_FILE}): reinstall Darkroom,"
            f" or put a .safetensors checkpoint in {home.checkpoints} (or pass --models-dir / --model)")
    return STARTER_FILE


def description(path: Path) -> str | None:
    """A one-line note for Darkroom's own models (None for the user's)."""
    path = Path(path)
    if path.parent == STARTER_FILE.parent or path.parent.name == "builtin":
        return DESCRIPTIONS.get(path.stem)
    return None
