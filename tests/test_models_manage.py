"""`darkroom models list|info|import|verify|rescan`: the model library as a user manages it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from darkroom.cli import cli
from darkroom.cli.models import models_group
from darkroom.home import Home
from darkroom.models.hashing import HashCache, sha256_file
from darkroom.services.model_manager import ModelManager, part_path
from darkroom.testing.tiny_lora import write_tiny_lora

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run(home, monkeypatch):
    """run("list", "--json") -> click Result of `darkroom --home HOME models list --json`."""
    monkeypatch.setitem(cli.commands, "models", models_group)

    def invoke(*args, models_dirs=()):
        extra = [a for d in models_dirs for a in ("--models-dir", str(d))]
        return CliRunner().invoke(cli, ["--home", str(home.root), *extra, "models", *args], catch_exceptions=False)

    return invoke


@pytest.fixture(scope="module")
def usb(tmp_path_factory, tiny_model) -> Path:
    """A folder as a USB drive holds them: one file of each kind, with a preview beside the checkpoint."""
    folder = tmp_path_factory.mktemp("usb")
    built = tiny_model("sd1")
    shutil.copy(built["path"], folder / "dream.safetensors")
    (folder / "dream.preview.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    write_tiny_lora(folder / "loras" / "ink.safetensors", built, rank=4, alpha=2.0, base_model_version=True,
                    tag_frequency={"10_ink": {"inkdrawing": 12, "monochrome": 3}, "5_x": {"sketch": 5}})
    prefix = "first_stage_model."
    vae = {k.removeprefix(prefix): v for k, v in built["ldm"].items() if k.startswith(prefix)}
    save_file(vae, str(folder / "clear.vae.safetensors"))
    (folder / "deep" / "style").mkdir(parents=True)
    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(folder / "deep" / "style" / "mystyle.safetensors"))
    return folder


def listing(result) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_import_puts_each_kind_in_its_folder_and_checks_hashes(run, home, usb):
    r = run("import", str(usb))
    assert r.exit_code == 0, r.output
    expected = {
        home.checkpoints / "dream.safetensors": usb / "dream.safetensors",
        home.loras / "ink.safetensors": usb / "loras" / "ink.safetensors",
        home.vae / "clear.vae.safetensors": usb / "clear.vae.safetensors",
        home.embeddings / "mystyle.safetensors": usb / "deep" / "style" / "mystyle.safetensors",
    }
    cache = HashCache(home.cache_db)
    for dest, src in expected.items():
        assert dest.is_file(), r.output
        assert sha256_file(dest) == sha256_file(src)
        assert cache.cached_sha256(dest) == sha256_file(src)  # recorded: listed and verified without hashing
        assert dest.stat().st_mtime_ns == src.stat().st_mtime_ns
        assert not part_path(dest).exists()
    assert (home.checkpoints / "dream.preview.png").read_bytes() == (usb / "dream.preview.png").read_bytes()
    assert "imported 4 (" in r.output

    # the same files again: nothing copied
    r = run("import", str(usb / "dream.safetensors"), str(usb / "loras"))
    assert r.exit_code == 0, r.output
    assert r.output.count("already there") == 3 and "imported 0" in r.output


def test_same_name_different_file_is_refused_unless_renamed(run, home, usb, tmp_path, tiny_model):
    assert run("import", str(usb / "loras" / "ink.safetensors")).exit_code == 0
    other = tmp_path / "ink.safetensors"
    write_tiny_lora(other, tiny_model("sd1"), rank=2, seed=7)
    before = sha256_file(home.loras / "ink.safetensors")
    r = run("import", str(other))
    assert r.exit_code == 1
    assert "already exists and is a different file" in r.output and "--rename" in r.output
    assert "Traceback" not in r.output
    assert sha256_file(home.loras / "ink.safetensors") == before
    r = run("import", "--rename", str(other))
    assert r.exit_code == 0, r.output
    assert sha256_file(home.loras / "ink-2.safetensors") == sha256_file(other)
    # renamed again: it is already there as ink-2
    r = run("import", "--rename", str(other))
    assert r.exit_code == 0 and "already there" in r.output and "ink-2.safetensors" in r.output


def test_pickles_need_allow_pickle_and_garbage_is_refused(run, home, tmp_path):
    src = tmp_path / "drive"
    (src / "embeddings").mkdir(parents=True)
    torch.save({"state_dict": {"x": torch.zeros(4)}}, src / "old.ckpt")
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "tiny"}, src / "embeddings" / "tiny.pt")
    (src / "junk.safetensors").write_bytes(b"\x00" * 7 + b"not a model" * 50)
    (src / "junk.ckpt").write_bytes(b"hello world " * 50)
    save_file({"foo": torch.zeros(3)}, str(src / "other.safetensors"))

    r = run("import", str(src))
    assert r.exit_code == 1
    lines = {line.split(": ")[1]: line for line in r.output.splitlines() if line.startswith("refused: ")}
    assert "--allow-pickle" in lines[str(src / "old.ckpt")] and "run code" in lines[str(src / "old.ckpt")]
    assert "not a valid .safetensors file" in lines[str(src / "junk.safetensors")]
    assert "neither a .safetensors file nor a PyTorch pickle" in lines[str(src / "junk.ckpt")]
    assert "not a Stable Diffusion model" in lines[str(src / "other.safetensors")]
    assert not list(home.checkpoints.iterdir()) and not list(home.embeddings.iterdir())
    assert "Traceback" not in r.output

    r = run("import", "--allow-pickle", str(src / "old.ckpt"), str(src / "embeddings"))
    assert r.exit_code == 0, r.output
    assert (home.checkpoints / "old.ckpt").read_bytes() == (src / "old.ckpt").read_bytes()
    assert (home.embeddings / "tiny.pt").is_file()  # the folder it came from says what it is
    assert "kind guessed" in r.output

    r = run("import", str(tmp_path / "drive" / "embeddings" / "tiny.pt"), "--kind", "lora", "--allow-pickle")
    assert r.exit_code == 0, r.output  # --kind decides for a pickle
    assert (home.loras / "tiny.pt").is_file()

    (tmp_path / "notes.txt").write_text("hello")
    r = run("import", str(tmp_path / "notes.txt"))
    assert r.exit_code == 1 and "not a model file (.txt)" in r.output


def test_a_copy_that_reads_back_different_is_not_kept(run, home, usb, monkeypatch):
    from darkroom.services import model_manager as manage

    real = manage.hash_file
    monkeypatch.setattr(manage, "hash_file", lambda path, *a, from_disk=False, **k: (
        "0" * 64 if from_disk else real(path, *a, **k)))
    r = run("import", str(usb / "dream.safetensors"))
    assert r.exit_code == 1 and "the copy differs from the source" in r.output
    assert list(home.checkpoints.iterdir()) == []  # neither the file nor its .part


def test_kind_option_must_agree_with_the_header(run, home, usb):
    r = run("import", "--kind", "checkpoint", str(usb / "loras" / "ink.safetensors"))
    assert r.exit_code == 1 and "it is a LoRA, not a checkpoint" in r.output
    assert not (home.checkpoints / "ink.safetensors").exists()


def test_list_by_kind_with_cached_and_missing_hashes(run, home, usb, tmp_path):
    for src, dest in ((usb / "dream.safetensors", home.checkpoints), (usb / "loras" / "ink.safetensors", home.loras),
                      (usb / "clear.vae.safetensors", home.vae)):
        shutil.copy(src, dest)
    # an AUTOMATIC1111 install used in place: its embeddings folder is found
    webui = tmp_path / "webui"
    (webui / "embeddings").mkdir(parents=True)
    shutil.copy(usb / "deep" / "style" / "mystyle.safetensors", webui / "embeddings")
    dirs = (webui,)
    HashCache(home.cache_db).sha256(home.loras / "ink.safetensors")

    r = run("list", models_dirs=dirs)
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    heads = [line.split()[0] for line in out if line.split()[0].isupper()]
    assert heads == ["CHECKPOINTS", "LORAS", "VAES", "EMBEDDINGS"]
    rows = {line.split()[0]: line for line in out}
    assert "SD1" in rows["dream"] and " - " in rows["dream"]
    assert "LoRA (SD1)" in rows["ink"] and sha256_file(home.loras / "ink.safetensors")[:10] in rows["ink"]
    assert "VAE" in rows["clear.vae.safetensors"]
    assert "width 32, 2 vectors" in rows["mystyle"]
    assert "run `darkroom models rescan` to hash them" in r.stderr

    rows = listing(run("list", "--json", "--kind", "lora", "--kind", "embedding", models_dirs=dirs))
    assert set(rows) == {"ink", "mystyle"}
    assert rows["ink"]["sha256"] == sha256_file(home.loras / "ink.safetensors")
    assert rows["mystyle"]["sha256"] is None and rows["mystyle"]["kind"] == "embedding"
    assert rows["mystyle"]["path"] == str(webui / "embeddings" / "mystyle.safetensors")

    # rescan hashes the rest; list shows every hash, without the hint
    r = run("rescan", models_dirs=dirs)
    assert r.exit_code == 0 and "hashed " in r.output and "1 already hashed" in r.output
    r = run("list", models_dirs=dirs)
    assert "rescan" not in r.output
    for row in listing(run("list", "--json", models_dirs=dirs)).values():
        assert row["sha256"] == sha256_file(Path(row["path"])), row
    r = run(models_dirs=dirs)  # `darkroom models` alone lists
    assert r.exit_code == 0 and "CHECKPOINTS" in r.output


def test_the_folders_are_those_the_loaders_search(home, tmp_path):
    from darkroom.engine.lora import LoraLibrary
    from darkroom.text.embeddings import EmbeddingLibrary

    webui, comfy = tmp_path / "webui", tmp_path / "comfy"
    for d in ("models/Stable-diffusion", "models/Lora", "models/LyCORIS", "models/VAE", "embeddings"):
        (webui / d).mkdir(parents=True)
    for d in ("models/checkpoints", "models/loras", "models/vae", "models/embeddings"):
        (comfy / d).mkdir(parents=True)
    h = Home(home.root, [webui, comfy])
    manager = ModelManager(h)
    assert manager.folders("lora") == LoraLibrary(h).folders()
    assert manager.folders("embedding") == EmbeddingLibrary(h).dirs()
    assert manager.folders("vae") == [h.vae, webui / "models/VAE", comfy / "models/vae"]
    assert manager.folders("checkpoint")[:3] == [h.checkpoints, webui / "models/Stable-diffusion",
                                                 comfy / "models/checkpoints"]


def test_misplaced_files_are_pointed_out(run, home, usb):
    shutil.copy(usb / "loras" / "ink.safetensors", home.checkpoints / "ink.safetensors")
    r = run("list")
    assert r.exit_code == 0
    assert "note: ink.safetensors is a LoRA, found in a checkpoint folder" in r.stderr


def test_info_of_a_checkpoint(run, home, usb):
    shutil.copy(usb / "dream.safetensors", home.checkpoints)
    shutil.copy(usb / "dream.preview.png", home.checkpoints)
    path = home.checkpoints / "dream.safetensors"
    digest = sha256_file(path)
    r = run("info", "dream")
    assert r.exit_code == 0, r.output
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if line and not line.startswith(" ")
                  and not line.startswith(("metadata", "short hash", "native size")))
    assert fields["kind"] == "checkpoint" and fields["family"] == "SD1" and fields["precision"] == "fp32"
    assert fields["SHA-256"] == digest
    assert f"short hash   {digest[:10]} (AutoV2" in r.stdout
    assert fields["preview"] == str(home.checkpoints / "dream.preview.png")
    assert "  darkroom_config: {" in r.stdout and "characters)" in r.stdout  # long values are cut
    assert HashCache(home.cache_db).cached_sha256(path) == digest  # hashed once, remembered

    data = json.loads(run("info", "--json", str(path)).stdout)
    assert (data["sha256"], data["short_hash"], data["native_size"]) == (digest, digest[:10], 64)
    assert json.loads(data["metadata"]["darkroom_config"])["unet"]  # in full
    assert data["parameters"] > 1000 and data["dtypes"]["F32"] > 0.99

    # by short hash, once hashed
    assert json.loads(run("info", "--json", digest[:10]).stdout)["path"] == str(path)


def test_info_of_a_lora(run, home, usb, tiny_model):
    shutil.copy(usb / "loras" / "ink.safetensors", home.loras)
    data = json.loads(run("info", "--json", "ink").stdout)
    assert data["kind"] == "lora"
    lora = data["lora"]
    assert (lora["base"], lora["rank"], lora["alpha"]) == ("SD1", 4, 2)
    assert lora["trigger_words"] == ["inkdrawing", "sketch", "monochrome"]
    r = run("info", "ink")
    assert "rank / alpha   4 / 2" in r.stdout and "trigger words  inkdrawing, sketch, monochrome" in r.stdout

    # without kohya's metadata: rank from the tensor shapes, alpha from the .alpha tensors
    bare = home.loras / "bare.safetensors"
    write_tiny_lora(bare, tiny_model("sd1"), rank=8, alpha=3.0, dtype=torch.float16)
    save_file(load_file(str(bare)), str(bare))
    lora = json.loads(run("info", "--json", "bare").stdout)["lora"]
    assert (lora["rank"], lora["alpha"], lora["network"]) == (8, 3, None)
    assert json.loads(run("info", "--json", "bare").stdout)["precision"] == "fp16"


def test_info_errors_are_one_line(run, home, usb):
    r = run("info", "nosuch")
    assert r.exit_code == 1 and r.output.startswith("error: no model named 'nosuch'")
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    shutil.copy(usb / "dream.safetensors", home.checkpoints / "twin.safetensors")
    shutil.copy(usb / "loras" / "ink.safetensors", home.loras / "twin.safetensors")
    r = run("info", "twin")
    assert r.exit_code == 1 and "more than one model" in r.output and "--kind" in r.output
    assert json.loads(run("info", "--json", "--kind", "lora", "twin").stdout)["kind"] == "lora"


def _flip_byte(path: Path, at: int = -100, *, keep_mtime: bool) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def test_verify_tells_rotted_from_changed(run, home, usb):
    assert run("import", str(usb)).exit_code == 0
    r = run("verify")
    assert r.exit_code == 0, r.output
    assert r.output.count("OK ") >= 4

    lora, vae = home.loras / "ink.safetensors", home.vae / "clear.vae.safetensors"
    _flip_byte(lora, keep_mtime=True)  # silent corruption: same size, same date
    _flip_byte(vae, keep_mtime=False)  # an edit
    shutil.copy(usb / "dream.safetensors", home.checkpoints / "new.safetensors")
    (home.embeddings / "mystyle.safetensors").unlink()
    r = run("verify")
    assert r.exit_code == 1, r.output
    status = {line.split()[2].split(":")[0]: line.split()[0] for line in r.output.splitlines()
              if line.split() and line.split()[0] in ("OK", "CHANGED", "ROTTED", "NEW", "MISSING")}
    assert status["ink"] == "ROTTED" and status["clear.vae.safetensors"] == "CHANGED"
    assert status["dream"] == "OK" and status["new"] == "NEW" and status["mystyle.safetensors"] == "MISSING"
    assert "silent corruption" in r.output

    # by name; --json
    rows = json.loads(run("verify", "--json", "ink", "dream").stdout)
    assert [(row["name"], row["status"]) for row in rows] == [("ink", "ROTTED"), ("dream", "OK")]

    # rescan accepts the edit and forgets the deleted file; the rotted file stays rotted
    r = run("rescan")
    assert "forgot 1 file" in r.output
    rows = {row["name"]: row["status"] for row in json.loads(run("verify", "--json").stdout)}
    assert rows["clear.vae.safetensors"] == "OK" and rows["new"] == "OK" and rows["ink"] == "ROTTED"
    assert "mystyle.safetensors" not in rows


def _fake_checkpoint(path: Path, data_bytes: int, *, random: bool = False) -> Path:
    """A valid SD1-layout safetensors header followed by `data_bytes` of zeros (a sparse file), or of
    random bytes (a file of its own hash)."""
    tensors = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": ("F32", [1, 1], 4),
        "first_stage_model.decoder.conv_in.weight": ("F32", [1], 4),
        "model.diffusion_model.input_blocks.0.0.weight": ("F32", [1, 4, 1, 1], 16),
        "model.diffusion_model.out.2.weight": ("U8", [data_bytes], data_bytes),
    }
    header, offset = {}, 0
    for key, (dtype, shape, n) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        if random:
            fh.write(os.urandom(offset))
        else:
            fh.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.slow
def test_an_interrupted_import_leaves_no_partial_file(run, home, tmp_path):
    src = _fake_checkpoint(tmp_path / "big.safetensors", 150_000_000)
    dest = home.checkpoints / "big.safetensors"
    part = part_path(dest)
    code = ("import sys; from darkroom.cli import cli; from darkroom.cli.models import models_group;"
            " cli.add_command(models_group, 'models'); cli(sys.argv[1:], prog_name='darkroom')")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, "--home", str(home.root), "models", "import", str(src)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.monotonic() + 600  # only a hang gets near this
    try:
        while not (part.exists() and part.stat().st_size >= 8 << 20):
            assert proc.poll() is None, "the import ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    assert part.stat().st_size < src.stat().st_size  # killed mid-copy; hidden: no listing shows it
    assert "big" not in run("list").output

    r = run("import", str(src))
    assert r.exit_code == 0, r.output
    assert sha256_file(dest) == sha256_file(src)
    assert not part.exists()
    assert json.loads(run("info", "--json", "big").stdout)["family"] == "SD1"
