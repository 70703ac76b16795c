"""The one folder that holds all of a user's Darkroom state."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

SUBDIRS = ("models/checkpoints", "models/loras", "models/vae", "models/embeddings", "outputs")


@dataclass
class Home:
    """Paths inside the home folder; `extra_model_dirs` are other installs used in place."""

    root: Path
    extra_model_dirs: list[Path] = field(default_factory=list)

    @classmethod
    def resolve(cls, explicit: str | Path | None = None) -> Home:
        """`--home` wins, then $DARKROOM_HOME, then the OS per-user data folder."""
        if explicit:
            root = Path(explicit)
        elif os.environ.get("DARKROOM_HOME"):
            root = Path(os.environ["DARKROOM_HOME"])
        else:
            root = Path(platformdirs.user_data_dir("darkroom", appauthor=False))
        return cls(root.expanduser().resolve())

    def ensure(self) -> Home:
        for sub in SUBDIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        return self

    @property
    def checkpoints(self) -> Path:
        return self.root / "models" / "checkpoints"

    @property
    def loras(self) -> Path:
        return self.root / "models" / "loras"

    @property
    def vae(self) -> Path:
        return self.root / "models" / "vae"

    @property
    def embeddings(self) -> Path:
        return self.root / "models" / "embeddings"

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def network_log(self) -> Path:
        return self.logs / "network-attempts.jsonl"

    @property
    def cache_db(self) -> Path:
        return self.root / "cache.sqlite3"

    @property
    def builtin(self) -> Path:
        """Where Darkroom makes its own fallback model (see darkroom.models.starter)."""
        return self.root / "builtin"

    def checkpoint_dirs(self) -> list[Path]:
        dirs = [self.checkpoints]
        for extra in self.extra_model_dirs:
            # AUTOMATIC1111/Forge and ComfyUI roots are recognised; a plain folder is used as is
            for sub in ("models/Stable-diffusion", "models/checkpoints"):
                if is_folder(extra / sub):
                    dirs.append(extra / sub)
                    break
            else:
                dirs.append(extra)
        return dirs


def is_folder(path: Path) -> bool:
    """Whether `path` is a folder; False, not an error, when it cannot be looked at (a models
    folder is whatever a user typed: Path.is_dir raises PermissionError behind a locked folder)."""
    try:
        return path.is_dir()
    except OSError:
        return False
