"""softedge_teed: TEED from 7_model.pth in the authors' key layout (random weights at the released size), its
forward pinned to the authors' network, and the extension's pre- and post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import teed
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import save, teed_state


def _noise(h=64, w=128, seed=7) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


def test_released_layout_loads_strictly(tmp_path):
    state = teed_state()
    assert sum(v.numel() for v in state.values()) == 58_910  # the paper's "58K"
    net = teed.load(save(state, tmp_path / "7_model.pth"))
    assert torch.equal(net.dblock_3.denselayer1.conv2.weight, state["dblock_3.denselayer1.conv2.weight"])
    assert torch.equal(net.up_block_3.features[5].weight, state["up_block_3.features.5.weight"])
    maps = net(torch.rand(1, 3, 64, 96) * 255)
    assert [tuple(m.shape) for m in maps] == [(1, 1, 64, 96)] * 4  # three stages and the fusion, full size


def test_edges_match_the_authors_network():
    """Values from the authors' TED (sd-webui-controlnet's annotator/teed/ted.py) on the same weights and
    picture, computed once when this module was written: the extension's mean of the four maps through a
    sigmoid."""
    net = teed.TEED().eval()
    net.load_state_dict(teed_state(seed=1))
    edge = teed.edges(net, _noise())
    assert edge.shape == (64, 128)
    assert edge.mean() == pytest.approx(0.5116696748, abs=1e-6)
    assert edge.std() == pytest.approx(0.0780023551, abs=1e-6)
    for (y, x), want in {(10, 20): 0.5028503880, (40, 100): 0.3682315738, (63, 0): 0.4949090936}.items():
        assert edge[y, x] == pytest.approx(want, abs=1e-6)


def test_map_follows_the_extension(tmp_path, monkeypatch):
    save(teed_state(seed=1), tmp_path / "TEED" / "7_model.pth")
    picture = Image.fromarray(_noise(90, 120))
    out = pp.detect("softedge_teed", picture, resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and (out[..., 0] == out[..., 2]).all() and out.std() > 0
    seen = {}

    def probe(net, img):
        seen["shape"] = img.shape
        return np.linspace(0, 1, img.shape[1])[None].repeat(img.shape[0], 0)

    monkeypatch.setattr(teed, "edges", probe)
    two = pp.detect("softedge_teed", picture, resolution=64, annotator_dirs=[tmp_path])
    assert seen["shape"] == (64, 128, 3)  # padded to multiples of 64, cropped back
    # Safe Steps 2: quantised to 0, 1/2 and 1; the crop keeps the ramp's first 85/128, below 2/3
    assert set(np.unique(np.rint(two[..., 0] * 255))) == {0, 127}
    raw = pp.detect("softedge_teed", picture, resolution=64, threshold_a=0, annotator_dirs=[tmp_path])
    assert len(np.unique(raw[..., 0])) > 50  # 0: not quantised
    assert pp.module_list()["module_detail"]["softedge_teed"]["sliders"][1] == {
        "name": "Safe Steps", "value": 2, "min": 0, "max": 10, "step": 1}
    assert pp.canonical_module("te_hed") == "softedge_teed"


def test_other_installs_and_bad_files(tmp_path):
    comfy = tmp_path / "ckpts"
    save(teed_state(), comfy / "bdsqlsz" / "qinglong_controlnet-lllite" / "Annotators" / "7_model.pth")
    assert pp.module_status("softedge_teed", [comfy]) == (True, None)
    with pytest.raises(InvalidRequest, match="softedge_teed needs 7_model.pth.*downloads/TEED"):
        pp.detect("softedge_teed", Image.fromarray(_noise()), annotator_dirs=[tmp_path / "none"])
    state = teed_state()
    del state["block_cat.DWconv2.bias"]
    save(state, tmp_path / "7_model.pth")
    with pytest.raises(ModelLoadError, match="7_model.pth: not a TEED weight file.*missing"):
        pp.detect("softedge_teed", Image.fromarray(_noise()), annotator_dirs=[tmp_path])
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "7_model.pth")
    with pytest.raises(ModelLoadError, match="not a TEED weight file"):
        pp.detect("softedge_teed", Image.fromarray(_noise()), annotator_dirs=[tmp_path])


# --- softedge_anyline: MTEED.pth through the same network --------------------------------------------------

def test_anyline_is_mteed_with_the_extensions_faint_lines(tmp_path, monkeypatch):
    from darkroom.control.annotators import simple

    save(teed_state(seed=2), tmp_path / "TEED" / "MTEED.pth")
    picture = Image.fromarray(_noise(90, 120))
    detail = pp.module_list()["module_detail"]["softedge_anyline"]["sliders"]
    assert detail[0] == {"name": "Resolution", "value": 1280, "min": 64, "max": 2048, "step": 8}
    assert detail[1]["name"] == "Safe Steps"
    assert pp.detect("softedge_anyline", picture, resolution=-1, annotator_dirs=[tmp_path]).shape == (1280, 1707, 3)
    lines = np.full((64, 128), 2, np.uint8)
    lines[10, 10:22] = 1  # 12 pixels of exactly 1: kept
    lines[30, 10:15] = 1  # 5: removed, as remove_small_objects does
    monkeypatch.setattr(simple, "lineart_standard", lambda img, res: lines[: img.shape[0], : img.shape[1]])
    monkeypatch.setattr(teed, "edges", lambda net, img: np.full(img.shape[:2], 0.5))
    out = np.rint(pp.detect("softedge_anyline", picture, resolution=64, threshold_a=0, annotator_dirs=[tmp_path])
                  * 255)[..., 0]
    assert (out[10, 10:22] == 1).all() and (out[30, 10:15] == 127).all() and out[0, 0] == 127
