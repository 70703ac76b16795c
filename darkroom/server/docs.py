"""/docs: the help pages, the README, the CLI and API references, troubleshooting and FAQ, as local HTML.

Everything comes from the package (darkroom.help): nothing is fetched, no CDN, one stylesheet
served here. The API reference is built from this app's own OpenAPI schema, so it lists exactly
the routes this server answers.
"""

from __future__ import annotations

import html

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

import darkroom
from darkroom import help as pages
from darkroom.help import render

router = APIRouter(prefix="/docs", include_in_schema=False)

CSS = """
body { font: 16px/1.5 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #fafafa; }
main { max-width: 52rem; margin: 0 auto; padding: 1rem 1.5rem 4rem; }
.docs-nav { padding: .6rem 1.5rem; background: #20232a; }
.docs-nav a { color: #fff; margin-right: 1.2rem; text-decoration: none; }
code, pre { font-family: ui-monospace, monospace; background: #eee; border-radius: 3px; }
code { padding: 0 .2em; } pre { padding: .8em; overflow-x: auto; } pre code { padding: 0; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: .25em .5em; vertical-align: top; }
td.method { font-family: ui-monospace, monospace; white-space: nowrap; }
@media (prefers-color-scheme: dark) {
  body { color: #e6e6e6; background: #161618; } code, pre { background: #2a2a2e; } a { color: #8ab4ff; }
  th, td { border-color: #444; }
}
"""

HEADERS = {"cache-control": "no-cache"}


def _html(title: str, body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(render.page(title, body), status_code=status, headers=HEADERS)


def _known() -> set[str]:
    return set(pages.docs())


def _code_list() -> str:
    items = "".join(f'<li><a href="/docs/errors/{html.escape(c)}"><code>{html.escape(c)}</code></a> '
                    f"{html.escape(pages.title(c))}</li>" for c in pages.codes())
    return f"<ul>{items}</ul>"


@router.get("/docs.css")
def stylesheet() -> Response:
    return Response(CSS, media_type="text/css", headers=HEADERS)


@router.get("")
@router.get("/")
def index() -> HTMLResponse:
    known = _known()
    first = [n for n in pages.INDEX_DOCS if n in known]
    links = [(f"/docs/{n}", pages.doc_title(n)) for n in first]
    links.insert(2, ("/docs/api", "API reference (this server's routes)"))
    more = [(f"/docs/{n}", pages.doc_title(n)) for n in sorted(known - set(first))]
    li = lambda pairs: "".join(f'<li><a href="{h}">{html.escape(t)}</a></li>' for h, t in pairs)
    version = html.escape(darkroom.__version__)
    body = (f"<h1>Darkroom help</h1><p>Everything here ships with Darkroom {version} and works offline."
            " In a terminal: <code>darkroom help</code> and <code>darkroom help CODE</code>.</p>"
            f"<ul>{li(links)}</ul><h2>More documents</h2><ul>{li(more)}</ul>"
            f'<h2 id="errors">Error codes</h2>{_code_list()}')
    return _html("Help", body)


@router.get("/errors")
def errors() -> HTMLResponse:
    return _html("Error codes", f"<h1>Error codes</h1>{_code_list()}")


@router.get("/errors/{code}")
def error_page(code: str) -> HTMLResponse:
    text = pages.page(code)
    if text is None:
        body = (f"<h1>No page for {html.escape(code)}</h1><p>Darkroom has no error code of that name."
                f" These are the known codes:</p>{_code_list()}")
        return _html("Unknown code", body, status=404)
    code = pages.normalize(code)
    return _html(code, render.to_html(text, known_docs=_known(), here="darkroom/help/pages"))


@router.get("/api")
def api_reference(request: Request) -> HTMLResponse:
    schema = request.app.openapi()
    groups: dict[str, list[str]] = {}
    for path, methods in sorted(schema.get("paths", {}).items()):
        for method, op in methods.items():
            tag = (op.get("tags") or ["darkroom"])[0]
            summary = op.get("summary") or ""
            groups.setdefault(tag, []).append(
                f'<tr><td class="method">{html.escape(method.upper())}</td><td><code>{html.escape(path)}</code></td>'
                f"<td>{html.escape(summary)}</td></tr>")
    sections = "".join(f"<h2>{html.escape(tag)}</h2><table><tr><th>method</th><th>path</th><th>what</th></tr>"
                       f"{''.join(rows)}</table>" for tag, rows in sorted(groups.items()))
    body = ("<h1>API reference</h1><p>The routes of this server, from its OpenAPI schema"
            ' (<a href="/api/openapi.json">/api/openapi.json</a>). Errors answer JSON with <code>error</code>,'
            ' <code>detail</code> and <code>code</code>: the <a href="/docs/errors">error code</a>.</p>' + sections)
    return _html("API reference", body)


@router.get("/{name}")
def document(name: str) -> HTMLResponse:
    key = name.lower().removesuffix(".md")
    text = pages.doc(key)
    if text is None:
        return _html("Not found", f"<h1>No document {html.escape(name)}</h1><p><a href=\"/docs\">All help</a></p>",
                     status=404)
    here = "" if key == "readme" else "docs"
    return _html(pages.doc_title(key), render.to_html(text, known_docs=_known(), here=here))

