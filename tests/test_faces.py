"""Face restoration (darkroom/faces): RetinaFace in facexlib's key layout, priors/decoding/NMS, FFHQ alignment and
paste-back, the restorer with tiny GFPGAN/CodeFormer files, and the A1111 routes through the real `webuiapi`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from darkroom.errors import Interrupted, InvalidRequest, ModelLoadError
from darkroom.faces import FaceRestorer
from darkroom.faces.align import paste_face, similarity, template, warp_face
from darkroom.faces.detect import Face, RetinaFace, decode_boxes, decode_landmarks, nms, priors
from darkroom.faces.load import gfpgan_config, read_weights
from darkroom.home import Home
from darkroom.testing import tiny_faces
from tests.server_util import live_server, studio_with

# --- the detector --------------------------------------------------------------------------------------------


def test_retinaface_loads_facexlib_layout_strictly(tmp_path):
    state = tiny_faces.retinaface_state()
    keys = set(state)
    # the names facexlib's checkpoint uses (torchvision ResNet body, FPN, SSH with its odd 7x7 spelling, heads)
    for key in ("body.conv1.weight", "body.layer4.2.bn3.running_var", "body.layer2.0.downsample.0.weight",
                "fpn.output1.0.weight", "fpn.merge2.1.bias", "ssh3.conv7x7_3.0.weight", "ssh1.conv7X7_2.1.weight",
                "ClassHead.2.conv1x1.weight", "BboxHead.0.conv1x1.bias", "LandmarkHead.1.conv1x1.weight"):
        assert key in keys, key
    assert not any(k.startswith(("body.fc", "body.avgpool")) for k in keys)
    path = tmp_path / "detection_Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DataParallel's prefix is stripped
    net = RetinaFace.from_state_dict(read_weights(path))
    assert torch.equal(net.state_dict()["fpn.output1.0.weight"], state["fpn.output1.0.weight"])
    del state["ssh2.conv3X3.1.weight"]
    with pytest.raises(ModelLoadError, match="not a RetinaFace-ResNet50 face detector"):
        RetinaFace.from_state_dict(state)


def test_priors_match_hand_computed_anchors():
    p = priors(64, 96)  # strides 8, 16, 32 -> 8x12, 4x6, 2x3 cells, two sizes each
    assert p.shape == (2 * (8 * 12 + 4 * 6 + 2 * 3), 4)
    assert torch.allclose(p[0], torch.tensor([4 / 96, 4 / 64, 16 / 96, 16 / 64]))
    assert torch.allclose(p[1], torch.tensor([4 / 96, 4 / 64, 32 / 96, 32 / 64]))
    assert torch.allclose(p[2], torch.tensor([12 / 96, 4 / 64, 16 / 96, 16 / 64]))  # next column
    last = p[-1]  # stride 32, row 1, column 2, size 512
    assert torch.allclose(last, torch.tensor([80 / 96, 48 / 64, 512 / 96, 512 / 64]))


def test_decoding_boxes_and_landmarks():
    anchor = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    loc = torch.tensor([[1.0, -1.0, 0.0, math_log(2) / 0.2]])
    box = decode_boxes(loc, anchor)[0]
    # centre (0.5 + 1 * 0.1 * 0.2, 0.5 - 1 * 0.1 * 0.4) = (0.52, 0.46); size (0.2, 0.8)
    assert torch.allclose(box, torch.tensor([0.42, 0.06, 0.62, 0.86]), atol=1e-6)
    pts = decode_landmarks(torch.tensor([[0.0, 0.0, 10.0, 5.0, 0, 0, 0, 0, -10.0, 0]]), anchor)[0]
    assert torch.allclose(pts[1], torch.tensor([0.5 + 10 * 0.1 * 0.2, 0.5 + 5 * 0.1 * 0.4]))
    assert torch.allclose(pts[4], torch.tensor([0.3, 0.5]))


def math_log(x: float) -> float:
    import math

    return math.log(x)


def test_nms_keeps_best_and_drops_overlaps():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 5.0]])
    scores = torch.tensor([0.9, 0.95, 0.5, 0.8])
    # box 1 beats box 0 (IoU 9/11 = 0.82); box 3 vs box 1: 45/(100+50-45) = 0.43 > 0.4 -> dropped
    assert nms(boxes, scores, 0.4) == [1, 2]
    assert nms(boxes, scores, 0.5) == [1, 3, 2]


# --- alignment -----------------------------------------------------------------------------------------------


def test_similarity_recovers_a_known_transform():
    angle, scale, shift = 0.3, 1.7, torch.tensor([12.0, -5.0], dtype=torch.float64)
    rot = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float64)
    src = torch.tensor([[10, 20], [40, 22], [25, 35], [15, 50], [38, 49]], dtype=torch.float64)
    dst = src @ (scale * rot).T + shift
    m = similarity(src, dst)
    assert torch.allclose(m[:, :2], scale * rot, atol=1e-9)
    assert torch.allclose(m[:, 2], shift, atol=1e-9)


def test_paste_back_touches_only_the_crop_and_leaves_the_rest():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 120, 160)).astype(np.float32))
    face = torch.tensor([[60, 50], [90, 50], [75, 66], [63, 80], [88, 80]], dtype=torch.float64)
    m = similarity(face, template(64))
    crop = warp_face(image, m, 64)
    same = paste_face(image, crop, m)
    changed = (same != image).any(0)
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert changed.sum() > 0
    # eyes 30 px apart vs the template's 15.7 at 64 px: the crop covers ~122 px around x=75, y~62
    assert bool((same[:, :, :12] == image[:, :, :12]).all()) and bool((same[:, :, 140:] == image[:, :, 140:]).all())
    assert xs.min() >= 12 and xs.max() < 140
    white = paste_face(image, torch.full_like(crop, 255.0), m)
    centre = white[:, 60:70, 70:80]
    # inside the feathered edge the face replaces the picture
    assert torch.allclose(centre, torch.full_like(centre, 255.0), atol=1e-3)
    touched = (white != image).any(0)
    assert bool((white[:, :, :12] == image[:, :, :12]).all()) and touched.sum() > changed.sum() * 0.9


# --- the restorer --------------------------------------------------------------------------------------------


class OneFace:
    """A detector stub: one face at known landmarks."""

    def __init__(self, landmarks):
        self.landmarks = torch.tensor(landmarks, dtype=torch.float64)

    def detect(self, image):
        return [Face((0.0, 0.0, 1.0, 1.0), 0.99, self.landmarks)]


LANDMARKS = [[70, 60], [100, 60], [85, 76], [73, 90], [98, 90]]


def _photo(w=200, h=160, seed=1) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_gfpgan_config_is_read_from_the_file():
    state = tiny_faces.gfpgan_state()["params_ema"]
    cfg = gfpgan_config(state)
    assert (cfg["out_size"], cfg["num_style_feat"], cfg["channel_multiplier"], cfg["narrow"], cfg["num_mlp"],
            cfg["different_w"], cfg["sft_half"]) == (64, 16, 1, 1 / 32, 2, True, True)


def test_restores_only_the_face_region(tmp_path):
    root = tmp_path / "a1111"
    tiny_faces.write_a1111_faces(root, detector=False)
    restorer = FaceRestorer(Home(tmp_path / "home", [root]), detector=OneFace(LANDMARKS))
    photo = _photo()
    out = restorer.restore(photo, "gfpgan")
    a, b = np.asarray(photo).astype(int), np.asarray(out).astype(int)
    changed = (a != b).any(2)
    assert changed.sum() > 500
    ys, xs = np.nonzero(changed)
    # the 64 px crop spans ~122 px around the face (eyes 30 px apart vs the template's 15.7): x ~24..146
    assert 20 <= xs.min() and xs.max() < 150
    assert (a[:, :20] == b[:, :20]).all() and (a[:, 150:] == b[:, 150:]).all()
    assert restorer.restore(photo, "GFPGAN", visibility=0) is photo
    half = np.asarray(restorer.restore(photo, "GFPGAN", visibility=0.5)).astype(int)
    assert np.abs(half - (a + b) / 2).max() <= 1  # Image.blend with the original, as the webui's extras
    assert np.array_equal(np.asarray(restorer.restore(photo, "GFPGAN")), b)  # fixed noise: repeatable


def test_no_face_found_changes_nothing(tmp_path):
    root = tmp_path / "a1111"
    tiny_faces.write_a1111_faces(root, finds_faces=False)
    restorer = FaceRestorer(Home(tmp_path / "home", [root]))
    photo = _photo(64, 64)
    assert np.array_equal(np.asarray(restorer.restore(photo, "GFPGAN")), np.asarray(photo))


def test_cancel_stops_between_faces(tmp_path):
    import threading

    root = tmp_path / "a1111"
    tiny_faces.write_a1111_faces(root, detector=False)
    restorer = FaceRestorer(Home(tmp_path / "home", [root]), detector=OneFace(LANDMARKS))
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        restorer.restore(_photo(), "GFPGAN", cancel=stop)


def test_missing_files_name_the_files_and_folders(tmp_path):
    restorer = FaceRestorer(Home(tmp_path / "home"))
    with pytest.raises(InvalidRequest) as e:
        restorer.check("CodeFormer")
    msg = str(e.value)
    assert "codeformer-v0.1.0.pth and detection_Resnet50_Final.pth" in msg
    assert str(tmp_path / "home" / "models" / "faces") in msg and "models/Codeformer" in msg
    with pytest.raises(InvalidRequest, match="choose CodeFormer or GFPGAN"):
        restorer.check("RestoreFormer")
    assert restorer.available() == []


@pytest.mark.slow
def test_codeformer_runs_from_an_a1111_layout(tmp_path):
    root = tmp_path / "a1111"
    tiny_faces.write_a1111_faces(root, gfpgan=False, codeformer=True, detector=False)
    restorer = FaceRestorer(Home(tmp_path / "home", [root]), detector=OneFace(LANDMARKS))
    assert restorer.available() == [{"name": "CodeFormer", "cmd_dir": str(root / "models" / "Codeformer")}]
    photo = _photo()
    out = np.asarray(restorer.restore(photo, "CodeFormer", weight=0.7)).astype(int)
    a = np.asarray(photo).astype(int)
    assert (out != a).any() and (out[:, :20] == a[:, :20]).all()


# --- through the A1111 API -----------------------------------------------------------------------------------


def test_webuiapi_txt2img_restore_faces_and_extras(tmp_path, tiny_model):
    root = tmp_path / "a1111"
    files = tiny_faces.write_a1111_faces(root)
    studio = studio_with(Home(tmp_path / "home", [root]), tiny_model("sd1")["path"])
    try:
        with live_server(studio) as url:
            host, port = url.removeprefix("http://").split(":")
            client = webuiapi.WebUIApi(host=host, port=int(port))
            assert client.get_face_restorers() == [{"name": "GFPGAN", "cmd_dir": str(files["gfpgan"].parent)}]
            with pytest.raises(RuntimeError, match="codeformer-v0.1.0.pth"):  # the default model's file is missing
                client.txt2img(prompt="a face", steps=2, width=64, height=64, seed=3, restore_faces=True)
            client.set_options({"face_restoration_model": "gfpgan"})
            assert client.get_options()["face_restoration_model"] == "GFPGAN"
            plain = client.txt2img(prompt="a face", steps=2, width=64, height=64, seed=3)
            fixed = client.txt2img(prompt="a face", steps=2, width=64, height=64, seed=3, restore_faces=True)
            assert "Face restoration: GFPGAN" in fixed.info["infotexts"][0]
            assert fixed.info["restore_faces"] is True and fixed.info["face_restoration_model"] == "GFPGAN"
            assert not np.array_equal(np.asarray(plain.image), np.asarray(fixed.image))
            one = client.extra_single_image(plain.image, upscaler_1="None", gfpgan_visibility=0.5)
            assert "GFPGAN visibility: 0.5" in one.info
            assert not np.array_equal(np.asarray(one.image.convert("RGB")), np.asarray(plain.image))
            with pytest.raises(RuntimeError, match="codeformer-v0.1.0.pth"):
                client.extra_single_image(plain.image, upscaler_1="None", codeformer_visibility=1)
            files["gfpgan"].unlink()
            assert client.get_face_restorers() == []
            with pytest.raises(RuntimeError, match="422.*GFPGANv1.4.pth"):
                client.txt2img(prompt="a face", steps=2, width=64, height=64, seed=3, restore_faces=True)
    finally:
        studio.close()
