"""tile_colorfix(+sharp), mlsd, the PiDiNet modules and OpenPose hands and faces: the nets from files in the
real key layouts (random weights; mlsd and PiDiNet at their released sizes, the pose nets narrowed), the
pixel-difference conversion against its definition, and the decoding and drawing on synthetic outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import mlsd, normalbae, openpose, pidinet, tile
from darkroom.control.annotators import openpose_parts as parts
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.offline import guard as offline
from darkroom.testing import tiny_annotators as tiny
from darkroom.testing.tiny_annotators import mlsd_state, part_pose_state, pidinet_state, save


def _noise(h=90, w=120, seed=3) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8))


def _sliders(name: str) -> list[dict]:
    return pp.module_list()["module_detail"][name]["sliders"]


# --- tile_colorfix ----------------------------------------------------------------------------------------------

def test_tile_colorfix_map_is_the_picture_with_the_extensions_sliders():
    im = _noise(70, 50)
    for name in ("tile_colorfix", "tile_colorfix+sharp"):
        out = pp.detect(name, im, resolution=512)  # no resolution: the input size is kept
        assert out.shape == (70, 50, 3) and np.array_equal(np.rint(out * 255).astype(np.uint8), np.asarray(im))
        assert pp.MODULES[name].colour_fix and not pp.MODULES["tile_resample"].colour_fix
    variation = {"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0}
    assert _sliders("tile_colorfix") == [variation]
    assert _sliders("tile_colorfix+sharp") == [variation, {"name": "Sharpness", "value": 1.0, "min": 0.0,
                                                            "max": 2.0, "step": 0.01}]
    assert pp.thresholds("tile_colorfix+sharp", -1, -1) == (8.0, 1.0)
    assert pp.thresholds("tile_colorfix+sharp", 64, 0) == (8.0, 0.0)  # out of range: the default; 0 is allowed


def test_box_blur_is_a_replicate_padded_mean():
    x = torch.zeros(1, 1, 7, 7)
    x[0, 0, 3, 3] = 9.0
    y = tile.box_blur(x, 1)
    assert torch.allclose(y[0, 0, 2:5, 2:5], torch.ones(3, 3)) and y.sum() == 9.0
    ramp = torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 4, 6)
    # at the left border the window sees 0, 0, 0 (repeated), 1, 2 for k=2
    assert tile.box_blur(ramp, 2)[0, 0, 0, 0] == pytest.approx(3 / 5)
    assert torch.allclose(tile.box_blur(torch.full((1, 4, 5, 5), 2.0), 3), torch.full((1, 4, 5, 5), 2.0))


def test_colour_fix_takes_the_low_frequencies_from_the_map():
    gen = torch.Generator().manual_seed(0)
    flat = torch.full((2, 4, 16, 16), 0.7)
    target = torch.randn(1, 4, 16, 16, generator=gen)
    # a flat prediction has no detail of its own: what is left is the map's blurred colour
    assert torch.allclose(tile.fix_colours(flat, target, 3), tile.box_blur(target, 3).expand(2, -1, -1, -1), atol=1e-5)
    assert torch.allclose(tile.fix_colours(flat, target, 3, hires=True), tile.box_blur(target, 6).expand(2, -1, -1, -1),
                          atol=1e-5)
    half = tile.fix_colours(flat, target, 3, weight=0.5)
    assert torch.allclose(half, 0.5 * tile.box_blur(target, 3) + 0.35, atol=1e-5)
    assert torch.equal(tile.fix_colours(flat, target, 3, weight=-2), flat)  # the weight is clamped to [0, 1]
    # detail (what the blur removes) is the prediction's; the colours are the map's
    detail = torch.randn(2, 4, 16, 16, generator=gen)
    fixed = tile.fix_colours(detail + 5.0, target, 8.0)
    assert torch.allclose(fixed, detail - tile.box_blur(detail, 8) + tile.box_blur(target, 8), atol=1e-4)


def test_sharp_blurs_the_negative_rows_only():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 12, 12, generator=gen)
    target = torch.randn(1, 4, 12, 12, generator=gen)
    plain = tile.fix_colours(x, target, 3)
    rows = torch.tensor([False, False, True, True])  # the batch is [negative, negative, prompt, prompt]
    sharp = tile.fix_colours(x, target, 3, sharpness=2.0, prompt_rows=rows)
    assert torch.equal(sharp[2:], plain[2:])
    assert torch.allclose(sharp[:2], 0.02 * tile.box_blur(plain[:2], 3) + 0.98 * plain[:2], atol=1e-6)
    assert torch.equal(tile.fix_colours(x, target, 3, sharpness=2.0), plain)  # rows unknown: all the prompt's


# --- mlsd -------------------------------------------------------------------------------------------------------

def _mlsd_output(h=32, w=48) -> np.ndarray:
    """A decoded M-LSD output at half size: one strong centre at (x 20, y 10) of a horizontal segment 16
    half-size pixels long, a strong centre of a 0.05-long segment, a weak centre, the rest far below."""
    out = np.full((9, h, w), -10.0, np.float32)
    out[0, 10, 20] = 5.0
    out[1:5, 10, 20] = (-8.0, 0.0, 8.0, 0.0)
    out[0, 25, 40] = 5.0
    out[1:5, 25, 40] = (0.0, 0.0, 0.03, 0.04)
    out[0, 5, 5] = -3.0  # sigmoid 0.047
    out[1:5, 5, 5] = (-4.0, 0.0, 4.0, 0.0)
    return out


def test_mlsd_decodes_and_draws_a_known_segment():
    segments = mlsd.decode(_mlsd_output(), 0.1, 0.1)
    assert segments.tolist() == [[24.0, 20.0, 56.0, 20.0]]  # doubled to the input's pixels
    assert len(mlsd.decode(_mlsd_output(), 0.01, 0.01)) == 3  # lower thresholds keep the short and the weak
    assert len(mlsd.decode(_mlsd_output(), 0.1, 16.5)) == 0  # the distance is measured at half size
    canvas = mlsd.draw(segments, 64, 96)
    ys, xs = np.nonzero(canvas)
    assert set(ys.tolist()) == {20} and xs.min() == 24 and xs.max() == 56 and len(xs) == 33
    assert set(np.unique(canvas).tolist()) == {0, 255}
    diagonal = mlsd.draw(np.array([[10.7, 5.2, 30.9, 25.9]]), 40, 40)  # ends cut toward zero: (10, 5)-(30, 25)
    assert diagonal[5, 10] == 255 and diagonal[25, 30] == 255 and diagonal[15, 20] == 255 and diagonal.sum() == 21 * 255


class _FixedMLSD(nn.Module):
    """Records its input and answers with _mlsd_output's maps at half the input size."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen = x
        out = np.full((9, x.shape[2] // 2, x.shape[3] // 2), -10.0, np.float32)
        out[:, :32, :48] = _mlsd_output()
        return torch.from_numpy(out)[None]


def test_mlsd_feeds_four_planes_and_draws_at_the_input_size(tmp_path, monkeypatch):
    save(mlsd_state(), tmp_path / "mlsd" / "mlsd_large_512_fp32.pth")
    stub = _FixedMLSD()
    monkeypatch.setattr(mlsd, "load", lambda path: stub)
    red = Image.new("RGB", (100, 80), (255, 0, 0))
    out = pp.detect("mlsd", red, resolution=80, annotator_dirs=[tmp_path])
    assert stub.seen.shape == (1, 4, 128, 128)  # 80x100 padded to multiples of 64
    assert stub.seen[0, :, 0, 0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1 / 127.5 - 1])  # RGB, then ones
    assert out.shape == (80, 100, 3) and out[20, 24:57].min() == 1.0 and out.sum() == 3 * 33


def test_mlsd_net_has_the_released_layout_and_loads_strictly(tmp_path):
    net = mlsd.MLSD()
    state = net.state_dict()
    assert len(state) == 362 and sum(p.numel() for p in net.parameters()) == 1_533_680
    assert tuple(state["backbone.features.0.0.weight"].shape) == (32, 4, 3, 3)
    assert tuple(state["backbone.features.13.conv.2.weight"].shape) == (96, 576, 1, 1)
    assert tuple(state["block15.conv1.0.weight"].shape) == (64, 96, 1, 1)
    assert tuple(state["block23.conv3.weight"].shape) == (16, 64, 1, 1)
    path = save(mlsd_state(seed=2), tmp_path / "mlsd_large_512_fp32.pth")
    loaded = mlsd.load(path)
    with torch.no_grad():
        assert tuple(loaded(torch.zeros(1, 4, 64, 96)).shape) == (1, 9, 32, 48)
    out = pp.detect("mlsd", _noise(), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and set(np.unique(out).tolist()) <= {0.0, 1.0}
    broken = mlsd_state()
    del broken["block22.conv2.1.running_var"]
    torch.save(broken, path)
    with pytest.raises(ModelLoadError, match="mlsd_large_512_fp32.pth: not a M-LSD large weight file"):
        pp.detect("mlsd", _noise(), annotator_dirs=[tmp_path])


def test_mlsd_sliders_and_missing_file(tmp_path):
    assert _sliders("mlsd") == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "MLSD Value Threshold", "value": 0.1, "min": 0.01, "max": 2.0, "step": 0.01},
        {"name": "MLSD Distance Threshold", "value": 0.1, "min": 0.01, "max": 20.0, "step": 0.01}]
    with pytest.raises(InvalidRequest) as err:
        pp.detect("mlsd", _noise(), annotator_dirs=[tmp_path / "a", tmp_path / "b"])
    assert "mlsd needs mlsd_large_512_fp32.pth" in str(err.value) and "annotator/downloads/mlsd" in str(err.value)
    assert str(tmp_path / "b") in str(err.value)


# --- PiDiNet ----------------------------------------------------------------------------------------------------

_RING = ((-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1))  # clockwise from the top left
_FLAT = {(dy, dx): (dy + 1) * 3 + (dx + 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # 3x3 entries 1-8


def _difference_conv(x: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """A depthwise pixel-difference convolution written from its definition, one offset at a time."""
    padded = F.pad(x, (2, 2, 2, 2))
    h, wd = x.shape[2:]

    def at(dy, dx):
        return padded[:, :, 2 + dy:2 + dy + h, 2 + dx:2 + dx + wd]

    weight = w[:, 0].reshape(1, -1, 9, 1, 1)
    out = torch.zeros_like(x)
    if kind == "cd":
        for offset, i in _FLAT.items():
            out += weight[:, :, i] * (at(*offset) - at(0, 0))
    elif kind == "ad":
        for k, offset in enumerate(_RING):
            nxt = _RING[(k + 1) % 8]
            out += weight[:, :, _FLAT[offset]] * (at(*offset) - at(*nxt))
    else:
        for k, (dy, dx) in enumerate(_DIRECTIONS):
            out += weight[:, :, k + 1] * (at(2 * dy, 2 * dx) - at(dy, dx))
    return out


@pytest.mark.parametrize("kind", ["cd", "ad", "rd"])
def test_pixel_differences_convert_to_plain_kernels(kind):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 5, 11, 13, generator=gen)
    w = torch.randn(5, 1, 3, 3, generator=gen)
    plain = pidinet.convert(w, kind)
    pad = plain.shape[-1] // 2
    assert torch.allclose(F.conv2d(x, plain, padding=pad, groups=5), _difference_conv(x, w, kind), atol=1e-5)
    assert torch.equal(pidinet.convert(w, "cv"), w)


def test_pidinet_file_layout_and_strict_loading(tmp_path):
    state = pidinet_state()
    assert len(state) == 83 and sum(v.numel() for v in state.values()) == 710_149  # table5_pidinet.pth's
    assert tuple(state["block1_2.conv1.weight"].shape) == (60, 1, 3, 3)  # radial: 3x3 in the file
    assert pidinet.block_kinds()["block4_1.conv1.weight"] == "cd" and len(pidinet.block_kinds()) == 16
    path = save(state, tmp_path / "pidinet" / "table5_pidinet.pth", prefix="module.")
    net = pidinet.load(path)
    assert tuple(net.block1_2.conv1.weight.shape) == (60, 1, 5, 5)
    assert torch.equal(net.block1_2.conv1.weight, pidinet.convert(state["block1_2.conv1.weight"], "rd"))
    torch.save({"state_dict": state}, path)  # the training checkpoint's wrapping
    assert torch.equal(pidinet.load(path).init_block.weight, pidinet.convert(state["init_block.weight"], "cd"))
    del state["attentions.3.conv2.weight"]
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="table5_pidinet.pth: not a PiDiNet weight file"):
        pp.detect("softedge_pidinet", _noise(), annotator_dirs=[tmp_path])
    torch.save({"conv1_1.weight": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError, match="not a PiDiNet weight file"):
        pidinet.load(path)


class _BlueEdges(nn.Module):
    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, :1]  # channel 0 is blue when fed BGR


def test_pidinet_variants(tmp_path, monkeypatch):
    save(pidinet_state(width=8, dil=4, seed=1), tmp_path / "table5_pidinet.pth")
    soft = pp.detect("softedge_pidinet", _noise(), resolution=64, annotator_dirs=[tmp_path])
    assert soft.shape == (64, 85, 3) and 0 <= soft.min() and soft.max() <= 1 and soft.std() > 0
    assert all(s == [] for s in map(_sliders, ("pidinet", "pidinet_safe", "pidinet_scribble")))  # as the extension
    assert pp.canonical_module("softedge_pidisafe") == "pidinet_safe"
    # what the net sees: BGR in [0, 1]; the variants' post-processing on a known map
    assert pidinet.edges(_BlueEdges(), np.full((4, 4, 3), (0, 0, 255), np.uint8)).min() == 1.0
    assert pidinet.edges(_BlueEdges(), np.full((4, 4, 3), (255, 0, 0), np.uint8)).max() == 0.0
    ramp = np.tile(np.linspace(0, 1, 128, dtype=np.float32), (64, 1))
    monkeypatch.setattr(pidinet, "edges", lambda net, img: ramp[:img.shape[0], :img.shape[1]])
    safe = pp.detect("softedge_pidisafe", _noise(64, 128), resolution=64, annotator_dirs=[tmp_path])
    assert set(np.rint(np.unique(safe) * 255).astype(int).tolist()) == {0, 127, 255}
    line = np.zeros((64, 128), np.float32)
    line[:, 56:65] = 1.0  # a 9-pixel stripe: one thick stroke (columns are ridges along their own line)
    monkeypatch.setattr(pidinet, "edges", lambda net, img: line)
    scribble = pp.detect("scribble_pidinet", _noise(64, 128), resolution=64, annotator_dirs=[tmp_path])
    assert set(np.unique(scribble).tolist()) == {0.0, 1.0}
    assert scribble[:, 50:71].min() == 1.0 and scribble[:, :40].max() == 0.0 and scribble[:, 81:].max() == 0.0
    monkeypatch.setattr(pidinet, "edges", lambda net, img: ramp[:img.shape[0], :img.shape[1]])
    sketch = pp.detect("t2ia_sketch_pidi", _noise(64, 128), resolution=64, annotator_dirs=[tmp_path])
    assert sketch.shape == (64, 128, 3) and set(np.unique(sketch).tolist()) == {0.0, 1.0}
    assert sketch[:, :64].max() == 0.0 and sketch[:, 64:].min() == 1.0  # edges above 0.5 white, the rest black
    assert pp.canonical_module("t2ia_sketch_pidi") == "pidinet_sketch" and _sliders("pidinet_sketch") == []


# --- OpenPose hands and faces -------------------------------------------------------------------------------

# nose, neck, right arm (2-4), left arm (5-7), hips, eyes (14, 15) and ears (16, 17)
PERSON = {0: (100, 40), 1: (100, 60), 2: (80, 60), 3: (80, 90), 4: (80, 120), 5: (120, 60), 6: (120, 90),
          7: (120, 120), 8: (90, 130), 11: (110, 130), 14: (95, 35), 15: (105, 35), 16: (90, 40), 17: (110, 40)}


def _person(points=PERSON):
    return [points.get(i) for i in range(18)]


def test_hand_and_face_boxes_follow_the_body():
    # forearm 30, upper arm 30: 1.5 x 30 = 45 wide, centred 0.33 x 30 past the wrist
    assert parts.hand_boxes(_person(), 200, 200) == [(97, 107, 45, True), (57, 107, 45, False)]
    assert parts.hand_boxes(_person(), 140, 200) == [(97, 107, 32, True), (57, 107, 32, False)]  # cut at the bottom
    assert parts.hand_boxes(_person(), 120, 200) == []  # under 20 pixels left
    no_left = dict(PERSON)
    del no_left[6]
    assert [b[3] for b in parts.hand_boxes(_person(no_left), 200, 200)] == [False]
    # nose-eye 5 x 3 = 15, nose-ear 10 x 1.5 = 15: a 30-pixel box round the nose
    assert parts.face_box(_person(), 200, 200) == (85, 25, 30)
    wide = {**PERSON, 16: (80, 40)}  # an ear 20 away: 30 each way
    assert parts.face_box(_person(wide), 200, 200) == (70, 10, 60)
    assert parts.face_box(_person({k: v for k, v in PERSON.items() if k not in (14, 15, 16, 17)}), 200, 200) is None
    assert parts.face_box(_person({0: (100, 40), 14: (97, 38)}), 200, 200) is None  # 3 x 3 each way: under 20


def _blob(cx, cy, height, sigma, size=parts.HAND_GRID):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return height * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))


def test_hand_peaks_take_the_strongest_blob():
    maps = np.zeros((parts.HAND_GRID, parts.HAND_GRID, parts.HAND_MAPS), np.float32)
    maps[:, :, 0] = _blob(64, 32, 1.0, 3)
    # joint 1: a tall narrow peak and a lower wide blob holding more in all: the wide one wins
    maps[:, :, 1] = _blob(20, 20, 0.9, 1.5) + _blob(100, 100, 0.5, 8)
    maps[:, :, 2] = _blob(50, 50, 0.04, 3)  # under the threshold after the blur: not found
    peaks = parts.hand_peaks(maps, 64, 256)
    assert peaks[0] == (128, 16)  # the 128 grid scaled to a 64 x 256 crop
    assert peaks[1] == (200, 50)
    assert peaks[2] is None and len(peaks) == 21


class _FixedMaps(nn.Module):
    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = maps
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen = x
        return self.maps[None]


def test_face_peaks_are_each_maps_maximum_in_the_crop():
    side = parts.FACE_INPUT // 8
    maps = torch.full((parts.FACE_MAPS, side, side), -1.0)
    maps[3, 12, 24] = 2.0  # 1/4 down, 1/2 across
    maps[5, 47, 47] = 2.0
    net = _FixedMaps(maps)
    crop = np.zeros((95, 189, 3), np.uint8)
    peaks = parts.face_peaks(net, crop)
    assert tuple(net.seen.shape) == (1, 3, 384, 384) and float(net.seen.min()) == -0.5
    assert len(peaks) == parts.FACE_MAPS and sum(p is not None for p in peaks) == 2  # by landmark: None if not found
    assert peaks[3] == (96.0, 24.0) and peaks[5] == (188.0, 94.0)  # align_corners: the last cell on the last pixel


def test_drawing_hands_and_faces():
    hand = [None] * 21
    hand[0], hand[1] = (20.0, 40.0), (60.0, 40.0)
    canvas = openpose.draw([_person()], 200, 200, hands=[(hand, None)], faces=[[(150.0, 150.0)]], body=False)
    assert tuple(canvas[40, 40]) == parts.HAND_COLORS[0] == (255, 0, 0)  # edge 0: hue 0
    assert tuple(canvas[40, 20]) == (0, 0, 255) and tuple(canvas[40, 60]) == (0, 0, 255)  # joints: blue dots
    assert tuple(canvas[150, 150]) == (255, 255, 255) and tuple(canvas[150, 153]) == (255, 255, 255)
    assert tuple(canvas[150, 155]) == (0, 0, 0)  # face dots: radius 3
    assert tuple(canvas[60, 100]) == (0, 0, 0)  # body=False: no neck
    assert tuple(openpose.draw([_person()], 200, 200)[60, 100]) == openpose.COLORS[1]
    assert parts.HAND_COLORS[5] == (128, 255, 0) and parts.HAND_COLORS[1] == (255, 77, 0)


def test_hand_and_face_nets_have_the_released_layouts(tmp_path):
    for outputs, tensors, weights in ((22, 104, 36_832_324), (71, 104, 38_425_706)):
        with torch.device("meta"):
            net = parts.PartNet(outputs)
        assert len(net.state_dict()) == tensors and sum(p.numel() for p in net.parameters()) == weights
        assert tuple(net.Mconv1_stage2.weight.shape) == (128, 128 + outputs, 7, 7)
    path = save(part_pose_state(22), tmp_path / "hand_pose_model.pth")
    with torch.no_grad():
        assert tuple(parts.load(path, 22, "hand")(torch.zeros(1, 3, 64, 48)).shape) == (1, 22, 8, 6)
    with pytest.raises(ModelLoadError, match="hand_pose_model.pth: not an OpenPose face weight file \\(22 maps"):
        parts.load(path, 71, "face")
    state = part_pose_state(71)
    del state["Mconv4_stage5.bias"]
    with pytest.raises(ModelLoadError, match="facenet.pth: not a CMU OpenPose face weight file"):
        parts.load(save(state, tmp_path / "facenet.pth"), 71, "face")


def _pose_folder(tmp_path):
    from darkroom.testing.tiny_annotators import body_pose_state

    save(body_pose_state(), tmp_path / "openpose" / "body_pose_model.pth")
    save(part_pose_state(22, seed=1), tmp_path / "openpose" / "hand_pose_model.pth")
    save(part_pose_state(71, seed=2), tmp_path / "openpose" / "facenet.pth")
    return [tmp_path]


def test_full_pose_draws_body_hands_and_face_in_place(tmp_path, monkeypatch):
    dirs = _pose_folder(tmp_path)
    monkeypatch.setattr(openpose, "decode", lambda heat, paf: [[None if p is None else (float(p[0]), float(p[1]))
                                                               for p in _person()]])
    crops = []

    def fake_hand_maps(net, crop):
        crops.append(crop.shape)
        maps = np.zeros((parts.HAND_GRID, parts.HAND_GRID, parts.HAND_MAPS), np.float32)
        maps[:, :, 0] = _blob(64, 64, 1.0, 3)  # the wrist joint in the middle of the box
        return maps

    monkeypatch.setattr(parts, "hand_maps", fake_hand_maps)
    monkeypatch.setattr(parts, "face_peaks", lambda net, crop: [(5.0, 6.0)])
    im = Image.new("RGB", (200, 200))
    full = pp.detect("openpose_full", im, resolution=200, annotator_dirs=dirs)
    assert crops == [(45, 45, 3), (45, 45, 3)]  # both hands, boxes from the arms
    assert np.allclose(full[107 + 22, 97 + 22], [0, 0, 1])  # the left hand's joint: the box's middle, blue
    assert np.allclose(full[107 + 22, 57 + 22], [0, 0, 1])
    assert np.allclose(full[25 + 6, 85 + 5], [1, 1, 1])  # the face landmark, offset by its box
    assert np.allclose(full[60, 100], np.array(openpose.COLORS[1]) / 255)  # the body's neck
    face_only = pp.detect("openpose_faceonly", im, resolution=200, annotator_dirs=dirs)
    assert np.allclose(face_only[31, 90], [1, 1, 1]) and face_only[60, 100].max() == 0
    ys, xs = np.nonzero(face_only.max(axis=2))  # one dot of radius 3, nothing else
    assert np.abs(ys - 31).max() == 3 and np.abs(xs - 90).max() == 3 and (face_only[ys, xs] == 1).all()
    hand_only = pp.detect("openpose_hand", im, resolution=200, annotator_dirs=dirs)
    assert hand_only[31, 90].max() == 0 and np.allclose(hand_only[129, 119], [0, 0, 1])
    face = pp.detect("openpose_face", im, resolution=200, annotator_dirs=dirs)
    assert np.allclose(face[31, 90], [1, 1, 1]) and face[129, 119].max() < 1


def test_tiny_pose_files_run_and_missing_files_are_named(tmp_path):
    dirs = _pose_folder(tmp_path)
    for name in ("openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full"):
        out = pp.detect(name, _noise(), resolution=64, annotator_dirs=dirs)
        assert out.shape == (64, 85, 3) and out.dtype == np.float32
    assert _sliders("openpose_full") == [{"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    assert _sliders("openpose_hand") == _sliders("openpose_face") == _sliders("openpose_faceonly") == []
    (tmp_path / "openpose" / "facenet.pth").unlink()
    assert pp.detect("openpose_hand", _noise(), resolution=64, annotator_dirs=dirs).shape == (64, 85, 3)
    with pytest.raises(InvalidRequest) as err:
        pp.detect("openpose_full", _noise(), annotator_dirs=dirs)
    assert "openpose_full needs facenet.pth" in str(err.value) and "annotator/downloads/openpose" in str(err.value)
    assert pp.module_status("openpose_faceonly", dirs)[0] is False and pp.module_status("openpose_hand", dirs)[0]


# --- normal_bae -------------------------------------------------------------------------------------------

def test_normal_bae_net_has_the_released_layout():
    with torch.device("meta"):
        net = normalbae.NormalBae()
    state = net.state_dict()
    assert len(state) == 936 and sum(p.numel() for p in net.parameters()) == 72_422_336  # scannet.pt's
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["encoder.original_model.conv_stem.weight"] == (48, 3, 3, 3)
    assert shapes["encoder.original_model.blocks.0.2.conv_pw.weight"] == (24, 24, 1, 1)  # no expansion
    assert shapes["encoder.original_model.blocks.5.8.se.conv_reduce.weight"] == (76, 1824, 1, 1)
    assert shapes["encoder.original_model.blocks.6.2.conv_pwl.weight"] == (512, 3072, 1, 1)
    assert shapes["encoder.original_model.bn2.running_var"] == (2048,)
    assert shapes["decoder.up1._net.0.weight"] == (1024, 2224, 3, 3)  # the head and stage 5's 176
    assert shapes["decoder.out_conv_res1.0.weight"] == (128, 132, 1)
    assert [len(stage) for stage in normalbae.b5().stages] == [3, 5, 5, 7, 7, 9, 3]
    assert normalbae.spec_of(state) == normalbae.b5()  # the shapes read back from the file's keys


def test_same_padding_is_tensorflows():
    conv = normalbae._SameConv(1, 1, 3, stride=2)
    with torch.no_grad():
        conv.weight.copy_(torch.arange(9.0).view(1, 1, 3, 3))
    for size, (before, after) in ((5, (1, 1)), (6, (0, 1)), (8, (0, 1))):
        x = torch.randn(1, 1, size, size)
        expected = F.conv2d(F.pad(x, (before, after, before, after)), conv.weight, stride=2)
        assert torch.allclose(conv(x), expected) and conv(x).shape[-1] == -(-size // 2)


class _Upright(nn.Module):
    """Records its input and answers with every normal pointing at the viewer."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.seen = x
        out = torch.zeros(1, 4, *x.shape[2:])
        out[:, 2] = 1.0
        return out


def test_normal_bae_feeds_imagenet_normalised_rgb_and_maps_normals_to_colours():
    stub = _Upright()
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = 255
    out = normalbae.normals(stub, img)
    assert stub.seen[0, :, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    assert out.shape == (64, 64, 3) and out[0, 0].tolist() == [127, 127, 255]


def test_tiny_normal_bae_file_runs_and_bad_files_are_named(tmp_path):
    state = tiny.normal_bae_state(seed=1)
    path = tiny.normal_bae_file(state, tmp_path / "normal_bae" / "scannet.pt")
    out = pp.detect("normal_bae", _noise(), resolution=64, annotator_dirs=[tmp_path])
    assert out.shape == (64, 85, 3) and out.std() > 0
    length = np.linalg.norm(out * 2 - 1, axis=2)
    assert np.abs(length - 1).max() < 0.03  # unit normals, quantised to 8 bits
    assert _sliders("normal_bae") == [] and pp.MODULES["normal_bae"].priority == 100
    torch.save(state, path)  # a bare state dict loads too
    assert normalbae.load(path).decoder.conv2.weight.shape[0] == 16
    del state["decoder.out_conv_res2.6.bias"]
    tiny.normal_bae_file(state, path)
    with pytest.raises(ModelLoadError, match="scannet.pt: not a normal_bae \\(NNET\\) weight file"):
        pp.detect("normal_bae", _noise(), annotator_dirs=[tmp_path])
    torch.save({"model": {"conv1_1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ModelLoadError, match="no EfficientNet encoder"):
        normalbae.load(path)
    with pytest.raises(InvalidRequest, match="normal_bae needs scannet.pt.*downloads/normal_bae"):
        pp.detect("normal_bae", _noise(), annotator_dirs=[tmp_path / "elsewhere"])


# --- all of them --------------------------------------------------------------------------------------------

NEW = ("tile_colorfix", "tile_colorfix+sharp", "mlsd", "softedge_pidinet", "softedge_pidisafe", "scribble_pidinet",
       "openpose_hand", "openpose_face", "openpose_faceonly", "openpose_full", "normal_bae")


def test_new_modules_are_listed_and_fetch_nothing(tmp_path):
    aliases = pp.module_list(alias_names=True)
    assert set(NEW) <= set(aliases["module_list"]) and set(NEW) <= set(aliases["module_detail"])
    keys = pp.module_list()["module_list"]
    assert {"pidinet", "pidinet_safe", "pidinet_scribble", "mlsd", "openpose_full"} <= set(keys)
    assert keys.index("openpose_full") < keys.index("openpose")  # priority 100, as the extension sorts
    guard = offline.process_guard()
    before = len(guard.attempts)
    empty = tmp_path / "empty"
    dirs = _pose_folder(tmp_path / "full")
    save(mlsd_state(), dirs[0] / "mlsd_large_512_fp32.pth")
    save(pidinet_state(width=8, dil=4), dirs[0] / "table5_pidinet.pth")
    tiny.normal_bae_file(tiny.normal_bae_state(), dirs[0] / "scannet.pt")
    for name in NEW:
        for folder in ([empty], dirs):
            try:
                pp.detect(name, _noise(64, 64), resolution=64, annotator_dirs=folder)
            except InvalidRequest as e:
                assert folder == [empty] and "needs" in str(e), e
    assert guard.installed and len(guard.attempts) == before


def test_area_shrink_is_opencvs_inter_area():
    """The extension shrinks pictures with cv2.INTER_AREA: each output pixel the mean of the input area it covers,
    edge pixels by the fraction covered. These values are OpenCV 5.1's on the same picture (PIL's BOX filter,
    used before, counts an edge pixel all or nothing: shrinking 600 to 512 rows it was 37 levels off at a sharp
    edge and 27 on average on noise)."""
    from darkroom.control.annotators import imageops

    img = np.random.RandomState(7).randint(0, 256, (45, 61, 3)).astype(np.uint8)
    out = imageops.resize(img, 25, 17, imageops.AREA)
    assert int(out.astype(np.int64).sum()) == 158892
    assert out[0, 0].tolist() == [145, 134, 115] and out[16, 24].tolist() == [85, 158, 147]
    assert out[8, 11].tolist() == [119, 121, 100]
    grey = imageops.resize(img[..., 0].astype(np.float32) / 255, 25, 17, imageops.AREA)
    assert float(grey[3, 4]) == pytest.approx(0.5343533754, abs=1e-6) and float(grey.sum()) == pytest.approx(
        207.2604675, abs=1e-4)
    assert int(imageops.resize(img[:44, :60], 30, 22, imageops.AREA).astype(np.int64).sum()) == 247382  # 2x: exact


def test_cubic_is_opencvs_inter_cubic():
    """The extension enlarges pictures with cv2.INTER_CUBIC (a = -0.75; PIL's BICUBIC, used before, has a = -0.5
    and was up to 12 levels off). tests/data/opencv_cubic_reference.npz holds OpenCV 5.1.0's own results
    (opencv-python-headless in a throwaway venv, numpy's default_rng(20261206) inputs, 7 uint8 and 2 float32
    cases: enlarging, shrinking, uneven factors, 1 and 3 channels, with cv2.ipp.setUseIPP(False) and True).
    uint8 must equal OpenCV's own path exactly and IPP's (most x86 pip wheels) within 1 level; floats within 1e-3."""
    from pathlib import Path

    from darkroom.control.annotators import imageops

    with np.load(Path(__file__).parent / "data" / "opencv_cubic_reference.npz") as ref:
        data = dict(ref)
    cases = sorted({k.rsplit("_", 1)[0] for k in data if k.endswith("_in")})
    assert len(cases) == 9
    for case in cases:
        img, generic, ipp = data[f"{case}_in"], data[f"{case}_generic"], data[f"{case}_ipp"]
        out = imageops.resize(img, generic.shape[1], generic.shape[0], imageops.CUBIC)
        out = out.reshape(generic.shape)
        if img.dtype == np.uint8:
            assert out.dtype == np.uint8
            np.testing.assert_array_equal(out, generic, err_msg=case)
            assert np.abs(out.astype(np.int64) - ipp).max() <= 1, case
        else:
            np.testing.assert_allclose(out, generic, atol=1e-3, rtol=0, err_msg=case)
            np.testing.assert_allclose(out, ipp, atol=2e-3, rtol=0, err_msg=case)
    grey = data["u8_0_in"][:, :, 0]  # a 2-D picture keeps its shape
    assert imageops.resize(grey, 90, 64, imageops.CUBIC).shape == (64, 90)
