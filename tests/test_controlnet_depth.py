"""The depth_anything and depth_midas preprocessors: the original checkpoints' key layouts renamed onto
transformers' DepthAnythingForDepthEstimation and hybrid DPTForDepthEstimation (tiny files, loaded strictly),
and the extension's pre- and post-processing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from darkroom.control import preprocess as pp
from darkroom.control.annotators import depth
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import depth_anything_state, midas_hybrid_state, save


def _picture(h=90, w=120) -> Image.Image:
    return Image.fromarray(np.random.RandomState(5).randint(0, 256, (h, w, 3)).astype(np.uint8))


def test_tiny_file_loads_strictly_and_gives_a_stretched_map(tmp_path):
    save(depth_anything_state(), tmp_path / "depth_anything" / "depth_anything_vitl14.pth")
    out = pp.detect("depth_anything", _picture(), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1 and out.std() > 0
    assert (out[:, :, 0] == out[:, :, 2]).all()  # grey


def test_original_tensors_land_where_they_belong(tmp_path):
    state = depth_anything_state(seed=2)
    model = depth.load(save(state, tmp_path / "depth_anything_vitl14.pth"))
    ours = model.state_dict()
    q, k, v, o = depth._attention_names(set(ours))
    qkv = state["pretrained.blocks.1.attn.qkv.weight"]
    assert torch.equal(ours[f"backbone.encoder.layer.1.{q}.weight"], qkv[:64])
    assert torch.equal(ours[f"backbone.encoder.layer.1.{k}.weight"], qkv[64:128])
    assert torch.equal(ours[f"backbone.encoder.layer.1.{v}.weight"], qkv[128:])
    assert torch.equal(ours["backbone.encoder.layer.3.layer_scale2.lambda1"], state["pretrained.blocks.3.ls2.gamma"])
    # refinenet4 fuses the deepest features first: the first fusion layer
    assert torch.equal(ours["neck.fusion_stage.layers.0.residual_layer2.convolution1.weight"],
                       state["depth_head.scratch.refinenet4.resConfUnit2.conv1.weight"])
    assert torch.equal(ours["neck.reassemble_stage.layers.3.resize.weight"], state["depth_head.resize_layers.3.weight"])
    assert torch.equal(ours["head.conv3.bias"], state["depth_head.scratch.output_conv2.2.bias"])


def test_the_released_sizes_map_with_nothing_missing():
    from transformers import DepthAnythingForDepthEstimation

    state = depth_anything_state(hidden=1024, blocks=24, side=37, outs=(256, 512, 1024, 1024), features=256,
                                 meta=True)
    config = depth._config(state)
    assert config.backbone_config.out_indices == [21, 22, 23, 24] and config.backbone_config.image_size == 518
    assert config.backbone_config.num_attention_heads == 16
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(config)
    model.load_state_dict(depth._rename(state, 1024, set(model.state_dict())), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == 335_315_649  # Depth Anything ViT-L


def test_bad_files_are_named(tmp_path):
    state = depth_anything_state()
    del state["depth_head.scratch.refinenet2.out_conv.bias"]
    path = save(state, tmp_path / "depth_anything_vitl14.pth")
    with pytest.raises(ModelLoadError, match="depth_anything_vitl14.pth: not a Depth Anything weight file"):
        pp.detect("depth_anything", _picture(), annotator_dirs=[tmp_path])
    torch.save({"conv1_1.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError, match="not a Depth Anything weight file"):
        pp.detect("depth_anything", _picture(), annotator_dirs=[tmp_path])
    with pytest.raises(InvalidRequest, match="needs depth_anything_vitl14.pth.*downloads/depth_anything"):
        pp.detect("depth_anything", _picture(), annotator_dirs=[tmp_path / "elsewhere"])


class _Probe(nn.Module):
    """Records what the network is fed and answers with depth rising from left to right."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        self.seen = pixel_values
        h, w = pixel_values.shape[2:]
        return SimpleNamespace(predicted_depth=torch.linspace(0, 5, w).expand(1, h, w).clone())


def test_input_is_518_multiples_of_14_in_bgr_and_output_is_stretched(tmp_path, monkeypatch):
    probe = _Probe()
    red = np.zeros((64, 96, 3), np.uint8)
    red[..., 0] = 255
    d = depth.depth(probe, red)
    assert tuple(probe.seen.shape) == (1, 3, 518, 784)  # 777 rounds to 784: both sides at least 518
    means = probe.seen[0].mean(dim=(1, 2))
    assert means[2] > 2 and means[0] < -1  # the extension's swap: red arrives as the third channel
    assert d.shape == (64, 96)
    monkeypatch.setattr(depth, "load", lambda path, v2=False: probe)
    save(depth_anything_state(), tmp_path / "depth_anything_vitl14.pth")
    out = pp.detect("depth_anything", Image.fromarray(red), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 96, 3)
    assert out[:, 0].max() < 0.02 and out[:, -1].min() > 0.6  # near (large) is white
    assert pp.module_list()["module_detail"]["depth_anything"]["sliders"] == []  # as the extension: hidden


# --- depth_midas: MiDaS v3 DPT-Hybrid --------------------------------------------------------------------------

def test_midas_tiny_file_loads_strictly_and_keeps_non_square_pictures(tmp_path):
    save(midas_hybrid_state(), tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt")
    out = pp.detect("depth_midas", _picture(), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0
    assert np.array_equal(out, pp.detect("depth", _picture(), resolution=64, annotator_dirs=[tmp_path]))
    model = depth.load_midas(tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt")
    wide = np.random.RandomState(1).randint(0, 256, (64, 192, 3)).astype(np.uint8)
    assert depth.midas_depth(model, wide).shape == (64, 192)  # the grid follows the picture, 4x12 patches
    square = wide[:, :64]
    model.dpt.embeddings.image_size = (64, 64)
    with torch.no_grad():  # on a square picture: what transformers' own forward gives
        x = torch.from_numpy(square).float().permute(2, 0, 1)[None] / 127.5 - 1
        ref = model(pixel_values=x).predicted_depth[0].numpy()
    assert np.allclose(depth.midas_depth(model, square), ref, atol=1e-5)


def test_midas_original_tensors_land_where_they_belong(tmp_path):
    state = midas_hybrid_state(seed=4)
    ours = depth.load_midas(save(state, tmp_path / "dpt_hybrid-midas-501f0c75.pt")).state_dict()
    attention = [k for k in ours if k.startswith("dpt.encoder.layer.2.attention") and k.endswith(".weight")]
    qkv = state["pretrained.model.blocks.2.attn.qkv.weight"]
    for i, part in enumerate(("q", "k", "v")):
        (name,) = [k for k in attention if f".{part}_proj." in k or k.endswith(
            {"q": "query.weight", "k": "key.weight", "v": "value.weight"}[part])]
        assert torch.equal(ours[name], qkv[i * 64:(i + 1) * 64])
    prefix = "dpt.embeddings.backbone.bit."
    assert torch.equal(ours[prefix + "embedder.convolution.weight"],
                       state["pretrained.model.patch_embed.backbone.stem.conv.weight"])
    assert torch.equal(ours[prefix + "encoder.stages.2.layers.1.norm3.bias"],
                       state["pretrained.model.patch_embed.backbone.stages.2.blocks.1.norm3.bias"])
    pairs = {"neck.reassemble_stage.readout_projects.3.0.weight": "pretrained.act_postprocess4.0.project.0.weight",
             "neck.reassemble_stage.layers.3.resize.weight": "pretrained.act_postprocess4.4.weight",
             "neck.reassemble_stage.layers.2.projection.bias": "pretrained.act_postprocess3.3.bias",
             "neck.fusion_stage.layers.3.projection.weight": "scratch.refinenet1.out_conv.weight",
             "neck.convs.3.weight": "scratch.layer4_rn.weight",
             "head.head.4.bias": "scratch.output_conv.4.bias",
             "dpt.encoder.layer.5.layernorm_after.weight": "pretrained.model.blocks.5.norm2.weight"}
    for theirs_key, original in pairs.items():
        assert torch.equal(ours[theirs_key], state[original]), theirs_key

def test_midas_released_sizes_map_with_nothing_missing():
    from transformers import DPTForDepthEstimation

    state = midas_hybrid_state(hidden=768, blocks=12, side=24, stem=64, stages=((3, 256), (4, 512), (9, 1024)),
                               outs=(256, 512, 768, 768), features=256, meta=True)
    config = depth._midas_config(state)
    assert config.backbone_out_indices == [0, 1, 8, 11] and config.image_size == 384
    with torch.device("meta"):
        model = DPTForDepthEstimation(config)
    model.load_state_dict(depth._midas_rename(state, 768, set(model.state_dict())), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == 122_377_985  # DPT-Hybrid without its classifier


def test_midas_bad_files_and_the_stretch(tmp_path, monkeypatch):
    state = midas_hybrid_state()
    del state["pretrained.model.blocks.3.mlp.fc2.bias"]
    path = save(state, tmp_path / "dpt_hybrid-midas-501f0c75.pt")
    with pytest.raises(ModelLoadError, match="dpt_hybrid-midas-501f0c75.pt: not a MiDaS DPT-Hybrid weight file"):
        pp.detect("depth_midas", _picture(), annotator_dirs=[tmp_path])
    save(depth_anything_state(), path)
    with pytest.raises(ModelLoadError, match="not a MiDaS DPT-Hybrid weight file"):
        pp.detect("depth_midas", _picture(), annotator_dirs=[tmp_path])
    with pytest.raises(InvalidRequest, match="depth_midas needs dpt_hybrid-midas-501f0c75.pt.*downloads/midas"):
        pp.detect("depth_midas", _picture(), annotator_dirs=[tmp_path / "elsewhere"])
    seen = {}

    def fake_depth(model, img):
        seen["img"] = img
        return np.tile(np.linspace(2.0, 7.0, img.shape[1], dtype=np.float32), (img.shape[0], 1))

    monkeypatch.setattr(depth, "load_midas", lambda path: nn.Identity())
    monkeypatch.setattr(depth, "midas_depth", fake_depth)
    out = pp.detect("depth_midas", _picture(90, 120), resolution=64, annotator_dirs=[tmp_path])
    assert seen["img"].shape == (64, 128, 3)  # fed at the resolution, padded to 64, as the extension
    assert out.shape == (64, 85, 3) and out[:, 0].max() == 0 and out[:, -1].min() > 0.6
    assert pp.module_list()["module_detail"]["depth"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]


# --- depth_anything_v2: the same network, other blocks feed the head -----------------------------------------

def test_v2_safetensors_loads_strictly_and_takes_the_authors_blocks(tmp_path):
    path = save(depth_anything_state(blocks=8, seed=3),
                tmp_path / "depth_anything_v2" / "depth_anything_v2_vitl.safetensors")
    out = pp.detect("depth_anything_v2", _picture(), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and 0 <= out.min() and out.max() <= 1 and out.std() > 0
    assert (out[:, :, 0] == out[:, :, 2]).all()
    v1, v2 = depth.load(path), depth.load(path, v2=True)
    assert v1.config.backbone_config.out_indices == [5, 6, 7, 8]  # the last four blocks
    assert v2.config.backbone_config.out_indices == [2, 4, 6, 8]  # spread: blocks 1, 3, 5, 7
    img = np.asarray(_picture(56, 56))
    assert not np.allclose(depth.depth(v1, img), depth.depth(v2, img))  # the choice reaches the map
    assert pp.module_list()["module_detail"]["depth_anything_v2"]["sliders"] == []
    assert pp.module_status("depth_anything_v2", [tmp_path]) == (True, None)


@pytest.mark.parametrize(("hidden", "blocks", "outs", "features", "blocks_used", "params"), [
    (1024, 24, (256, 512, 1024, 1024), 256, [4, 11, 17, 23], 335_315_649),  # V2-Large, "335.3M"
    (768, 12, (96, 192, 384, 768), 128, [2, 5, 8, 11], 97_470_785),  # V2-Base, "97.5M"
    (384, 12, (48, 96, 192, 384), 64, [2, 5, 8, 11], 24_785_089),  # V2-Small, "24.8M"
])
def test_v2_released_sizes_take_the_authors_blocks(hidden, blocks, outs, features, blocks_used, params):
    from transformers import DepthAnythingForDepthEstimation

    state = depth_anything_state(hidden=hidden, blocks=blocks, side=37, outs=outs, features=features, meta=True)
    config = depth._config(state, v2=True)
    assert config.backbone_config.out_indices == [i + 1 for i in blocks_used]
    assert depth.v2_blocks(40) == [9, 19, 29, 39]  # ViT-G's, from the same table
    with torch.device("meta"):
        model = DepthAnythingForDepthEstimation(config)
    model.load_state_dict(depth._rename(state, hidden, set(model.state_dict())), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == params


def test_v2_other_installs_names_and_a_clear_error(tmp_path):
    state = depth_anything_state(blocks=8)
    comfy = tmp_path / "comfy"  # controlnet_aux's download path, the authors' .pth
    save(state, comfy / "depth-anything" / "Depth-Anything-V2-Small" / "depth_anything_v2_vits.pth")
    assert pp.detect("depth_anything_v2", _picture(), resolution=64, annotator_dirs=[comfy]).std() > 0
    save(state, tmp_path / "mine" / "depth_anything_v2_vitb.pth")
    found = depth.files.find(depth.V2_FILE, depth.V2_KIND, [tmp_path / "mine", comfy])
    assert found.name == "depth_anything_v2_vitb.pth"  # ViT-B before ViT-S, whichever folder comes first
    with pytest.raises(InvalidRequest, match=r"needs depth_anything_v2_vitl.safetensors \(or depth_anything_v2_vitl"
                                             r".pth\).*downloads/depth_anything_v2"):
        pp.detect("depth_anything_v2", _picture(), annotator_dirs=[tmp_path / "elsewhere"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "depth_anything_v2_vitl.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelLoadError, match="depth_anything_v2_vitl.safetensors"):
        pp.detect("depth_anything_v2", _picture(), annotator_dirs=[tmp_path / "bad"])


# --- normal_midas: normals from the MiDaS depth -----------------------------------------------------------

def test_midas_normals_follow_the_extensions_formula(tmp_path, monkeypatch):
    save(midas_hybrid_state(), tmp_path / "midas" / "dpt_hybrid-midas-501f0c75.pt")
    out = pp.detect("normal_midas", _picture(), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and out.std() > 0
    assert pp.module_list()["module_detail"]["normal_map"]["sliders"][1] == {
        "name": "Normal Background Threshold", "value": 0.4, "min": 0.0, "max": 1.0, "step": 0.01}
    ramp = np.tile(np.arange(128, dtype=np.float32), (64, 1))  # depth rising to the right, 1 per pixel
    monkeypatch.setattr(depth, "midas_depth", lambda model, img: ramp[: img.shape[0], : img.shape[1]])
    out = pp.detect("normal_midas", Image.new("RGB", (128, 64)), resolution=64, annotator_dirs=[tmp_path])
    px = np.rint(out * 255).astype(int)
    # Sobel x of a unit ramp is 8; n = (8, 0, 2 pi) / |.|, written as (z, y, x) colours
    n = np.array([8.0, 0.0, 2 * np.pi]) / np.hypot(8.0, 2 * np.pi)
    want = tuple(int(v) for v in (n * 127.5 + 127.5)[::-1])
    assert tuple(px[30, 100]) == want
    assert tuple(px[30, 20]) == (255, 127, 127)  # under 0.4 of the stretched depth: flat background
    flat = pp.detect("normal_midas", Image.new("RGB", (128, 64)), resolution=64, threshold_a=0.0,
                     annotator_dirs=[tmp_path])
    assert tuple(np.rint(flat[30, 20] * 255).astype(int)) == want  # threshold 0: no background
