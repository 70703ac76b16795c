"""seg_ofade20k / seg_ofcoco: OneFormer's detectron2 checkpoints renamed onto transformers'
OneFormerForUniversalSegmentation, the predictor's resize and normalisation, semantic inference and the
dataset palettes.

The pinned numbers were checked against the extension's own OneFormer code (annotator/oneformer from
sd-webui-controlnet, run on the same tiny file and padded picture): its class scores agree to 2e-5 and its
labels are the same at every pixel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control.annotators import oneformer as of
from darkroom.control.annotators import palettes
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_oneformer import FULL, TINY, oneformer_state, write_oneformer


def _picture() -> np.ndarray:
    y, x = np.mgrid[0:96, 0:128].astype(np.float32)
    img = np.stack([x * 2, y * 2.5, 255 - x - y], -1)
    img[20:60, 30:80] = (250, 30, 40)
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def ade_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("annotators")
    write_oneformer(folder / "oneformer" / of.FILES["ade20k"], seed=3)
    return folder


def test_original_layout_loads_strictly_with_its_config(ade_dir):
    model = of.load(ade_dir / "oneformer" / of.FILES["ade20k"])
    c = model.config
    assert (c.num_labels, c.num_queries, c.decoder_layers, c.query_dec_layers, c.encoder_layers) == (5, 6, 3, 1, 1)
    widths = (c.hidden_dim, c.conv_dim, c.mask_dim, c.dim_feedforward, c.encoder_feedforward_dim)
    assert widths == (64, 64, 64, 96, 1024)
    assert c.num_attention_heads == 8 and c.task_seq_len == 77
    b = c.backbone_config
    assert (b.embed_dim, b.depths, b.num_heads, b.window_size) == (32, [1, 1, 2, 1], [1, 2, 4, 8], 4)


def test_renaming_drops_only_the_training_parts():
    state = oneformer_state(seed=0)
    renamed = of._rename(state)
    dropped = {k.split(".")[0] for k in state if k.startswith(of._DROPPED)}
    assert dropped == {"text_encoder", "text_projector", "prompt_ctx"}
    indices = [k for k in state if k.endswith("relative_position_index")]
    kept = len(state) - sum(k.startswith(of._DROPPED) for k in state) - len(indices)
    fused = sum(k.endswith(("attn.qkv.weight", "attn.qkv.bias", "self_attn.in_proj_weight", "self_attn.in_proj_bias"))
                and ("transformer_self_attention_layers" in k or k.startswith("backbone.")) for k in state)
    assert len(renamed) == kept + 2 * fused  # each fused projection became three
    assert torch.equal(renamed["criterion.empty_weight"], state["criterion.empty_weight"])
    # Swin's fused projection is split in q, k, v order
    qkv = state["backbone.layers.2.blocks.1.attn.qkv.weight"]
    prefix = "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.1.attention."
    assert torch.equal(renamed[prefix + "q_proj.weight"], qkv[:128])
    assert torch.equal(renamed[prefix + "v_proj.weight"], qkv[256:])


def test_released_shapes_give_swin_l_with_the_extension_model_size():
    from transformers import OneFormerForUniversalSegmentation

    state = oneformer_state(FULL, seed=None)  # shapes only
    config = of._config(state)
    assert (config.num_queries, config.num_labels, config.decoder_layers, config.query_dec_layers) == (250, 150, 10, 2)
    b = config.backbone_config
    assert (b.embed_dim, b.depths, b.num_heads, b.window_size) == (192, [2, 2, 18, 2], [6, 12, 24, 48], 12)
    with torch.device("meta"):
        model = OneFormerForUniversalSegmentation(config)
    renamed = of._rename(state)
    renamed.update({k: v for k, v in model.state_dict().items() if k.startswith(of._UNUSED) and k not in renamed})
    model.load_state_dict(renamed, strict=True, assign=True)
    used = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(of._UNUSED))
    assert used == 218_811_147  # the extension's OneFormer (Swin-L, ADE20K) built from its yaml


def test_task_is_clip_tokenised_as_oneformer_does():
    tokens = of.task_tokens()
    assert tokens.shape == (1, 77)
    assert tokens[0, :8].tolist() == [49406, 518, 10549, 533, 29119, 1550, 49407, 0]
    assert not tokens[0, 7:].any()


def test_predictor_size_is_detectron2_resize_shortest_edge():
    assert of.predictor_size(512, 704, *of.TEST_SIZE["ade20k"]) == (640, 880)
    assert of.predictor_size(512, 704, *of.TEST_SIZE["coco"]) == (800, 1100)
    assert of.predictor_size(64, 1024, *of.TEST_SIZE["ade20k"]) == (160, 2560)  # the long side capped
    assert of.predictor_size(704, 576, 640, 2560) == (782, 640)  # 782.2 rounds down, half up


def test_network_sees_rgb_normalised_and_padded_to_32(ade_dir, monkeypatch):
    model = of.load(ade_dir / "oneformer" / of.FILES["ade20k"])
    seen = {}
    forward = model.forward

    def spy(pixel_values, task_inputs):
        seen["x"], seen["task"] = pixel_values, task_inputs
        return forward(pixel_values=pixel_values, task_inputs=task_inputs)

    monkeypatch.setattr(model, "forward", spy)
    red = np.zeros((512, 704, 3), np.uint8)
    red[..., 0] = 255
    scores = of.class_scores(model, red, "ade20k")
    x = seen["x"]
    assert x.shape == (1, 3, 640, 896)  # 640 x 880, padded with zeros to a multiple of 32
    assert x[0, 0, 0, 0].item() == pytest.approx((255 - 123.675) / 58.395)
    assert x[0, 2, 0, 0].item() == pytest.approx(-103.53 / 57.375)
    assert not x[0, :, :, 880:].any()
    assert scores.shape == (5, 512, 704)


def test_pinned_map_on_a_tiny_file(ade_dir):
    model = of.load(ade_dir / "oneformer" / of.FILES["ade20k"])
    from darkroom.control.annotators import imageops

    padded, (h, w) = imageops.pad64(imageops.to_resolution(_picture(), 128))
    scores = of.class_scores(model, padded, "ade20k")
    assert scores.shape == (5, 128, 192)
    expected = {(0, 0): [0.00065, 0.60633, 0.00291, 0.66795, 0.9211],  # since imageops' cubic is OpenCV's
                (40, 60): [0.00126, 0.78249, 0.00431, 0.9303, 1.1122],
                (100, 150): [0.00027, 0.06222, 0.00102, 0.45387, 0.36595]}
    for (y, x), values in expected.items():
        assert scores[:, y, x].tolist() == pytest.approx(values, abs=5e-5)
    out = of.detect(_picture(), 128, [ade_dir], "ade20k")
    assert out.shape == (h, w, 3) == (128, 171, 3) and out.dtype == np.uint8
    colours, counts = np.unique(out.reshape(-1, 3), axis=0, return_counts=True)
    found = {tuple(c): int(n) for c, n in zip(colours.tolist(), counts, strict=True)}
    ade = palettes.ADE20K
    assert found == {ade[1]: 3315, ade[3]: 10464, ade[4]: 8109}
    assert tuple(out[0, 0]) == ade[4] and tuple(out[0, 33]) == ade[3] and tuple(out[100, 20]) == ade[1]


@pytest.mark.parametrize("kind, classes, winner", [("ade20k", 5, 3), ("coco", 133, 120)])
def test_the_winning_class_takes_its_dataset_colour(tmp_path, kind, classes, winner):
    state = oneformer_state({"classes": classes}, seed=0)
    key = "sem_seg_head.predictor.class_embed."
    state[key + "weight"] = torch.zeros_like(state[key + "weight"])
    state[key + "bias"] = torch.zeros(classes + 1)
    state[key + "bias"][winner] = 20.0
    (tmp_path / "oneformer").mkdir()
    torch.save({"model": state}, tmp_path / "oneformer" / of.FILES[kind])
    out = of.detect(np.full((64, 64, 3), 128, np.uint8), 64, [tmp_path], kind)
    table = palettes.ADE20K if kind == "ade20k" else palettes.COCO_PANOPTIC
    assert out.shape == (64, 64, 3)
    assert (out == np.array(table[winner], np.uint8)).all()


def test_palettes_are_detectron2s():
    assert len(palettes.ADE20K) == 150 and len(palettes.COCO_PANOPTIC) == 133
    assert palettes.COCO_PANOPTIC[0] == (220, 20, 60) and palettes.COCO_PANOPTIC[132] == (250, 141, 255)
    assert palettes.ADE20K[0] == (120, 120, 120) and palettes.ADE20K[149] == (92, 0, 255)
    labels = np.array([[0, 1], [132, 200]])
    assert of.colour(labels, "coco").tolist() == [[[220, 20, 60], [119, 11, 32]], [[250, 141, 255], [255, 255, 255]]]


def test_missing_file_and_unknown_kind_are_clear(tmp_path):
    with pytest.raises(InvalidRequest, match="250_16_swin_l_oneformer_ade20k_160k.pth"):
        of.detect(_picture(), 64, [tmp_path], "ade20k")
    with pytest.raises(InvalidRequest, match="cityscapes"):
        of.detect(_picture(), 64, [tmp_path], "cityscapes")


def test_wrong_file_is_a_clear_load_error(tmp_path):
    path = tmp_path / of.FILES["coco"]
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ModelLoadError, match="150_16_swin_l_oneformer_coco_100ep.pth: not a OneFormer"):
        of.load(path)


def test_an_unknown_or_missing_key_is_named(tmp_path):
    state = oneformer_state(seed=0)
    state["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(3)
    torch.save({"model": state}, tmp_path / "a.pth")
    with pytest.raises(ModelLoadError, match=r"1 unexpected, e\.g\. sem_seg_head\.predictor\.extra_head\.weight"):
        of.load(tmp_path / "a.pth")
    state = oneformer_state(seed=0)
    del state["sem_seg_head.pixel_decoder.layer_1.norm.bias"]
    torch.save({"model": state}, tmp_path / "b.pth")
    with pytest.raises(ModelLoadError, match=r"missing, e\.g\. model\.pixel_level_module\.decoder\.layer_1\.1\.bias"):
        of.load(tmp_path / "b.pth")


def test_tiny_spec_is_small():
    assert sum(v.numel() for v in oneformer_state(TINY, seed=0).values()) < 2_500_000


def test_through_the_preprocessor_registry(ade_dir):
    """seg_ofade20k (key oneformer_ade20k, the Segmentation type's default) from the extension's downloads folder
    layout; its resolution slider is hidden as there, and a missing COCO file is named."""
    from PIL import Image

    from darkroom.control import preprocess as pp

    out = pp.detect("seg_ofade20k", Image.fromarray(_picture()), resolution=128, annotator_dirs=[ade_dir])
    assert out.shape == (128, 171, 3)
    assert np.array_equal(np.rint(out * 255).astype(np.uint8), of.detect(_picture(), 128, [ade_dir], "ade20k"))
    assert pp.module_list()["module_detail"]["oneformer_ade20k"]["sliders"] == []
    with pytest.raises(InvalidRequest, match="150_16_swin_l_oneformer_coco_100ep.pth"):
        pp.detect("seg_ofcoco", Image.fromarray(_picture()), annotator_dirs=[ade_dir])
