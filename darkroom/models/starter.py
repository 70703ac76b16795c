"""The built-in model used when the user has configured none.

Until the trained starter model ships (issue 3), this is a tiny randomly initialised SD1-
layout model that Darkroom makes itself, deterministically, on first use: it exercises the
whole offline pipeline on a fresh machine, but its pictures are abstract noise, not art.
"""

from __future__ import annotations

from pathlib import Path

from darkroom.home import Home

NAME = "darkroom-tiny-random"
DESCRIPTION = "built-in tiny random demo model: proves the pipeline, makes abstract noise; add real checkpoints"


def starter_path(home: Home) -> Path:
    """Path of the built-in model, building it on first use (a few MB, a second or two)."""
    path = home.builtin / f"{NAME}.safetensors"
    if not path.exists():
        from darkroom.models.tiny import build_tiny_checkpoint

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        build_tiny_checkpoint(tmp, "sd1", seed=0)
        tmp.replace(path)
    return path


def is_builtin(path: Path) -> bool:
    return Path(path).parent.name == "builtin" and Path(path).stem == NAME
