"""The built-in model used when the user has configured none.

The trained starter model (`darkroom/assets/starter/darkroom-starter.safetensors`, a tiny
SD1-architecture model trained from scratch on drawn shapes by scripts/train_starter.py) is
used where present. Without it (a checkout made before it was trained), Darkroom falls back
to a tiny randomly initialised SD1-layout model that it makes itself, deterministically, on
first use: it exercises the whole offline pipeline, but its pictures are abstract noise.
"""

from __future__ import annotations

from pathlib import Path

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
    """The trained starter model, or the random fallback built on first use (a second or two)."""
    if STARTER_FILE.exists():
        return STARTER_FILE
    path = home.builtin / f"{RANDOM_NAME}.safetensors"
    if not path.exists():
        from darkroom.models.tiny import build_tiny_checkpoint

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        build_tiny_checkpoint(tmp, "sd1", seed=0)
        tmp.replace(path)
    return path


def description(path: Path) -> str | None:
    """A one-line note for Darkroom's own models (None for the user's)."""
    path = Path(path)
    if path.parent == STARTER_FILE.parent or path.parent.name == "builtin":
        return DESCRIPTIONS.get(path.stem)
    return None
