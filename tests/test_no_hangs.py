"""Nothing a user or a file does makes Darkroom hang: FIFOs and devices are refused before they are
read, and prompts are bounded in size and parsed in linear time (issue 16)."""

from __future__ import annotations

import os
import threading

import pytest
from click.testing import CliRunner

from darkroom.cli import cli

HANG_GUARD = 600  # seconds: only a hang gets anywhere near this, however loaded the machine


def run_guarded(home, *args):
    """`darkroom --home HOME ARGS` in a thread; a hang fails the test instead of stopping the suite."""
    box: dict = {}

    def target():
        box["result"] = CliRunner().invoke(cli, ["--home", str(home.root), *args], catch_exceptions=False)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG_GUARD)
    assert not t.is_alive(), f"darkroom {' '.join(args)} hung"
    return box["result"]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("args", [
    ("png-info", "{fifo}"),
    ("generate", "x", "--steps", "1", "-i", "{fifo}"),
    ("generate", "x", "--steps", "1", "-W", "64", "-H", "64", "--mask", "{fifo}", "-i", "{image}"),
    ("generate", "--from-png", "{fifo}"),
])
def test_a_fifo_is_refused_not_read(home, fifo, tmp_path, args):
    from PIL import Image

    image = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "white").save(image)
    r = run_guarded(home, *(a.format(fifo=fifo, image=image) for a in args))
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert f"{fifo} is a named pipe (FIFO), not an image file" in r.output, r.output


def test_an_oversized_image_file_is_refused_before_it_is_read(home, tmp_path, monkeypatch):
    from darkroom.metadata import images

    monkeypatch.setattr(images, "MAX_IMAGE_FILE_BYTES", 1000)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(5000))
    r = run_guarded(home, "png-info", str(big))
    assert r.exit_code != 0 and "too large for an image file" in r.output
