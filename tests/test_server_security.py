"""What keeps the local server local: host and origin checks, tokens, path guards, upload limits."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from darkroom.errors import InvalidRequest
from darkroom.server import uploads
from darkroom.server.security import Security
from tests.server_util import FAST, client, wait_job


def test_foreign_host_refused(api):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends its own Host."""
    r = api.get("/api/status", headers={"host": "evil.example:7860"})
    assert r.status_code == 403 and "evil.example" in r.json()["error"]
    assert api.get("/api/status", headers={"host": "localhost:7860"}).status_code == 200


@pytest.mark.parametrize("headers", [
    {"origin": "http://evil.example"},
    {"origin": "http://127.0.0.1:9999"},  # another local app is another origin too
    {"origin": "null"},
    {"sec-fetch-site": "cross-site"},
])
def test_cross_origin_writes_refused(api, studio, headers):
    r = api.post("/api/jobs", json={"prompt": "x", **FAST}, headers=headers)
    assert r.status_code == 403 and "refused" in r.json()["error"]
    assert studio.queue.jobs() == []


def test_same_origin_write_allowed(api):
    r = api.post("/api/jobs", json={"prompt": "x", **FAST}, headers={"origin": "http://127.0.0.1:7860",
                                                                     "sec-fetch-site": "same-origin"})
    assert r.status_code == 202
    wait_job(api, r.json()["job"]["id"])


def test_headers_on_every_response(api):
    for path in ("/", "/static/app.js", "/api/status", "/api/nothing-here"):
        r = api.get(path)
        assert r.headers["content-security-policy"].startswith("default-src 'self'"), path
        assert r.headers["x-content-type-options"] == "nosniff"


def test_token_required_when_listening(studio):
    sec = Security(token="s3cret", listen=True)
    with client(studio, sec, follow_redirects=False) as c:
        r = c.get("/api/status")
        assert r.status_code == 401 and "token" in r.json()["error"]
        assert c.get("/").status_code == 401
        assert c.get("/api/status", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/status", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer s3cret"}).status_code == 200
        # any Host is fine when listening (phones use the LAN address)
        assert c.get("/api/status", headers={"authorization": "Bearer s3cret",
                                             "host": "192.168.1.5:7860"}).status_code == 200
        # the printed link trades the token for a cookie and drops it from the address bar
        r = c.get("/?token=s3cret")
        assert r.status_code == 303 and r.headers["location"] == "/"
        assert "darkroom_token" in r.headers["set-cookie"] and "HttpOnly" in r.headers["set-cookie"]
        c.cookies.set("darkroom_token", "s3cret")
        assert c.get("/").status_code == 200
        assert c.get("/api/status").status_code == 200


def test_api_auth_basic(studio):
    sec = Security.for_serve(listen=False, token=None, api_auth="user:pass")
    with client(studio, sec) as c:
        r = c.get("/sdapi/v1/sd-models")
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
        good = base64.b64encode(b"user:pass").decode()
        bad = base64.b64encode(b"user:nope").decode()
        assert c.get("/api/status", headers={"authorization": f"Basic {bad}"}).status_code == 401
        assert c.get("/api/status", headers={"authorization": f"Basic {good}"}).status_code == 200
    with pytest.raises(InvalidRequest, match="user:password"):
        Security.for_serve(listen=False, token=None, api_auth="nocolon")


def test_listen_generates_a_token():
    sec = Security.for_serve(listen=True, token=None, api_auth=None)
    assert sec.required and len(sec.token) >= 20


@pytest.mark.parametrize("path", [
    "/static/../../../../etc/passwd",
    "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/api/images/..%2f..%2fetc%2fpasswd",
    "/api/images/-1",
])
def test_no_path_escapes(api, path):
    r = api.get(path)
    assert r.status_code in (404, 422), (path, r.status_code)
    assert b"root:" not in r.content


def test_history_rows_cannot_point_outside(api, studio, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    outputs = studio.home.outputs
    (outputs / "link.png").symlink_to(secret)
    assert studio.history.reconcile() == (0, 0)  # links are not indexed
    with pytest.raises(InvalidRequest):
        studio.history.add(secret, "")
    # a tampered database row: ../ and a symlink both resolve outside and are refused
    for rel in ("../../secret.png", "link.png", str(secret)):
        studio.history._db.execute("INSERT INTO images (path, created) VALUES (?, 0)", (rel,))
    ids = [i.id for i in studio.history.search(per_page=10)[1]]
    for item_id in ids:
        assert api.get(f"/api/images/{item_id}").status_code == 404
    assert secret.exists()


def test_upload_limits(api, monkeypatch):
    monkeypatch.setattr(uploads, "MAX_UPLOAD_BYTES", 1000)
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    r = api.post("/api/png-info", files={"file": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert api.post("/api/png-info", files={"file": ("empty.png", b"", "image/png")}).status_code == 422
    monkeypatch.setattr(uploads, "MAX_PIXELS", 100)
    with pytest.raises(InvalidRequest, match="too many pixels"):
        uploads.open_image(buf.getvalue(), name="big.png")
