"""normal_dsine: DSINE from dsine.pt's layout (on normal_bae's EfficientNet, narrowed), its camera from the Fov
slider, Iterations refinements, and the map. The full-size network was run beside the authors' code (Bae and
Davison's models/dsine.py, as the extension's wheel packages it) on the same random weights: equal to 1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import dsine
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import dsine_state


def _write(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"module." + k: v for k, v in dsine_state(seed=seed).items()}}, path)
    return path


def test_released_layout():
    with torch.device("meta"):
        net = dsine.DSINE()
        out = net(torch.empty(1, 3, 64, 96), dsine.intrinsics(60.0, 64, 96).to("meta"))
    assert tuple(out.shape) == (1, 3, 64, 96)
    keys = set(net.state_dict())
    assert {"encoder.original_model.conv_head.weight", "decoder.up2._net.3.weight", "gru.convq.weight",
            "up_prob_head.4.weight"} <= keys
    assert net.up_prob_head[4].out_channels == 9 * 64 and net.decoder.conv2.in_channels == 2050


def test_camera_and_pinned_normals(tmp_path):
    k = dsine.intrinsics(60.0, 64, 96)[0]
    assert float(k[0, 0]) == pytest.approx(48 / np.tan(np.pi / 6)) and float(k[1, 1]) == float(k[0, 0])
    assert (float(k[0, 2]), float(k[1, 2])) == (47.5, 31.5)  # the centre, top-left pixel at 0
    net = dsine.load(_write(tmp_path / "dsine.pt", seed=1))
    img = np.random.RandomState(3).randint(0, 256, (64, 96, 3)).astype(np.uint8)
    out = dsine.normals(net, img, (64, 96), 60.0)
    assert out.shape == (64, 96, 3)
    assert float(out.mean()) == pytest.approx(177.8628, abs=0.01)
    assert out[10, 20].tolist() == [76, 168, 237] and out[40, 80].tolist() == [146, 208, 224]
    net.iterations = 1
    assert not np.array_equal(dsine.normals(net, img, (64, 96), 60.0), out)  # the refinements count


def test_rotations_are_rodrigues():
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(5, 3, generator=gen)
    r = dsine.rotation_matrices(v)
    assert torch.allclose(r @ r.transpose(-1, -2), torch.eye(3).expand(5, 3, 3), atol=1e-5)
    axis = v / v.norm(dim=-1, keepdim=True)
    assert torch.allclose((r @ axis.unsqueeze(-1)).squeeze(-1), axis, atol=1e-5)  # the axis stays put
    assert torch.allclose(dsine.rotation_matrices(torch.zeros(1, 3)), torch.eye(3)[None])


def test_through_the_preprocessor_and_bad_files(tmp_path):
    _write(tmp_path / "normal_dsine" / "dsine.pt")
    picture = Image.fromarray(np.random.RandomState(5).randint(0, 256, (90, 120, 3)).astype(np.uint8))
    out = pp.detect("normal_dsine", picture, resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and out.std() > 0
    wide = pp.detect("normal_dsine", picture, resolution=64, threshold_a=120, annotator_dirs=[tmp_path])
    assert not np.array_equal(wide, out)  # the field of view reaches the rays
    sliders = pp.module_list()["module_detail"]["normal_dsine"]["sliders"]
    assert [s["name"] for s in sliders] == ["Resolution", "Fov", "Iterations"]
    with pytest.raises(InvalidRequest, match="normal_dsine needs dsine.pt.*downloads/normal_dsine"):
        pp.detect("normal_dsine", picture, annotator_dirs=[tmp_path / "none"])
    torch.save({"model": {"conv1_1.weight": torch.zeros(1)}}, tmp_path / "dsine.pt")
    with pytest.raises(ModelLoadError, match="dsine.pt: not a DSINE weight file"):
        pp.detect("normal_dsine", picture, annotator_dirs=[tmp_path])
