"""Pose JSON: what the pose preprocessors found, in the extension's OpenPose layout (/controlnet/detect's "poses"),
and maps drawn back from it (/controlnet/render_openpose_json), equal to the detected map."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import dwpose
from darkroom.control.annotators import openpose as op
from darkroom.control.annotators.poses import Person, PoseSet
from darkroom.errors import InvalidRequest
from darkroom.testing.tiny_annotators import body_pose_state, save
from darkroom.testing.tiny_onnx import dwpose_file, yolox_file
from tests.test_controlnet_dwpose import PICTURE, _files
from tests.test_controlnet_openpose import POSE, _maps


def _png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_openpose_json_is_the_extensions_layout_and_draws_back_the_same_map(tmp_path, monkeypatch):
    save(body_pose_state(), tmp_path / "body_pose_model.pth")
    monkeypatch.setattr(op, "maps", lambda net, img: _maps([POSE], *img.shape[:2]))
    found: list = []
    out = pp.detect("openpose", Image.new("RGB", (200, 160)), resolution=160, annotator_dirs=[tmp_path],
                    poses=found)
    assert len(found) == 1
    pose = found[0].to_json()
    assert set(pose) == {"people", "animals", "canvas_height", "canvas_width"}
    assert (pose["canvas_width"], pose["canvas_height"]) == (200, 160)  # the map's size, not the padded one
    person = pose["people"][0]
    assert set(person) == {"pose_keypoints_2d", "face_keypoints_2d", "hand_left_keypoints_2d",
                           "hand_right_keypoints_2d"}
    body = person["pose_keypoints_2d"]
    assert len(body) == 54 and person["face_keypoints_2d"] is None and person["hand_left_keypoints_2d"] is None
    for k in range(18):
        x, y, c = body[3 * k: 3 * k + 3]
        if k in POSE:
            assert c == 1.0 and x * 200 == pytest.approx(POSE[k][0], abs=0.51) and y * 160 == pytest.approx(
                POSE[k][1], abs=0.51)
        else:
            assert (x, y, c) == (0.0, 0.0, 0.0)
    drawn = PoseSet.from_json(pose).render()
    assert drawn.shape == (160, 200, 3)
    assert np.array_equal(drawn, np.rint(out * 255).astype(np.uint8))


def test_dw_pose_json_has_hands_and_faces_with_missing_points_zeroed(tmp_path):
    found: list = []
    out = pp.detect("dw_openpose_full", PICTURE, resolution=512, annotator_dirs=_files(tmp_path), poses=found)
    pose = found[0].to_json()
    person = pose["people"][0]
    body = person["pose_keypoints_2d"]
    assert body[0:3] == [pytest.approx(256 / 512, abs=1e-3), pytest.approx(156 / 512, abs=1e-3), 1.0]  # the nose
    assert body[3 * 14: 3 * 14 + 3] == [0.0, 0.0, 0.0]  # the right eye scored 0.2: not found
    face = person["face_keypoints_2d"]
    assert len(face) == 3 * 70 and face[2] == 1.0 and sum(face[2::3]) == 1.0  # one face point found
    assert person["hand_left_keypoints_2d"][0:3] == [pytest.approx(356 / 512, abs=1e-3),
                                                      pytest.approx(356 / 512, abs=1e-3), 1.0]
    assert person["hand_right_keypoints_2d"] is None  # no right-hand point scored: the part is null
    assert np.array_equal(PoseSet.from_json(pose).render(), np.rint(out * 255).astype(np.uint8))


def test_animal_json_draws_back_the_same_map(tmp_path):
    dog = (320, 320, 160, 160, 0.9, 16)
    yolox_file(tmp_path / "openpose" / "yolox_l.onnx", (dog,))
    dwpose_file(tmp_path / "openpose" / dwpose.ANIMAL_FILE, {k: (32 + 12 * k, 128, 0.9) for k in range(17)},
                count=17, size=(256, 256))
    found: list = []
    out = pp.detect("animal_openpose", PICTURE, resolution=512, annotator_dirs=[tmp_path], poses=found)
    pose = found[0].to_json()
    assert pose["people"] == [] and len(pose["animals"]) == 1 and len(pose["animals"][0]) == 51
    assert out.max() > 0 and np.array_equal(PoseSet.from_json(pose).render(), np.rint(out * 255).astype(np.uint8))


def test_missing_points_leave_their_limbs_out():
    body = [None] * 18
    body[1], body[2], body[5] = (100.0, 100.0), (60.0, 100.0), (140.0, 100.0)
    drawn = PoseSet(200, 200, [Person(body)]).render()
    assert tuple(drawn[100, 80]) == tuple(int(c * 0.6) for c in op.COLORS[0])  # neck - right shoulder
    json = PoseSet(200, 200, [Person(body)]).to_json()
    json["people"][0]["pose_keypoints_2d"][3 * 2 + 2] = 0.0  # the right shoulder "not found"
    again = PoseSet.from_json(json).render()
    assert tuple(again[100, 80]) == (0, 0, 0) and tuple(again[100, 120]) != (0, 0, 0)


@pytest.mark.parametrize(("pose", "needle"), [
    ([], "an object with people"),
    ({"people": []}, "pose.canvas_height must be a whole number"),
    ({"people": [], "canvas_height": 0, "canvas_width": 64}, "pose.canvas_height"),
    ({"people": [], "canvas_height": 64, "canvas_width": 1e9}, "pose.canvas_width"),
    ({"people": [{"pose_keypoints_2d": [0.5, 0.5]}], "canvas_height": 64, "canvas_width": 64},
     "pose.people[0].pose_keypoints_2d: x, y, confidence triples"),
    ({"people": [{"pose_keypoints_2d": [0.5, "a", 1]}], "canvas_height": 64, "canvas_width": 64},
     "every value must be a number"),
    ({"people": ["x"], "canvas_height": 64, "canvas_width": 64}, "pose.people[0]: a person is an object"),
    ({"people": [{"hand_left_keypoints_2d": [0.0] * 66}], "canvas_height": 64, "canvas_width": 64},
     "at most 21 points"),
])
def test_bad_pose_json_is_named(pose, needle):
    with pytest.raises(InvalidRequest) as err:
        PoseSet.from_json(pose)
    assert needle in str(err.value)


def test_detect_and_render_over_the_a1111_routes(api, studio):
    from tests.test_controlnet_api import png_b64

    annotators = studio.home.root / "models" / "annotators"
    _files(annotators)
    r = api.post("/controlnet/detect", json={"controlnet_module": "dw_openpose_full", "controlnet_processor_res": 512,
                                             "controlnet_input_images": [png_b64(PICTURE)] * 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 2 and len(body["poses"]) == 2
    r = api.post("/controlnet/render_openpose_json", json=body["poses"])
    assert r.status_code == 200, r.text
    rendered = r.json()
    assert rendered["info"] == "Success" and len(rendered["images"]) == 2
    assert np.array_equal(_png(rendered["images"][0]), _png(body["images"][0]))
    assert api.post("/controlnet/render_openpose_json", json=[]).json() == {"info": "No pose data detected."}
    bad = api.post("/controlnet/render_openpose_json", json=[{"people": [], "canvas_width": 64}])
    assert bad.status_code == 422 and "pose[0].canvas_height" in bad.json()["detail"]
    canny = api.post("/controlnet/detect", json={"controlnet_module": "canny",
                                                 "controlnet_input_images": [png_b64(PICTURE)]}).json()
    assert "poses" not in canny  # only the pose modules answer poses, as the extension
    native = api.post("/api/controlnet/detect", json={"module": "dw_openpose_full", "resolution": 512,
                                                      "image": png_b64(PICTURE)}).json()
    assert native["pose"] == body["poses"][0]
    assert api.post("/api/controlnet/detect", json={"module": "canny", "image": png_b64(PICTURE)}).json()["pose"] \
        is None
