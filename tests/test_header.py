"""Header parsing and detection catch bad files with one clear line each."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from darkroom.errors import ModelLoadError
from darkroom.models.families import detect
from darkroom.models.header import read_header


def _write_header_only(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_empty_and_text_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.safetensors: file is empty"):
        read_header(tmp_path / "empty.safetensors")
    (tmp_path / "notes.safetensors").write_text("hello, this is not a model at all")
    with pytest.raises(ModelLoadError, match="notes.safetensors: not a valid .safetensors file"):
        read_header(tmp_path / "notes.safetensors")


def test_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(1000), "b": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match="model.safetensors: file is truncated"):
        read_header(path)


def test_corrupt_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 20)
    with pytest.raises(ModelLoadError, match="corrupt .safetensors header"):
        read_header(path)


def test_metadata_and_shapes(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(2, 3, dtype=torch.float16)}, path, metadata={"k": "v"})
    h = read_header(path)
    assert h.metadata == {"k": "v"} and h.shape("x") == (2, 3) and h.dtypes == {"F16"}


@pytest.mark.parametrize(
    "keys,kind,detail",
    [
        (["model.diffusion_model.joint_blocks.0.x.weight"], "unsupported", "SD3"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "unsupported", "Flux"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "lora", "LoRA"),
        (["emb_params"], "embedding", "textual inversion embedding"),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "vae", "VAE"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "unsupported", None),
        (["something.else"], "unknown", None),
    ],
)
def test_detect_non_checkpoints(tmp_path, keys, kind, detail):
    path = tmp_path / "f.safetensors"
    _write_header_only(path, {k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                              for i, k in enumerate(keys)}, b"\0" * 4 * len(keys))
    d = detect(read_header(path))
    assert d.kind == kind
    if detail:
        assert d.detail == detail
