"""dw_openpose_full: YOLOX boxes and RTMPose SimCC keypoints from ONNX graphs run by onnxruntime (tiny graphs
with the real files' shapes and chosen outputs, darkroom/testing/tiny_onnx.py), mapped back to the picture
and drawn as OpenPose bodies, hands and faces, as the extension does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators import dwpose
from darkroom.control.annotators.openpose import COLORS
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_onnx import dwpose_file, yolox_file

PICTURE = Image.new("RGB", (512, 512), (90, 120, 150))
# a person box centred at (320, 320) of the 640-pixel detector input, 200 x 400: the 512-pixel picture's
# (256, 256), 160 x 320; widened 1.25x and to 3:4 it is 300 x 400 picture pixels on the 288 x 384 pose input,
# so pose input (u, v) is picture (u * 300 / 288 + 106, v * 400 / 384 + 56)
PERSON = (320, 320, 200, 400, 0.9, 0)
POINTS = {0: (144, 96, 0.9),  # nose -> picture (256, 156)
          5: (192, 192, 0.8), 6: (96, 192, 0.8),  # left and right shoulders -> (306, 256), (206, 256); neck (256, 256)
          2: (120, 84, 0.2),  # right eye, under 0.3: left out -> would be (231, 143)
          23: (144, 144, 0.9),  # the first face point -> (256, 206)
          91: (240, 288, 0.9)}  # the left wrist -> (356, 356)


def _files(folder, boxes=(PERSON,), points=POINTS):
    yolox_file(folder / "openpose" / "yolox_l.onnx", boxes)
    dwpose_file(folder / "openpose" / "dw-ll_ucoco_384.onnx", points)
    return [folder]


def _rgb(out: np.ndarray, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in np.rint(out[y, x] * 255))


def test_keypoints_land_where_the_extension_puts_them(tmp_path):
    out = pp.detect("dw_openpose_full", PICTURE, resolution=512, annotator_dirs=_files(tmp_path))
    assert out.shape == (512, 512, 3)
    assert _rgb(out, 256, 156) == COLORS[0]  # nose
    assert _rgb(out, 256, 256) == COLORS[1]  # neck, between the shoulders
    assert _rgb(out, 206, 256) == COLORS[2] and _rgb(out, 306, 256) == COLORS[5]  # right, left shoulder
    assert _rgb(out, 256, 206) == (255, 255, 255)  # the face point, over the neck-nose limb
    assert _rgb(out, 356, 356) == (0, 0, 255)  # the hand's joint
    assert _rgb(out, 231, 143) == (0, 0, 0)  # the eye scored 0.2
    lit = np.argwhere(out.max(2) > 0)
    assert lit[:, 0].min() >= 150 and lit[:, 0].max() <= 362 and lit[:, 1].min() >= 200 and lit[:, 1].max() <= 362


def test_things_but_no_person_take_the_whole_picture_and_nothing_draws_nothing(tmp_path):
    cat = (320, 320, 100, 100, 0.9, 15)
    # the whole 512 x 512 picture: 640 x 853.3 at 3:4, so pose input (144, 192) is its centre
    out = pp.detect("dw_openpose_full", PICTURE, resolution=512,
                    annotator_dirs=_files(tmp_path, boxes=(cat,), points={0: (144, 192, 0.9)}))
    assert _rgb(out, 256, 256) == COLORS[0]
    empty = pp.detect("dw_openpose_full", PICTURE, resolution=512, annotator_dirs=_files(tmp_path / "e", boxes=()))
    assert empty.max() == 0


def test_people_boxes_nms_and_the_letterbox():
    boxes = np.array([[0, 0, 100, 100], [5, 5, 105, 105], [200, 200, 300, 300]], np.float32)
    assert dwpose.nms(boxes, np.array([0.5, 0.9, 0.4])) == [1, 2]  # the overlapping weaker box goes
    x, ratio = dwpose.letterbox(np.zeros((100, 200, 3), np.uint8))
    assert x.shape == (1, 3, 640, 640) and ratio == 3.2
    assert x[0, :, :320].max() == 0 and (x[0, :, 320:] == 114).all()  # top-left, grey below

    def detector(inp):
        raw = np.zeros((1, 8400, 85), np.float32)
        raw[0, 40 * 80 + 40, :6] = (0, 0, np.log(25), np.log(50), 0.9, 0.9)  # a person at (320, 320), 200 x 400
        raw[0, 40 * 80 + 41, :6] = (0, 0, np.log(25), np.log(50), 0.9, 0.5)  # the same one, 8 pixels right: NMS
        return [raw]

    found = dwpose.people(detector, np.zeros((320, 320, 3), np.uint8))  # ratio 2
    np.testing.assert_allclose(found, [[110, 60, 210, 260]])


def test_crop_is_the_frame_on_the_pose_input():
    img = np.zeros((400, 300, 3), np.uint8)
    img[100:200, 100:200] = 255
    centre, size = dwpose.box_frame(np.array([0, 0, 240, 320]))  # 300 x 400 already 3:4
    assert tuple(size) == (300, 400) and tuple(centre) == (120, 160)
    crop = dwpose.crop(img, centre, size)  # 288 x 384 covering x -30..270, y -40..360
    step = 300 / 288
    inside = crop[int((150 + 40) / step), int((150 + 30) / step)]
    assert crop.shape == (384, 288, 3) and (inside == 255).all()
    assert crop[0, 0].max() == 0 and crop[-1, -1].max() == 0  # outside the picture: black


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(InvalidRequest, match="dw_openpose_full needs yolox_l.onnx.*downloads/openpose"):
        pp.detect("dw_openpose_full", PICTURE, annotator_dirs=[tmp_path])
    folder = tmp_path / "bad"
    _files(folder)
    (folder / "openpose" / "yolox_l.onnx").write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="yolox_l.onnx: not an ONNX YOLOX person detector"):
        pp.detect("dw_openpose_full", PICTURE, annotator_dirs=[folder])
    dwpose_file(folder / "openpose" / "yolox_l.onnx")  # a graph of the wrong shape
    with pytest.raises(ModelLoadError, match="yolox_l.onnx: not the YOLOX person detector"):
        pp.detect("dw_openpose_full", PICTURE, annotator_dirs=[folder])
    yolox_file(folder / "openpose" / "yolox_l.onnx", (PERSON,))
    yolox_file(folder / "openpose" / "dw-ll_ucoco_384.onnx", (PERSON,))
    with pytest.raises(ModelLoadError, match="dw-ll_ucoco_384.onnx: not the DWPose whole-body model"):
        pp.detect("dw_openpose_full", PICTURE, annotator_dirs=[folder])
    assert pp.module_list()["module_detail"]["dw_openpose_full"]["sliders"][0]["name"] == "Resolution"


ANIMAL_FILE = "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx"


def test_animals_draw_every_limb_in_the_extensions_colours(tmp_path):
    # a dog (class 16) box centred at (320, 320) of the detector input, 160 x 160: the picture's (256, 256),
    # 128 x 128, widened to 160 x 160 on the 256 x 256 input: input (u, v) is picture (u * 0.625 + 176, ...)
    dog = (320, 320, 160, 160, 0.9, 16)
    person = (100, 100, 50, 100, 0.9, 0)  # not an animal: left out
    points = {k: (32 + 12 * k, 128, 0.9) for k in range(17)}  # a row of keypoints at picture y 256
    points[1] = (32, 224, 0.9)  # the right eye below the left one: limb 0 (white) is vertical at x 196
    yolox_file(tmp_path / "openpose" / "yolox_l.onnx", (dog, person))
    dwpose_file(tmp_path / "openpose" / ANIMAL_FILE, points, count=17, size=(256, 256))
    out = pp.detect("animal_openpose", PICTURE, resolution=512, annotator_dirs=[tmp_path])
    assert _rgb(out, 196, 280) == (255, 255, 255)  # between the eyes, (196, 256) and (196, 316)
    assert _rgb(out, 196, 250) == (0, 0, 0) and out[: 200].max() == 0  # nothing above the row, no person
    assert pp.module_list()["module_detail"]["animal_openpose"]["sliders"][0]["name"] == "Resolution"
    yolox_file(tmp_path / "openpose" / "yolox_l.onnx", (person,))
    assert pp.detect("animal_openpose", PICTURE, resolution=512, annotator_dirs=[tmp_path]).max() == 0
