"""ControlNet files: every layout loads to the same model, listings, names, kinds we refuse, the cache."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from darkroom.control import files as cn_files
from darkroom.control.config import classify
from darkroom.control.files import find_controlnets, resolve
from darkroom.control.load import ControlNetCache, check_family, header_kind, load_controlnet
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.home import Home
from darkroom.testing.tiny_controlnet import build_tiny_controlnet, write_tiny_controlnet


def _inputs(model, family: str):
    """Deterministic inputs for one forward pass of a tiny ControlNet of `family`."""
    g = torch.Generator().manual_seed(3)
    cfg = model.config
    extra = None
    if family == "sdxl":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra = {"text_embeds": torch.randn(2, pooled, generator=g),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return dict(sample=torch.randn(2, 4, 16, 16, generator=g), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(2, 7, cfg.cross_attention_dim, generator=g),
                controlnet_cond=torch.rand(2, 3, 32, 32, generator=g), added_cond_kwargs=extra, return_dict=False)


def _outputs(model, family):
    with torch.no_grad():
        down, mid = model(**_inputs(model, family))
    return [*down, mid]


LAYOUTS = [
    ("sd1", "single", ".safetensors", torch.float32),
    ("sd1", "single-noprefix", ".safetensors", torch.float32),
    ("sd1", "single", ".pth", torch.float16),
    ("sd1", "single-noprefix", ".pth", torch.float32),
    ("sd1", "single", ".safetensors", torch.float16),
    ("sd1", "diffusers-single", ".safetensors", torch.float32),
    ("sd1", "diffusers", "", torch.float32),
    ("sd2", "single", ".safetensors", torch.float32),
    ("sdxl", "single", ".safetensors", torch.float32),
    ("sdxl", "diffusers-single", ".safetensors", torch.float16),
    ("sdxl", "diffusers", "", torch.float16),
]


@pytest.mark.parametrize("family,layout,suffix,dtype", LAYOUTS,
                         ids=[f"{f}-{lay}{s}-{str(d)[6:]}" for f, lay, s, d in LAYOUTS])
def test_every_layout_loads_to_the_reference_model(tmp_path, family, layout, suffix, dtype):
    """Same tensors and the same outputs as the diffusers model the file was written from: the key mapping
    and the config inferred from shapes (widths, depths, heads, SDXL's add embedding) are both right."""
    path = write_tiny_controlnet(tmp_path, "cn", family, layout, dtype=dtype, suffix=suffix or ".safetensors",
                                 variant="fp16" if layout == "diffusers" and dtype == torch.float16 else None)
    if layout == "diffusers" and dtype == torch.float16:
        assert (path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = load_controlnet(path, dtype=torch.float32)
    reference = build_tiny_controlnet(family).to(dtype).float()
    assert loaded.family == family
    ours, theirs = loaded.model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for a, b in zip(_outputs(loaded.model, family), _outputs(reference, family), strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert list(loaded.model.config.conditioning_embedding_out_channels) == [16, 32]


def test_loads_in_the_requested_dtype(tmp_path):
    path = write_tiny_controlnet(tmp_path, "cn", "sd1", "single", dtype=torch.float32)
    loaded = load_controlnet(path, dtype=torch.float16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float16}
    assert loaded.nbytes() == sum(p.numel() * 2 for p in loaded.model.parameters())


def test_a_full_1_0_release_file_loads_only_the_control_model(tmp_path):
    """The ControlNet 1.0 files also hold a whole SD model under model.diffusion_model.: it is ignored."""
    from safetensors.torch import load_file, save_file

    path = write_tiny_controlnet(tmp_path, "cn", "sd1", "single")
    tensors = load_file(str(path))
    tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
    tensors["first_stage_model.encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(tensors, str(path))
    loaded = load_controlnet(path, dtype=torch.float32)
    assert torch.equal(loaded.model.conv_in.weight, build_tiny_controlnet("sd1").conv_in.weight)


def test_family_comes_from_the_header(tmp_path):
    for family in ("sd1", "sd2", "sdxl"):
        for layout in ("single", "diffusers-single", "diffusers"):
            kind = header_kind(write_tiny_controlnet(tmp_path / family, f"cn-{layout}", family, layout))
            assert kind is not None and kind.supported and kind.family == family, (family, layout, kind)
    assert header_kind(write_tiny_controlnet(tmp_path, "p", "sd1", "single", suffix=".pth")) is None  # a pickle


def test_real_context_widths_name_the_family():
    """Real files: 768 context = SD1, 1024 = SD2 (both linear or conv projections), SDXL's add embedding."""
    base = {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3), "conv_in.weight": (320, 4, 3, 3),
            "down_blocks.0.resnets.0.conv2.weight": (320, 320, 3, 3),
            "down_blocks.0.attentions.0.proj_in.weight": (320, 320)}
    sd1 = classify({**base, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768)})
    sd2 = classify({**base, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 1024)})
    assert (sd1.family, sd2.family) == ("sd1", "sd2")


@pytest.mark.parametrize("keys,what", [
    ({"body.0.block1.weight": (4,), "conv_in.weight": (4,)}, "T2I-Adapter"),
    ({"adapter.body.0.resnets.0.block1.weight": (4,)}, "T2I-Adapter"),
    ({"lora_controlnet": (0,), "input_blocks.1.0.in_layers.2.up": (4,)}, "Control-LoRA"),
    ({"task_embedding": (8, 320), "controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3)}, "Union"),
    ({"lllite_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.down.0.weight": (4,)}, "SD1/SD2 ControlNet-LLLite"),
    ({"lllite_unet_conv_in.down.0.weight": (4,)}, "LLLite model whose layout is not recognised"),
    ({"decoder.conv_in.weight": (4,)}, "not a ControlNet"),
])
def test_other_control_models_are_refused_clearly(tmp_path, keys, what):
    from safetensors.torch import save_file

    kind = classify(keys)
    assert not kind.supported and what in kind.detail
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(v) for k, v in keys.items()}, str(path))
    with pytest.raises(InvalidRequest, match="supported") as err:
        load_controlnet(path, dtype=torch.float32)
    assert "other.safetensors" in str(err.value) and what in str(err.value)


def test_damaged_union_diffusers_folder_is_a_load_error(tmp_path):
    """Union folders load (tests/test_controlnet_union.py); one that cannot is an error naming it."""
    folder = tmp_path / "union"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetUnionModel"}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="union: the diffusers ControlNet Union model could not be loaded"):
        load_controlnet(folder, dtype=torch.float32)


def test_damaged_files_are_model_load_errors(tmp_path):
    path = write_tiny_controlnet(tmp_path, "cn", "sd1", "single")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cn.safetensors"):
        load_controlnet(path, dtype=torch.float32)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="bad.pth"):
        load_controlnet(bad, dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="not found"):
        load_controlnet(tmp_path / "missing.safetensors", dtype=torch.float32)


def test_wrong_family_names_both():
    with pytest.raises(InvalidRequest) as err:
        check_family("sd1", "control_v11p_sd15_canny", "sdxl", "juggernautXL")
    assert str(err.value) == ("control_v11p_sd15_canny is an SD1 ControlNet; the checkpoint juggernautXL is SDXL;"
                              " pick an SDXL ControlNet")
    check_family("sdxl", "x", "sdxl", "y")  # same family: fine


def _legacy_hash(path) -> str:
    data = path.read_bytes()
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_listing_reads_every_install_folder(tmp_path):
    a1111, comfy = tmp_path / "a1111", tmp_path / "comfy"
    home = Home(tmp_path / "home", extra_model_dirs=[a1111, comfy]).ensure()
    write_tiny_controlnet(home.controlnets, "mine", "sd1", "single")
    write_tiny_controlnet(home.controlnets / "sub", "folder-cn", "sdxl", "diffusers")
    big = write_tiny_controlnet(a1111 / "models" / "ControlNet", "control_xl", "sdxl", "single")  # > 1 MiB
    write_tiny_controlnet(a1111 / "extensions" / "sd-webui-controlnet" / "models", "ext_cn", "sd1", "single",
                          suffix=".pth")
    write_tiny_controlnet(comfy / "models" / "controlnet", "comfy_cn", "sd2", "single-noprefix")
    write_tiny_controlnet(comfy / "models" / "controlnet", "mine", "sdxl", "single")  # same name: first wins
    (home.controlnets / "notes.safetensors").write_bytes(b"garbage")  # damaged: reported, not listed
    problems: list[str] = []
    found = {f.name: f for f in find_controlnets(home, problems)}
    # the built-in starter ControlNet is always listed, after the user's own
    assert set(found) == {"mine", "folder-cn", "control_xl", "ext_cn", "comfy_cn", "darkroom-starter-control"}
    assert found["darkroom-starter-control"].family == "sd1"
    assert found["mine"].family == "sd1" and found["mine"].folder == "controlnet"
    assert found["folder-cn"].family == "sdxl" and found["folder-cn"].path.is_dir()
    assert found["control_xl"].folder == "ControlNet" and found["ext_cn"].folder == "models"
    assert found["ext_cn"].family is None  # a pickle: known once loaded
    assert found["comfy_cn"].family == "sd2"
    assert any("notes.safetensors" in p for p in problems)
    assert big.stat().st_size > 0x110000
    assert found["control_xl"].title == f"control_xl [{_legacy_hash(big)}]"
    assert found["folder-cn"].title.startswith("folder-cn [")


def test_unsupported_kinds_are_listed_but_not_usable(tmp_path):
    from safetensors.torch import save_file

    home = Home(tmp_path / "home").ensure()
    home.controlnets.mkdir(parents=True)
    save_file({"body.0.block1.weight": torch.zeros(2)}, str(home.controlnets / "t2iadapter_canny.safetensors"))
    files = [f for f in find_controlnets(home) if f.name != "darkroom-starter-control"]  # the built-in
    assert [(f.name, f.supported) for f in files] == [("t2iadapter_canny", False)]
    with pytest.raises(InvalidRequest, match="T2I-Adapter"):
        resolve(files, "t2iadapter_canny")


def test_resolve_accepts_every_way_of_naming(tmp_path):
    home = Home(tmp_path / "home").ensure()
    path = write_tiny_controlnet(home.controlnets, "control_v11p_sd15_canny", "sd1", "single")
    write_tiny_controlnet(home.controlnets, "other", "sd1", "single", seed=1)
    files = find_controlnets(home)
    target = next(f for f in files if f.name == "control_v11p_sd15_canny")
    for wanted in ("control_v11p_sd15_canny", target.title, "control_v11p_sd15_canny [00000000]",
                   "control_v11p_sd15_canny.safetensors", str(path), "CONTROL_V11P_SD15_CANNY"):
        assert resolve(files, wanted) is target, wanted
    with pytest.raises(InvalidRequest) as err:
        resolve(files, "control_v11p_sd15_depth")
    assert "control_v11p_sd15_depth" in str(err.value) and target.title in str(err.value)
    with pytest.raises(InvalidRequest, match="models/controlnet"):
        resolve([], "anything")


def test_the_starter_controlnet_is_listed_when_shipped(tmp_path, monkeypatch):
    """Shipped as one file with diffusers keys and the diffusers config in its metadata."""
    starter = write_tiny_controlnet(tmp_path / "assets", "darkroom-starter-control", "sd1", "diffusers-single")
    monkeypatch.setattr(cn_files, "STARTER_CONTROL", starter)
    home = Home(tmp_path / "home").ensure()
    [entry] = find_controlnets(home)
    assert (entry.name, entry.family, entry.folder) == ("darkroom-starter-control", "sd1", "builtin")
    assert load_controlnet(entry.path, dtype=torch.float32).family == "sd1"
    monkeypatch.setattr(cn_files, "STARTER_CONTROL", tmp_path / "absent.safetensors")
    assert find_controlnets(home) == []


def test_cache_loads_once_and_notices_a_changed_file(tmp_path):
    path = write_tiny_controlnet(tmp_path, "cn", "sd1", "single")
    cache = ControlNetCache(capacity=1)
    first = cache.get(path, dtype=torch.float32)
    assert cache.get(path, dtype=torch.float32) is first and cache.loads == 1
    assert cache.get(path, dtype=torch.float16) is not first and cache.loads == 2  # another dtype, capacity 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache.get(path, dtype=torch.float16)
    assert cache.loads == 3
    with pytest.raises(ModelLoadError, match="not found"):
        cache.get(tmp_path / "gone.safetensors", dtype=torch.float32)


def test_original_key_names_agree_with_diffusers_converter():
    """An independent check of the original layout's names (real 4-width hint block, input_hint_block.14 the
    last conv): diffusers' own single-file converter maps our file's keys to the same tensors as ours."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from darkroom.control.keys import controlnet_to_original, original_to_diffusers, strip_original_prefix
    from darkroom.testing.tiny_controlnet import tiny_controlnet_config

    config = {**tiny_controlnet_config("sd1"), "conditioning_embedding_out_channels": (16, 32, 96, 256)}
    state = ControlNetModel(**config).state_dict()
    original = controlnet_to_original(state, config)
    assert "control_model.input_hint_block.14.weight" in original
    theirs = convert_controlnet_checkpoint(dict(original), config)
    ours = original_to_diffusers(strip_original_prefix(original))
    assert set(ours) == set(theirs) == set(state)
    assert all(ours[k] is theirs[k] for k in ours)


def test_a_diffusers_folder_of_another_control_class_is_refused_by_name(tmp_path):
    folder = tmp_path / "controlnet-xs"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetXSAdapter"}))
    with pytest.raises(InvalidRequest, match="controlnet-xs is a ControlNet-XS model; only ControlNets, ControlNet"
                                             " Union models and T2I-Adapters are supported"):
        load_controlnet(folder, dtype=torch.float32)
