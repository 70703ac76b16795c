"""The network guard refuses and records outbound connections; loopback still works."""

import json
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

import darkroom  # noqa: F401  (sets the HF stack offline and installs the guard)
from darkroom.offline import guard as offline


def test_import_sets_hf_stack_offline():
    import os

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        assert os.environ[key] == "1"
    assert offline.process_guard().installed


def test_outbound_connection_refused_and_recorded(tmp_path):
    guard = offline.NetworkGuard(tmp_path / "net.jsonl").install()
    try:
        guard.uninstall()  # install our own fresh guard on top of the process one
        guard.install()
        with pytest.raises(offline.NetworkBlocked, match="blocked an outbound connection to 203.0.113.7:443"):
            socket.create_connection(("203.0.113.7", 443), timeout=1)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen("http://198.51.100.1/", timeout=1)
    finally:
        guard.uninstall()
    hosts = [a.host for a in offline.read_log(tmp_path / "net.jsonl")]
    assert hosts == ["203.0.113.7", "198.51.100.1"]
    assert all(a.caller.startswith(__file__) for a in guard.attempts), guard.attempts


def test_dns_lookup_of_outside_name_is_refused():
    with pytest.raises(offline.NetworkBlocked, match="huggingface.co"):
        socket.getaddrinfo("huggingface.co", 443)
    assert offline.process_guard().attempts[-1].host == "huggingface.co"


def test_loopback_is_allowed():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepter = threading.Thread(target=lambda: srv.accept()[0].close(), daemon=True)
    accepter.start()
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    accepter.join(5)  # closing the listener under a pending accept() raises in that thread
    srv.close()


def test_hub_request_in_child_process_is_blocked():
    """Even code that asks the hub directly gets nowhere: offline switches plus the guard."""
    code = (
        "import darkroom, json\n"
        "from huggingface_hub import HfApi\n"
        "try:\n"
        "    HfApi().model_info('runwayml/stable-diffusion-v1-5')\n"
        "    print(json.dumps('reached the hub'))\n"
        "except Exception as e:\n"
        "    print(json.dumps(type(e).__name__))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) != "reached the hub", out.stderr
