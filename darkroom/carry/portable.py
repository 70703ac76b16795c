"""Portable bundle: Darkroom frozen with its interpreter, for a Linux machine with no Python at all.

`create_portable()` writes into a folder (new or empty):

    darkroom            the launcher (POSIX sh): checks the glibc, then runs app/darkroom with the bundle's models
    app/                the frozen app (PyInstaller, one-folder mode): Python, torch, every pinned dependency and
                        Darkroom with its package data (starter model, tokenizer, configs, web UI)
    models/<kind>/      the chosen models, used in place (the launcher passes the folder as --models-dir)
    install.sh          verifies every file (sha256sum -c, no Python needed) before it writes anything, then
                        copies the folder to the target and links the launcher into a bin folder
    manifest.json, SHA256SUMS   as in every bundle (darkroom.carry.bundle.write_manifest), written last

The freezing runs in a separate build venv (cached, keyed by the pins): the pinned runtime requirements,
the CPU torch and the pinned PyInstaller of requirements-build.txt. PyInstaller is a build tool, never a
runtime dependency. The frozen app needs the glibc of the machine it was built on (or newer): the
floor is read from the binaries' symbol versions and written to the manifest and the launcher.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from darkroom.carry import bundle as _bundle
from darkroom.carry.bundle import (
    NODEPS_FILE,
    OTHER_BUNDLE_FOLDER,
    BundleError,
    Echo,
    copy_models,
    find_source,
    model_bytes,
    read_requirements,
    resolve_models,
    write_manifest,
)
from darkroom.carry.bundle_target import make_target, torch_requirement
from darkroom.errors import StorageError
from darkroom.fsutil import writes_to
from darkroom.home import Home

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "portable"
BUILD_REQUIREMENTS = "requirements-build.txt"
APP = "app"  # the frozen app's folder inside the bundle
LAUNCHER = "darkroom"
SCRIPTS = ("install.sh", "README.txt")
GLIBC_PLACEHOLDER = "@GLIBC_FLOOR@"
KIND = "portable"
KEEP = ".darkroom-keep"

Run = Callable[[list[str]], None]


# ---------------------------------------------------------------------------------------------- helpers


def run_command(cmd: list[str], echo: Echo, what: str) -> None:
    """Run a build step (pip, PyInstaller) as a child process; its last ERROR line becomes the one-line error."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=80)
    for line in proc.stdout:
        line = line.rstrip("\n")
        echo(line)
        tail.append(line)
    if proc.wait():
        errors = [t.split("ERROR:", 1)[1].strip() for t in tail if "ERROR:" in t]
        raise BundleError(f"{what} failed: {errors[-1] if errors else f'exit status {proc.returncode}'}")


def default_build_cache() -> Path:
    """Where the build venv lives between runs ($DARKROOM_PORTABLE_BUILD_CACHE, else the user cache folder)."""
    if os.environ.get("DARKROOM_PORTABLE_BUILD_CACHE"):
        return Path(os.environ["DARKROOM_PORTABLE_BUILD_CACHE"]).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("darkroom", appauthor=False)) / "portable-build"


def _base_python() -> str:
    return getattr(sys, "_base_executable", None) or sys.executable


def build_key(src: Path, torch_req: str) -> str:
    """The build venv's identity: the pins, the torch build and the interpreter that is frozen."""
    h = hashlib.sha256()
    for name in ("requirements.txt", NODEPS_FILE, BUILD_REQUIREMENTS):
        path = src / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    h.update(f"{torch_req}\0{sys.version}\0{_base_python()}".encode())
    return h.hexdigest()[:16]


def ensure_build_venv(cache: Path, src: Path, torch_req: str, torch_index: str | None, run: Run,
                      echo: Echo) -> Path:
    """The build venv for these pins (made once, then reused): returns its python."""
    key = build_key(src, torch_req)
    venv = cache / f"venv-{key}"
    python = venv / "bin" / "python"
    stamp = venv / ".darkroom-build-ready"
    if stamp.is_file() and python.exists():
        echo(f"darkroom: reusing the build venv {venv}")
        return python
    if venv.exists():
        shutil.rmtree(venv)  # an interrupted set-up
    echo(f"darkroom: making the build venv {venv} (once for these pins)")
    cache.mkdir(parents=True, exist_ok=True)
    run([_base_python(), "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "install", "--progress-bar", "off"]
    index = ["--index-url", torch_index] if torch_index else []
    run([*pip, "--no-deps", torch_req, *index])  # only torch from the torch index: its dependencies from pip's
    run([*pip, "-r", str(src / "requirements.txt")])  # torch==X.Y.Z: the build above satisfies it
    if (src / NODEPS_FILE).is_file():
        run([*pip, "--no-deps", "-r", str(src / NODEPS_FILE)])  # spandrel without torchvision (see the file)
    run([*pip, "-r", str(src / BUILD_REQUIREMENTS)])
    stamp.write_text(key + "\n", encoding="utf-8")
    return python


def glibc_floor(folder: Path) -> str:
    """The newest GLIBC_x.y symbol version any binary under folder asks for: the oldest glibc it runs on."""
    best = (2, 0)
    pattern = re.compile(rb"GLIBC_2\.(\d+)(?:\.(\d+))?\x00")
    for path in folder.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
            data = f.read()
        for m in pattern.finditer(data):
            best = max(best, (2, int(m[1])))
    return f"{best[0]}.{best[1]}"


def host_glibc() -> str | None:
    name, version = platform.libc_ver()
    return version if name == "glibc" and version else None


# ---------------------------------------------------------------------------------------------- freezing


def pyinstaller_args(entry: Path, dist: Path, work: Path) -> list[str]:
    """PyInstaller's options: one folder, Darkroom's package data and the modules found only at run time."""
    return [
        "--noconfirm", "--clean", "--onedir", "--console", "--name", "darkroom", "--log-level", "WARN",
        "--distpath", str(dist), "--workpath", str(work / "build"), "--specpath", str(work),
        "--additional-hooks-dir", str(ASSETS / "hooks"),  # hook-darkroom.py: package data, lazy submodules
        # diffusers and transformers import their classes lazily (importlib): the hooks in ASSETS/hooks name
        # the parts Darkroom loads; uvicorn picks its protocol and loop modules by name at start-up
        "--collect-submodules", "uvicorn",
        "--exclude-module", "torchvision", "--exclude-module", "tkinter", "--exclude-module", "matplotlib",
        "--exclude-module", "darkroom.testing", "--exclude-module", "darkroom.starter_training",
        str(entry),
    ]


def freeze(python: Path, src: Path, dest: Path, scratch: Path, run: Run, echo: Echo) -> Path:
    """Install Darkroom's wheel into the build venv, freeze it, move the app to dest/app; returns that folder."""
    wheels = scratch / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = _bundle.build_darkroom_wheel(src, wheels, lambda args: run([str(python), "-m", "pip",
                                                                        "--disable-pip-version-check", *args]))
    run([str(python), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--force-reinstall",
         "--no-index", str(wheel)])
    staging = dest / ".freezing"
    echo("darkroom: freezing Darkroom with PyInstaller (a few minutes)")
    run([str(python), "-m", "PyInstaller", *pyinstaller_args(ASSETS / "entry.py", staging, scratch / "pyinstaller")])
    app = dest / APP
    (staging / "darkroom").rename(app)
    staging.rmdir()
    return app


def write_scripts(dest: Path, glibc: str) -> None:
    launcher = (ASSETS / "darkroom.sh").read_text(encoding="utf-8").replace(GLIBC_PLACEHOLDER, glibc)
    (dest / LAUNCHER).write_text(launcher, encoding="utf-8")
    (dest / LAUNCHER).chmod(0o755)
    for name in SCRIPTS:
        shutil.copyfile(ASSETS / name, dest / name)
    (dest / "install.sh").chmod(0o755)


# ---------------------------------------------------------------------------------------------- create


def create_portable(dest: Path, *, home: Home, models: Sequence[str] = (), torch: str = "cpu",
                    torch_index_url: str | None = None, source: Path | None = None, build_cache: Path | None = None,
                    run: Run | None = None, echo: Echo = print,
                    progress: Callable[[str, int], Callable[[int], None] | None] | None = None) -> dict:
    """Write a portable bundle (the frozen app, models, launcher, installer, manifest) into dest; returns the
    manifest. Linux x86-64 only, built on Linux x86-64 (PyInstaller freezes the machine it runs on)."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in ("x86_64", "amd64"):
        raise BundleError(f"--portable is built on and for Linux x86-64 only (this is {sys.platform}"
                          f" {platform.machine()}); a Windows portable folder is not built yet: use a wheel bundle")
    target = make_target((), None, torch)
    src = find_source(source)
    if not (src / BUILD_REQUIREMENTS).is_file():
        raise BundleError(f"{src / BUILD_REQUIREMENTS} not found: it pins PyInstaller for --portable")
    requirements = read_requirements(src / "requirements.txt")
    pins = [r for r in requirements if re.match(r"torch\s*==", r)]
    m = re.fullmatch(r"torch\s*==\s*([\w.+]+)", pins[0]) if len(pins) == 1 else None
    if not m:
        raise BundleError(f"{src / 'requirements.txt'} must pin torch exactly once (torch==X.Y.Z)")
    torch_req, torch_index = torch_requirement(m[1], target, None if torch_index_url == "none" else torch_index_url)
    if torch_index_url == "none":
        torch_index = None
    chosen, notes = resolve_models(home, models)
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError(f"{dest} is not an empty folder: choose a new or empty one")
    for note in notes:
        echo(f"darkroom: {note}")
    run = run or (lambda cmd: run_command(cmd, echo, Path(cmd[2] if cmd[1] == "-m" else cmd[0]).name))
    cache = Path(build_cache).expanduser().resolve() if build_cache else default_build_cache()
    try:
        with writes_to(dest, "write the bundle", instead=OTHER_BUNDLE_FOLDER):
            dest.mkdir(parents=True, exist_ok=True)
            python = ensure_build_venv(cache, src, torch_req, torch_index, run, echo)
            with _scratch() as scratch:
                app = freeze(python, src, dest, scratch, run, echo)
            glibc = glibc_floor(app)
            expected = {}
            if chosen:
                echo(f"darkroom: copying {len(chosen)} model(s)")
                expected = copy_models(chosen, dest,
                                       progress("copying models", model_bytes(chosen)) if progress else None)
                keep = dest / "models" / "checkpoints" / KEEP  # the launcher passes models/ on when this folder
                if not keep.parent.is_dir():                     # exists (a LoRA-only bundle has no checkpoint)
                    keep.parent.mkdir(parents=True)
                    keep.write_bytes(b"")
            write_scripts(dest, glibc)
            info = {
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "darkroom_version": _version(src),
                "kind": KIND,
                "target": {**target.as_json(), "torch_requirement": torch_req, "glibc": glibc,
                           "built_on_glibc": host_glibc()},
                "launch": LAUNCHER,
                "models": [{"path": mdl.dest, "kind": mdl.kind} for mdl in chosen],
            }
            total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            echo("darkroom: writing the manifest")
            return write_manifest(dest, info, expected, progress("hashing", total) if progress else None)
    except (BundleError, StorageError) as e:
        raise type(e)(f"{e} ({dest} is incomplete: delete it before trying again)" if _bundle._has_files(dest)
                      else str(e)) from None


@contextlib.contextmanager
def _scratch():
    with writes_to(tempfile.gettempdir(), "prepare the bundle", instead="point TMPDIR at a folder with room"):
        tmp = tempfile.TemporaryDirectory(prefix="darkroom-portable-", ignore_cleanup_errors=True)
    with tmp as name:
        yield Path(name)


def _version(src: Path) -> str:
    m = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (src / "pyproject.toml").read_text(encoding="utf-8"))
    return m[1] if m else "0"
