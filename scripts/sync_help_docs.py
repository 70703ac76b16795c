"""Copy README.md and docs/*.md into darkroom/help/docs/, the copies that ship in the package.

The server's /docs pages and `darkroom help` read those copies, so a wheel or an offline bundle
(which carry only the darkroom package) serve the same documents as a checkout. A test fails
when a copy differs from its source: run this script after editing the README or docs/.

Usage: .venv/bin/python scripts/sync_help_docs.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "darkroom" / "help" / "docs"


def sources() -> dict[str, Path]:
    """Shipped name -> source file."""
    return {"README.md": ROOT / "README.md", **{p.name: p for p in sorted((ROOT / "docs").glob("*.md"))}}


def differences() -> list[str]:
    """The copies that are missing, stale or no longer have a source."""
    want = sources()
    have = {p.name for p in OUT.glob("*.md")} if OUT.is_dir() else set()
    out = [f"{name}: missing" for name in want if name not in have]
    out += [f"{name}: differs from {src.relative_to(ROOT)}" for name, src in want.items()
            if name in have and (OUT / name).read_bytes() != src.read_bytes()]
    out += [f"{name}: no source any more" for name in sorted(have - set(want))]
    return out


def main(argv: list[str]) -> int:
    if "--check" in argv:
        problems = differences()
        for line in problems:
            print(f"darkroom/help/docs/{line}", file=sys.stderr)
        return 1 if problems else 0
    OUT.mkdir(exist_ok=True)
    want = sources()
    for stale in OUT.glob("*.md"):
        if stale.name not in want:
            stale.unlink()
    for name, src in want.items():
        (OUT / name).write_bytes(src.read_bytes())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
