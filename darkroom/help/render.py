"""Markdown -> safe HTML for the /docs pages, with markdown-it-py (CommonMark, pure Python).

Raw HTML in the Markdown is escaped, never passed through. Links are kept only where they stay
on this server: a shipped document (README.md, docs/cli.md -> /docs/readme, /docs/cli), an error
code's page, a fragment (#...) or an absolute local path (/docs/...). Every other link (the web,
a source file) becomes its plain text, and images become their alt text: a rendered page loads
nothing and links nowhere outside (the CSP `default-src 'self'` would block it anyway).
"""

from __future__ import annotations

import html
import posixpath
import re
from collections.abc import Callable

from markdown_it import MarkdownIt
from markdown_it.token import Token

from darkroom.help import CODE_RE


def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")


def slug(text: str) -> str:
    """A heading's anchor, as GitHub makes it: lower case, spaces to '-', punctuation dropped."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def local_href(href: str, known_docs: set[str], here: str = "") -> str | None:
    """Where a Markdown link goes on this server, or None to drop the link (keep its text).

    `here` is the folder of the document being rendered in the checkout ('' for README.md,
    'docs' for docs/*.md), so relative links resolve as they do on a code host.
    """
    href = href.strip()
    if href.startswith("#"):
        return href
    if href.startswith("/") and not href.startswith("//"):
        return href
    if re.match(r"^[a-z][a-z0-9+.-]*:", href, re.I):  # http:, mailto:, javascript:, ...
        return None
    path, _, fragment = href.partition("#")
    target = posixpath.normpath(posixpath.join(here, path)) if path else ""
    if CODE_RE.fullmatch(posixpath.basename(target).removesuffix(".md")):
        name = posixpath.basename(target).removesuffix(".md")
        return f"/docs/errors/{name}" + (f"#{fragment}" if fragment else "")
    if target == "README.md":
        name = "readme"
    elif target.startswith("docs/") and target.endswith(".md") and "/" not in target[5:]:
        name = target[5:-3].lower()
    else:
        return None
    if name not in known_docs:
        return None
    return f"/docs/{name}" + (f"#{fragment}" if fragment else "")


def _rewrite(tokens: list[Token], link: Callable[[str], str | None]) -> None:
    """Headings get ids; inline links are rewritten or dropped; images become their alt text."""
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and i + 1 < len(tokens):
            token.attrSet("id", slug(tokens[i + 1].content))
        if not token.children:
            continue
        out: list[Token] = []
        dropped: list[str | None] = []  # a stack: for each open link, its web address when it was dropped
        for child in token.children:
            if child.type == "link_open":
                original = str(child.attrGet("href") or "")
                href = link(original)
                dropped.append(original if href is None else None)
                if href is not None:
                    child.attrSet("href", href)
                    out.append(child)
            elif child.type == "link_close":
                web = dropped.pop() if dropped else None
                if web is None:
                    out.append(child)
                elif web.startswith(("http://", "https://")):  # said as text, to look up on a connected machine
                    note = Token("text", "", 0)
                    note.content = f" ({web})"
                    out.append(note)
            elif child.type == "image":
                text = Token("text", "", 0)
                text.content = child.content or ""
                out.append(text)
            else:
                out.append(child)
        token.children = out


def to_html(markdown: str, *, known_docs: set[str] | frozenset[str] = frozenset(), here: str = "") -> str:
    """The HTML body of a Markdown document: text escaped, no raw HTML, local links only."""
    md = _parser()
    tokens = md.parse(markdown)
    _rewrite(tokens, lambda href: local_href(href, set(known_docs), here))
    return md.renderer.render(tokens, md.options, {})


def page(title: str, body: str, *, nav: str = "") -> str:
    """A whole HTML page around a rendered body; `title` is text (escaped here), `body` and `nav` are HTML."""
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)} - Darkroom help</title>"
            "<link rel=\"stylesheet\" href=\"/docs/docs.css\"></head>\n<body>"
            "<nav class=\"docs-nav\"><a href=\"/docs\">Help</a> <a href=\"/\">Darkroom</a>"
            f"{nav}</nav>\n<main>\n{body}\n</main></body></html>\n")
