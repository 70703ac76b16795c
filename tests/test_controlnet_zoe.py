"""depth_zoe: ZoeD_M12_N.pt's layout renamed onto transformers' ZoeDepthForDepthEstimation (a tiny model written
out in the original layout, loaded back and compared with itself), the config read from the file, and the
extension's input pipeline (reflection padding, the MiDaS core's resize, the mirrored second run)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import zoe
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import zoe_config, zoe_file_state


def _tiny_file(path, seed=0):
    from transformers import ZoeDepthForDepthEstimation

    torch.manual_seed(seed)
    model = ZoeDepthForDepthEstimation(zoe_config()).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(zoe_file_state(model), path)
    return model


def test_original_layout_loads_onto_transformers_and_computes_the_same(tmp_path):
    original = _tiny_file(tmp_path / "ZoeD_M12_N.pt", seed=1)
    loaded = zoe.load(tmp_path / "ZoeD_M12_N.pt")
    assert loaded.config.backbone_config.out_indices == [1, 2, 3, 4]
    assert loaded.config.bin_configurations[0]["n_bins"] == 8 and loaded.config.num_attractors == [4, 4, 2, 1]
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).predicted_depth, original(pixel_values=x).predicted_depth)


def test_released_layout_reads_as_zoed_n():
    from transformers import ZoeDepthForDepthEstimation

    with torch.device("meta"):
        released = ZoeDepthForDepthEstimation(zoe_config(tiny=False))
    state = zoe_file_state(released)["model"]
    config = zoe._config(state)
    assert config.backbone_config.out_indices == [6, 12, 18, 24] and config.backbone_config.image_size == 384
    assert config.neck_hidden_sizes == [256, 512, 1024, 1024] and config.num_attractors == [16, 8, 4, 1]
    assert config.bin_configurations[0]["n_bins"] == 64 and config.bin_embedding_dim == 128
    assert config.backbone_config.layer_norm_eps == 1e-6  # timm's, not transformers' default
    with torch.device("meta"):
        model = ZoeDepthForDepthEstimation(config)
    model.load_state_dict(zoe._rename(state, 1024), strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == 343_789_698


def test_core_size_is_midas_minimal_resize():
    assert zoe.core_size(608, 608) == (512, 512)  # width's factor (0.84) is closer to 1 than height's (0.63)
    assert zoe.core_size(400, 1000) == (384, 960)  # height's (0.96) is
    assert zoe.core_size(96, 128) == (384, 512)


class _Ramp(nn.Module):
    """Answers with depth rising left to right, whatever it is shown; records its inputs."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, pixel_values):
        self.seen.append(pixel_values)
        h, w = pixel_values.shape[2:]
        return SimpleNamespace(predicted_depth=torch.linspace(0, 1, w).expand(1, h, w).clone())


def test_padding_resize_and_mirrored_run():
    ramp = _Ramp()
    d = zoe.depth(ramp, np.full((64, 128, 3), 255, np.uint8))
    assert d.shape == (64, 128)
    # the mirrored run's ramp, flipped back, cancels the first: their mean is flat
    assert np.abs(d - d.mean()).max() < 0.02
    first = ramp.seen[0]
    # padded by int(sqrt(32) x 3) = 16 rows and int(sqrt(64) x 3) = 24 columns each side: 96 x 176; the width's
    # factor (512 / 176 = 2.91) is closer to 1 than the height's (4), so 279 x 512, in multiples of 32: 288 x 512
    assert tuple(first.shape[2:]) == zoe.core_size(96, 176) == (288, 512)
    assert float(first.max()) == pytest.approx(1.0)  # a white picture in [0, 1], normalised to [-1, 1]
    assert zoe.depth_map(np.linspace(0, 10, 101, dtype=np.float32)[None])[0, 0] == 255  # near white


def test_through_the_preprocessor_and_bad_files(tmp_path):
    _tiny_file(tmp_path / "zoedepth" / "ZoeD_M12_N.pt")
    picture = Image.fromarray(np.random.RandomState(5).randint(0, 256, (90, 120, 3)).astype(np.uint8))
    out = pp.detect("depth_zoe", picture, resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and (out[..., 0] == out[..., 2]).all()
    assert [s["name"] for s in pp.module_list()["module_detail"]["depth_zoe"]["sliders"]] == ["Resolution"]
    with pytest.raises(InvalidRequest, match="depth_zoe needs ZoeD_M12_N.pt.*downloads/zoedepth"):
        pp.detect("depth_zoe", picture, annotator_dirs=[tmp_path / "none"])
    torch.save({"model": {"conv1_1.weight": torch.zeros(1)}}, tmp_path / "ZoeD_M12_N.pt")
    with pytest.raises(ModelLoadError, match="ZoeD_M12_N.pt: not a ZoeDepth weight file"):
        pp.detect("depth_zoe", picture, annotator_dirs=[tmp_path])
