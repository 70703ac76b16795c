"""InsightFace for FaceID: SCRFD boxes and keypoints decoded and suppressed as insightface does, the ArcFace
alignment and embedding, and where the packs' files are found (tiny graphs with the real files' I/O,
darkroom/testing/tiny_insightface.py)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control.annotators import imageops
from darkroom.control.annotators import insightface as inf
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing import tiny_insightface as ti
from darkroom.testing.tiny_onnx import _constant_graph

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)  # 640 wide: the detector sees it at scale 1


def _detect(tmp_path, anchors, rgb, *, batched=False):
    path = ti.scrfd_file(tmp_path / "det_10g.onnx", anchors, batched=batched)
    return inf.detect(rgb, inf._graph(path, "SCRFD face detector"), name=path.name)


@pytest.mark.parametrize("batched", [False, True])
def test_boxes_and_keypoints_decode_to_picture_pixels(tmp_path, batched):
    # 400 wide, 300 high: scaled to 640 x 480 on the detector input, so input pixels / 1.6 are picture pixels
    offsets = (-1.0, -0.5, 1.0, -0.5, 0.0, 0.25, -0.75, 1.0, 0.75, 1.0)
    face = ti.Anchor(16, 10, 8, 1, 0.9, (2.0, 3.0, 4.0, 5.0), offsets)  # anchor centre (160, 128)
    weak = ti.Anchor(32, 3, 3, 0, 0.49, (1.0, 1.0, 1.0, 1.0), (0.0,) * 10)  # under the 0.5 threshold
    found = _detect(tmp_path, [face, weak], RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8), batched=batched)
    assert len(found) == 1
    f = found[0]
    assert f.bbox == pytest.approx(((160 - 32) / 1.6, (128 - 48) / 1.6, (160 + 64) / 1.6, (128 + 80) / 1.6))
    expected_kps = (np.array([160.0, 128.0]) + np.array(offsets).reshape(5, 2) * 16) / 1.6
    np.testing.assert_allclose(f.kps, expected_kps, rtol=1e-6)
    assert f.det_score == pytest.approx(0.9)


def test_overlapping_lower_score_duplicates_are_suppressed_with_insightfaces_plus_one_areas(tmp_path):
    best = ti.face_anchor((80, 80, 89, 89), np.full((5, 2), 85.0), 0.9)  # 10 x 10 pixels counting +1
    # 4 pixels to the right: IoU 60 / 140 = 0.43 with +1 areas (suppressed), 45 / 117 = 0.38 without
    shifted = ti.Anchor(8, 11, 10, 0, 0.8, (0.5, 0.0, 0.625, 1.125), (0.0,) * 10)
    apart = ti.face_anchor((300, 200, 400, 330), np.full((5, 2), 350.0), 0.7, stride=16)
    found = _detect(tmp_path, [shifted, apart, best], PICTURE)
    assert [f.det_score for f in found] == pytest.approx([0.9, 0.7])
    assert found[0].bbox == pytest.approx((80, 80, 89, 89))
    dets = np.array([[80, 80, 89, 89, 0.9], [84, 80, 93, 89, 0.8], [85, 80, 94, 89, 0.7]], np.float32)
    assert inf.nms(dets) == [0, 2]  # 5 pixels over: IoU 50 / 150 = 0.33, kept


def test_the_largest_face_is_taken_and_none_is_an_error():
    small = inf.Face((0, 0, 10, 10), np.zeros((5, 2)), 0.99)
    big = inf.Face((50, 50, 90, 100), np.zeros((5, 2)), 0.6)
    same = inf.Face((0, 0, 40, 50), np.zeros((5, 2)), 0.7)
    assert inf.largest_face([small, big]) is big
    assert inf.largest_face([big, small, same]) is same  # equal areas: the last, as the extension's sort
    with pytest.raises(InvalidRequest, match="no face was found in the picture; FaceID and InstantID need a picture"):
        inf.largest_face([])


def test_keypoints_on_the_template_give_back_the_picture():
    picture = RNG.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_allclose(inf.estimate_norm(inf.ARCFACE_DST), np.eye(2, 3), atol=1e-5)
    np.testing.assert_array_equal(inf.norm_crop(picture, inf.ARCFACE_DST), picture)


def test_a_similarity_is_recovered_and_the_crop_samples_it():
    picture = RNG.integers(0, 256, (300, 320, 3), dtype=np.uint8)
    kps = inf.ARCFACE_DST * 2 + np.array([30, 40], np.float32)  # the face twice as large, shifted
    np.testing.assert_allclose(inf.estimate_norm(kps), [[0.5, 0, -15], [0, 0.5, -20]], atol=1e-5)
    np.testing.assert_array_equal(inf.norm_crop(picture, kps), picture[40:264:2, 30:254:2])
    turn = np.deg2rad(30)
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    tilted = (inf.ARCFACE_DST - 56) @ rot.T * 1.5 + 150  # dst = rot(-30) (src - 150) / 1.5 + 56
    m = inf.estimate_norm(tilted)
    np.testing.assert_allclose(m[:, :2], rot.T / 1.5, atol=1e-5)
    np.testing.assert_allclose(m @ [150, 150, 1], [56, 56], atol=1e-4)
    mirrored = inf.ARCFACE_DST * [-1, 1] + [200, 0]  # a reflection fits best, but it stays a rotation
    assert np.linalg.det(inf.estimate_norm(mirrored)[:, :2]) > 0


def test_outside_the_picture_is_black_and_bilinear_in_between():
    flat = np.full((100, 100, 3), 200, np.uint8)
    out = inf.norm_crop(flat, inf.ARCFACE_DST - [50.5, 0])  # the picture's first column at x = 50.5 of the crop
    assert (out[:, :50] == 0).all() and (out[100:] == 0).all()
    assert (out[:100, 50] == 100).all() and (out[:100, 51:] == 200).all()


def test_the_warp_gives_opencvs_bytes():
    # insightface's norm_crop (cv2.warpAffine of OpenCV 4.14: coordinates in 1/32 pixel, weights in 1/1024)
    rng = np.random.default_rng(11)
    picture = rng.integers(0, 256, (160, 150, 3), dtype=np.uint8)
    turn = np.deg2rad(17)
    rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
    kps = ((inf.ARCFACE_DST - 56) @ rot.T * 1.15 + [70.3, 81.7]).astype(np.float32)
    digest = hashlib.sha256(inf.norm_crop(picture, kps).tobytes()).hexdigest()
    assert digest == "d88a14103424066d11943899b01708f5b160b8c1f9972d19290c348093f76122"


def test_the_resize_is_opencvs_two_tap_bilinear():
    img = np.array([[0, 100, 200, 40], [60, 20, 80, 0]], np.uint8)[:, :, None]
    np.testing.assert_array_equal(imageops.resize(img, 2, 1, imageops.LINEAR)[:, :, 0], [[45, 80]])  # 2x2 means
    up = imageops.resize(np.array([[0, 200]], np.uint8)[:, :, None], 4, 1, imageops.LINEAR)[0, :, 0]
    np.testing.assert_array_equal(up, [0, 50, 150, 200])  # centres at -0.25 (the edge), 0.25, 0.75, 1.25
    # shrinking keeps two taps (no antialiasing): a one-pixel line between the taps vanishes
    lines = np.zeros((1, 9, 1), np.uint8)
    lines[0, 1::3] = 255
    np.testing.assert_array_equal(imageops.resize(lines, 3, 1, imageops.LINEAR)[0, :, 0], [255, 255, 255])
    lines[0] = 0
    lines[0, ::3] = 255
    np.testing.assert_array_equal(imageops.resize(lines, 3, 1, imageops.LINEAR)[0, :, 0], [0, 0, 0])
    # OpenCV 4.14's own bytes, 7 of which differ from exact bilinear rounded (its 11-bit weights, SIMD truncations)
    small = np.array([[248, 194, 190], [207, 147, 26], [237, 21, 245]], np.uint8)[:, :, None]
    opencv = [[248, 240, 217, 194, 192, 190, 190], [242, 234, 211, 187, 178, 169, 166],
              [225, 216, 192, 167, 137, 106, 96], [207, 198, 173, 147, 95, 43, 26], [220, 202, 147, 93, 104, 116, 120],
              [233, 205, 122, 39, 114, 188, 213], [237, 206, 113, 21, 117, 213, 245]]
    np.testing.assert_array_equal(imageops.resize(small, 7, 7, imageops.LINEAR)[:, :, 0], opencv)


def test_the_embedding_is_arcface_on_the_aligned_crop(tmp_path):
    kps = inf.ARCFACE_DST * 2 + np.array([100, 50], np.float32)
    ti.pack(tmp_path, [ti.face_anchor((90, 40, 340, 300), kps, 0.95)], seed=3)
    found = inf.faces(PICTURE, [tmp_path])
    assert len(found) == 1
    face = found[0]
    np.testing.assert_allclose(face.kps, kps, atol=1e-4)
    crop = PICTURE[50:274:2, 100:324:2].astype(np.float32)  # the face at half size: the template's 112 x 112
    pooled = ((crop - 127.5) / 127.5).transpose(2, 0, 1).reshape(3, 8, 14, 8, 14).mean(axis=(2, 4))
    weights, bias = ti.arcface_weights(3)
    expected = pooled.reshape(-1) @ weights + bias
    assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
    np.testing.assert_allclose(face.embedding, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(face.normed_embedding, expected / np.linalg.norm(expected), atol=1e-5)
    assert inf.faces(PICTURE[::-1].copy(), [tmp_path])[0].embedding != pytest.approx(face.embedding)


def test_no_face_gives_an_empty_list(tmp_path):
    ti.pack(tmp_path, [])
    assert inf.faces(PICTURE, [tmp_path]) == []


def test_a_missing_pack_names_its_files_and_where_to_put_them(tmp_path):
    with pytest.raises(InvalidRequest) as e:
        inf.pack_dir("buffalo_l", [tmp_path / "a", tmp_path / "b"])
    message = str(e.value)
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message
    assert "models/insightface/models/buffalo_l" in message and "annotator/downloads/insightface/models" in message
    assert e.value.hint == f"searched: {tmp_path / 'a'}, {tmp_path / 'b'}"
    with pytest.raises(InvalidRequest, match="scrfd_10g_bnkps.onnx and glintr100.onnx"):
        inf.faces(PICTURE, [tmp_path], pack="antelopev2")
    with pytest.raises(InvalidRequest, match="unknown InsightFace pack 'buffalo_s'"):
        inf.pack_dir("buffalo_s", [tmp_path])


def test_packs_are_found_in_each_layout(tmp_path):
    extension = ti.pack(tmp_path / "downloads" / "insightface" / "models")  # annotator/downloads given
    comfy = ti.pack(tmp_path / "comfy" / "models", name="antelopev2")  # ComfyUI's models/insightface given
    flat = ti.pack(tmp_path / "flat")  # the pack's parent given
    assert inf.pack_dir("buffalo_l", [tmp_path / "downloads"]) == extension
    assert inf.pack_dir("antelopev2", [tmp_path / "comfy"]) == comfy
    assert inf.pack_dir("buffalo_l", [tmp_path / "flat"]) == flat
    assert inf.pack_dir("buffalo_l", [tmp_path / "flat", tmp_path / "downloads"]) == flat  # first match wins
    (flat / "w600k_r50.onnx").unlink()  # half a pack is not a pack
    assert inf.pack_dir("buffalo_l", [tmp_path / "flat", tmp_path / "downloads"]) == extension


def test_sessions_are_kept_until_the_file_changes(tmp_path):
    path = ti.arcface_file(tmp_path / "w600k_r50.onnx")
    first = inf._graph(path, "ArcFace recognition model")
    assert inf._graph(path, "ArcFace recognition model") is first
    ti.arcface_file(path, seed=1)
    os.utime(path, ns=(1, 1))
    assert inf._graph(path, "ArcFace recognition model") is not first


def test_detectors_without_keypoints_and_other_files_are_refused(tmp_path):
    plain = {name: value for name, value in ti.scrfd_outputs([]).items() if name not in ti.KPS_NAMES}
    path = _constant_graph(tmp_path / "buffalo_l" / "det_10g.onnx", "input.1", (1, 3, "?", "?"), plain)
    ti.arcface_file(tmp_path / "buffalo_l" / "w600k_r50.onnx")
    with pytest.raises(ModelLoadError, match="det_10g.onnx: not an SCRFD detector with keypoints"):
        inf.faces(PICTURE, [tmp_path])
    path.write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="det_10g.onnx: not an ONNX SCRFD face detector"):
        inf.faces(PICTURE, [tmp_path])
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        inf.detect(PICTURE.astype(np.float32), lambda x: [])
