"""Bad input and a hostile environment: a clear one-line error with the right exit code or HTTP status,
never a traceback, an HTTP 500 or a silent black image (issue 16).

Seeds past 2**64-1, text that is not Unicode, decompression-bomb images, NaN/inf (LoRAs, prompt
weights, a damaged model), an invalid or busy port, a read-only home and a full disk; each through
the CLI and the server routes that meet it.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from darkroom.cli import cli
from darkroom.engine import generate as generate_module
from darkroom.errors import StorageError
from darkroom.offline.guard import NetworkBlocked, NetworkGuard
from darkroom.request import MAX_SEED, MAX_TEXT, GenerationRequest
from darkroom.testing.tiny_lora import write_tiny_lora
from tests.server_util import FAST, free_port, wait_job

ROOT = Path(__file__).resolve().parent.parent
A1111_FAST = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
CLI_FAST = ("-m", "tiny-sd1", "--steps", "1", "-W", "64", "-H", "64", "--sampler", "Euler")


def run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home.root), *args], catch_exceptions=False)


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == body["detail"]
    return body["error"]


def openai_error_of(r, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error["message"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png(size=(64, 64)) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of one colour: a few hundred KB that decode to width x height bytes."""
    z = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bomb() -> bytes:
    """20000x20000: past PIL's own bomb limit (it raises DecompressionBombError when opening)."""
    return bomb_png(20000, 20000)


@pytest.fixture
def sd1_in_home(home, tiny_model):
    target = home.checkpoints / "tiny-sd1.safetensors"
    shutil.copy(tiny_model("sd1")["path"], target)
    return target


def corrupt_copy(src: Path, dst: Path, pick, value: float, *, every: bool = False) -> str:
    """Copy a .safetensors file (metadata kept) with the first tensor `pick(key)` accepts (or `every` one)
    filled with `value`; returns the first key changed."""
    with safe_open(str(src), framework="pt") as fh:
        metadata = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    keys = [k for k in sorted(tensors) if pick(k)]
    for key in keys if every else keys[:1]:
        tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, str(dst), metadata=metadata)
    return keys[0]


# --- 1. seeds ------------------------------------------------------------------------------------


def test_seed_range_a1111(api):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **A1111_FAST, "seed": MAX_SEED, "batch_size": 2})
    message = error_of(r, 422)
    assert f"seed {MAX_SEED} is too large for 2 images" in message and f"at most {MAX_SEED - 1}" in message
    # the last valid seed of a batch of two works: image k uses seed + k
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **A1111_FAST, "seed": MAX_SEED - 1, "batch_size": 2})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["all_seeds"] == [MAX_SEED - 1, MAX_SEED]


def test_seed_range_cli_and_subseed(home):
    r = run(home, "generate", "x", "--seed", str(MAX_SEED), "-b", "2", "-n", "2")
    assert r.exit_code == 2
    assert f"error: invalid request: seed {MAX_SEED} is too large for 4 images" in r.output
    assert "Traceback" not in r.output
    r = run(home, "generate", "x", "--seed", str(MAX_SEED + 1))
    assert r.exit_code == 2 and "seed: Input should be less than or equal to 18446744073709551615" in r.output
    with pytest.raises(ValueError, match=f"subseed {MAX_SEED} is too large for 3 images"):
        GenerationRequest(subseed=MAX_SEED, subseed_strength=0.5, n_iter=3)


# --- 2. text ---------------------------------------------------------------------------------------


def test_lone_surrogate_a1111_native_openai(api):
    raw = b'{"prompt": "a \\ud800 cat", "steps": 2, "width": 64, "height": 64}'
    headers = {"content-type": "application/json"}
    message = error_of(api.post("/sdapi/v1/txt2img", content=raw, headers=headers), 422)
    assert message == ("invalid request: prompt: a lone surrogate \\ud800 at character 3 is not valid Unicode"
                       " (half of a character such as an emoji); send the whole character")
    raw_negative = b'{"prompt": "cat", "negative_prompt": "\\udfff", "steps": 2, "width": 64, "height": 64}'
    message = error_of(api.post("/api/jobs", content=raw_negative, headers=headers), 422)
    assert message.startswith("invalid request: negative_prompt: a lone surrogate \\udfff at character 1")
    r = api.post("/v1/images/generations", content=b'{"prompt": "\\ud83d", "size": "64x64"}', headers=headers)
    assert "lone surrogate \\ud83d" in openai_error_of(r, 400, "prompt")


def test_invalid_utf8_cli_argument(home):
    # what Python makes of the bytes b"caf\xe9" (Latin-1) in argv: a surrogate escape
    r = run(home, "generate", "caf\udce9 au lait", "--steps", "1")
    assert r.exit_code == 2, r.output
    assert ("error: invalid request: prompt: the byte 0xE9 at character 4 is not UTF-8; write the text in UTF-8"
            " (check the terminal's or the file's encoding)") in r.output
    assert "Traceback" not in r.output


def test_prompt_length_limit(api, home):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x" * (MAX_TEXT + 1), **A1111_FAST})
    assert error_of(r, 422) == "invalid request: prompt: 65,537 characters is too long (limit 65,536); shorten the text"
    r = run(home, "generate", "x", "-N", "y" * (MAX_TEXT * 8))
    assert r.exit_code == 2 and "negative_prompt: 524,288 characters is too long (limit 65,536)" in r.output


# --- 3. decompression bombs ------------------------------------------------------------------------


def test_bomb_cli(home, sd1_in_home, tmp_path, bomb):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    r = run(home, "generate", "x", "-i", str(path), *CLI_FAST[:4], "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert ("error: init image: too many pixels (400,000,000; the limit is 67,108,864 = 8192x8192); use a smaller"
            " image") in r.output


def test_bomb_a1111_openai_native(api, bomb):
    r = api.post("/sdapi/v1/img2img", json={"prompt": "x", **A1111_FAST, "init_images": [b64(bomb)]})
    assert error_of(r, 413) == ("init_images[0]: too many pixels (400,000,000; the limit is 67,108,864 ="
                                " 8192x8192); use a smaller image")
    r = api.post("/sdapi/v1/img2img", json={"prompt": "x", **A1111_FAST, "init_images": [b64(png())],
                                            "mask": b64(bomb)})
    assert error_of(r, 413).startswith("mask: too many pixels (400,000,000; the limit is 67,108,864")
    r = api.post("/v1/images/edits", files={"image": ("bomb.png", bomb, "image/png")}, data={"prompt": "x"})
    assert openai_error_of(r, 413, "image").startswith("image: too many pixels (400,000,000; the limit is 67,108,864")
    r = api.post("/api/jobs", json={"prompt": "x", **FAST, "init_image": b64(bomb)})
    assert r.status_code == 202, r.text
    done = wait_job(api, r.json()["job"]["id"])
    assert done["state"] == "error"
    assert done["error"].startswith("init image: too many pixels (400,000,000; the limit is 67,108,864")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [9000, 10000])  # under PIL's warning; between its warning and its error
def test_pixel_limit_names_the_size(side):
    from darkroom.engine.img2img import open_image
    from darkroom.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match=rf"^mask: too many pixels \({side}x{side}; the limit is") as caught:
        open_image(bomb_png(side, side), "mask")
    assert caught.value.status == 413


# --- 4. NaN and inf ----------------------------------------------------------------------------------


def test_lora_with_nan_names_the_file(home, sd1_in_home, tiny_model, tmp_path):
    good = tmp_path / "good.safetensors"
    write_tiny_lora(good, tiny_model("sd1"))
    key = corrupt_copy(good, home.loras / "broken.safetensors", lambda k: k.endswith("lora_up.weight"), float("nan"))
    r = run(home, "generate", "x <lora:broken:0.8>", *CLI_FAST, "-o", str(tmp_path / "out"))
    assert r.exit_code == 1, r.output
    assert (f"error: LoRA 'broken' ({home.loras / 'broken.safetensors'}): its tensor {key} holds NaN or infinite"
            " values; the file is damaged (download it again, or remove it from the prompt)") in r.output
    assert not list((tmp_path / "out").glob("*.png"))


def test_lora_that_overflows_when_merged(home, sd1_in_home, tiny_model, tmp_path):
    good = tmp_path / "good.safetensors"
    write_tiny_lora(good, tiny_model("sd1"))
    corrupt_copy(good, home.loras / "huge.safetensors", lambda k: k.endswith((".lora_up.weight", ".lora_down.weight")),
                 1e30, every=True)  # finite, but up @ down is 1e60
    r = run(home, "generate", "x <lora:huge>", *CLI_FAST, "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "error: LoRA 'huge' makes layer " in r.output
    assert ("overflow (the merged weights would be NaN or infinite); lower its weight in the prompt or use another"
            " LoRA") in r.output


def test_prompt_weight_not_finite(api):
    prompt = "a (red:1" + "0" * 400 + ") circle"  # float() of it is inf
    r = api.post("/sdapi/v1/txt2img", json={"prompt": prompt, **A1111_FAST})
    assert error_of(r, 422) == ("prompt weight 100000000000000000000000... (401 characters) is not a finite number;"
                                " write a weight such as (word:1.2)")
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "(" * 80 + "red", **A1111_FAST})
    assert error_of(r, 422).startswith("the emphasis on 'red' (2048.4, from nested brackets) is outside -1000 to 1000")


def test_prompt_weight_cli(home, sd1_in_home, tmp_path):
    r = run(home, "generate", "a (red:5000) circle", *CLI_FAST, "-o", str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "error: prompt weight 5000 is outside -1000 to 1000; write a weight such as (word:1.2)" in r.output
    # an AND weight of inf is refused before anything runs, as an emphasis weight is
    r = run(home, "generate", "a :1" + "0" * 400 + " AND b", *CLI_FAST, "--precision", "fp32", "-o",
            str(tmp_path / "out"))
    assert r.exit_code == 2, r.output
    assert "error: the AND weight 100000000000000000000000... (401 characters) is not a finite number" in r.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_non_finite_latents_are_an_error_not_a_black_image(home, sd1_in_home, tiny_model, tmp_path):
    key = corrupt_copy(sd1_in_home, home.checkpoints / "tiny-nan.safetensors",
                       lambda k: k.startswith("model.diffusion_model.out."), float("nan"))
    assert key
    out = tmp_path / "out"
    r = run(home, "generate", "x", "-m", "tiny-nan", "--steps", "1", "-W", "64", "-H", "64", "--precision", "fp32",
            "-o", str(out))
    assert r.exit_code == 1, r.output
    assert ("error: sampling gave NaN or infinite values (the image would be black); suspects: the model 'tiny-nan'"
            " (float32: damaged weights or an overflow)") in r.output
    assert not out.exists() or not list(out.iterdir())
    # with a LoRA and a strong prompt weight in play, they are named first
    write_tiny_lora(home.loras / "style.safetensors", tiny_model("sd1"))
    r = run(home, "generate", "a (red:5) circle <lora:style:0.7>", "-m", "tiny-nan", "--steps", "1", "-W", "64",
            "-H", "64", "--precision", "fp32", "-o", str(out))
    assert r.exit_code == 1, r.output
    assert ("suspects: the LoRA 'style' (weight 0.7/0.7); a prompt weight of 5 (try values near 1); the model"
            " 'tiny-nan'") in r.output


# --- 5. the port -------------------------------------------------------------------------------------


def test_serve_port_out_of_range_and_in_use(home):
    r = run(home, "serve", "--port", "99999")
    assert r.exit_code == 2
    assert "error: port 99999 is out of range: use 1-65535 (7860 is the usual one)" in r.output
    with socket.socket() as busy:
        port = free_port()
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = run(home, "serve", "--port", str(port))
    assert r.exit_code == 1
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in r.output
    assert f"try --port {port + 1}" in r.output


# --- 6. a home that cannot be written ----------------------------------------------------------------


def test_log_file_that_cannot_be_opened_warns_and_goes_on(home, sd1_in_home):
    home.logs.write_text("a file where the logs folder should be")  # fails for root too
    r = run(home, "models")
    assert r.exit_code == 0, r.output
    assert f"warning: cannot write the log file {home.logs / 'darkroom.log'}" in r.output
    assert "going on without it" in r.output and "tiny-sd1" in r.output


def test_log_write_failure_warns_once(tmp_path, capsys):
    import logging

    from darkroom.cli.group import LogFile

    handler = LogFile(tmp_path / "darkroom.log")
    handler.stream.close()  # every later write fails, as on a full disk
    logger = logging.getLogger("darkroom.test-bad-input")
    logger.addHandler(handler)
    try:
        logger.error("one")
        logger.error("two")
    finally:
        logger.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("warning: cannot write the log file") == 1 and "Traceback" not in err


def test_network_log_that_cannot_be_written_warns_once(tmp_path, capsys):
    blocker = tmp_path / "logs"
    blocker.write_text("not a folder")
    guard = NetworkGuard(blocker / "network-attempts.jsonl")
    for _ in range(2):
        with pytest.raises(NetworkBlocked):
            guard._check(("203.0.113.5", 443))
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot record blocked connections in {blocker / 'network-attempts.jsonl'}") == 1
    assert len(guard.attempts) == 2


def test_output_folder_that_cannot_be_made(home, sd1_in_home, tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "out"
    r = run(home, "generate", "x", *CLI_FAST, "-o", str(out))
    assert r.exit_code == 1, r.output
    assert f"error: cannot write images to {out}: a file is in the way of the folder" in r.output


def _as_other_user() -> list[str] | None:
    """The command prefix that runs a child without root's power over permissions, or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "import darkroom"], capture_output=True, cwd=ROOT,
                           timeout=300)
    return prefix if probe.returncode == 0 else None


@pytest.mark.slow
def test_read_only_home(tiny_model):
    prefix = _as_other_user()
    if prefix is None:
        pytest.skip("needs a non-root user (setpriv) that can read this checkout")
    base = Path(tempfile.mkdtemp(prefix="darkroom-ro-"))
    try:
        base.chmod(0o755)
        root = base / "home"
        for sub in ("models/checkpoints", "models/loras", "models/vae", "models/embeddings", "outputs"):
            (root / sub).mkdir(parents=True)
        shutil.copy(tiny_model("sd1")["path"], root / "models/checkpoints/tiny-sd1.safetensors")
        out = base / "out"
        out.mkdir()
        out.chmod(0o777)
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

        def darkroom(*args):
            return subprocess.run([*prefix, sys.executable, "-m", "darkroom.cli", "--home", str(root), *args],
                                  capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)

        warning = f"warning: cannot write the log file {root / 'logs' / 'darkroom.log'}"
        r = darkroom("models")
        assert r.returncode == 0 and "tiny-sd1" in r.stdout, r.stderr
        assert warning in r.stderr and "Traceback" not in r.stderr
        r = darkroom("generate", "x", *CLI_FAST, "--seed", "3", "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert [p.name for p in out.iterdir()] == ["00000-3.png"] and r.stderr.count(warning) == 1
        r = darkroom("generate", "x", *CLI_FAST)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert f"error: cannot write images to {root / 'outputs' / 'txt2img'}" in r.stderr
        assert ": permission denied; choose a folder you can write to" in r.stderr
        r = darkroom("serve", "--port", str(free_port()))  # the server needs its history database
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert r.stderr.splitlines()[-1].startswith("error: ") and str(root) in r.stderr.splitlines()[-1]
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


# --- 7. a full disk ------------------------------------------------------------------------------------


class _FullDisk:
    """`open` for darkroom.engine.generate: the first `ok` files are written, then the disk is full."""

    def __init__(self, ok: int, code: int = errno.ENOSPC):
        self.ok, self.code = ok, code

    def __call__(self, path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)  # noqa: SIM115 (closed by the wrapper)
        if "w" not in mode:
            return fh
        if self.ok > 0:
            self.ok -= 1
            return fh
        return _FailingFile(fh, self.code)


class _FailingFile:
    def __init__(self, fh, code: int):
        self.fh, self.code = fh, code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def flush(self):
        pass


def test_full_disk_cli_keeps_what_was_written(home, sd1_in_home, tmp_path, monkeypatch):
    monkeypatch.setattr(generate_module, "open", _FullDisk(ok=1), raising=False)
    out = tmp_path / "out"
    r = run(home, "generate", "x", *CLI_FAST, "--seed", "7", "-n", "2", "-o", str(out))
    assert r.exit_code == 1, r.output
    assert (f"error: cannot write images to {out}: no space left on the disk; free some space or choose another"
            " output folder") in r.output
    assert "Traceback" not in r.output
    assert [p.name for p in out.iterdir()] == ["00000-7.png"]  # the first image, whole; no temp file left
    Image.open(out / "00000-7.png").load()


def test_full_disk_a1111_and_native(api, studio, monkeypatch):
    monkeypatch.setattr(generate_module, "open", _FullDisk(ok=0, code=errno.EDQUOT), raising=False)
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", **A1111_FAST, "save_images": True})
    message = error_of(r, 507)
    assert message.startswith(f"cannot write images to {studio.home.outputs / 'txt2img'}")
    assert message.endswith(": the disk quota is used up; free some space or choose another output folder")
    monkeypatch.setattr(generate_module, "open", _FullDisk(ok=0), raising=False)
    r = api.post("/api/jobs", json={"prompt": "x", **FAST})
    assert r.status_code == 202, r.text
    done = wait_job(api, r.json()["job"]["id"])
    assert done["state"] == "error" and "no space left on the disk" in done["error"]
    assert not [p for p in studio.home.outputs.rglob("*") if p.is_file() and p.suffix in (".png", ".tmp")]


def test_storage_error_kinds(tmp_path):
    for code, words in ((errno.ENOSPC, "no space left on the disk"), (errno.EROFS, "the file system is read-only"),
                        (errno.EACCES, "permission denied")):
        error = StorageError.wrap(OSError(code, os.strerror(code)), tmp_path)
        assert isinstance(error, StorageError) and error.status == 507
        assert str(error).startswith(f"cannot write images to {tmp_path}: {words}")
    other = OSError(errno.EIO, "I/O error")
    assert StorageError.wrap(other, tmp_path) is other  # a real fault stays one
