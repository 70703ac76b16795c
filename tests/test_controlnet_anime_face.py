"""seg_anime_face: the MobileNetV2 U-Net from UNet.pth (torchvision's MobileNetV2 layout written out), its
512-pixel input and the extension's class colours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import anime_face
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import anime_face_state, save


def _picture(h=90, w=120) -> Image.Image:
    return Image.fromarray(np.random.RandomState(4).randint(0, 256, (h, w, 3)).astype(np.uint8))


def test_encoder_is_torchvisions_mobilenet_v2():
    features = anime_face.mobilenet_v2_features()
    assert len(features) == 19 and sum(p.numel() for m in features for p in m.parameters()) == 2_223_872
    keys = set(anime_face.AnimeFaceUNet().state_dict())
    assert {"en_block0.0.0.weight", "en_block0.1.conv.2.running_var", "en_block1.0.conv.1.0.weight",
            "en_block4.2.conv.3.bias", "de_block0.1.weight"} <= keys
    assert not any(k.startswith("de_block4.2") for k in keys)  # instance norm without affine weights


def test_tiny_file_through_the_preprocessor(tmp_path):
    save(anime_face_state(seed=1), tmp_path / "anime_face_segment" / "UNet.pth", prefix="module.")
    out = pp.detect("seg_anime_face", _picture(), resolution=512, annotator_dirs=[tmp_path])
    assert out.shape == (512, 683, 3)
    colours = {tuple(c) for c in np.unique(np.rint(out.reshape(-1, 3) * 255).astype(int), axis=0)}
    assert colours and colours <= {tuple(int(v) for v in c) for c in anime_face.PALETTE}
    assert pp.canonical_module("anime_face_segment") == "anime_face_segment"
    assert pp.module_list()["module_detail"]["anime_face_segment"]["sliders"][0]["name"] == "Resolution"


def test_input_is_512_pixels_in_0_1_and_classes_take_the_palette(monkeypatch):
    net = anime_face.AnimeFaceUNet()
    seen = {}

    def probe(x):
        seen["x"] = x
        scores = torch.zeros(1, 7, *x.shape[2:])
        scores[0, 2, :, : x.shape[3] // 2] = 1  # eyes on the left half
        scores[0, 6, :, x.shape[3] // 2:] = 1  # clothes on the right
        return scores

    net.forward = probe
    out = anime_face.segment(net, np.full((64, 100, 3), 255, np.uint8))
    assert tuple(seen["x"].shape) == (1, 3, 512, 800) and float(seen["x"].max()) == pytest.approx(1.0)
    assert tuple(out[0, 0]) == (255, 0, 0) and tuple(out[0, -1]) == (255, 0, 255)
    assert anime_face.segment(net, np.zeros((100, 77, 3), np.uint8)).shape == (664, 512, 3)  # 664.9: truncated


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(InvalidRequest, match="seg_anime_face needs UNet.pth.*downloads/anime_face_segment"):
        pp.detect("seg_anime_face", _picture(), annotator_dirs=[tmp_path])
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "UNet.pth")
    with pytest.raises(ModelLoadError, match="UNet.pth: not an anime face segmentation weight file"):
        pp.detect("seg_anime_face", _picture(), annotator_dirs=[tmp_path])
