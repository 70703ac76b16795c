"""`darkroom serve`: build the Studio, check the port, print where to go, run uvicorn."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable

from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.home import Home

log = logging.getLogger("darkroom.server")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Refuse a port out of range, in use or not ours to take, before anything is loaded."""
    if not 1 <= port <= 65535:
        raise InvalidRequest(f"port {port} is out of range: use 1-65535 (7860 is the usual one)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise DarkroomError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                                hint=f"is another web UI running? try --port {port + 1}",
                                code="DR-CANNOT-LISTEN") from None


def serve(home: Home, *, port: int = 7860, listen: bool = False, host: str | None = None, token: str | None = None,
          api_auth: str | None = None, max_queue: int = 100, device: str | None = None, precision: str | None = None,
          allow_pickle: bool = False, vram: str | None = None, fp8: bool = False,
          echo: Callable[[str], None] = print) -> None:
    import uvicorn

    from darkroom.server.app import create_app
    from darkroom.server.security import Security
    from darkroom.services.studio import build_studio

    host = host or ("0.0.0.0" if listen else "127.0.0.1")
    beyond_loopback = not _is_loopback(host)
    security = Security.for_serve(listen=beyond_loopback, token=token, api_auth=api_auth)
    _check_port(host, port)
    studio = build_studio(home, device=device, precision=precision, allow_pickle=allow_pickle, max_queue=max_queue,
                          vram=vram, fp8=fp8)
    app = create_app(studio, security)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/"
    echo(f"Darkroom {studio.engine.cache.device.device} · {studio.history.count()} images in history"
         f" · model: {studio.current_model() or 'none'}")
    if security.token:
        echo(f"Open {url}?token={security.token}")
        echo("(the token is required from every client; API clients send it as 'Authorization: Bearer <token>')")
    else:
        echo(f"Open {url}")
    if beyond_loopback:
        echo(f"Listening on {host}:{port}: other machines on your network can reach this server with the token.")
    echo("Press Ctrl+C to stop.")
    log.info("serving on %s:%d (token %s)", host, port, "on" if security.required else "off")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", access_log=False)
    try:
        uvicorn.Server(config).run()
    finally:
        studio.close()
