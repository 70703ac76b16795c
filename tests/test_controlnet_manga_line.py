"""lineart_anime_denoise (manga_line): the res_skip line extractor from erika.pth in the authors' key layout,
its forward pinned to the authors' network at the released size, and the extension's pre- and post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import manga_line as ml
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import manga_line_state, save


def _picture(h=64, w=128, seed=7) -> np.ndarray:
    img = np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)
    img[:, : w // 2] //= 3  # a darker left half
    return img


def test_released_size_matches_the_authors_network():
    """Values from the authors' res_skip (sd-webui-controlnet's annotator/manga_line) on the same random
    weights (the released widths, 43.1 M weights) and picture, computed once when this module was written."""
    state = manga_line_state(widths=None, seed=1, gain=0.8)
    net = ml.MangaLineNet().eval()
    net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in net.parameters()) == 43_100_147
    img = _picture()
    grey = np.asarray(Image.fromarray(img).convert("L"), dtype=np.float32)
    with torch.no_grad():
        raw = net(torch.from_numpy(grey)[None, None])[0, 0].numpy()
    for (y, x), want in {(10, 20): 149.58463, (40, 100): 177.04158, (63, 0): 142.9076, (0, 127): 100.78071}.items():
        assert raw[y, x] == pytest.approx(want, rel=1e-4)
    assert raw.mean() == pytest.approx(169.84225, rel=1e-4)
    lines = ml.lines(net, img)
    assert lines.dtype == np.uint8 and lines.mean() == pytest.approx(84.668, abs=0.05)  # 255 minus the output


def test_tiny_file_through_the_preprocessor(tmp_path):
    save(manga_line_state(seed=2), tmp_path / "manga_line" / "erika.pth", prefix="module.")  # DataParallel keys
    picture = Image.fromarray(_picture(90, 120))
    out = pp.detect("lineart_anime_denoise", picture, resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and (out[..., 0] == out[..., 2]).all() and out.std() > 0
    assert pp.canonical_module("manga_line") == "lineart_anime_denoise"  # v1.0's name
    assert pp.module_list()["module_detail"]["lineart_anime_denoise"]["sliders"] == []  # hidden, as the extension
    net = ml.load(tmp_path / "manga_line" / "erika.pth")
    seen = {}

    def probe(x):
        seen["x"] = x
        return torch.full_like(x, 55.0)

    net.forward = probe
    grey = ml.lines(net, np.full((64, 64, 3), (200, 100, 50), np.uint8))
    assert seen["x"].shape == (1, 1, 64, 64) and float(seen["x"][0, 0, 0, 0]) == 124.0  # BT.601 grey, 0-255
    assert (grey == 200).all()  # 255 minus the output


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(InvalidRequest, match="lineart_anime_denoise needs erika.pth.*downloads/manga_line"):
        pp.detect("lineart_anime_denoise", Image.fromarray(_picture()), annotator_dirs=[tmp_path])
    state = manga_line_state()
    del state["block4.model.11.residual.model.2.bias"]
    save(state, tmp_path / "erika.pth")
    with pytest.raises(ModelLoadError, match="erika.pth: not a manga line.*1 tensor.s. missing"):
        pp.detect("lineart_anime_denoise", Image.fromarray(_picture()), annotator_dirs=[tmp_path])
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "erika.pth")
    with pytest.raises(ModelLoadError, match="not a manga line weight file"):
        pp.detect("lineart_anime_denoise", Image.fromarray(_picture()), annotator_dirs=[tmp_path])
