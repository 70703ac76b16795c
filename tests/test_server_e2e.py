"""The server as users run it: many clients at once, a kill mid-job, and no network at all."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.server_util import FAST, HANG_GUARD, free_port, live_server

ROOT = Path(__file__).resolve().parents[1]


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


def _wait(url: str, job_id: str, timeout: float = HANG_GUARD) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{url}/api/jobs/{job_id}", timeout=HANG_GUARD).json()
        if state["state"] in ("done", "error", "interrupted"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} unfinished: {state}")


@pytest.mark.slow
def test_concurrent_clients(studio):
    """4 clients x 5 requests over real sockets: every job completes, in order, and is in the history."""
    results: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    with live_server(studio) as url:
        def client_run(n: int) -> None:
            try:
                with httpx.Client(base_url=url, timeout=HANG_GUARD) as c:
                    jobs = []
                    for i in range(5):
                        r = c.post("/api/jobs", json={"prompt": f"client {n} request {i}", **FAST,
                                                      "seed": 1000 * n + i})
                        assert r.status_code == 202, r.text
                        jobs.append(r.json()["job"]["id"])
                    results[n] = [_wait(url, j) for j in jobs]
            except BaseException as e:  # reported below; a thread's exception is otherwise lost
                errors.append(e)

        threads = [threading.Thread(target=client_run, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG_GUARD)
        assert not errors, errors
        history = httpx.get(f"{url}/api/history", params={"per_page": 100}).json()
    states = [s for per_client in results.values() for s in per_client]
    assert len(states) == 20 and all(s["state"] == "done" for s in states)
    assert history["total"] == 20
    assert {i["seed"] for i in history["items"]} == {1000 * n + i for n in range(4) for i in range(5)}
    assert {i["prompt"] for i in history["items"]} == {f"client {n} request {i}" for n in range(4) for i in range(5)}
    # one queue: each client's own jobs ran in the order it sent them
    for per_client in results.values():
        ids = [s["images"][0]["history_id"] for s in per_client]
        assert ids == sorted(ids)


def _serve(home: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "darkroom.cli", "--home", str(home), "serve", "--port", str(port), "--device", "cpu",
         "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            httpx.get(f"{url}/api/status", timeout=2)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("server did not come up")


@pytest.mark.slow
def test_killed_mid_job_loses_nothing_finished(tmp_path, tiny_model):
    home = tmp_path / "home"
    (home / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_model("sd1")["path"], home / "models" / "checkpoints")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _serve(home, port)
    try:
        _wait_up(url, proc)
        job = httpx.post(f"{url}/api/jobs", json={"prompt": "survivor", **FAST, "steps": 40, "n_iter": 50,
                                                  "seed": 7}, timeout=HANG_GUARD).json()["job"]
        deadline = time.monotonic() + HANG_GUARD
        while len(httpx.get(f"{url}/api/jobs/{job['id']}", timeout=HANG_GUARD).json()["images"]) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no chance to clean up
        proc.wait(HANG_GUARD)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = sorted(p for p in (home / "outputs").rglob("*.png") if not p.name.startswith("."))
    assert 3 <= len(finished) < 50
    for p in finished:
        Image.open(p).load()  # every finished file is whole
    proc = _serve(home, port)
    try:
        _wait_up(url, proc)
        history = httpx.get(f"{url}/api/history", params={"per_page": 100}, timeout=HANG_GUARD).json()
        assert history["total"] == len(finished)
        assert {i["seed"] for i in history["items"]} == set(range(7, 7 + len(finished)))
        for item in history["items"]:
            png = httpx.get(f"{url}{item['url']}", timeout=HANG_GUARD)
            assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (64, 64)
        # and the restarted server works
        again = httpx.post(f"{url}/api/jobs", json={"prompt": "after", **FAST}, timeout=HANG_GUARD).json()["job"]
        assert _wait(url, again["id"])["state"] == "done"
    finally:
        proc.terminate()
        proc.wait(20)


ROUND_TRIP = textwrap.dedent("""
    import fcntl, socket, struct, sys
    from pathlib import Path
    # a fresh network namespace has only a loopback interface, and it is down: bring it up
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
    fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
    import httpx
    from darkroom.home import Home
    from tests.server_util import FAST, live_server, studio_with
    studio = studio_with(Home(Path(sys.argv[1])), Path(sys.argv[2]))
    with live_server(studio) as url:
        assert "<html" in httpx.get(url + "/").text.lower()
        job = httpx.post(url + "/api/jobs", json={"prompt": "offline", **FAST}).json()["job"]
        import time
        deadline = time.monotonic() + 600  # only a hang gets near this
        while time.monotonic() < deadline:
            state = httpx.get(url + "/api/jobs/" + job["id"], timeout=600).json()
            if state["state"] != "queued" and state["state"] != "running":
                break
            time.sleep(0.05)
        assert state["state"] == "done", state
        assert httpx.get(url + state["images"][0]["url"]).content[:4] == b"\\x89PNG"
        r = httpx.post(url + "/sdapi/v1/txt2img", json={"prompt": "offline", "steps": 3, "width": 64, "height": 64,
                                                         "sampler_name": "Euler a"}, timeout=600)
        assert r.status_code == 200 and r.json()["images"], r.text
    studio.close()
    print("ROUND TRIP OK")
""")


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root, Linux)")
def test_server_round_trip_without_network(tmp_path, tiny_model):
    """UI page, a native job and an A1111 txt2img, all inside a network namespace with no way out."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", ROUND_TRIP, str(tmp_path / "home"),
                           str(tiny_model("sd1")["path"])], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=HANG_GUARD)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ROUND TRIP OK" in proc.stdout
