"""Proof of offline operation (`darkroom doctor --prove-offline`); the readiness checks are in
`darkroom.offline.readiness`.

`prove_offline(home)` shows it instead: it starts a child process (`python -m darkroom.offline.proof`)
inside a network namespace with nothing but loopback (`unshare -n`, where the OS allows it;
elsewhere the same child with only the in-process guard, and the report says so). The child
installs an audit hook (`sys.addaudithook`) that records every socket connect, send, bind and
name lookup and every file opened, then (1) generates an image with the default model and
(2) runs the web server on loopback, loads the UI page, POSTs a job to `/api/jobs` and fetches
the image. The report lists outbound attempts (must be none), loopback traffic, the files
opened outside Darkroom's folders and the Python installation, and the time each part took.

Test-only hook: `DARKROOM_PROVE_TEST_CONNECT=HOST:PORT[,raw:HOST:PORT...]` makes the child
attempt those outbound connections (`raw:` bypasses the in-process guard, so only the audit
hook and the namespace stand in the way), to prove that attempts are caught and reported.
It exists for tests/test_prove.py; nothing else sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import darkroom
from darkroom.errors import DarkroomError
from darkroom.home import Home
from darkroom.humanize import human_size
from darkroom.offline import guard as offline
from darkroom.offline.proof_files import Roots, summarize_files
from darkroom.offline.readiness import proof_dir

PARTS = ("generation", "server")
TEST_CONNECT_ENV = "DARKROOM_PROVE_TEST_CONNECT"
PROMPT = "a lighthouse on a cliff at dusk"
MAX_SIDE = 256  # the proof shows that generation works, not how well: keep it quick on a CPU


# --- the child: audit hook, generation, server round trip -------------------------------------

NET_EVENTS = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind", "socket.getaddrinfo",
              "socket.gethostbyname", "socket.gethostbyaddr"}
FILE_EVENTS = {"open", "sqlite3.connect", "ctypes.dlopen"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _destination(event: str, args: tuple) -> tuple[str, int | None]:
    """(host, port) an event is aimed at; local-only addresses (AF_UNIX, netlink) come back as loopback."""
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
        host = args[0]
        host = host.decode(errors="replace") if isinstance(host, bytes) else host
        port = args[1] if event == "socket.getaddrinfo" and len(args) > 1 else None
        port = int(port) if isinstance(port, int) or (isinstance(port, str) and port.isdigit()) else None
        return ("" if host is None else str(host)), port
    address = args[1] if len(args) > 1 else None
    if isinstance(address, tuple) and address and isinstance(address[0], str):
        port = address[1] if len(address) > 1 and isinstance(address[1], int) else None
        return address[0], port
    return "localhost", None  # AF_UNIX paths, abstract sockets, netlink: never leave the machine


class AuditRecorder:
    """An audit hook that records network events and opened files (cheaply: classified afterwards)."""

    def __init__(self):
        self.active = True
        self.net: list[tuple[str, str, int | None, str]] = []  # (event, host, port, thread)
        self.opened: dict[str, str] = {}  # path -> "read" or "write"
        self.hook_errors = 0

    def install(self) -> AuditRecorder:
        sys.addaudithook(self._hook)
        return self

    def _hook(self, event: str, args: tuple) -> None:
        if not self.active or (event not in NET_EVENTS and event not in FILE_EVENTS):
            return
        try:
            if event in NET_EVENTS:
                import threading

                host, port = _destination(event, args)
                self.net.append((event, host, port, threading.current_thread().name))
            else:
                self._file(event, args)
        except Exception:  # an audit hook that raises would break the operation it watches
            self.hook_errors += 1

    def _file(self, event: str, args: tuple) -> None:
        target = args[0] if args else None
        if target is None or isinstance(target, int):
            return  # an already-open descriptor, or an in-memory database
        target = os.fsdecode(os.fspath(target))
        if event == "sqlite3.connect" and (target == ":memory:" or target.startswith("file:")):
            return
        if event == "ctypes.dlopen" and os.sep not in target:
            return  # a bare library name: the mapped file is listed from /proc/self/maps at the end
        how = "read"
        if event == "open":
            mode, flags = (args[1] if len(args) > 1 else None), (args[2] if len(args) > 2 else 0)
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int)
                                                                               and flags & _WRITE_FLAGS):
                how = "write"
        elif event == "sqlite3.connect":
            how = "write"
        path = os.path.normpath(os.path.abspath(target))
        if self.opened.get(path) != "write":
            self.opened[path] = how

    def add_mapped_files(self) -> None:
        """Files mapped into the process (shared libraries, native-code mmaps) that no open event showed."""
        was, self.active = self.active, False
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].startswith("/") and not parts[5].startswith("/memfd:"):
                        path = parts[5].strip()
                        if os.path.exists(path):
                            self.opened.setdefault(path, "read")
        except OSError:
            pass  # not Linux: no maps to add
        finally:
            self.active = was


def _bring_up_loopback() -> None:
    """A fresh network namespace has only `lo`, and it is down: bring it up (SIOCGIFFLAGS/SIOCSIFFLAGS)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))


def _interfaces() -> list[str]:
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return []


def _test_connections(spec: str) -> list[dict]:
    """Test-only (see the module docstring): attempt the outbound connections named in `spec`."""
    import _socket

    results = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        raw = item.startswith("raw:")
        host, _, port = item.removeprefix("raw:").rpartition(":")
        try:
            if raw:  # straight to the C method: the in-process guard never sees it
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.settimeout(2)
                    _socket.socket.connect(s, (host, int(port)))
            else:
                socket.create_connection((host, int(port)), timeout=2).close()
            outcome = "connected"
        except OSError as e:
            outcome = f"{type(e).__name__}: {e}"
        results.append({"target": item, "outcome": outcome})
    return results


def _native_side(library, path: Path) -> int:
    entry = library.describe(path)
    native = library.native_size(entry) or 512
    return max(64, min(native, MAX_SIDE) // 8 * 8)


def _http(opener, method: str, url: str, body: dict | None = None) -> tuple[int, bytes]:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json"} if data else {})
    with opener.open(req, timeout=60) as r:
        return r.status, r.read()


def _server_round_trip(studio, request: dict, out: Path) -> dict:
    """Serve the app on loopback, load the UI page, POST a job, wait, fetch its image."""
    import threading
    import urllib.request

    import uvicorn

    from darkroom.server.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(studio), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="proof-server", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy, whatever the env says
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the server did not start on loopback")
            time.sleep(0.05)
        status, page = _http(opener, "GET", url + "/")
        if status != 200 or b"<html" not in page.lower():
            raise RuntimeError(f"GET / answered {status} without the UI page")
        status, body = _http(opener, "POST", url + "/api/jobs", request)
        job = json.loads(body)["job"]
        deadline = time.monotonic() + 600
        while True:
            state = json.loads(_http(opener, "GET", f"{url}/api/jobs/{job['id']}")[1])
            if state["state"] in ("done", "error", "interrupted"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job['id']} did not finish: {state['state']}")
            time.sleep(0.1)
        if state["state"] != "done" or not state["images"]:
            raise RuntimeError(f"job {job['id']} ended {state['state']}: {state.get('error')}")
        png = _http(opener, "GET", url + state["images"][0]["url"])[1]
        if png[:8] != b"\x89PNG\r\n\x1a\n":
            raise RuntimeError("the fetched image is not a PNG")
        out.write_bytes(png)
        return {"url": url, "ui_page_bytes": len(page), "job": job["id"], "job_state": state["state"],
                "png": str(out), "png_bytes": len(png)}
    finally:
        server.should_exit = True
        thread.join(15)


def _setup(args, home: Home, out: Path, report: dict):
    """The Studio the proof runs on, and the request it sends (the default model, small and quick)."""
    import sqlite3

    from darkroom.api import build_engine
    from darkroom.request import GenerationRequest
    from darkroom.services.studio import build_studio
    from darkroom.settings import Settings

    # the model a request without one would use in this home (`darkroom generate` picks the same)
    selected = args.model or Settings(home.root / "settings.json").get("current_model")
    model_path = build_engine(home, device="cpu").model_path(GenerationRequest(model=selected))
    report["model"] = str(model_path)
    # the server runs on a scratch home (its history and settings are not the user's) that
    # sees the user's model folders in place and reuses their hash cache
    scratch = Home(out / "server-home", extra_model_dirs=[*home.checkpoint_dirs(), home.builtin]).ensure()
    if home.cache_db.is_file():
        with sqlite3.connect(home.cache_db) as src, sqlite3.connect(scratch.cache_db) as dst:
            src.backup(dst)
    studio = build_studio(scratch, device=args.device, precision=args.precision)
    side = _native_side(studio.engine.library, model_path)
    return studio, {"prompt": PROMPT, "steps": args.steps, "width": side, "height": side, "seed": 1,
                    "sampler": "Euler", "model": str(model_path)}


def _generation(studio, request: dict, out: Path, report: dict) -> dict:
    """Part 1: the library call `darkroom generate` makes, PNG written to `out`."""
    from darkroom.request import GenerationRequest

    result = studio.engine.generate(GenerationRequest(**request), output_dir=out)
    report["png"] = result.images[0].path
    return {"png": report["png"], "steps": request["steps"], "size": f"{request['width']}x{request['height']}",
            "model": result.model_name}



def _part(report: dict, name: str, fn) -> None:
    import traceback

    start = time.perf_counter()
    try:
        report["parts"][name] = {"ok": True, **fn()}
    except Exception as e:  # reported, not raised: the proof reports what it could not do
        traceback.print_exc()
        report["parts"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    report["parts"][name]["seconds"] = round(time.perf_counter() - start, 2)


def child_main(argv: list[str] | None = None) -> int:
    """`python -m darkroom.offline.proof ...`: the proof run itself (started by `prove_offline`)."""
    start = time.perf_counter()
    recorder = AuditRecorder().install()  # first: everything from here on is seen
    p = argparse.ArgumentParser(prog="python -m darkroom.offline.proof", description=__doc__.split("\n\n")[0])
    p.add_argument("--home", required=True, type=Path)
    p.add_argument("--models-dir", action="append", default=[], type=Path)
    p.add_argument("--model", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--isolation", choices=("namespace", "guard"), default="guard")
    p.add_argument("--report", required=True, type=Path)
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]

    home = Home(args.home.resolve(), extra_model_dirs=[d.resolve() for d in args.models_dir])
    out = args.report.parent
    offline.process_guard(home.network_log)
    report: dict = {"pid": os.getpid(), "interfaces": [], "parts": {}, "model": None, "png": None, "notes": []}
    if args.isolation == "namespace":
        try:
            _bring_up_loopback()
        except OSError as e:
            report["notes"].append(f"could not bring up loopback in the namespace: {e}")
    report["interfaces"] = _interfaces()

    if os.environ.get(TEST_CONNECT_ENV):
        report["test_connections"] = _test_connections(os.environ[TEST_CONNECT_ENV])

    studio, request = None, {}
    if parts:
        try:
            studio, request = _setup(args, home, out, report)
        except Exception as e:  # e.g. --model names nothing: reported, and no part runs
            import traceback

            if not isinstance(e, DarkroomError):
                traceback.print_exc()
            report["error"] = f"{type(e).__name__}: {e}"
            parts = []
    report["timings"] = {"start-up": round(time.perf_counter() - start, 2)}

    try:
        if "generation" in parts:
            _part(report, "generation", lambda: _generation(studio, request, out / "generation", report))
        if "server" in parts:
            _part(report, "server", lambda: _server_round_trip(studio, {**request, "seed": 2}, out / "server-job.png"))
    finally:
        if studio is not None:
            studio.close()
    for name, part in report["parts"].items():
        report["timings"][name] = part["seconds"]

    recorder.add_mapped_files()
    recorder.active = False
    guard_attempts = [asdict(a) for a in offline.process_guard().attempts]
    report.update(_network_summary(recorder.net, guard_attempts))
    roots = Roots.current([home.root, *home.checkpoint_dirs(), home.builtin])
    report["files"] = summarize_files(recorder.opened, roots)
    report["hook_errors"] = recorder.hook_errors
    report["notes"].append("files opened by native code (safetensors, tokenizers) raise no audit event; those still"
                           " mapped at the end are listed from /proc/self/maps")
    args.report.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return exit_code(report)


def _network_summary(events: list[tuple[str, str, int | None, str]], guard_attempts: list[dict]) -> dict:
    outbound: dict[str, dict] = {}
    loopback: dict[str, int] = {}
    for event, host, port, thread in events:
        if offline._is_local(host):  # also "" (any port on this host for a bind; no host for a lookup)
            loopback[event] = loopback.get(event, 0) + 1
            continue
        key = f"{host}:{port}" if port is not None else host
        dest = outbound.setdefault(key, {"host": host, "port": port, "events": []})
        dest["events"].append({"event": event, "thread": thread, "seen_by": "audit hook"})
    for a in guard_attempts:
        key = f"{a['host']}:{a['port']}" if a["port"] is not None else a["host"]
        dest = outbound.setdefault(key, {"host": a["host"], "port": a["port"], "events": []})
        dest["events"].append({"event": "blocked by the network guard", "caller": a["caller"], "seen_by": "guard"})
    return {"outbound": list(outbound.values()), "loopback": {"count": sum(loopback.values()), "events": loopback}}


# --- the parent: start the child with no network, read its report ----------------------------


def namespace_command() -> tuple[list[str] | None, str]:
    """The command prefix that runs a child in a network namespace of its own, or None and why not.

    `unshare -n` needs root; elsewhere `unshare -rn` (a user namespace mapping the user to root)
    works where the kernel allows unprivileged user namespaces.
    """
    if not sys.platform.startswith("linux"):
        return None, f"no network namespaces on {sys.platform}"
    if shutil.which("unshare") is None:
        return None, "the unshare command is not installed (util-linux)"
    reason = ""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        try:
            p = subprocess.run([*prefix, "true"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"unshare failed: {e}"
        if p.returncode == 0:
            return prefix, f"network namespace ({' '.join(prefix)})"
        reason = (p.stderr.strip() or "no reason given")[:120]
    return None, f"unshare -n is not permitted here ({reason})"


def namespace_available() -> tuple[bool, str]:
    """Whether the proof can run in a network namespace here, and how (or why not)."""
    prefix, why = namespace_command()
    return prefix is not None, why


def prove_offline(home: Home, *, model: str | None = None, device: str | None = None, precision: str | None = None,
                  steps: int = 4, parts: tuple[str, ...] = PARTS, isolation: str = "auto", timeout: float = 1800,
                  env: dict[str, str] | None = None) -> dict:
    """Run the proof in a child with no network; `isolation`: auto, namespace or guard."""
    started = time.perf_counter()
    prefix, why = namespace_command()
    ns_ok = prefix is not None
    if isolation == "auto":
        isolation = "namespace" if ns_ok else "guard"
    elif isolation == "namespace" and not ns_ok:
        raise DarkroomError(f"cannot prove inside a network namespace: {why}")
    out = proof_dir(home)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (out / "generation", out / "server-home"):
        shutil.rmtree(stale, ignore_errors=True)
    (out / "server-job.png").unlink(missing_ok=True)
    child_report = out / f".report-{os.getpid()}.json"
    child_report.unlink(missing_ok=True)

    cmd = [sys.executable, "-m", "darkroom.offline.proof", "--home", str(home.root), "--steps", str(steps),
           "--parts", ",".join(parts), "--isolation", isolation, "--report", str(child_report)]
    for d in home.extra_model_dirs:
        cmd += ["--models-dir", str(d)]
    for flag, value in (("--model", model), ("--device", device), ("--precision", precision)):
        if value:
            cmd += [flag, value]
    if isolation == "namespace":
        cmd = [*prefix, *cmd]
    pkg_parent = str(Path(darkroom.__file__).resolve().parent.parent)
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, child_env.get("PYTHONPATH")]))

    mode = (f"{why}: the child had no network but loopback" if isolation == "namespace"
            else f"in-process guard only ({'chosen' if ns_ok else why}): the child could reach the network had the"
            " guard let it")
    report: dict = {}
    rc, stderr = None, ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env, timeout=timeout)
        rc, stderr = proc.returncode, proc.stdout + proc.stderr
        if child_report.is_file():
            report = json.loads(child_report.read_text(encoding="utf-8"))
    except subprocess.TimeoutExpired as e:
        stderr = f"timed out after {timeout:.0f} s\n" + (e.stderr or b"").decode(errors="replace")[-4000:]
    finally:
        child_report.unlink(missing_ok=True)
        shutil.rmtree(out / "server-home", ignore_errors=True)
    if not report:
        report = {"error": f"the proof child ended (exit {rc}) without a report", "parts": {}, "outbound": [],
                  "loopback": {"count": 0, "events": {}}, "files": None, "timings": {}, "notes": []}
    report["isolation"] = {"mode": isolation, "description": mode}
    report["command"] = cmd
    report["child_exit"] = rc
    report["requested_parts"] = list(parts)
    report["timings"]["total"] = round(time.perf_counter() - started, 2)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    missing = [p for p in parts if not report["parts"].get(p, {}).get("ok")]
    if missing or rc not in (0, 1):
        report["stderr_tail"] = stderr[-4000:]
    report["ok"] = not report["outbound"] and not missing and rc == 0
    (out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def exit_code(report: dict) -> int:
    """0: proven offline; 1: an outbound attempt was seen; 2: no attempt, but a part did not complete."""
    if report.get("outbound"):
        return 1
    wanted = report.get("requested_parts", list(report.get("parts", {})))
    if report.get("error") or any(not report.get("parts", {}).get(p, {}).get("ok") for p in wanted):
        return 2
    return 0


def render_proof(report: dict) -> str:
    code = exit_code(report)
    verdict = {0: "PASSED: no outbound connection was attempted",
               1: f"FAILED: {len(report['outbound'])} outbound destination(s) attempted",
               2: "INCOMPLETE: no outbound attempt, but not every part ran"}[code]
    lines = [f"Offline proof {verdict}",
             f"Isolation: {report['isolation']['description']}"
             + (f" (interfaces: {', '.join(report['interfaces'])})" if report.get("interfaces") else "")]
    if report.get("model"):
        lines.append(f"Model: {report['model']}")
    for n, name in enumerate(report.get("requested_parts", []), 1):
        part = report["parts"].get(name)
        title = {"generation": "Generation", "server": "Server round trip"}.get(name, name)
        if part is None:
            lines.append(f"{n}. {title}: did not run")
        elif not part["ok"]:
            lines.append(f"{n}. {title}: FAILED in {part['seconds']} s: {part['error']}")
        elif name == "generation":
            lines.append(f"{n}. {title}: OK in {part['seconds']} s ({part['steps']} steps, {part['size']})"
                         f" -> {part['png']}")
        else:
            page = human_size(part["ui_page_bytes"])
            lines.append(f"{n}. {title}: OK in {part['seconds']} s: GET / (UI page, {page}),"
                         f" POST /api/jobs -> {part['job_state']}, image fetched ({human_size(part['png_bytes'])})"
                         f" -> {part['png']}")
    if report.get("error"):
        lines.append(f"Error: {report['error']}")
    for t in report.get("test_connections", []):
        lines.append(f"Test-only connection to {t['target']}: {t['outcome']}")
    loop = report["loopback"]
    ev = ", ".join(f"{k.removeprefix('socket.')} {v}" for k, v in sorted(loop["events"].items()))
    lines.append(f"Outbound connection attempts: {len(report['outbound'])}; loopback: {loop['count']}"
                 + (f" ({ev})" if ev else ""))
    for dest in report["outbound"]:
        where = f"{dest['host']}:{dest['port']}" if dest["port"] is not None else dest["host"]
        seen = "; ".join(e["event"] + (f" from {e['caller']}" if e.get("caller") else "") for e in dest["events"])
        lines.append(f"  ! {where}: {seen}")
    files = report.get("files")
    if files:
        c = files["counts"]
        groups = ", ".join(f"{g} {n}" for g, n in sorted(files["system_groups"].items()))
        lines.append(f"Files opened: {c['darkroom']} in Darkroom's folders, {c['python']} in the Python installation,"
                     f" {c['system']} system ({groups or 'none'}), {c['other']} elsewhere"
                     + (":" if c["other"] else ""))
        for folder, items in sorted(files["other"].items()):
            names = ", ".join(Path(i["path"]).name + (" (written)" if i["how"] == "write" else "")
                              + ("" if i.get("exists", True) else " (not found)") for i in items)
            lines.append(f"  {folder}/: {names}")
    lines += [f"Note: {n}" for n in report.get("notes", [])]
    t = report.get("timings", {})
    lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()))
    if report.get("png"):
        lines.append(f"Image: {report['png']}")
    if report.get("stderr_tail") and code:
        lines.append("Child output (last lines):")
        lines += ["  " + line for line in report["stderr_tail"].strip().splitlines()[-15:]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(child_main())
