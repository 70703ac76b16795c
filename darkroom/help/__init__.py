"""Help without the internet: a troubleshooting page per error code, and the docs, shipped in the package.

`pages/CODE.md` is one page per DR-... code (cause, fix, related commands): `darkroom help CODE`
prints it and the server serves it at /docs/errors/CODE. `docs/` holds copies of the README and
docs/*.md (kept equal to the checkout's by scripts/sync_help_docs.py, checked by a test), so an
installed wheel or bundle serves the same documents as a checkout. Nothing here imports a web or
CLI framework, nor anything of Darkroom's above the standard library.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.abc import Traversable

CODE_RE = re.compile(r"DR(?:-[A-Z0-9]+)+")
INDEX_DOCS = ("readme", "cli", "troubleshooting", "faq")
"""The documents the /docs index lists first (the API reference is built by the server)."""


def _folder(name: str) -> Traversable:
    return resources.files(__name__) / name


def normalize(code: str) -> str:
    """'dr-model-not-found', 'MODEL_NOT_FOUND' -> 'DR-MODEL-NOT-FOUND' (what a user may type)."""
    code = code.strip().upper().replace("_", "-")
    return code if code.startswith("DR-") else f"DR-{code}"


def codes() -> list[str]:
    """Every code with a help page, sorted."""
    return sorted(p.name[:-3] for p in _folder("pages").iterdir() if p.name.endswith(".md"))


def page(code: str) -> str | None:
    """The Markdown page of `code` (case and a missing DR- prefix forgiven), or None when there is none."""
    code = normalize(code)
    if not CODE_RE.fullmatch(code):
        return None
    path = _folder("pages") / f"{code}.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def title(code: str) -> str:
    """The page's one-line summary: 'no model of that name'."""
    text = page(code) or ""
    first = text.splitlines()[0] if text else ""
    return first.split(": ", 1)[1] if ": " in first else first.lstrip("# ")


def index_text() -> str:
    """`darkroom help` without a code: every code with its summary, and where the docs are."""
    width = max(map(len, codes()))
    lines = ["Darkroom help (offline). Error messages end with a code such as [DR-MODEL-NOT-FOUND];",
             "`darkroom help CODE` prints its page. With `darkroom serve` running, the same pages, the README,",
             "the CLI and API references, troubleshooting and FAQ are at http://127.0.0.1:7860/docs", "",
             "Codes:"]
    lines += [f"  {c:<{width}}  {title(c)}" for c in codes()]
    return "\n".join(lines)


def docs() -> list[str]:
    """The shipped documents by name ('readme', 'cli', 'troubleshooting', 'faq', 'gpu', ...)."""
    return sorted(p.name[:-3].lower() for p in _folder("docs").iterdir() if p.name.endswith(".md"))


def doc(name: str) -> str | None:
    """A shipped document's Markdown by name ('readme' is README.md), or None."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        return None
    path = _folder("docs") / ("README.md" if name == "readme" else f"{name}.md")
    return path.read_text(encoding="utf-8") if path.is_file() else None


def doc_title(name: str) -> str:
    """A document's first heading ('Darkroom', 'darkroom CLI reference'), else its name."""
    for line in (doc(name) or "").splitlines():
        if line.startswith("# "):
            return line[2:].strip().strip("`")
    return name
