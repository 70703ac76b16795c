"""Help without the internet: error codes, `darkroom help`, the /docs pages, and what a wheel ships."""

from __future__ import annotations

import errno
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import darkroom
from darkroom import help as pages
from darkroom.cli import cli
from darkroom.errors import DarkroomError, StorageError
from darkroom.home import Home

ROOT = Path(__file__).resolve().parent.parent
# ImportStopped takes the code of the StorageError that stopped it; TensorReadError is a ModelLoadError that keeps
# its reason apart from the file's name (for callers that name the file their own way)
INHERITS_ON_PURPOSE = {"ImportStopped", "TensorReadError"}


def _all_error_classes() -> list[type]:
    for mod in pkgutil.walk_packages(darkroom.__path__, "darkroom."):
        if not mod.name.startswith(("darkroom.testing", "darkroom.starter_training")) and "__main__" not in mod.name:
            importlib.import_module(mod.name)
    seen, todo = [], [DarkroomError]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += cls.__subclasses__()
    return seen


def test_every_error_class_has_its_own_code_and_a_page():
    classes = _all_error_classes()
    assert len(classes) > 20  # the walk found the subclasses in services/, server/, carry/, ...
    for cls in classes:
        assert pages.CODE_RE.fullmatch(cls.code), cls
        assert pages.page(cls.code), f"{cls.__module__}.{cls.__name__}: no help page for {cls.code}"
        if cls is not DarkroomError and cls.__name__ not in INHERITS_ON_PURPOSE:
            assert "code" in vars(cls), f"{cls.__module__}.{cls.__name__} has no code of its own"


def test_every_code_named_in_the_source_has_a_page():
    named = set()
    for path in [*(ROOT / "darkroom").rglob("*.py"), *(ROOT / "darkroom").rglob("*.js")]:
        named |= set(re.findall(r"""["'](DR(?:-[A-Z0-9]+)+)["']""", path.read_text(encoding="utf-8")))
    assert {"DR-STORAGE-FULL", "DR-CANNOT-LISTEN", "DR-INTERNAL", "DR-ACCESS-TOKEN"} <= named
    assert not named - set(pages.codes()), named - set(pages.codes())


def test_storage_errors_know_their_kind():
    from darkroom.fsutil import read_error, storage_error

    def oserror(n):
        return OSError(n, os.strerror(n))

    assert StorageError.wrap(oserror(errno.ENOSPC), "/out").code == "DR-STORAGE-FULL"
    assert StorageError.wrap(oserror(errno.EROFS), "/out").code == "DR-STORAGE-READ-ONLY"
    assert StorageError.wrap(oserror(errno.EACCES), "/out").code == "DR-STORAGE-DENIED"
    assert storage_error(oserror(errno.EDQUOT), "/out", "save").code == "DR-STORAGE-FULL"
    assert storage_error(oserror(errno.ENOENT), "/out", "save").code == "DR-STORAGE-GONE"
    assert read_error(oserror(errno.EIO), "/in/x").code == "DR-STORAGE-GONE"
    assert DarkroomError("x", code="DR-CANNOT-LISTEN").code == "DR-CANNOT-LISTEN"
    assert DarkroomError("x").code == "DR-ERROR"


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


def test_help_code_prints_the_page_with_no_network(tmp_path):
    cmd = [sys.executable, "-m", "darkroom.cli", "help", "dr-model-not-found"]
    if _can_unshare():
        cmd = ["unshare", "-n", *cmd]
    env = dict(os.environ, DARKROOM_HOME=str(tmp_path / "home"))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("# DR-MODEL-NOT-FOUND: ")
    for heading in ("## Cause", "## Fix", "## Related commands", "darkroom models list"):
        assert heading in p.stdout
    assert not (Home(tmp_path / "home").network_log).exists()  # the guard saw no attempt


def test_help_index_and_unknown_code(home):
    index = CliRunner().invoke(cli, ["--home", str(home.root), "help"])
    assert index.exit_code == 0 and all(code in index.output for code in pages.codes())
    r = CliRunner().invoke(cli, ["--home", str(home.root), "help", "DR-NO-SUCH-THING"])
    assert r.exit_code == 2
    assert "no help page for 'DR-NO-SUCH-THING'" in r.stderr
    assert "DR-MODEL-NOT-FOUND" in r.stderr and "DR-STORAGE-FULL" in r.stderr


def test_cli_error_line_carries_the_code(home, tmp_path):
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "--model", "nosuch", "-o",
                                 str(tmp_path / "o")])
    last = r.stderr.strip().splitlines()[-1]
    assert r.exit_code == 1 and last.startswith("error: no model named 'nosuch'"), r.stderr
    assert last.endswith(" [DR-MODEL-NOT-FOUND] (darkroom help DR-MODEL-NOT-FOUND)")
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "-W", "513", "-o", str(tmp_path / "o")])
    last = r.stderr.strip().splitlines()[-1]
    assert r.exit_code == 2 and last.startswith("error: invalid request: "), r.stderr
    assert last.endswith(" [DR-INVALID-REQUEST] (darkroom help DR-INVALID-REQUEST)")


# --- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs_client(tmp_path_factory):
    from tests.server_util import client, studio_with

    studio = studio_with(Home(tmp_path_factory.mktemp("docs-home")), start=False)
    with client(studio) as c:
        yield c
    studio.close()


_LINK = re.compile(r"""\b(?:src|href|action)\s*=\s*["']([^"']*)["']""", re.I)


def _local_page(r) -> str:
    assert r.status_code == 200, r.text[:300]
    assert r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for url in _LINK.findall(r.text):
        assert url.startswith(("/", "#")) and not url.startswith("//"), url
    assert "<script" not in r.text
    return r.text


def test_http_errors_carry_the_code(docs_client):
    r = docs_client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
    assert r.status_code == 422 and r.json()["code"] == "DR-INVALID-REQUEST"
    assert r.json()["error"] == r.json()["detail"]  # the two keys clients read, unchanged
    r = docs_client.get("/api/jobs/nosuch")
    assert r.status_code == 404 and r.json()["code"] == "DR-JOB-NOT-FOUND"
    assert docs_client.get("/api/nosuch").json()["code"] == "DR-NO-SUCH-ROUTE"
    r = docs_client.post("/v1/images/generations", json={"prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["code"] == "DR-INVALID-REQUEST"


def test_docs_index_and_error_pages_render_locally(docs_client):
    index = _local_page(docs_client.get("/docs"))
    for href in ("/docs/readme", "/docs/cli", "/docs/api", "/docs/troubleshooting", "/docs/faq",
                 "/docs/errors/DR-MODEL-NOT-FOUND"):
        assert f'href="{href}"' in index
    page = _local_page(docs_client.get("/docs/errors/DR-STORAGE-FULL"))
    assert "<h1" in page and "DR-STORAGE-FULL" in page and "<h2 id=\"fix\">Fix</h2>" in page
    missing = docs_client.get("/docs/errors/DR-NOPE")
    assert missing.status_code == 404 and "/docs/errors/DR-MODEL-NOT-FOUND" in missing.text
    assert docs_client.get("/docs/docs.css").headers["content-type"].startswith("text/css")


def test_readme_cli_api_troubleshooting_faq_render(docs_client):
    readme = _local_page(docs_client.get("/docs/readme"))
    assert "<h1 id=\"darkroom\">Darkroom</h1>" in readme and 'href="/docs/cli"' in readme
    assert "<table>" in readme  # the commands table
    assert "<code>darkroom generate" in _local_page(docs_client.get("/docs/cli"))
    api = _local_page(docs_client.get("/docs/api"))
    assert "/sdapi/v1/txt2img" in api and "/v1/images/generations" in api and "/api/jobs/{job_id}" in api
    trouble = _local_page(docs_client.get("/docs/troubleshooting"))
    assert 'href="/docs/errors/DR-NON-FINITE"' in trouble
    assert 'href="/docs/readme#offline-provably"' in _local_page(docs_client.get("/docs/faq"))
    assert docs_client.get("/docs/nosuch").status_code == 404


def test_markdown_is_escaped_and_links_stay_local():
    from darkroom.help.render import to_html

    out = to_html('<script>alert(1)</script>\n\n[a](javascript:alert(1)) [b](https://example.com/x)'
                  ' ![i](http://example.com/i.png) [c](docs/gpu.md#vram) [d](src/x.py)',
                  known_docs={"gpu"})
    assert "<script" not in out and "&lt;script&gt;" in out
    assert 'href="javascript' not in out and 'href="https' not in out and 'href="src/' not in out
    assert 'href="/docs/gpu#vram"' in out and out.count("href=") == 1
    assert "b (https://example.com/x)" in out and "<img" not in out


# --- what an installed package holds ----------------------------------------------------------------

def test_packaged_docs_match_the_checkout():
    p = subprocess.run([sys.executable, "scripts/sync_help_docs.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, f"run scripts/sync_help_docs.py:\n{p.stderr}"
    assert {"readme", "cli", "troubleshooting", "faq"} <= set(pages.docs())


@pytest.mark.slow
def test_a_built_wheel_serves_the_help(tmp_path):
    from darkroom.carry.bundle import build_darkroom_wheel, run_pip

    wheel = build_darkroom_wheel(ROOT, tmp_path, lambda args: run_pip(args, lambda line: None))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"darkroom/help/docs/README.md", "darkroom/help/docs/cli.md", "darkroom/help/docs/faq.md",
            "darkroom/help/pages/DR-MODEL-NOT-FOUND.md"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (f"import darkroom.help as h, darkroom.help.render as r; assert h.__file__.startswith({str(site)!r});"
            " assert h.page('DR-TOO-BIG') and h.doc('readme').startswith('# Darkroom');"
            " print(len(r.to_html(h.doc('troubleshooting'))))")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(site)))
    assert p.returncode == 0 and int(p.stdout) > 1000, p.stderr
