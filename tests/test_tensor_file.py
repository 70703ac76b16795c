"""LoRA, VAE, embedding, ControlNet and upscaler files read with plain reads, never a memory map (issue 16's
residual): the same tensors safetensors reads, and a drive that fails mid-read (EIO) or a file cut short is a
clear error naming the file (DR-STORAGE-GONE: reconnect the drive), where a memory map would kill the process
with SIGBUS."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from darkroom.control.load import _read_tensors as read_controlnet
from darkroom.engine.lora import LoraFile
from darkroom.errors import ModelLoadError, StorageError
from darkroom.models import tensor_file
from darkroom.models.header import read_header
from darkroom.models.loader import LoadOptions, load_checkpoint
from darkroom.models.tensor_file import TensorReadError, check_layout, read_tensors
from darkroom.models.vae_file import load_vae_file
from darkroom.text.embeddings import EmbeddingError, read_embedding
from darkroom.upscale.load import read_state_dict


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {
        "f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, 4, generator=g).bfloat16(), "f64": torch.randn(2, generator=g).double(),
        "i64": torch.arange(-3, 3), "i32": torch.arange(4, dtype=torch.int32),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["f8e4m3"] = torch.randn(6, generator=g).to(torch.float8_e4m3fn)
        out["f8e5m2"] = torch.randn(6, generator=g).to(torch.float8_e5m2)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, and defined for float8, which has no torch.equal)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


class FailingFile:
    """A file whose drive goes away after `after` bytes: reads then fail with EIO, as on a pulled USB drive."""

    def __init__(self, path: Path, after: int):
        self.fh, self.left = open(path, "rb"), after

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.fh.seek(pos, whence)

    def readinto(self, buf) -> int:
        if self.left <= 0:
            raise OSError(errno.EIO, "Input/output error")
        view = memoryview(buf)[: self.left]
        n = self.fh.readinto(view)
        self.left -= n
        return n


@pytest.fixture
def pulled(monkeypatch):
    """Make every plain read of a tensor file fail after `after` bytes of tensor data."""

    def pull(after: int = 0) -> None:
        monkeypatch.setattr(tensor_file, "_open", lambda path: FailingFile(path, after))

    return pull


@pytest.fixture
def no_mmap(monkeypatch):
    """Once called: safetensors' memory-mapping readers made to fail, so a reader that still uses them is caught."""

    def refuse(*a, **k):
        raise AssertionError("a user's file was read through safetensors' memory map")

    def arm() -> None:
        monkeypatch.setattr(safetensors, "safe_open", refuse)
        monkeypatch.setattr(safetensors.torch, "safe_open", refuse)
        monkeypatch.setattr(safetensors.torch, "load_file", refuse)

    return arm


def test_reads_the_same_tensors_as_safetensors(tmp_path):
    path = tmp_path / "all.safetensors"
    save_file(every_dtype(), str(path), metadata={"ss_network_dim": "4"})
    want = load_file(str(path))
    got = read_tensors(path)
    assert list(got) == list(read_header(path).tensors) and got.keys() == want.keys()
    assert all(same(got[k], want[k]) for k in want), [k for k in want if not same(got[k], want[k])]
    assert list(read_tensors(path, ["f16", "bf16"])) == ["f16", "bf16"]  # only those asked, in that order
    got["f32"].add_(1)  # each tensor owns its memory: no view into a shared buffer or a map
    assert same(read_tensors(path, ["f16"])["f16"], want["f16"])
    check_layout(read_header(path))  # a file safetensors wrote tiles its data exactly


@pytest.mark.parametrize("after", [0, 10, 70])
def test_a_read_failing_mid_file_is_a_clear_error_naming_it(tmp_path, pulled, after):
    path = tmp_path / "style.safetensors"
    save_file({"a": torch.ones(16), "b": torch.ones(16)}, str(path))
    pulled(after)
    with pytest.raises(StorageError) as e:
        read_tensors(path)
    assert e.value.code == "DR-STORAGE-GONE"
    assert str(e.value) == f"cannot read {path}: {tmp_path} stopped answering (a drive removed?): reconnect it and" \
                           " try again"


def test_a_file_cut_short_after_its_header_was_read(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(path))
    header = read_header(path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(TensorReadError, match="vae.safetensors: cannot read tensors .*ends inside tensor 'b'"):
        read_tensors(path, header=header)


def test_layouts_safetensors_would_refuse_are_refused(tmp_path):
    def raw(entries: dict, data: bytes) -> Path:
        head = json.dumps(entries).encode()
        path = tmp_path / "odd.safetensors"
        path.write_bytes(struct.pack("<Q", len(head)) + head + data)
        return path

    gap = raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    with pytest.raises(TensorReadError, match="odd.safetensors: .*starts at byte 4"):
        check_layout(read_header(gap))
    extra = raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8)
    with pytest.raises(TensorReadError, match="cover 4 bytes of its 8"):
        check_layout(read_header(extra))
    odd = raw({"a": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(TensorReadError, match="dtype U16"):
        read_tensors(odd)


def lora_file(path: Path) -> Path:
    base = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{base}.lora_down.weight": torch.randn(4, 8), f"{base}.lora_up.weight": torch.randn(8, 4),
               f"{base}.alpha": torch.tensor(2.0)}, str(path))
    return path


def test_every_reader_of_user_files_reads_without_a_memory_map(tmp_path, tiny_model, no_mmap):
    lora = LoraFile(lora_file(tmp_path / "style.safetensors"))
    save_file(tiny_model("sd1")["state_dicts"]["vae"], str(tmp_path / "vae.safetensors"))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "emb.safetensors"))
    save_file({"control_model.input_blocks.0.0.weight": torch.ones(2)}, str(tmp_path / "cn.safetensors"))
    save_file({"weight": torch.ones(3)}, str(tmp_path / "4x-up.safetensors"))
    no_mmap()
    assert lora.modules()
    assert load_vae_file(tmp_path / "vae.safetensors") is not None
    assert read_embedding(tmp_path / "emb.safetensors").vectors[""].shape == (2, 32)
    tensors, _ = read_controlnet(tmp_path / "cn.safetensors")
    assert list(tensors) == ["control_model.input_blocks.0.0.weight"]
    assert read_state_dict(tmp_path / "4x-up.safetensors")["weight"].shape == (3,)
    model = load_checkpoint(tiny_model("sd1")["path"], LoadOptions())  # the checkpoint loader never did
    assert model.unet is not None


def test_a_drive_pulled_while_a_lora_vae_embedding_or_controlnet_is_read(tmp_path, tiny_model, pulled):
    """Each reader lets the failed read out as the one-line error naming the file (the CLI and server render a
    DarkroomError without a traceback), never a crash or a generic error."""
    lora = LoraFile(lora_file(tmp_path / "style.safetensors"))
    save_file(tiny_model("sd1")["state_dicts"]["vae"], str(tmp_path / "vae.safetensors"))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "emb.safetensors"))
    save_file({"control_model.input_blocks.0.0.weight": torch.ones(2)}, str(tmp_path / "cn.safetensors"))
    save_file({"weight": torch.ones(3)}, str(tmp_path / "4x-up.safetensors"))
    pulled(4)  # every file here holds more than 4 bytes of tensor data
    cases = [(lora.modules, "style"), (lambda: load_vae_file(tmp_path / "vae.safetensors"), "vae"),
             (lambda: read_embedding(tmp_path / "emb.safetensors"), "emb"),
             (lambda: read_controlnet(tmp_path / "cn.safetensors"), "cn"),
             (lambda: read_state_dict(tmp_path / "4x-up.safetensors"), "4x-up")]
    for read, name in cases:
        with pytest.raises(StorageError) as e:
            read()
        assert e.value.code == "DR-STORAGE-GONE"
        assert str(e.value).startswith(f"cannot read {tmp_path / name}.safetensors: {tmp_path} stopped answering")


def test_an_embedding_cut_short_is_an_embedding_error(tmp_path, monkeypatch):
    path = tmp_path / "emb.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(path))
    header = read_header(path)
    monkeypatch.setattr("darkroom.text.embeddings.read_header", lambda p: header)  # listed before it was cut
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 8)
    with pytest.raises(EmbeddingError, match="emb.safetensors: cannot read tensors .*ends inside tensor"):
        read_embedding(path)


def test_a_lora_cut_short_after_it_was_listed(tmp_path):
    lora = LoraFile(lora_file(tmp_path / "style.safetensors"))
    with open(lora.path, "r+b") as fh:
        fh.truncate(lora.path.stat().st_size - 8)
    with pytest.raises(ModelLoadError, match=r"LoRA 'style' \(style.safetensors\): cannot read tensors \(.*truncated"):
        lora.modules()
