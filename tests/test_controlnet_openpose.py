"""The openpose preprocessor: the body network from a tiny file in the real key layout, and the keypoint
decoding and drawing on synthetic heatmaps and part affinity fields (random weights find no pose)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from darkroom.control import preprocess as pp
from darkroom.control.annotators import openpose as op
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_annotators import body_pose_state, save

# nose, neck, right shoulder and elbow, left shoulder and elbow, right and left hip (x, y)
POSE = {0: (100, 40), 1: (100, 60), 2: (80, 60), 3: (70, 90), 5: (120, 60), 6: (130, 90), 8: (90, 120),
        11: (110, 120)}


def _maps(people: list[dict[int, tuple[int, int]]], h: int = 160, w: int = 200, flip: set[int] = frozenset()):
    """Heatmaps with a peak of 1 at each keypoint and PAFs of unit vectors along each limb whose two ends
    are given (limb indices in `flip` point the wrong way)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    heat = np.zeros((h, w, op.HEATMAPS), np.float32)
    paf = np.zeros((h, w, op.PAFS), np.float32)
    for person in people:
        for part, (x, y) in person.items():
            heat[:, :, part] = np.maximum(heat[:, :, part], np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0))
        for k, ((a, b), (cx, cy)) in enumerate(zip(op.LIMBS, op.LIMB_PAFS, strict=True)):
            if a not in person or b not in person:
                continue
            (xa, ya), (xb, yb) = person[a], person[b]
            length = np.hypot(xb - xa, yb - ya)
            ux, uy = (xb - xa) / length, (yb - ya) / length
            t = (xx - xa) * ux + (yy - ya) * uy
            near = (t >= -2) & (t <= length + 2) & (np.abs((xx - xa) * uy - (yy - ya) * ux) <= 3)
            sign = -1.0 if k in flip else 1.0
            paf[near, cx], paf[near, cy] = sign * ux, sign * uy
    return heat, paf


def test_a_known_pose_decodes_to_its_keypoints():
    heat, paf = _maps([POSE])
    people = op.decode(heat, paf)
    assert len(people) == 1
    found = {i: p for i, p in enumerate(people[0]) if p is not None}
    assert found == {k: (float(x), float(y)) for k, (x, y) in POSE.items()}


def test_two_people_stay_apart_and_a_reversed_field_breaks_the_limb():
    left = {k: (x - 50, y) for k, (x, y) in POSE.items()}
    right = {k: (x + 50, y + 10) for k, (x, y) in POSE.items()}
    people = sorted(op.decode(*_maps([left, right], w=260)), key=lambda p: p[1][0])
    assert [p[1] for p in people] == [(50.0, 60.0), (150.0, 70.0)]
    assert all(sum(q is not None for q in p) == len(POSE) for p in people)
    # the neck-to-right-elbow-chain: a PAF pointing from elbow to shoulder joins nothing
    shoulder_elbow = op.LIMBS.index((2, 3))
    (person,) = op.decode(*_maps([POSE], flip={shoulder_elbow}))
    assert person[2] == (80.0, 60.0) and person[3] is None


def test_weak_or_small_detections_are_no_person():
    heat, paf = _maps([{1: (100, 60), 2: (80, 60), 5: (120, 60)}])  # three parts: under the four needed
    assert op.decode(heat, paf) == []
    heat, paf = _maps([POSE])
    assert op.decode(heat * 0.09, paf) == []  # peaks under the 0.1 threshold
    assert op.decode(heat, np.zeros_like(paf)) == []  # no field: no limb


def test_drawing_uses_the_extension_colours():
    canvas = op.draw([[POSE.get(i) for i in range(18)]], 160, 200)
    assert canvas.shape == (160, 200, 3) and canvas.dtype == np.uint8
    assert tuple(canvas[60, 90]) == (153, 0, 0)  # neck-right shoulder, limb 0: 60 % of red
    assert tuple(canvas[60, 110]) == (153, 51, 0)  # neck-left shoulder, limb 1
    assert tuple(canvas[60, 100]) == op.COLORS[1]  # the neck's dot, full colour
    assert tuple(canvas[40, 100]) == op.COLORS[0]  # the nose
    assert tuple(canvas[120, 90]) == op.COLORS[8]  # right hip
    assert tuple(canvas[5, 5]) == (0, 0, 0) and tuple(canvas[150, 190]) == (0, 0, 0)
    # the limb is about 8 pixels thick: its colour 3 pixels off the axis, black 7 off
    assert tuple(canvas[63, 90]) == (153, 0, 0) and tuple(canvas[67, 90]) == (0, 0, 0)
    assert (op.draw([], 10, 12) == 0).all()


class _BlueNet(nn.Module):
    """Stands in for the body model: every heatmap is the blue of the input, at 1/8 size."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        blue = F.avg_pool2d(x[:, :1] + 0.5, op.STRIDE)  # channel 0: the net is fed BGR
        return torch.zeros(1, op.PAFS, *blue.shape[2:]), blue.repeat(1, op.HEATMAPS, 1, 1)


def test_maps_feed_bgr_and_come_back_at_the_picture_size():
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, :150] = (0, 0, 255)  # blue left half, red right half
    img[:, 150:] = (255, 0, 0)
    heat, paf = op.maps(_BlueNet(), img)
    assert heat.shape == (200, 300, 19) and paf.shape == (200, 300, 38)
    assert heat[20:180, 10:120, 0].min() > 0.9 and heat[20:180, 180:290, 0].max() < 0.1


def test_tiny_body_model_loads_strictly_and_runs(tmp_path):
    folder = tmp_path / "downloads"
    save(body_pose_state(seed=1), folder / "openpose" / "body_pose_model.pth")
    im = Image.fromarray(np.random.RandomState(3).randint(0, 256, (90, 120, 3)).astype(np.uint8))
    out = pp.detect("openpose", im, resolution=64, annotator_dirs=[folder])
    assert out.shape == (64, 85, 3) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    save(body_pose_state(blank=True), folder / "openpose" / "body_pose_model.pth")
    assert (pp.detect("openpose", im, resolution=64, annotator_dirs=[folder]) == 0).all()
    # the full-size network has the released file's 184 tensors and 52 million weights
    full = op.BodyPoseNet().state_dict()
    assert len(full) == 184 and sum(v.numel() for v in full.values()) == 52_311_446
    state = body_pose_state()
    del state["Mconv7_stage6_L1.bias"]
    torch.save(state, folder / "openpose" / "body_pose_model.pth")
    with pytest.raises(ModelLoadError, match="body_pose_model.pth: not a CMU OpenPose body weight file "
                       r"\(1 tensor\(s\) missing, e.g. Mconv7_stage6_L1.bias\)"):
        pp.detect("openpose", im, annotator_dirs=[folder])
    torch.save({"conv1_1.weight": torch.zeros(2)}, folder / "openpose" / "body_pose_model.pth")
    with pytest.raises(ModelLoadError, match="not an OpenPose body weight file"):
        pp.detect("openpose", im, annotator_dirs=[folder])


def test_detect_draws_the_pose_where_the_picture_has_it(tmp_path, monkeypatch):
    save(body_pose_state(), tmp_path / "body_pose_model.pth")
    seen = {}

    def fake_maps(net, img):
        seen["shape"] = img.shape
        return _maps([POSE], *img.shape[:2])

    monkeypatch.setattr(op, "maps", fake_maps)
    out = pp.detect("openpose", Image.new("RGB", (200, 160)), resolution=160, annotator_dirs=[tmp_path])
    assert seen["shape"] == (192, 256, 3)  # 160x200 padded to multiples of 64, as the extension detects
    assert out.shape == (160, 200, 3)
    assert np.allclose(out[60, 90], np.array([153, 0, 0]) / 255.0)  # drawn in place, then cropped
    assert np.allclose(out[40, 100], np.array(op.COLORS[0]) / 255.0)


def test_openpose_is_listed_and_a_missing_file_is_named(tmp_path):
    listing = pp.module_list()
    assert "openpose" in listing["module_list"]
    assert listing["module_detail"]["openpose"]["sliders"] == [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}]
    with pytest.raises(InvalidRequest) as err:
        pp.detect("openpose", Image.new("RGB", (64, 64)), annotator_dirs=[tmp_path / "a", tmp_path / "b"])
    assert "openpose needs body_pose_model.pth" in str(err.value)
    assert "annotator/downloads/openpose" in str(err.value) and str(tmp_path / "b") in str(err.value)
    assert pp.module_status("openpose", [tmp_path])[0] is False
    with pytest.raises(InvalidRequest, match="cannot run the mediapipe_face preprocessor yet"):
        pp.canonical_module("mediapipe_face")


def test_released_widths_run_end_to_end():
    """Every layer once, in order, at the released files' widths (on the meta device: shapes only). A layer run
    twice went unnoticed with narrow test widths that happened to fit; the released ones do not."""
    from darkroom.control.annotators import openpose_parts

    with torch.device("meta"):
        body = op.BodyPoseNet()
        paf, heat = body(torch.empty(1, 3, 64, 96))
        hand = openpose_parts.PartNet(22)(torch.empty(1, 3, 64, 64))
        face = openpose_parts.PartNet(71)(torch.empty(1, 3, 64, 64))
    assert tuple(paf.shape) == (1, 38, 8, 12) and tuple(heat.shape) == (1, 19, 8, 12)
    assert tuple(hand.shape) == (1, 22, 8, 8) and tuple(face.shape) == (1, 71, 8, 8)
    assert len(body._front) == len(set(body._front) - {None}) + body._front.count(None)
