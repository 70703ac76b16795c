"""What keeps the local server local: host check, same-origin writes, access token, headers.

- Host header: on 127.0.0.1 only loopback names are accepted (a DNS-rebinding page that
  resolves evil.example to 127.0.0.1 sends `Host: evil.example` and is refused).
- Writes (POST/PUT/PATCH/DELETE) carrying an Origin, or a Sec-Fetch-Site, from another
  site are refused: a web page the user visits must not drive the local server.
- With `--listen` (or `--api-auth`) every route needs credentials: the access token as a
  cookie (set by opening `/?token=...`), `Authorization: Bearer <token>` (the OpenAI
  client's way), `X-Darkroom-Token`, or HTTP Basic (`--api-auth user:pass`, as the webui;
  any user name with the token as password also works).
- Every response carries a strict Content-Security-Policy, so the page cannot load anything
  from outside even by mistake.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; connect-src 'self';"
       " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
COOKIE = "darkroom_token"
WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


@dataclass
class Security:
    """The server's access rules, decided once at start-up."""

    token: str | None = None  # required when set
    api_user: str | None = None
    api_password: str | None = None
    listen: bool = False  # bound beyond loopback: any Host is allowed, but credentials are required

    @classmethod
    def for_serve(cls, *, listen: bool, token: str | None, api_auth: str | None) -> Security:
        user = password = None
        if api_auth:
            user, sep, password = api_auth.partition(":")
            if not sep or not user or not password:
                from darkroom.errors import InvalidRequest

                raise InvalidRequest("--api-auth must look like user:password")
        if listen and not token:
            token = secrets.token_urlsafe(18)
        return cls(token=token, api_user=user, api_password=password, listen=listen)

    @property
    def required(self) -> bool:
        return bool(self.token or self.api_user)

    def credentials_ok(self, request: Request) -> bool:
        if not self.required:
            return True
        offered: list[str] = []
        if c := request.cookies.get(COOKIE):
            offered.append(c)
        if h := request.headers.get("x-darkroom-token"):
            offered.append(h)
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer":
            offered.append(value.strip())
        elif scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user = password = ""
            if self.api_user and _same(user, self.api_user) and _same(password, self.api_password or ""):
                return True
            offered.append(password)
        return bool(self.token) and any(_same(o, self.token) for o in offered)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _error(status: int, message: str, **headers: str) -> Response:
    code = "DR-ACCESS-TOKEN" if status == 401 else "DR-ACCESS-REFUSED"  # its help page: /docs/errors/CODE
    return JSONResponse({"error": message, "detail": message, "code": code}, status_code=status,
                        headers={**HEADERS, **headers})


class SecurityMiddleware:
    """Pure ASGI middleware (works for streaming responses too) applying `Security`."""

    def __init__(self, app: ASGIApp, security: Security):
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.check(request)
        if refusal is not None:
            await refusal(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def check(self, request: Request) -> Response | None:
        sec = self.security
        host = _host_name(request.headers.get("host", ""))
        if not sec.listen and host not in LOOPBACK_NAMES:
            return _error(403, f"host {host!r} is not allowed: this server answers on 127.0.0.1 only"
                               " (start it with --listen to use it from other machines)")
        if request.method in WRITE_METHODS:
            origin = request.headers.get("origin")
            if origin and origin != "null":
                if urlsplit(origin).netloc != request.headers.get("host", ""):
                    return _error(403, f"cross-origin request from {origin} refused: only pages served by"
                                       " Darkroom itself may send requests to it")
            elif origin == "null" or request.headers.get("sec-fetch-site") == "cross-site":
                return _error(403, "cross-origin request refused: only pages served by Darkroom may send requests")
        if sec.required:
            token = request.query_params.get("token")
            if token and sec.token and _same(token, sec.token) and request.method in ("GET", "HEAD"):
                # the link printed at start: trade the token for a cookie, and drop it from the address bar
                response = RedirectResponse(request.url.path or "/", status_code=303, headers=HEADERS)
                response.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=30 * 86400)
                return response
            if not sec.credentials_ok(request):
                message = ("access token required: open the address printed by `darkroom serve` (it ends in"
                           " ?token=...), or send it as 'Authorization: Bearer <token>'")
                if request.url.path.startswith("/v1"):  # the OpenAI clients read error.message
                    return JSONResponse({"error": {"message": message, "type": "authentication_error", "param": None,
                                                   "code": "invalid_api_key"}}, status_code=401, headers=HEADERS)
                if request.url.path.startswith(("/api", "/sdapi")):
                    return _error(401, message, **({"www-authenticate": 'Basic realm="darkroom"'}
                                                   if request.url.path.startswith("/sdapi") else {}))
                return PlainTextResponse(message, status_code=401, headers=HEADERS)
        return None
