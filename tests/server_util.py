"""Helpers for server tests: a Studio over a tiny model, an in-process client, a real server on a socket."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi.testclient import TestClient

from darkroom.home import Home
from darkroom.server.app import create_app
from darkroom.server.security import Security
from darkroom.services.studio import Studio, build_studio

BASE = "http://127.0.0.1:7860"
# fast enough for every test: the tiny sd1 model at 64x64
HANG_GUARD = 600.0  # seconds: waits end on a state; this only stops a hang, however loaded the machine
FAST = {"steps": 3, "width": 64, "height": 64, "sampler": "Euler"}


def studio_with(home: Home, *models: Path, start: bool = True, max_queue: int = 100) -> Studio:
    """A Studio over `home` with copies of `models` in its checkpoints folder (CPU, fp32)."""
    home.ensure()
    for m in models:
        shutil.copy(m, home.checkpoints / m.name)
    studio = build_studio(home, device="cpu", precision="fp32", start=start, max_queue=max_queue)
    if studio.hash_thread is not None:
        studio.hash_thread.join(HANG_GUARD)  # tests expect hashes listed; users see them appear
    return studio


def client(studio: Studio, security: Security | None = None, **kw) -> TestClient:
    """An httpx-based in-process client; Host 127.0.0.1:7860 as a browser on this machine sends."""
    return TestClient(create_app(studio, security), base_url=BASE, **kw)


def wait_job(c, job_id: str, timeout: float = HANG_GUARD) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = c.get(f"/api/jobs/{job_id}").json()
        if state["state"] in ("done", "error", "interrupted"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s: {state}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(studio: Studio, security: Security | None = None):
    """A real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(studio, security), host="127.0.0.1", port=port, log_level="warning",
                            lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + HANG_GUARD
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(HANG_GUARD)


def get_json(url: str, **kw) -> dict:
    r = httpx.get(url, timeout=30, **kw)
    r.raise_for_status()
    return r.json()
