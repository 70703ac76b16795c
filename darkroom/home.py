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
    def upscalers(self) -> Path:
        """Upscaler model files (ESRGAN, SwinIR, ...); see darkroom/upscale/discover.py for installs' folders."""
        return self.root / "models" / "upscalers"

    @property
    def controlnets(self) -> Path:
        """ControlNet files and folders; see darkroom/control/files.py for installs' folders."""
        return self.root / "models" / "controlnet"

    @property
    def faces(self) -> Path:
        """Face restoration files (GFPGANv1.4.pth, codeformer-v0.1.0.pth, detection_Resnet50_Final.pth); see
        darkroom/faces/load.py for installs' folders."""
        return self.root / "models" / "faces"

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

    @property
    def styles_file(self) -> Path:
        """The webui's styles.csv (name, prompt, negative_prompt) of this home: where new styles are saved."""
        return self.root / "styles.csv"

    @property
    def wildcards(self) -> Path:
        """Wildcard files (`name.txt` -> `__name__`) of the Dynamic Prompts syntax."""
        return self.root / "wildcards"

    def styles_files(self) -> list[Path]:
        """Every styles file, in the order they are read (a later file's style wins a name): the home's
        `styles.csv` and other `styles*.csv`, then each A1111/Forge root's, as the webui finds them beside it."""
        found = []
        for root in (self.root, *self.extra_model_dirs):
            try:
                others = sorted(p for p in root.glob("styles*.csv") if p.name != "styles.csv")
            except OSError:
                others = []
            found += [root / "styles.csv", *others]
        return [p for i, p in enumerate(found) if p not in found[:i] and (p == self.styles_file or _is_file(p))]

    def wildcard_dirs(self) -> list[Path]:
        """The home's `wildcards/`, then the Dynamic Prompts extension's of each A1111/Forge root, used in place."""
        dirs = [self.wildcards]
        for extra in self.extra_model_dirs:
            try:
                dirs += sorted(p for p in extra.glob("extensions/*dynamic-prompts*/wildcards") if is_folder(p))
            except OSError:
                continue
        return dirs

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


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def is_folder(path: Path) -> bool:
    """Whether `path` is a folder; False, not an error, when it cannot be looked at (a models
    folder is whatever a user typed: Path.is_dir raises PermissionError behind a locked folder)."""
    try:
        return path.is_dir()
    except OSError:
        return False
