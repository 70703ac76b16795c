"""Proof of offline operation: `darkroom doctor` readiness checks and `doctor --prove-offline`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from darkroom.cli.doctor import doctor
from darkroom.cli.group import Context
from darkroom.offline import guard as offline
from darkroom.offline import proof as prove
from darkroom.offline import readiness
from darkroom.offline.proof_files import Roots, classify, summarize_files
from darkroom.offline.readiness import FAIL, OK, WARN


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


def invoke(home, *args):
    return CliRunner().invoke(doctor, list(args), obj=Context(home), catch_exceptions=False)


@pytest.fixture
def mixed_home(home, tiny_model):
    """A home with a good tiny SD1 checkpoint, a truncated copy of it and an SD3-shaped file."""
    src = tiny_model("sd1")["path"]
    shutil.copy(src, home.checkpoints / "good.safetensors")
    data = src.read_bytes()
    (home.checkpoints / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"model.diffusion_model.joint_blocks.0.attn.qkv.weight": torch.zeros(4, 2)},
              home.checkpoints / "sd3-medium.safetensors")
    return home


def test_readiness_checks_each_model(mixed_home):
    checks = {c.name: c for c in readiness.readiness_checks(mixed_home)}
    good = checks["model good"]
    assert good.status == OK and good.reason.startswith("SD1, ") and "configs derived from tensor shapes" in good.reason
    assert checks["model truncated"].status == FAIL
    assert "truncated.safetensors: file is truncated" in checks["model truncated"].reason
    assert checks["model sd3-medium"].status == FAIL
    assert checks["model sd3-medium"].reason == "not supported: detected SD3"
    for name in ("offline switches", "network guard", "guard record", "tokenizer", "web UI assets",
                 "first-run downloads", "model darkroom-starter"):
        assert checks[name].status == OK, checks[name]
    assert checks["default model"].reason.startswith("good (first checkpoint")
    assert checks["offline proof"].status == WARN  # never run in this home


def test_doctor_text_json_and_exit_code(mixed_home):
    r = invoke(mixed_home)
    assert r.exit_code == 1, r.output  # a FAIL line
    for text in ("Device: ", "torch ", "diffusers ", "Network guard: installed", "none (all is well)",
                 str(mixed_home.checkpoints), "FAIL  model truncated", "OK    model good", "OK    tokenizer"):
        assert text in r.output, text
    r = invoke(mixed_home, "--json")
    report = json.loads(r.stdout)
    assert report["ok"] is False and report["counts"][FAIL] == 2
    assert report["environment"]["guard_installed"] is True
    assert {c["name"]: c["status"] for c in report["checks"]}["model good"] == OK


def test_doctor_good_home_passes_and_shows_the_guard_record(home, tiny_model):
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    r = invoke(home, "--deep")
    assert r.exit_code == 0, r.output
    assert "loaded fully in" in r.output
    guard = offline.NetworkGuard(home.network_log)
    with pytest.raises(offline.NetworkBlocked):
        guard._record("203.0.113.9", 443)
    checks = {c.name: c for c in readiness.readiness_checks(home)}
    assert checks["guard record"].status == WARN and "203.0.113.9:443" in checks["guard record"].reason
    assert "Blocked outbound connection attempts: 1" in invoke(home).output


def test_classifier_sorts_opened_paths():
    roots = Roots(darkroom=("/h", "/srv/site/darkroom"), python=("/venv", "/usr/lib/python3.11"), temp=("/tmp",))
    cases = {
        "/h/models/checkpoints/x.safetensors": ("darkroom", ""),
        "/srv/site/darkroom/assets/tokenizer/vocab.json": ("darkroom", ""),
        "/venv/lib/python3.11/site-packages/torch/__init__.py": ("python", ""),
        "/usr/lib/python3.11/json/__init__.py": ("python", ""),  # the stdlib before /usr/lib
        "/usr/lib/x86_64-linux-gnu/libgomp.so.1": ("system", "system libraries"),
        "/proc/self/maps": ("system", "kernel info (/proc)"),
        "/sys/devices/system/cpu/online": ("system", "devices and CPU info (/sys)"),
        "/etc/ld.so.cache": ("system", "dynamic linker cache"),
        "/tmp/pytest-1/home/x": ("system", "temporary files"),
        "/etc/resolv.conf": ("other", "/etc"),
        "/root/.cache/huggingface/hub/models--x/config.json": ("other", "/root/.cache/huggingface/hub/models--x"),
        "/hx/not-the-home": ("other", "/hx"),
        "/h/../etc/ssl/certs/ca.pem": ("other", "/etc/ssl/certs"),
    }
    for path, expected in cases.items():
        assert classify(path, roots) == expected, path
    summary = summarize_files({p: "read" for p in cases} | {"/root/.cache/x/token": "write"}, roots)
    assert summary["counts"] == {"darkroom": 2, "python": 2, "system": 5, "other": 5}
    assert summary["system_groups"]["system libraries"] == 1
    assert summary["other"]["/root/.cache/x"] == [{"path": "/root/.cache/x/token", "how": "write", "exists": False}]
    here = Roots.current(["/some/home"])
    assert "/some/home" in here.darkroom and classify(prove.__file__, here)[0] == "darkroom"
    assert classify(os.__file__, here)[0] == "python"


def test_audit_recorder_reads_events():
    rec = prove.AuditRecorder()  # not installed: events fed by hand
    rec._hook("open", ("/data/a.bin", "rb", 0))
    rec._hook("open", ("/data/b.log", None, os.O_WRONLY | os.O_CREAT))
    rec._hook("open", (3, "r", 0))  # a descriptor: nothing new opened
    rec._hook("sqlite3.connect", ("/data/c.sqlite3",))
    rec._hook("socket.bind", (None, ("127.0.0.1", 0)))
    rec._hook("socket.connect", (None, ("127.0.0.1", 7860)))
    rec._hook("socket.connect", (None, "/run/some.sock"))  # AF_UNIX
    rec._hook("socket.getaddrinfo", ("huggingface.co", 443, 0, 1, 6))
    rec._hook("socket.sendto", (None, ("8.8.8.8", 53)))
    rec._hook("import", ("json",))  # ignored
    assert rec.opened == {"/data/a.bin": "read", "/data/b.log": "write", "/data/c.sqlite3": "write"}
    net = prove._network_summary(rec.net, [{"host": "huggingface.co", "port": 443, "caller": "x.py:1", "when": ""}])
    assert net["loopback"] == {"count": 3, "events": {"socket.bind": 1, "socket.connect": 2}}
    assert [(d["host"], d["port"], len(d["events"])) for d in net["outbound"]] == [
        ("huggingface.co", 443, 2), ("8.8.8.8", 53, 1)]
    assert rec.hook_errors == 0


def test_outbound_attempt_is_reported_and_fails_the_proof(home):
    """Test-only hook: the child tries 1.2.3.4:80; the guard refuses, the audit hook sees the lookup."""
    report = prove.prove_offline(home, parts=(), isolation="guard", env={prove.TEST_CONNECT_ENV: "1.2.3.4:80"})
    print(prove.render_proof(report))
    assert prove.exit_code(report) == 1 and report["child_exit"] == 1 and not report["ok"]
    (dest,) = report["outbound"]
    assert (dest["host"], dest["port"]) == ("1.2.3.4", 80)
    assert {e["seen_by"] for e in dest["events"]} == {"guard", "audit hook"}
    assert report["isolation"]["mode"] == "guard"
    assert "FAILED: 1 outbound destination(s) attempted" in prove.render_proof(report)
    assert [a.host for a in offline.read_log(home.network_log)] == ["1.2.3.4"]
    last = {c.name: c for c in readiness.readiness_checks(home)}["offline proof"]
    assert last.status == FAIL and "1 outbound attempt" in last.reason


@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root, Linux)")
def test_attempt_that_bypasses_the_guard_is_caught_in_the_namespace(home):
    report = prove.prove_offline(home, parts=(), env={prove.TEST_CONNECT_ENV: "raw:192.0.2.1:9"})
    assert report["isolation"]["mode"] == "namespace" and report["interfaces"] == ["lo"]
    assert report["test_connections"][0]["outcome"].startswith("OSError")  # no route: nothing left the machine
    assert [(d["host"], d["events"][0]["event"]) for d in report["outbound"]] == [("192.0.2.1", "socket.connect")]
    assert prove.exit_code(report) == 1


def test_unknown_model_makes_an_incomplete_proof(home):
    report = prove.prove_offline(home, model="no-such-model", isolation="guard")
    assert prove.exit_code(report) == 2 and "no model named 'no-such-model'" in report["error"]
    assert "INCOMPLETE" in prove.render_proof(report)


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root, Linux)")
def test_prove_offline_generates_and_serves_without_network(home, tiny_model, monkeypatch):
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a tiny model on a busy machine
    r = invoke(home, "--prove-offline", "--json", "--device", "cpu", "--precision", "fp32")
    out = json.loads(r.stdout)
    report = out["proof"]
    print(prove.render_proof(report))
    assert r.exit_code == 0, r.output
    assert report["ok"] and report["isolation"]["mode"] == "namespace" and report["interfaces"] == ["lo"]
    assert report["outbound"] == []
    assert report["loopback"]["events"]["socket.connect"] >= 1 and report["loopback"]["events"]["socket.bind"] >= 1
    assert report["model"] == str(home.checkpoints / "tiny.safetensors")
    for png in (report["png"], report["parts"]["server"]["png"]):
        with open(png, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert report["parts"]["server"]["job_state"] == "done" and report["parts"]["server"]["ui_page_bytes"] > 1000
    files = report["files"]
    assert files["counts"]["darkroom"] > 0 and files["counts"]["python"] > 100
    other = [i["path"] for items in files["other"].values() for i in items]
    print("files outside Darkroom and Python:", other)
    assert len(other) <= 10, other
    surprising = ("huggingface", "resolv.conf", "/etc/hosts", "nsswitch", "/ssl/", "certifi", "/.netrc", "/.config/")
    assert not [p for p in other if any(s in p for s in surprising)], other
    assert set(report["timings"]) >= {"start-up", "generation", "server", "total"}
    assert {c["name"]: c for c in readiness.readiness(home)["checks"]}["offline proof"]["status"] == OK
