"""seg_ufade20k: UniFormer-S + UPerNet from upernet_global_small.pth's mmseg layout, mmseg's test pipeline as the
extension runs it (an RGB array taken for BGR, OpenCV's bilinear rescale into 2048 x 512) and the ADE20K colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control.annotators import imageops, uniformer
from darkroom.control.annotators.palettes import ADE20K
from darkroom.errors import ModelLoadError, ModelNotFound
from darkroom.testing.tiny_uniformer import uniformer_file_state, uniformer_state


def _write(path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(uniformer_file_state(**kw), path)
    return path


def _picture(h=64, w=96, seed=3):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def test_released_layout_and_a_narrow_file(tmp_path):
    with torch.device("meta"):
        full = uniformer.UPerNet()
    assert sum(p.numel() for p in full.parameters()) == 50_744_790  # UniFormer-S and the 512-wide UPerHead
    expected = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    released = {k: tuple(v.shape) for k, v in uniformer_state(full=True).items() if not k.startswith("auxiliary_head.")}
    assert released == expected  # every key and shape of the original layout, the auxiliary head aside
    net = uniformer.load(_write(tmp_path / uniformer.FILE))
    assert [len(getattr(net.backbone, f"blocks{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert net.backbone.blocks4[0].attn.heads == 2  # 128 channels in 64-wide heads


def test_output_is_pinned(tmp_path):
    """sd-webui-controlnet's own code (annotator/uniformer with its vendored mmcv/mmseg: inference_segmentor,
    show_result_pyplot with the ADE palette) gave these values on the same file and picture; Darkroom's
    logits agreed to 3e-6 and the map to the pixel. The picture is rescaled 8x (to 512 x 768) on the way."""
    net = uniformer.load(_write(tmp_path / uniformer.FILE, seed=1))
    img = _picture()
    assert tuple(uniformer.network_input(img).shape) == (1, 3, 512, 768)
    logits = uniformer.logits(net, img)
    assert logits.shape == (1, 150, 64, 96)
    for (y, x), class0, class7, best in (((0, 0), -0.1828909218, -0.7408409119, 84),
                                         ((10, 20), -0.7157961130, -1.0830271244, 51),
                                         ((40, 80), -0.5985080004, -0.9246374369, 135)):
        assert float(logits[0, 0, y, x]) == pytest.approx(class0, abs=1e-5)
        assert float(logits[0, 7, y, x]) == pytest.approx(class7, abs=1e-5)
        assert int(logits[0, :, y, x].argmax()) == best
    classes = uniformer.labels(net, img)
    counts = dict(zip(*(v.tolist() for v in np.unique(classes, return_counts=True)), strict=True))
    assert counts == {1: 1047, 10: 3, 18: 4, 23: 628, 42: 4, 51: 931, 61: 1, 71: 910, 84: 1356, 94: 23, 96: 9,
                      135: 1223, 139: 5}
    painted = uniformer.colorize(classes)
    assert painted[10, 20].tolist() == [31, 255, 0] and painted[40, 80].tolist() == [0, 255, 204]
    assert int(painted.astype(np.int64).sum()) == 2642561


def test_a_forced_class_is_painted_in_its_palette_colour(tmp_path):
    state = uniformer_file_state()
    seg = state["state_dict"]
    seg["decode_head.conv_seg.weight"].zero_()
    seg["decode_head.conv_seg.bias"].zero_()
    seg["decode_head.conv_seg.bias"][2] = 5.0  # ADE20K class 2: sky
    (tmp_path / "uniformer").mkdir()
    torch.save(state, tmp_path / "uniformer" / uniformer.FILE)
    out = uniformer.detect(_picture(90, 120), 64, [tmp_path])
    assert out.shape == (64, 85, 3) and out.dtype == np.uint8  # short side at the resolution, the pad cropped
    assert (out == np.array([6, 230, 230], np.uint8)).all()  # mmseg's sky, in RGB order (the flips cancel)
    assert len(ADE20K) == 150 and ADE20K[0] == (120, 120, 120) and ADE20K[149] == (92, 0, 255)


def test_input_is_the_picture_reversed_and_rescaled():
    red = np.zeros((512, 512, 3), np.uint8)
    red[..., 0] = 255
    x = uniformer.network_input(red)
    assert x.shape == (1, 3, 512, 512)  # already 512 on the short side: not resized
    # mmseg takes the RGB array for BGR and "converts" it: red reaches the network third, with blue's statistics
    assert float(x[0, 2].mean()) == pytest.approx((255 - 103.53) / 57.375, rel=1e-6)
    assert float(x[0, 0].mean()) == pytest.approx(-123.675 / 58.395, rel=1e-6)
    assert uniformer.rescaled_size(512, 768) == (512, 768)
    assert uniformer.rescaled_size(704, 960) == (512, 698)
    assert uniformer.rescaled_size(448, 2560) == (358, 2048)  # the long side's 2048 binds
    assert uniformer.rescaled_size(64, 96) == (512, 768)


def test_rescale_is_opencvs_bilinear():
    """Checked against cv2.resize(INTER_LINEAR) (OpenCV's vectorised path), up and down: equal to the level."""
    g = np.arange(60).reshape(4, 5, 3).astype(np.uint8) * 17 % 251  # uint8 arithmetic: wraps at 256
    assert imageops.resize(g, 7, 6, imageops.LINEAR)[..., 0].tolist() == [
        [0, 29, 65, 102, 138, 175, 204], [2, 30, 65, 102, 138, 174, 204], [4, 30, 64, 101, 137, 174, 203],
        [3, 29, 63, 100, 136, 173, 202], [3, 29, 63, 100, 136, 172, 202], [2, 28, 62, 99, 135, 172, 201]]
    noise = np.random.RandomState(0).randint(0, 256, (9, 11, 3)).astype(np.uint8)
    assert imageops.resize(noise, 6, 4, imageops.LINEAR)[..., 1].tolist() == [
        [130, 97, 125, 83, 150, 177], [148, 206, 92, 215, 103, 135], [98, 126, 28, 58, 71, 182],
        [170, 71, 129, 227, 92, 97]]


def test_the_network_matters(tmp_path):
    """A map that ignored the network (or a part of it) would not change when a deep layer does."""
    state = uniformer_file_state(seed=1)
    path = tmp_path / uniformer.FILE
    torch.save(state, path)
    before = uniformer.labels(uniformer.load(path), _picture())
    state["state_dict"]["backbone.blocks3.0.attn.proj.weight"].mul_(-3.0)
    torch.save(state, path)
    after = uniformer.labels(uniformer.load(path), _picture())
    assert (before != after).mean() > 0.05


def test_missing_wrong_and_damaged_files(tmp_path):
    with pytest.raises(ModelNotFound, match="seg_ufade20k needs upernet_global_small.pth"):
        uniformer.detect(_picture(), 64, [tmp_path])
    path = tmp_path / uniformer.FILE
    torch.save({"meta": {}, "state_dict": {"backbone.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ModelLoadError, match="upernet_global_small.pth: not a UniFormer UPerNet weight file"):
        uniformer.load(path)
    state = uniformer_file_state()
    del state["state_dict"]["decode_head.fpn_bottleneck.bn.running_var"]
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="upernet_global_small.pth: not a UniFormer UPerNet .* missing"):
        uniformer.load(path)
    state = uniformer_file_state()
    state["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(19, 16, 1, 1)  # a Cityscapes head
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="not the ADE20K UniFormer UPerNet \\(19 classes"):
        uniformer.load(path)
    path.write_bytes(_write(tmp_path / "whole.pth").read_bytes()[:5000])  # cut short
    with pytest.raises(ModelLoadError, match="upernet_global_small.pth: (cannot be read|not a loadable)"):
        uniformer.load(path)


def test_through_the_preprocessor_registry(tmp_path):
    """seg_ufade20k (key `segmentation`) from the extension's downloads folder layout, at the unit's resolution."""
    from PIL import Image

    from darkroom.control import preprocess as pp
    from darkroom.errors import InvalidRequest

    _write(tmp_path / "uniformer" / uniformer.FILE)
    picture = Image.fromarray(_picture(96, 144))
    out = pp.detect("seg_ufade20k", picture, resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 96, 3)
    colours = {tuple(int(round(c * 255)) for c in px) for px in out.reshape(-1, 3)}
    assert colours <= set(map(tuple, ADE20K)) and len(colours) >= 2
    assert "seg_ufade20k" in pp.module_list(alias_names=True)["module_list"]
    with pytest.raises(InvalidRequest, match="upernet_global_small.pth"):
        pp.detect("segmentation", picture, annotator_dirs=[tmp_path / "empty"])
