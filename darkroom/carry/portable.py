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
floor is read from the binaries' symbol versions and written to the manifest and the launcher. With a build
root (`build_root=`, an older Debian made by scripts/make_build_root.sh) the build venv and PyInstaller run
inside it (chroot), so the floor is at most that root's glibc (bullseye has 2.31; 2.30 was measured).
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
    prepare_destination,
    read_requirements,
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

# the build root (scripts/make_build_root.sh): its CPython, the stamp the script writes last, the build venv
ROOT_PYTHON = "/opt/python3.11/bin/python3.11"
ROOT_STAMP = "/opt/python3.11/.darkroom-build-root"
ROOT_CACHE = "/var/cache/darkroom/portable-build"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PIP_CONFIG_FILES = ("/etc/pip.conf", "/etc/xdg/pip")
# enter the root: bind the host paths pip needs (read-only, same place), /proc and /dev, then chroot; the
# mount namespace is private (unshare -m), so every mount goes away with the command
ENTER_ROOT = r"""root=$1; shift
while [ "$1" != -- ]; do
    if [ -d "$1" ]; then mkdir -p "$root$1"; else mkdir -p "$root$(dirname "$1")"; [ -e "$root$1" ] || : > "$root$1"; fi
    mount --bind "$1" "$root$1" && mount -o remount,bind,ro "$root$1"
    shift
done
shift
mount -t proc proc "$root/proc"
mount --rbind /dev "$root/dev"
exec chroot "$root" "$@"
"""


# ---------------------------------------------------------------------------------------------- helpers


def _what(cmd: list[str]) -> str:
    """A command's short name for its error line (inside a build root: the command after the wrapper's --)."""
    if cmd[0] == "unshare" and "--" in cmd:  # ... -- /usr/bin/env -i VAR=value ... command
        cmd = cmd[cmd.index("--") + 3:]
        while cmd and "=" in cmd[0]:
            cmd = cmd[1:]
    return Path(cmd[2] if len(cmd) > 2 and cmd[1] == "-m" else cmd[0]).name


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


def build_key(src: Path, torch_req: str, python_id: str | None = None) -> str:
    """The build venv's identity: the pins, the torch build and the interpreter that is frozen (this one, or
    python_id: a build root's)."""
    h = hashlib.sha256()
    for name in ("requirements.txt", NODEPS_FILE, BUILD_REQUIREMENTS):
        path = src / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    identity = python_id if python_id is not None else f"{sys.version}\0{_base_python()}"
    h.update(f"{torch_req}\0{identity}".encode())
    return h.hexdigest()[:16]


def ensure_build_venv(cache: Path, src: Path, torch_req: str, torch_index: str | None, run: Run,
                      echo: Echo, base_python: str | None = None, python_id: str | None = None) -> Path:
    """The build venv for these pins (made once, then reused): returns its python."""
    key = build_key(src, torch_req, python_id)
    venv = cache / f"venv-{key}"
    python = venv / "bin" / "python"
    stamp = venv / ".darkroom-build-ready"
    if stamp.is_file() and os.path.lexists(python):  # in a build root: a link to the root's python
        echo(f"darkroom: reusing the build venv {venv}")
        return python
    if venv.exists():
        shutil.rmtree(venv)  # an interrupted set-up
    echo(f"darkroom: making the build venv {venv} (once for these pins)")
    cache.mkdir(parents=True, exist_ok=True)
    run([base_python or _base_python(), "-m", "venv", str(venv)])
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


def pyinstaller_args(entry: Path, dist: Path, work: Path, assets: Path = ASSETS) -> list[str]:
    """PyInstaller's options: one folder, Darkroom's package data and the modules found only at run time."""
    return [
        "--noconfirm", "--clean", "--onedir", "--console", "--name", "darkroom", "--log-level", "WARN",
        "--distpath", str(dist), "--workpath", str(work / "build"), "--specpath", str(work),
        "--additional-hooks-dir", str(assets / "hooks"),  # hook-darkroom.py: package data, lazy submodules
        # diffusers and transformers import their classes lazily (importlib): the hooks in ASSETS/hooks name
        # the parts Darkroom loads; uvicorn picks its protocol and loop modules by name at start-up
        "--collect-submodules", "uvicorn",
        "--exclude-module", "torchvision", "--exclude-module", "tkinter", "--exclude-module", "matplotlib",
        "--exclude-module", "darkroom.testing", "--exclude-module", "darkroom.starter_training",
        str(entry),
    ]


def freeze(python: Path, src: Path, dest: Path, scratch: Path, run: Run, echo: Echo,
           staging: Path | None = None, assets: Path = ASSETS) -> Path:
    """Install Darkroom's wheel into the build venv, freeze it, move the app to dest/app; returns that folder.
    PyInstaller writes into staging (default dest/.freezing); a build root passes a folder inside it, and the
    entry script and hooks (assets) of the source copied into it."""
    wheels = scratch / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = _bundle.build_darkroom_wheel(src, wheels, lambda args: run([str(python), "-m", "pip",
                                                                        "--disable-pip-version-check", *args]))
    run([str(python), "-m", "pip", "--disable-pip-version-check", "install", "--no-deps", "--force-reinstall",
         "--no-index", str(wheel)])
    staging = staging or dest / ".freezing"
    echo("darkroom: freezing Darkroom with PyInstaller (a few minutes)")
    run([str(python), "-m", "PyInstaller", *pyinstaller_args(assets / "entry.py", staging, scratch / "pyinstaller",
                                                             assets)])
    app = dest / APP
    shutil.move(staging / "darkroom", app)  # a rename, or a copy out of a build root
    staging.rmdir()
    return app


def write_scripts(dest: Path, glibc: str) -> None:
    launcher = (ASSETS / "darkroom.sh").read_text(encoding="utf-8").replace(GLIBC_PLACEHOLDER, glibc)
    (dest / LAUNCHER).write_text(launcher, encoding="utf-8")
    (dest / LAUNCHER).chmod(0o755)
    for name in SCRIPTS:
        shutil.copyfile(ASSETS / name, dest / name)
    (dest / "install.sh").chmod(0o755)


# ---------------------------------------------------------------------------------------------- build root


class BuildRoot:
    """An older Debian root made by scripts/make_build_root.sh: the build venv and PyInstaller run inside it
    (unshare -m plus chroot), so the frozen app asks only for that root's glibc."""

    def __init__(self, path: Path, binds: Sequence[str] = ()):
        self.path = path
        self.binds = list(binds)
        self.stamp = (path / ROOT_STAMP.lstrip("/")).read_text(encoding="utf-8").strip()
        m = re.search(r"glibc (\d+\.\d+)", self.stamp)
        self.glibc = m[1] if m else None

    def host(self, inside: str) -> Path:
        """The host path of a path inside the root."""
        return self.path / inside.lstrip("/")

    def inside(self, arg: str) -> str:
        """A command argument as the root sees it: host paths under the root lose its prefix."""
        top = str(self.path)
        return "/" if arg == top else arg[len(top):] if arg.startswith(top + "/") else arg

    def command(self, cmd: list[str]) -> list[str]:
        """cmd, run inside the root with a clean environment (PATH, HOME, LANG, and pip's and the proxy's)."""
        keep = {k: v for k, v in os.environ.items()  # pip's cache: the root's own (/root/.cache/pip)
                if k.startswith("PIP_") and k != "PIP_CACHE_DIR" or k.lower() in ("http_proxy", "https_proxy",
                                                                                  "no_proxy")}
        env = [f"{k}={self.inside(v)}" for k, v in {"PATH": ROOT_PATH, "HOME": "/root", "LANG": "C.UTF-8",
                                                    **keep}.items()]
        return ["unshare", "-m", "sh", "-ec", ENTER_ROOT, "sh", str(self.path), *self.binds, "--",
                "/usr/bin/env", "-i", *env, *(self.inside(a) for a in cmd)]  # cmd[0] is a path, not VAR=

    def runner(self, run: Run) -> Run:
        return lambda cmd: run(self.command(cmd))


def check_build_root(path: Path) -> Path:
    """The build root's folder, or a one-line BundleError saying what is missing."""
    path = Path(path).expanduser().resolve()
    if not (path / ROOT_STAMP.lstrip("/")).is_file() or not os.path.lexists(path / ROOT_PYTHON.lstrip("/")):
        raise BundleError(f"{path} is not a build root (no {ROOT_STAMP}): make it with"
                          f" `sudo scripts/make_build_root.sh {path}` (debootstrap bullseye and CPython 3.11,"
                          " about 10 minutes)")
    if os.geteuid() != 0:
        raise BundleError("--build-root runs the build inside the root with chroot: run bundle create as root")
    missing = [tool for tool in ("unshare", "chroot", "mount") if shutil.which(tool) is None]
    if missing:
        raise BundleError(f"--build-root needs {' and '.join(missing)} (util-linux, coreutils)")
    return path


def pip_binds(pip_config: str, environ: dict[str, str] | None = None) -> list[str]:
    """The host paths pip needs inside a build root, bound read-only at the same place: the machine-wide pip
    configuration, /etc/resolv.conf, and every local folder or file that pip's configuration (`pip config
    list`) or PIP_* variables name (find-links folders, file:// indexes, constraint files)."""
    environ = os.environ if environ is None else environ
    values = re.findall(r"=\s*'?([^'\n]*)'?", pip_config)
    values += [v for k, v in environ.items() if k.startswith("PIP_") and k != "PIP_CACHE_DIR"]
    found = [p for p in PIP_CONFIG_FILES + ("/etc/resolv.conf",) if os.path.exists(p)]
    for value in values:
        for word in value.split():
            word = word.removeprefix("file://")
            word = os.path.normpath(word)
            if word.startswith("/") and os.path.exists(word) and not any(word == f or word.startswith(f + "/")
                                                                         for f in found):
                found.append(word)
    return list(dict.fromkeys(found))


def _host_pip_config() -> str:
    p = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else ""


@contextlib.contextmanager
def _temp_in(folder: Path | None):
    """Point tempfile at folder for the build (scratch folders in a build root are seen from inside it)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    before = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = before


# ---------------------------------------------------------------------------------------------- create


def create_portable(dest: Path, *, home: Home, models: Sequence[str] = (), torch: str = "cpu",
                    torch_index_url: str | None = None, source: Path | None = None, build_cache: Path | None = None,
                    run: Run | None = None, echo: Echo = print,
                    progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
                    build_root: Path | None = None) -> dict:
    """Write a portable bundle (the frozen app, models, launcher, installer, manifest) into dest; returns the
    manifest. Linux x86-64 only, built on Linux x86-64 (PyInstaller freezes the machine it runs on), or inside
    build_root (scripts/make_build_root.sh) for that root's older glibc."""
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
    root = BuildRoot(check_build_root(build_root), pip_binds(_host_pip_config())) if build_root else None
    dest, chosen = prepare_destination(dest, home, models, echo)
    run = run or (lambda cmd: run_command(cmd, echo, _what(cmd)))
    cache = Path(build_cache).expanduser().resolve() if build_cache else default_build_cache()
    base_python = python_id = None
    if root:
        echo(f"darkroom: building inside {root.path} ({root.stamp})")
        run, cache = root.runner(run), root.host(ROOT_CACHE)
        base_python, python_id = str(root.host(ROOT_PYTHON)), root.stamp
    try:
        with writes_to(dest, "write the bundle", instead=OTHER_BUNDLE_FOLDER):
            dest.mkdir(parents=True, exist_ok=True)
            with _temp_in(root.host("/tmp") if root else None), _scratch() as scratch:
                # in a build root: the source copied where the root sees it (requirement files, wheel, assets)
                build_src = _copy_source(src, scratch / "source") if root else src
                python = ensure_build_venv(cache, build_src, torch_req, torch_index, run, echo, base_python,
                                           python_id)
                inside = (scratch / "dist", build_src / "darkroom" / "assets" / "portable") if root else ()
                app = freeze(python, build_src, dest, scratch, run, echo, *inside)
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
                           "built_on_glibc": root.glibc if root else host_glibc(),
                           **({"build_root": root.stamp} if root else {})},
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


def _copy_source(src: Path, to: Path) -> Path:
    """What the build reads from the checkout, copied where a build root sees it."""
    shutil.copytree(src / "darkroom", to / "darkroom", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in", "requirements.txt",
                 NODEPS_FILE, BUILD_REQUIREMENTS):
        if (src / name).is_file():
            shutil.copy2(src / name, to / name)
    return to


def _version(src: Path) -> str:
    m = re.search(r'(?m)^version\s*=\s*"([^"]+)"', (src / "pyproject.toml").read_text(encoding="utf-8"))
    return m[1] if m else "0"
