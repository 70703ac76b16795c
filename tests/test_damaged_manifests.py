"""Backup and bundle manifests arrive on a USB drive: a damaged one is a one-line error naming it,
never a traceback, and the rest of the backup stays usable (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from darkroom.home import Home
from tests import test_backup as tb
from tests import test_bundle as tbd

PNG = "outputs/txt2img/2024-05-01/00000-1.png"


@pytest.fixture
def two_snapshots(home, tmp_path):
    """A backup folder with two snapshots of a home; -> (dest, [older id, newer id])."""
    dest = tmp_path / "bk"
    tb.add_output(home, None, "00000-1.png", 1)
    assert tb.run(home, "backup", str(dest)).exit_code == 0
    tb.add_output(home, None, "00001-2.png", 2)
    assert tb.run(home, "backup", str(dest)).exit_code == 0
    ids = [m["id"] for m in tb.manifests(dest)]
    assert len(ids) == 2
    return dest, ids


def _damage(dest, sid, change) -> None:
    path = dest / "snapshots" / sid / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


def _entry(m, **fields):
    m["files"][PNG].update(fields)
    return m


DAMAGE = {
    "list entry": lambda m: {**m, "files": {**m["files"], PNG: [1, 2]}},
    "string size": lambda m: _entry(m, size="219"),
    "no sha256": lambda m: {**m, "files": {**m["files"], PNG: {k: v for k, v in m["files"][PNG].items()
                                                               if k != "sha256"}}},
    "string date": lambda m: {**m, "created": "yesterday"},
    "manifest is a list": lambda m: [m],
    "path outside": lambda m: {**m, "files": {"../../etc/passwd": m["files"][PNG]}},
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_latest_snapshot_is_named_and_the_others_still_restore(home, tmp_path, two_snapshots, damage):
    dest, (older, newer) = two_snapshots
    _damage(dest, newer, DAMAGE[damage])

    v = tb.run(home, "verify", str(dest))
    assert v.exit_code == 1 and "Traceback" not in v.output
    assert f"snapshot {newer}: its manifest" in v.stdout and "is damaged" in v.stdout

    fresh = Home(tmp_path / "fresh").ensure()
    r = tb.run(fresh, "restore", str(dest))
    tb.one_line_error(r, f"snapshot {newer}", "cannot be used", older)
    assert not list(fresh.outputs.rglob("*.png"))

    ok = tb.run(fresh, "restore", str(dest), "--snapshot", older)
    assert ok.exit_code == 0, ok.output
    assert (fresh.root / PNG).is_file()

    # a new backup still works, and is complete again
    again = tb.run(home, "backup", str(dest))
    assert again.exit_code == 0, again.output


BUNDLE_DAMAGE = {
    "list entry": lambda m: {**m, "files": [["install.sh", 1]] + m["files"][1:]},
    "string size": lambda m: {**m, "files": [{**m["files"][0], "size": "12"}] + m["files"][1:]},
    "no path": lambda m: {**m, "files": [{k: v for k, v in m["files"][0].items() if k != "path"}] + m["files"][1:]},
    "target is text": lambda m: {**m, "target": "linux"},
    "date is a number": lambda m: {**m, "created": 5},
}


@pytest.mark.parametrize("damage", list(BUNDLE_DAMAGE))
def test_a_damaged_bundle_manifest_is_one_line_everywhere(tmp_path, damage):
    root = tbd.fake_bundle(tmp_path / "b")
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps(BUNDLE_DAMAGE[damage](manifest)))

    r = tbd._invoke(["verify", str(root)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("error: ") and "is damaged" in r.output, r.output

    for command in ("verify", "install-models"):  # the checker that runs on the offline machine
        p = subprocess.run([sys.executable, str(root / "bundle_check.py"), command, str(root)], capture_output=True,
                           text=True, env={"DARKROOM_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
                           timeout=600)
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert "is damaged" in p.stderr
    assert not (tmp_path / "home").exists()


def test_install_models_never_copies_a_link(tmp_path):
    root = tbd.fake_bundle(tmp_path / "b")
    secret = tmp_path / "secret"
    secret.write_text("private")
    lora = root / "models" / "loras" / "style.safetensors"
    lora.unlink()
    lora.symlink_to(secret)
    p = subprocess.run([sys.executable, str(root / "bundle_check.py"), "install-models", str(root)],
                       capture_output=True, text=True, env={"DARKROOM_HOME": str(tmp_path / "home")}, timeout=600)
    assert p.returncode == 1 and "not a regular file in the bundle" in p.stderr
    assert not list((tmp_path / "home").rglob("style*"))
