"""What files the offline proof's child opened, sorted into Darkroom's own, the Python
installation's, the system's and anything else (which the proof lists by folder).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import darkroom

SYSTEM_GROUPS = (
    ("/proc", "kernel info (/proc)"),
    ("/sys", "devices and CPU info (/sys)"),
    ("/dev", "devices (/dev)"),
    ("/etc/ld.so.cache", "dynamic linker cache"),
    ("/etc/localtime", "time zone"),
    ("/usr/share/zoneinfo", "time zone"),
    ("/usr/lib", "system libraries"),
    ("/usr/lib64", "system libraries"),
    ("/lib", "system libraries"),
    ("/lib64", "system libraries"),
    ("/usr/local/cuda", "CUDA libraries"),
)


@dataclass(frozen=True)
class Roots:
    """Where opened files are expected to be: Darkroom's folders, the Python installation, the system."""

    darkroom: tuple[str, ...]
    python: tuple[str, ...]
    system: tuple[tuple[str, str], ...] = SYSTEM_GROUPS
    temp: tuple[str, ...] = ()

    @classmethod
    def current(cls, darkroom_dirs: list[Path | str]) -> Roots:
        import site
        import sysconfig
        import tempfile

        pkg = Path(darkroom.__file__).parent
        # a system Python's prefix is /usr: too broad to mean "the Python installation", so there
        # only its library folders count
        python = [p for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
                  if os.path.normpath(p) not in ("/", "/usr", "/usr/local")]
        python += [*site.getsitepackages(), *(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib",
                                                                               "platlib"))]
        if site.ENABLE_USER_SITE:
            python.append(site.getusersitepackages())
        return cls(darkroom=_norm_all([pkg, *darkroom_dirs]), python=_norm_all(python),
                   temp=_norm_all([tempfile.gettempdir()]))


def _norm_all(paths) -> tuple[str, ...]:
    out: list[str] = []
    for p in paths:
        for q in {os.path.normpath(os.path.abspath(p)), os.path.realpath(p)}:
            if q not in out:
                out.append(q)
    return tuple(out)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def classify(path: str, roots: Roots) -> tuple[str, str]:
    """(category, group) of an opened path: darkroom, python, system (with its group) or other."""
    path = os.path.normpath(path)
    candidates = [path]
    real = os.path.realpath(path)
    if real != path:
        candidates.append(real)
    for p in candidates:
        if any(_under(p, r) for r in roots.darkroom):
            return "darkroom", ""
    for p in candidates:
        if any(_under(p, r) for r in roots.python):
            return "python", ""
    for p in candidates:
        for prefix, group in roots.system:
            if _under(p, prefix):
                return "system", group
        if any(_under(p, t) for t in roots.temp):
            return "system", "temporary files"
    return "other", os.path.dirname(path)


def summarize_files(opened: dict[str, str], roots: Roots) -> dict:
    """Counts per category, system files per group, and every other file grouped by folder."""
    counts = {"darkroom": 0, "python": 0, "system": 0, "other": 0}
    system: dict[str, int] = {}
    system_files: dict[str, list[str]] = {}
    other: dict[str, list[dict]] = {}
    for path, how in sorted(opened.items()):
        category, group = classify(path, roots)
        counts[category] += 1
        if category == "system":
            system[group] = system.get(group, 0) + 1
            system_files.setdefault(group, []).append(path)
        elif category == "other":
            other.setdefault(group, []).append({"path": path, "how": how, "exists": os.path.exists(path)})
    return {"counts": counts, "system_groups": system, "other": other, "system_files": system_files}
