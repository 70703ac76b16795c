"""ControlNet preprocessors: the maps the extension's annotators make, its resize rules, and offline weights."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import darkroom  # noqa: F401  (offline first: the guard is installed)
from darkroom.control import preprocess as pp
from darkroom.control.annotators.canny import canny
from darkroom.errors import InvalidRequest, TooLarge
from darkroom.home import Home
from darkroom.offline import guard as offline


def _disc(size=(96, 64), centre=(48, 32), radius=20) -> tuple[Image.Image, np.ndarray]:
    """A white filled circle on black, and each pixel's distance from the circle's centre."""
    im = Image.new("RGB", size, "black")
    cx, cy = centre
    ImageDraw.Draw(im).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill="white")
    yy, xx = np.mgrid[:size[1], :size[0]]
    return im, np.hypot(xx - cx, yy - cy)


# --- canny ------------------------------------------------------------------------------------------------

def test_canny_of_a_disc_is_its_outline():
    im, dist = _disc()
    edges = pp.detect("canny", im, resolution=64)  # short side 64: the size is kept
    assert edges.shape == (64, 96, 3) and edges.dtype == np.float32
    on = edges[..., 0] > 0.5
    assert set(np.unique(edges)) <= {0.0, 1.0}
    assert np.array_equal(edges[..., 0], edges[..., 2])
    assert on.sum() > 2 * np.pi * 20 * 0.8  # a closed outline, about the circumference long
    assert dist[on].min() >= 18.5 and dist[on].max() <= 21.5  # every edge pixel on the boundary
    assert not on[dist < 17].any() and not on[dist > 22].any()  # inside and outside empty
    # every direction round the circle has an edge pixel: no gap from the suppression
    ys, xs = np.nonzero(on)
    sectors = np.floor((np.degrees(np.arctan2(ys - 32, xs - 48)) + 180) / 15).astype(int) % 24
    assert len(set(sectors.tolist())) == 24


def test_canny_rectangle_edges_and_thresholds():
    img = np.zeros((40, 50), dtype=np.uint8)
    img[10:30, 15:40] = 120
    edges = canny(img, 100, 200) > 0
    ys, xs = np.nonzero(edges)
    # one-pixel lines along the four sides (on the step's inner or outer pixel), nothing elsewhere
    near_side = (np.isin(ys, (9, 10, 29, 30)) & (xs >= 14) & (xs <= 40)) | \
                (np.isin(xs, (14, 15, 39, 40)) & (ys >= 9) & (ys <= 30))
    assert near_side.all()
    assert edges[20, 14:16].sum() == 1 and edges[20, 39:41].sum() == 1  # left and right sides: one pixel wide
    assert edges[9:11, 27].sum() == 1 and edges[29:31, 27].sum() == 1
    assert not edges[12:28, 17:38].any()
    # Sobel's L1 magnitude of a 120 step is 4 * 120 = 480 across a side (6 * 120 at the corners):
    # kept above a threshold of 479, gone at 480 (the test is "greater than", as OpenCV's)
    assert canny(img, 479, 479)[20, 14] and not canny(img, 480, 480)[20, 14]
    assert (canny(img, 480, 480) > 0).sum() == 4 and not canny(img, 720, 720).any()
    # a weak step (magnitude 4 * 30 = 120) survives only when joined to a strong one (hysteresis)
    weak = np.zeros((40, 50), dtype=np.uint8)
    weak[:, 25:] = 30
    assert not canny(weak, 100, 200).any()
    assert canny(weak, 100, 110).any()
    joined = weak.copy()
    joined[:20, 25:] = 120  # the top half of the same edge is strong
    e = canny(joined, 100, 200) > 0
    assert e[30:, 24:26].any(), "the weak half is kept through the strong half"


def test_canny_matches_opencv_bit_for_bit():
    """Reference hashes from cv2.Canny (OpenCV 4.14) on the same picture: blocks of noise and a rectangle."""
    rng = np.random.RandomState(7)
    img = np.kron(rng.randint(0, 256, (12, 16, 3)).astype(np.uint8), np.ones((4, 4, 1), dtype=np.uint8))
    img[10:30, 20:50] = (200, 40, 90)
    for (lo, hi), count, digest in (((100, 200), 896, "424596858f30459c"), ((30, 60), 904, "a63ac702bf0bede0")):
        e = canny(img, lo, hi) > 0
        assert e.sum() == count
        assert hashlib.sha256(np.packbits(e).tobytes()).hexdigest()[:16] == digest


# --- the other maps without weights -------------------------------------------------------------------------

def test_invert_threshold_and_none_keep_values():
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, 10:] = 100
    arr[:, 20:] = 200
    im = Image.fromarray(arr)
    assert np.allclose(pp.detect("none", im), arr / 255.0)
    inv = pp.detect("invert (from white bg & black line)", im, resolution=999)  # the input size is kept
    assert inv.shape == (20, 30, 3) and np.allclose(inv, (255 - arr) / 255.0)
    assert pp.detect("invert", im).shape == (20, 30, 3)
    th = pp.detect("threshold", im, resolution=20)  # default level 127
    assert (th[:, :20] == 0).all() and (th[:, 21:] == 1).all()
    th = pp.detect("threshold", im, resolution=20, threshold_a=50)
    assert (th[:, :10] == 0).all() and (th[:, 11:] == 1).all()


def test_transparent_scribble_reads_as_black_on_white():
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).line((0, 16, 31, 16), fill=(0, 0, 0, 255), width=2)
    out = pp.detect("none", rgba)
    assert (out[0] == 1).all() and (out[16] == 0).all()


def test_bad_values_are_clear_errors_and_16_bit_input_works():
    im = Image.new("RGB", (16, 16))
    with pytest.raises(InvalidRequest, match="threshold_a"):
        pp.detect("canny", im, threshold_a="low")
    with pytest.raises(InvalidRequest, match="threshold_b"):
        pp.detect("canny", im, threshold_b=float("nan"))
    with pytest.raises(InvalidRequest, match="seed"):
        pp.detect("shuffle", im, seed="x")
    with pytest.raises(InvalidRequest, match="must be an image"):
        pp.detect("canny", np.zeros((4, 4, 3)))
    deep = Image.fromarray(np.array([[0, 65535, 32896, 65535]], dtype=np.uint16))  # a 16-bit grey PNG
    assert pp.detect("none", deep)[0, :, 0].tolist() == pytest.approx([0, 1, 128 / 255, 1])


def test_resolution_sets_the_short_side():
    im = Image.new("RGB", (300, 200), "gray")
    assert pp.detect("threshold", im, resolution=256).shape == (256, 384, 3)
    assert pp.detect("threshold", im, resolution=-1).shape == (512, 768, 3)  # -1: the default 512
    assert pp.detect("canny", im, resolution=100).shape == (100, 150, 3)
    assert pp.detect("canny", im, resolution=0).shape == (512, 768, 3)  # below range: the default, as the extension
    with pytest.raises(InvalidRequest, match="resolution"):
        pp.detect("canny", im, resolution="high")
    with pytest.raises(TooLarge):
        pp.detect("canny", Image.new("RGB", (4000, 10)), resolution=4096)


def test_tile_resample_downsamples_by_rate():
    im = Image.new("RGB", (200, 100), "red")
    assert pp.detect("tile_resample", im).shape == (100, 200, 3)  # rate 1: unchanged
    assert pp.detect("tile_resample", im, threshold_a=2).shape == (50, 100, 3)
    assert pp.detect("tile_resample", im, threshold_a=3).shape == (33, 66, 3)
    assert np.allclose(pp.detect("tile_resample", im, threshold_a=4)[..., 0], 1.0)
    # out of the slider's range (webuiapi's default 64 for every module): the default rate 1, as the extension
    assert pp.detect("tile_resample", im, threshold_a=64).shape == (100, 200, 3)


def test_inpaint_marks_masked_pixels_minus_one():
    im = Image.new("RGB", (40, 30), (255, 128, 0))
    mask = Image.new("L", (40, 30), 0)
    ImageDraw.Draw(mask).rectangle((10, 5, 19, 14), fill=255)
    for module in ("inpaint_only", "inpaint", "inpaint_global_harmonious"):
        out = pp.detect(module, im, mask=mask)
        assert out.shape == (30, 40, 3)
        assert (out[5:15, 10:20] == -1).all()
        assert out[0, 0].tolist() == pytest.approx([1.0, 128 / 255, 0.0])
        assert (out == -1).all(axis=2).sum() == 100
    small = mask.resize((20, 15), Image.Resampling.NEAREST)  # a mask of another size is scaled to the picture
    assert (pp.detect("inpaint_only", im, mask=small) == -1).all(axis=2).sum() == 100
    with pytest.raises(InvalidRequest, match="needs a mask"):
        pp.detect("inpaint_only", im)


def test_shuffle_is_deterministic_per_seed_and_keeps_colours():
    rng = np.random.RandomState(0)
    im = Image.fromarray(rng.randint(0, 256, (64, 96, 3)).astype(np.uint8))
    a = pp.detect("shuffle", im, resolution=64, seed=1)
    assert a.shape == (64, 96, 3)
    assert np.array_equal(a, pp.detect("shuffle", im, resolution=64, seed=1))
    assert not np.array_equal(a, pp.detect("shuffle", im, resolution=64, seed=2))
    flat = Image.new("RGB", (64, 64), (10, 200, 30))
    assert np.allclose(pp.detect("shuffle", flat, resolution=64, seed=5), np.array([10, 200, 30]) / 255.0)


def test_xdog_lineart_blur_and_colour_grid():
    im = Image.new("RGB", (128, 128), "white")
    ImageDraw.Draw(im).line((20, 64, 108, 64), fill="black", width=3)
    for module in ("scribble_xdog", "lineart_standard (from white bg & black line)"):
        out = pp.detect(module, im, resolution=128)
        assert out[62:67, 30:100].max() > 0.4, module  # the line is bright
        assert out[:40].max() == 0 and out[90:].max() == 0, module  # white paper stays black
    blurred = pp.detect("blur_gaussian", im, resolution=128, threshold_a=3)
    assert 0 < blurred[63, 64, 0] < blurred[58, 64, 0] < blurred[50, 64, 0] == 1
    grid = pp.detect("t2ia_color_grid", Image.new("RGB", (256, 128), (0, 64, 255)), resolution=128)
    assert grid.shape == (128, 256, 3) and np.allclose(grid, np.array([0, 64, 255]) / 255.0, atol=1 / 255)


def test_recolor_maps_are_gamma_corrected_grey():
    arr = np.array([[[255, 0, 0], [0, 0, 255], [128, 128, 128], [255, 255, 255]]], dtype=np.uint8)
    value = pp.detect("recolor_intensity", Image.fromarray(arr))
    assert value[0, :, 0].tolist() == pytest.approx([1.0, 1.0, 128 / 255, 1.0])
    darker = pp.detect("recolor_intensity", Image.fromarray(arr), threshold_a=2.0)
    assert darker[0, 2, 0] == pytest.approx(int((128 / 255) ** 2 * 255) / 255)
    lum = pp.detect("recolor_luminance", Image.fromarray(arr))[0, :, 0] * 255
    # OpenCV's Lab lightness of the picture read as BGR (the extension's quirk): pure red weighs as blue
    assert np.allclose(lum, [82, 136, 137, 255], atol=1)
    assert np.array_equal(lum, pp.detect("recolor_luminance", Image.fromarray(arr))[0, :, 1] * 255)


# --- fit and pixel perfect -----------------------------------------------------------------------------------

def _two_halves(h=50, w=100):
    m = np.zeros((h, w, 3), dtype=np.float32)
    m[:, : w // 2] = (0.2, 0.4, 0.6)
    m[:, w // 2:] = (0.8, 0.1, 0.3)
    return m


def test_fit_just_resize_stretches():
    out = pp.fit(_two_halves(), 64, 128, "Just Resize")
    assert out.shape == (128, 64, 3)
    assert np.allclose(out[:, :30], (0.2, 0.4, 0.6), atol=1e-3) and np.allclose(out[:, 34:], (0.8, 0.1, 0.3), atol=1e-3)


def test_fit_crop_and_resize_covers_and_crops_the_centre():
    m = np.zeros((50, 100, 3), dtype=np.float32)
    m[:, 25:75] = 1.0  # a white centre band, half the width
    out = pp.fit(m, 100, 100, "Crop and Resize")  # scale 2 -> 200x100, keep the middle 100 columns
    assert out.shape == (100, 100, 3)
    assert (out[:, 5:95] == 1).all()
    out = pp.fit(_two_halves(), 100, 100, 1)  # the old integer code
    assert out.shape == (100, 100, 3)
    inpaint = np.full((50, 100, 3), 0.5, dtype=np.float32)
    inpaint[:, 40:60] = -1  # a masked band in the middle stays masked, twice as wide
    out = pp.fit(inpaint, 100, 100, "Crop and Resize")
    masked = (out == -1).all(axis=2)
    assert masked[:, 32:68].all() and not masked[:, :28].any() and not masked[:, 72:].any()
    assert np.allclose(out[~masked], 0.5)


def test_fit_resize_and_fill_centres_on_the_border_median():
    m = np.full((50, 100, 3), 0.25, dtype=np.float32)
    m[20:30, 40:60] = 0.75
    out = pp.fit(m, 100, 100, "Resize and Fill")
    assert out.shape == (100, 100, 3)
    assert np.allclose(out[:25], 0.25) and np.allclose(out[75:], 0.25)  # the fill: the border's median
    assert np.allclose(out[45:55, 42:58], 0.75)  # the content, centred
    inpaint = np.full((50, 100, 3), 0.5, dtype=np.float32)
    inpaint[:, :20] = -1
    out = pp.fit(inpaint, 100, 100, "Resize and Fill")
    assert (out[:25] == -1).all() and (out[75:] == -1).all()  # filled area counts as masked
    assert (out[40:60, :18] == -1).all() and np.allclose(out[40:60, 22:], 0.5)


def test_fit_keeps_binary_and_few_colour_maps_crisp():
    edges = np.zeros((32, 32, 3), dtype=np.float32)
    edges[8:24, 8:24] = 1.0
    up = pp.fit(edges, 80, 80, "Just Resize")
    assert set(np.unique(up)) <= {0.0, 1.0}
    seg = np.zeros((30, 30, 3), dtype=np.float32)
    seg[:, 10:20] = (0.5, 0.2, 0.1)
    seg[:, 20:] = (0.1, 0.9, 0.3)
    out = pp.fit(seg, 47, 47, "Just Resize")
    colours = {tuple(np.round(c, 4)) for c in out.reshape(-1, 3)}
    assert len(colours) == 3  # nearest: no blended colours between classes


def test_fit_enlarged_edges_stay_one_pixel_lines():
    from scipy import ndimage

    im, _ = _disc((128, 96), (64, 48), 30)
    edges = pp.detect("canny", im, resolution=96)
    up = pp.fit(edges, 320, 240, "Just Resize")[..., 0]
    assert set(np.unique(up)) <= {0.0, 1.0}
    on = up > 0
    assert ndimage.label(on, np.ones((3, 3)))[1] == 1  # still one closed outline
    # thinned: about one pixel per pixel of circumference (2.5 x 30 px radius), few 2x2 blobs left
    assert on.sum() < 1.3 * 2 * np.pi * 75
    assert (on[:-1, :-1] & on[1:, :-1] & on[:-1, 1:] & on[1:, 1:]).sum() < 0.1 * on.sum()
    yy, xx = np.mgrid[:240, :320]
    radius = np.hypot((xx - 159.5) / 2.5, (yy - 119.5) / 2.5)
    assert 28 <= radius[on].min() and radius[on].max() <= 32  # where the enlarged circle's edge is


def test_fit_rejects_bad_input():
    with pytest.raises(InvalidRequest, match="resize_mode"):
        pp.fit(_two_halves(), 10, 10, "Stretch")
    with pytest.raises(InvalidRequest):
        pp.fit(_two_halves(), 0, 10, "Just Resize")
    with pytest.raises(InvalidRequest):
        pp.fit(np.zeros((4, 4, 5)), 10, 10, "Just Resize")


def test_pixel_perfect_resolution_as_the_extension():
    # k = max(768/512, 512/512) = 1.5 (crop and stretch), short side 512 -> 768
    assert pp.pixel_perfect_resolution(512, 512, 512, 768, "Crop and Resize") == 768
    assert pp.pixel_perfect_resolution(512, 512, 512, 768, "Just Resize") == 768
    # fill: k = min(...) = 1.0 -> 512
    assert pp.pixel_perfect_resolution(512, 512, 512, 768, "Resize and Fill") == 512
    # 1024x768 picture to 512x512: crop k = max(0.667, 0.5) -> 768 * 2/3 = 512; fill k = 0.5 -> 384
    assert pp.pixel_perfect_resolution(1024, 768, 512, 512, "Crop and Resize") == 512
    assert pp.pixel_perfect_resolution(1024, 768, 512, 512, "Resize and Fill") == 384
    # 1000x600 to 768x512: max(512/600, 768/1000) = 0.8533 * 600 = 512; min = 0.768 * 600 = 460.8 -> 461
    assert pp.pixel_perfect_resolution(1000, 600, 768, 512, "Crop and Resize") == 512
    assert pp.pixel_perfect_resolution(1000, 600, 768, 512, "Resize and Fill") == 461


# --- names and the module list --------------------------------------------------------------------------------

def test_module_names_and_aliases():
    assert pp.canonical_module("invert (from white bg & black line)") == "invert"
    assert pp.canonical_module("Canny") == "canny"
    assert pp.canonical_module("softedge_hed") == "hed"
    assert pp.canonical_module("lineart_realistic") == "lineart"
    assert pp.canonical_module("lineart_standard (from white bg & black line)") == "lineart_standard"
    assert pp.canonical_module("t2ia_color_grid") == "color"
    assert pp.canonical_module("inpaint_global_harmonious") == "inpaint"
    assert pp.canonical_module("fake_scribble") == "scribble_hed"
    with pytest.raises(InvalidRequest, match="available: none, .*canny"):
        pp.canonical_module("sharpen_everything")
    with pytest.raises(InvalidRequest, match="cannot run the mediapipe_face preprocessor yet.*module none"):
        pp.canonical_module("mediapipe_face")
    assert pp.canonical_module("densepose (pruple bg & purple torso)") == "densepose"
    for name in ("depth_hand_refiner", "mediapipe_face", "depth_leres++"):
        with pytest.raises(InvalidRequest, match="cannot run"):
            pp.detect(name, Image.new("RGB", (8, 8)))


def test_module_list_shape():
    listing = pp.module_list()
    assert listing["module_list"][0] == "none"
    assert {"canny", "invert", "threshold", "hed", "lineart", "inpaint_only", "shuffle"} <= set(listing["module_list"])
    assert "depth_leres++" not in listing["module_list"]
    canny_detail = listing["module_detail"]["canny"]
    assert canny_detail == {"model_free": False, "sliders": [
        {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8},
        {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
        {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}]}
    assert listing["module_detail"]["invert"]["sliders"] == []
    assert listing["module_detail"]["shuffle"]["sliders"] == []  # its resolution is fixed in the extension's UI
    aliases = pp.module_list(alias_names=True)
    assert "invert (from white bg & black line)" in aliases["module_list"]
    assert set(aliases["module_detail"]) == set(aliases["module_list"])
    for name in aliases["module_list"]:
        assert pp.canonical_module(name) in listing["module_list"]


# --- weights: only local files -------------------------------------------------------------------------------

def test_annotator_dirs_reads_installs_in_place(tmp_path):
    a1111, forge, comfy = tmp_path / "a1111", tmp_path / "forge", tmp_path / "comfy"
    (a1111 / "extensions/sd-webui-controlnet/annotator/downloads").mkdir(parents=True)
    (forge / "models/ControlNetPreprocessor").mkdir(parents=True)
    (comfy / "custom_nodes/comfyui_controlnet_aux/ckpts").mkdir(parents=True)
    (comfy / "models/clip_vision").mkdir(parents=True)  # IP-Adapters' CLIP vision towers (control.ipadapter)
    (comfy / "models/insightface").mkdir(parents=True)  # FaceID's face models (annotators.insightface)
    zipped = tmp_path / "zipped"  # the extension unpacked from a zip keeps the archive's folder name
    (zipped / "extensions/sd-webui-controlnet-main/annotator/downloads").mkdir(parents=True)
    home = Home(tmp_path / "home", [a1111, forge, comfy, zipped, tmp_path / "missing"])
    assert pp.annotator_dirs(home) == [
        tmp_path / "home/models/annotators",
        tmp_path / "home/models/clip_vision",
        tmp_path / "home/models/insightface",
        a1111 / "extensions/sd-webui-controlnet/annotator/downloads",
        forge / "models/ControlNetPreprocessor",
        comfy / "custom_nodes/comfyui_controlnet_aux/ckpts",
        comfy / "models/clip_vision",
        comfy / "models/insightface",
        zipped / "extensions/sd-webui-controlnet-main/annotator/downloads",
    ]


def test_missing_annotator_names_the_file_and_folders(tmp_path):
    dirs = [tmp_path / "home/models/annotators", tmp_path / "a1111/annotator/downloads"]
    with pytest.raises(InvalidRequest) as err:
        pp.detect("softedge_hed", Image.new("RGB", (64, 64)), annotator_dirs=dirs)
    text = str(err.value)
    assert "softedge_hed needs ControlNetHED.pth" in text
    assert str(dirs[0]) in text and str(dirs[1]) in text and "annotator/downloads/hed" in text
    ok, problem = pp.module_status("lineart_realistic", dirs)
    assert not ok and "sk_model.pth" in problem
    assert pp.module_status("canny", dirs) == (True, None)
    assert pp.module_status("depth_midas", dirs)[0] is False


# --- the nets, from tiny files in the real layouts ----------------------------------------------------------------

def _square(size=96) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle((24, 24, 71, 71), fill="white")
    return im


@pytest.mark.parametrize("layout", [
    "extensions/sd-webui-controlnet/annotator/downloads/hed",
    "models/ControlNetPreprocessor",
    "custom_nodes/comfyui_controlnet_aux/ckpts/lllyasviel/Annotators",
])
def test_hed_runs_from_each_install_layout(tmp_path, layout):
    from darkroom.testing.tiny_annotators import hed_state, save

    install = tmp_path / "install"
    # the released file is fp16
    save(hed_state(brightness=True), install / layout / "ControlNetHED.pth", dtype=torch.float16)
    dirs = pp.annotator_dirs(Home(tmp_path / "home", [install]))
    out = pp.detect("softedge_hed", _square(), resolution=96, annotator_dirs=dirs)
    assert out.shape == (96, 96, 3)
    assert out[30:66, 30:66].min() > 0.99 and out[:16].max() < 0.01  # the map lands where the picture is


def test_hed_variants_and_strict_loading(tmp_path):
    from darkroom.errors import ModelLoadError
    from darkroom.testing.tiny_annotators import hed_state, save

    folder = tmp_path / "annotators"
    save(hed_state(seed=3), folder / "ControlNetHED.pth")
    im = Image.fromarray(np.random.RandomState(1).randint(0, 256, (70, 90, 3)).astype(np.uint8))
    soft = pp.detect("softedge_hed", im, resolution=64, annotator_dirs=[folder], device="cpu")
    assert soft.shape == (64, 82, 3) and 0 <= soft.min() and soft.max() <= 1
    assert np.array_equal(soft, pp.detect("hed", im, resolution=64, annotator_dirs=[folder]))
    safe = pp.detect("softedge_hedsafe", im, resolution=64, annotator_dirs=[folder])
    assert set(np.round(np.unique(safe) * 255).astype(int).tolist()) <= {0, 127, 255}
    scribble = pp.detect("scribble_hed", _square(), resolution=96, annotator_dirs=[folder])
    assert set(np.unique(scribble).tolist()) <= {0.0, 1.0}
    # a file with a key missing, or of another network, is refused with its name
    state = hed_state()
    del state["block5.projection.bias"]
    torch.save(state, folder / "ControlNetHED.pth")
    with pytest.raises(ModelLoadError, match="ControlNetHED.pth: not a ControlNetHED weight file"):
        pp.detect("softedge_hed", im, annotator_dirs=[folder])
    (folder / "ControlNetHED.pth").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="ControlNetHED.pth"):
        pp.detect("softedge_hed", im, annotator_dirs=[folder])


def test_lineart_nets_load_strictly_and_invert(tmp_path):
    from darkroom.testing.tiny_annotators import anime_state, save, sketch_state

    folder = tmp_path / "downloads"
    im = Image.fromarray(np.random.RandomState(2).randint(0, 256, (80, 64, 3)).astype(np.uint8))
    save(sketch_state(seed=1), folder / "lineart" / "sk_model.pth")
    real = pp.detect("lineart_realistic", im, resolution=64, annotator_dirs=[folder])
    assert real.shape == (80, 64, 3) and 0 <= real.min() and real.max() <= 1 and real.std() > 0
    save(sketch_state(constant=1.0), folder / "lineart" / "sk_model2.pth")
    assert (pp.detect("lineart_coarse", im, resolution=64, annotator_dirs=[folder]) == 0).all()  # all "paper"
    save(anime_state(constant=0.0), folder / "lineart_anime" / "netG.pth", prefix="module.")
    anime = pp.detect("lineart_anime", im, resolution=64, annotator_dirs=[folder])
    assert anime.shape == (80, 64, 3) and (anime == 1).all()  # all line, inverted to white
    save(anime_state(seed=4), folder / "lineart_anime" / "netG.pth")
    assert pp.detect("lineart_anime", im, resolution=64, annotator_dirs=[folder]).std() > 0


def test_no_preprocessor_touches_the_network(tmp_path):
    """Every module, with and without its weight file: the process guard records no attempt."""
    from darkroom.testing import tiny_annotators as tiny
    from darkroom.testing import tiny_onnx
    from darkroom.testing.tiny_annotators import hed_state, save, sketch_state

    guard = offline.process_guard()
    before = len(guard.attempts)
    empty, full = tmp_path / "empty", tmp_path / "full"
    save(hed_state(), full / "ControlNetHED.pth")
    save(sketch_state(), full / "sk_model.pth")
    save(sketch_state(), full / "sk_model2.pth")
    save(tiny.body_pose_state(), full / "body_pose_model.pth")
    save(tiny.depth_anything_state(), full / "depth_anything_vitl14.pth")
    save(tiny.depth_anything_state(), full / "depth_anything_v2_vitl.safetensors")
    save(tiny.midas_hybrid_state(), full / "dpt_hybrid-midas-501f0c75.pt")
    save(tiny.mlsd_state(), full / "mlsd_large_512_fp32.pth")
    save(tiny.teed_state(), full / "7_model.pth")
    save(tiny.teed_state(), full / "MTEED.pth")
    save(tiny.manga_line_state(), full / "erika.pth")
    save(tiny.lama_state(), full / "ControlNetLama.pth")
    save(tiny.anime_face_state(), full / "UNet.pth")
    torch.save(tiny.leres_file_state(), full / "res101.pth")
    torch.save({"model": tiny.dsine_state()}, full / "dsine.pt")
    from transformers import ZoeDepthForDepthEstimation

    torch.save(tiny.zoe_file_state(ZoeDepthForDepthEstimation(tiny.zoe_config())), full / "ZoeD_M12_N.pt")
    tiny_onnx.yolox_file(full / "yolox_l.onnx")
    tiny_onnx.dwpose_file(full / "dw-ll_ucoco_384.onnx")
    tiny_onnx.dwpose_file(full / "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx", count=17,
                          size=(256, 256))
    save(tiny.pidinet_state(), full / "table5_pidinet.pth")
    save(tiny.part_pose_state(22), full / "hand_pose_model.pth")
    save(tiny.part_pose_state(71), full / "facenet.pth")
    tiny.normal_bae_file(tiny.normal_bae_state(), full / "scannet.pt")
    from darkroom.testing.tiny_oneformer import write_oneformer
    from darkroom.testing.tiny_uniformer import uniformer_file_state

    torch.save(uniformer_file_state(), full / "upernet_global_small.pth")
    write_oneformer(full / "250_16_swin_l_oneformer_ade20k_160k.pth")
    write_oneformer(full / "150_16_swin_l_oneformer_coco_100ep.pth")
    from darkroom.testing.tiny_ipadapter import write_tiny_clip_vision

    write_tiny_clip_vision(full / "clip_h.pth")
    write_tiny_clip_vision(full / "clip_g.pth")
    write_tiny_clip_vision(full / "clip_vitl.pth")
    from darkroom.testing.tiny_insightface import pack

    pack(full)  # FaceID's buffalo_l
    pack(full, name="antelopev2")  # InstantID's
    from darkroom.testing.tiny_densepose import build

    build(full / "densepose_r50_fpn_dl.torchscript")
    im = _square(64)
    mask = Image.new("L", (64, 64), 255)
    for name in pp.module_list()["module_list"]:
        for dirs in ([empty], [full]):
            try:
                pp.detect(name, im, resolution=64, mask=mask, annotator_dirs=dirs)
            except InvalidRequest as e:
                # the tiny InsightFace packs find no face: instant_id_face_keypoints says so
                assert dirs == [empty] or "netG.pth" in str(e) or "no face was found" in str(e), e
    assert guard.installed and len(guard.attempts) == before
