"""Offline by construction: the Hugging Face stack set offline, and a network guard.

`configure_environment()` runs when the package is imported, before diffusers or
transformers are, so that neither ever tries the hub. `NetworkGuard` refuses every
outbound connection to a non-loopback address and records who tried, where and when, in
memory and (when given a log file) in a JSON-lines file that `darkroom doctor` shows.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import os
import socket
import sys
import sysconfig
import threading
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
}


def configure_environment() -> None:
    """Force every offline switch of the Hugging Face stack (overriding user values)."""
    os.environ.update(OFFLINE_ENV)


class NetworkBlocked(ConnectionRefusedError):
    """Raised instead of connecting: Darkroom never talks to the outside world."""


@dataclass
class Attempt:
    when: str
    host: str
    port: int | None
    caller: str


def _is_local(host: str) -> bool:
    if host in ("localhost", "", "::1") or host.startswith("/"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost would need DNS: outside


class NetworkGuard:
    """Patches the socket layer so non-loopback connections fail and are recorded."""

    def __init__(self, log_file: Path | None = None):
        self.log_file = log_file
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._saved: dict[str, object] = {}
        self._warned = False

    def _warn_once(self, message: str) -> None:
        """A log that cannot be written (read-only home, full disk) is said once on stderr, never raised."""
        if not self._warned:
            self._warned = True
            print(f"warning: {message}", file=sys.stderr)

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def _record(self, host: str, port: int | None) -> None:
        # the innermost frame that is neither this module nor the standard library's
        # socket/http plumbing: the code that actually wanted the network
        stdlib = sysconfig.get_paths()["stdlib"]
        stack = [f for f in traceback.extract_stack()[:-2]
                 if f.filename != __file__ and not f.filename.startswith(stdlib)]
        caller = f"{stack[-1].filename}:{stack[-1].lineno}" if stack else "?"
        attempt = Attempt(_dt.datetime.now().isoformat(timespec="seconds"), host, port, caller)
        with self._lock:
            self.attempts.append(attempt)
            if self.log_file is not None:
                try:
                    self.log_file.parent.mkdir(parents=True, exist_ok=True)
                    with open(self.log_file, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(asdict(attempt)) + "\n")
                except OSError as e:  # the refusal matters more than the record; the in-memory one stays
                    self._warn_once(f"cannot record blocked connections in {self.log_file}"
                                    f" ({e.strerror or e}); they are still refused")
        raise NetworkBlocked(
            f"Darkroom blocked an outbound connection to {host}:{port} (from {caller}). "
            "Darkroom never uses the network; this attempt was recorded for `darkroom doctor`."
        )

    def _check(self, address) -> None:
        if isinstance(address, tuple) and address:
            host, port = str(address[0]), (address[1] if len(address) > 1 else None)
            if not _is_local(host):
                self._record(host, port)

    def install(self) -> NetworkGuard:
        if self.installed:
            return self
        guard = self
        orig_connect = socket.socket.connect
        orig_connect_ex = socket.socket.connect_ex
        orig_getaddrinfo = socket.getaddrinfo

        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                guard._check(address)
            return orig_connect(sock, address)

        def connect_ex(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                guard._check(address)
            return orig_connect_ex(sock, address)

        def getaddrinfo(host, port, *args, **kwargs):
            name = host.decode() if isinstance(host, bytes) else host
            if name is not None and not _is_local(str(name)):
                try:
                    ipaddress.ip_address(str(name))
                except ValueError:  # a DNS lookup of an outside name is itself a leak
                    guard._record(str(name), port)
            return orig_getaddrinfo(host, port, *args, **kwargs)

        self._saved = {"connect": orig_connect, "connect_ex": orig_connect_ex, "gai": orig_getaddrinfo}
        socket.socket.connect = connect
        socket.socket.connect_ex = connect_ex
        socket.getaddrinfo = getaddrinfo
        return self

    def uninstall(self) -> None:
        if not self.installed:
            return
        socket.socket.connect = self._saved["connect"]
        socket.socket.connect_ex = self._saved["connect_ex"]
        socket.getaddrinfo = self._saved["gai"]
        self._saved = {}


def read_log(log_file: Path) -> list[Attempt]:
    """The attempts recorded in a guard log file (empty when all is well)."""
    if not log_file.exists():
        return []
    out = []
    for line in log_file.read_text(encoding="utf-8").splitlines():
        try:
            out.append(Attempt(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return out


_PROCESS_GUARD = NetworkGuard()  # the socket module is process-wide, so its guard is too


def process_guard(log_file: Path | None = None) -> NetworkGuard:
    """Install (once) and return the process's guard; a given log file is used from now on."""
    if log_file is not None:
        _PROCESS_GUARD.log_file = log_file
    return _PROCESS_GUARD.install()
