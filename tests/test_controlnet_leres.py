"""depth_leres: LeReS (ResNeXt and its feature-transfer decoder) from res101.pth's layout, the extension's
input (BGR, 0-255 "normalised") and its 8-bit map with the Remove Near / Background sliders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import leres
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import leres_file_state


def _write(path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(leres_file_state(**kw), path)
    return path


def test_released_layout_and_a_narrow_file():
    with torch.device("meta"):
        full = leres.LeReS()
    assert sum(p.numel() for p in full.parameters()) == 115_360_833  # ResNeXt-101 32x8d and the decoder
    keys = set(full.state_dict())
    assert {"encoder_modules.encoder.layer3.22.conv2.weight", "encoder_modules.encoder.layer4.0.downsample.1.bias",
            "decoder_modules.ffm0.ftb2.conv_branch.4.weight", "decoder_modules.outconv.adapt_conv.3.bias"} <= keys


def test_depth_is_pinned(tmp_path):
    """The full-size network was checked against the authors' RelDepthModel (sd-webui-controlnet's
    annotator/leres) on the same random weights: equal to the last bit. These values pin the narrow one."""
    net = leres.load(_write(tmp_path / "res101.pth", seed=1))
    assert [len(getattr(net.encoder_modules.encoder, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    img = np.random.RandomState(3).randint(0, 256, (64, 96, 3)).astype(np.uint8)
    d = leres.depth(net, img)
    assert d.shape == (64, 96)
    assert float(d.mean()) == pytest.approx(0.0964425430, abs=1e-6)
    assert float(d[10, 20]) == pytest.approx(0.0888099223, abs=1e-6)
    assert float(d[40, 80]) == pytest.approx(0.0926155001, abs=1e-6)


def test_input_is_bgr_0_255_normalised(monkeypatch):
    net = leres.LeReS((1, 1, 1, 1), 2, 8, 8, 16)
    seen = {}

    def probe(x):
        seen["x"] = x
        return torch.zeros(1, 1, *x.shape[2:])

    net.forward = probe
    red = np.zeros((32, 32, 3), np.uint8)
    red[..., 0] = 255
    leres.depth(net, red)
    assert float(seen["x"][0, 2].mean()) == pytest.approx((255 - 0.406) / 0.225, rel=1e-5)  # red arrives third
    assert float(seen["x"][0, 0].mean()) == pytest.approx(-0.485 / 0.229, rel=1e-5)


def test_map_sliders_follow_the_extension():
    d = np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0)
    plain = leres.depth_map(d, 0, 0)
    assert plain[0, 0] == 255 and plain[0, -1] == 0  # small depths (near) come out white after the inversion
    near = leres.depth_map(d, 50, 0)  # levels at or under 127.5 zeroed before the inversion: they turn white
    assert (near[0, :128] == 255).all() and near[0, 200] == plain[0, 200]
    back = leres.depth_map(d, 0, 50)  # after it: the dark half goes black
    assert (back[0, 128:] == 0).all() and back[0, 10] == plain[0, 10]
    assert (leres.depth_map(np.zeros((4, 4), np.float32), 0, 0) == 255).all()  # flat: all levels 0, inverted


def test_through_the_preprocessor_and_bad_files(tmp_path):
    _write(tmp_path / "leres" / "res101.pth")
    picture = Image.fromarray(np.random.RandomState(5).randint(0, 256, (90, 120, 3)).astype(np.uint8))
    out = pp.detect("depth_leres", picture, resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and out.std() > 0
    sliders = pp.module_list()["module_detail"]["depth_leres"]["sliders"]
    assert [s["name"] for s in sliders] == ["Resolution", "Remove Near %", "Remove Background %"]
    with pytest.raises(InvalidRequest, match="depth_leres\\+\\+ preprocessor yet: .*use depth_leres"):
        pp.canonical_module("depth_leres++")
    with pytest.raises(InvalidRequest, match="depth_leres needs res101.pth.*downloads/leres"):
        pp.detect("depth_leres", picture, annotator_dirs=[tmp_path / "none"])
    torch.save({"depth_model": {"conv1_1.weight": torch.zeros(1)}}, tmp_path / "res101.pth")
    with pytest.raises(ModelLoadError, match="res101.pth: not a LeReS weight file"):
        pp.detect("depth_leres", picture, annotator_dirs=[tmp_path])
