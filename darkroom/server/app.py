"""The FastAPI application: routes from the interface modules over one Studio, one error shape.

Swagger UI and ReDoc are off (they load scripts from a CDN); the OpenAPI schema itself is
served locally at /api/openapi.json.
"""

from __future__ import annotations

import logging
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import darkroom
from darkroom.errors import DarkroomError
from darkroom.server.common import validation_message
from darkroom.server.security import Security, SecurityMiddleware
from darkroom.services.studio import Studio

log = logging.getLogger("darkroom.server")


def error_response(status: int, message: str, code: str) -> JSONResponse:
    # "error" for our UI and the OpenAI-style clients, "detail" as FastAPI/the webui answer, "code" the
    # DR-... name of its troubleshooting page (/docs/errors/CODE, `darkroom help CODE`)
    return JSONResponse({"error": message, "detail": message, "code": code}, status_code=status)


def http_code(status: int) -> str:
    """The DR-... code of FastAPI's own errors (no such route, a body that is not JSON)."""
    return "DR-NO-SUCH-ROUTE" if status in (404, 405) else "DR-INTERNAL" if status >= 500 else "DR-INVALID-REQUEST"


def create_app(studio: Studio, security: Security | None = None) -> FastAPI:
    from darkroom.server import (
        a1111,
        a1111_controlnet,
        a1111_extras,
        a1111_info,
        docs,
        native,
        native_controlnet,
        native_library,
        openai_api,
    )

    app = FastAPI(title="Darkroom", version=darkroom.__version__, docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.studio = studio

    @app.exception_handler(DarkroomError)
    async def _darkroom_error(request: Request, exc: DarkroomError):
        return error_response(exc.status, str(exc), exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, validation_message(exc.errors()), "DR-INVALID-REQUEST")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/v1/"):  # no such route or method: said in the OpenAI clients' shape
            return openai_api.openai_error(exc.status_code, str(exc.detail), code=http_code(exc.status_code))
        return error_response(exc.status_code, str(exc.detail), http_code(exc.status_code))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__} (details in logs/darkroom.log)",
                              "DR-INTERNAL")

    app.include_router(native.router)
    app.include_router(native_library.router)  # models folders, import, files in the wrong folder
    app.include_router(native_controlnet.router)  # ControlNet models, preprocessors, detected maps
    app.include_router(a1111.router)
    app.include_router(a1111_info.router)  # hypernetworks, face restorers, scripts, extensions, ...
    app.include_router(a1111_extras.router)
    app.include_router(a1111_controlnet.router)  # the sd-webui-controlnet extension's /controlnet routes
    app.include_router(openai_api.router)
    app.include_router(docs.router)  # /docs: the help pages, README and references, rendered locally

    static = resources.files("darkroom.server") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(str(static / "index.html"), headers={"cache-control": "no-cache"})

    app.add_middleware(SecurityMiddleware, security=security or Security())
    return app
