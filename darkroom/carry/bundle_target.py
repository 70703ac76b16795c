"""What an offline bundle is for: the target's Python, wheel platform tags, OS and torch build.

pip picks wheels by explicit tags and evaluates markers for the machine it runs on, so a bundle for
another system needs the tags expanded and the markers of that system (see `darkroom.carry.bundle`).
"""

from __future__ import annotations

import platform
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from darkroom.errors import BundleError

TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"
TORCH_VARIANTS = re.compile(r"^(cpu|pypi|cu\d{2,4}|rocm\d+(\.\d+)*|xpu)$")


@dataclass(frozen=True)
class Target:
    """What the bundle is for. No `platforms` means this machine's own wheel tags."""

    python: str
    platforms: tuple[str, ...]
    os: str | None
    machine: str | None
    torch: str

    @property
    def native(self) -> bool:
        return not self.platforms and self.python == _host_python()

    def pip_args(self) -> list[str]:
        """pip's options to pick wheels for the target (none for this very interpreter)."""
        args = ["--only-binary=:all:"]
        if self.native:
            return args
        args += ["--implementation", "cp", "--python-version", self.python]
        for tag in self.platforms:
            args += ["--platform", tag]
        return args

    def as_json(self) -> dict:
        return {"python": self.python, "os": self.os, "machine": self.machine, "platforms": list(self.platforms),
                "implementation": "cp", "torch": self.torch}


def _host_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def _host_os() -> str:
    return {"Windows": "windows", "Darwin": "macos"}.get(platform.system(), platform.system().lower())


_LEGACY_MANYLINUX = {"manylinux1": 5, "manylinux2010": 12, "manylinux2014": 17}


def expand_platform(tag: str) -> list[str]:
    """pip --platform values for a tag: manylinux_2_28_x86_64 also takes older glibc wheels (2_27 ... 2_5).

    pip matches an explicit --platform exactly, so without this a manylinux2014 target would miss
    torch's manylinux_2_28 wheels and vice versa. Other tags (win_amd64, macosx_11_0_arm64) pass as is:
    pip itself expands macOS versions.
    """
    m = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", tag)
    if m:
        glibc, arch = _LEGACY_MANYLINUX[m[1]], m[2]
    else:
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
        if not m:
            return [tag]
        glibc, arch = int(m[1]), m[2]
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        tags += [f"{legacy}_{arch}" for legacy, v in _LEGACY_MANYLINUX.items() if v == minor]
    return tags


def _os_machine(tag: str) -> tuple[str | None, str | None]:
    if tag.startswith("win"):
        return "windows", {"win32": "x86", "win_amd64": "x86_64", "win_arm64": "aarch64"}.get(tag)
    m = re.fullmatch(r"macosx_\d+_\d+_(\w+)", tag)
    if m:
        return "macos", None if m[1] in ("universal", "universal2", "intel") else m[1]
    m = re.fullmatch(r"(?:many|musl)?linux(?:\d+|_\d+_\d+)?_(\w+)", tag)
    if m:
        return "linux", m[1]
    return None, None


def make_target(platforms: Sequence[str] = (), python_version: str | None = None, torch: str = "cpu") -> Target:
    python = python_version or _host_python()
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise BundleError(f"--python-version {python!r}: give MAJOR.MINOR, e.g. 3.11")
    if not TORCH_VARIANTS.fullmatch(torch):
        raise BundleError(f"--torch {torch!r}: use cpu, a CUDA build such as cu124 or cu128, rocm6.4, xpu,"
                          " or pypi (the build PyPI serves)")
    if not platforms:
        return Target(python, (), _host_os(), platform.machine(), torch)
    systems = {_os_machine(tag) for tag in platforms}
    if len(systems) != 1 or next(iter(systems))[0] is None:
        raise BundleError(f"--platform {' '.join(platforms)}: give wheel platform tags of one system, e.g."
                          " manylinux_2_28_x86_64, win_amd64 or macosx_11_0_arm64")
    os_name, machine = systems.pop()
    expanded = tuple(dict.fromkeys(t for tag in platforms for t in expand_platform(tag)))
    return Target(python, expanded, os_name, machine, torch)


def marker_environment(target: Target) -> dict[str, str]:
    """PEP 508 marker values on the target (pip evaluates markers for the machine it runs on)."""
    from packaging.markers import default_environment

    env = default_environment()
    if target.native:
        return env
    full = platform.python_version() if target.python == _host_python() else f"{target.python}.0"
    machine = target.machine or env["platform_machine"]
    if target.os == "windows":
        machine = {"x86_64": "AMD64", "aarch64": "ARM64"}.get(machine, machine)
    elif target.os == "macos":
        machine = {"aarch64": "arm64"}.get(machine, machine)
    system = {"windows": ("nt", "win32", "Windows"), "macos": ("posix", "darwin", "Darwin"),
              "linux": ("posix", "linux", "Linux")}[target.os]
    env.update(os_name=system[0], sys_platform=system[1], platform_system=system[2], platform_machine=machine,
               python_version=target.python, python_full_version=full, implementation_name="cpython",
               implementation_version=full, platform_python_implementation="CPython", platform_release="",
               platform_version="")
    return env


def torch_requirement(version: str, target: Target, index_url: str | None = None) -> tuple[str, str | None]:
    """(requirement, index URL or None for pip's configured sources) for the torch variant of the target."""
    base = version.split("+", 1)[0]
    if target.os == "macos":
        if target.torch not in ("cpu", "pypi"):
            raise BundleError(f"--torch {target.torch}: torch for macOS has no CUDA/ROCm build; use --torch cpu"
                              " (Apple's MPS is included)")
        return f"torch=={base}", index_url
    if target.torch == "pypi":
        return f"torch=={base}", index_url
    return f"torch=={base}+{target.torch}", index_url or TORCH_INDEX.format(variant=target.torch)
