"""densepose / densepose_parula: torchvision's operators written in torch, OpenCV's colour maps, the extension's
post-processing, and the file errors.

Every expected number here comes from the real thing, recorded in tests/data/densepose_reference.npz (154 KB):
1. In Darkroom's venv (torch 2.13.0+cpu, no torchvision): `darkroom.testing.tiny_densepose.build` wrote the tiny
   TorchScript model; a synthetic 100x120 picture and synthetic model outputs (6 boxes, 5x5 maps, exact ties in
   the fine scores) were saved beside it.
2. In a throwaway venv outside the repository (python3.11 -m venv; pip install torch==2.5.1 torchvision==0.20.1
   opencv-python-headless numpy: torch 2.5.1+cu124 and torchvision 0.20.1+cu124 run on the CPU, OpenCV 5.1.0,
   numpy 2.4.6): torchvision.ops.nms and roi_align on the inputs stored here; cv2.applyColorMap(0..255) with
   COLORMAP_VIRIDIS and COLORMAP_PARULA (OpenCV 4.14.0 gives the same tables); and sd-webui-controlnet's own code
   at 56cec5b2 (annotator/densepose, scripts/preprocessor/legacy/processor.py, with stubs for webui's modules)
   run on the tiny model: processor.densepose(picture, res, cmap) at res 64 and 128 (`map_*`, real torchvision
   ops inside the model), and apply_densepose's extractor + visualizer steps on the synthetic outputs (`syn_*`,
   `empty_*`). The versions and the extension commit are in the file's `versions`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from darkroom.control.annotators import densepose, imageops, tv_ops
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.testing.tiny_densepose import build

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning")

REF = Path(__file__).parent / "data" / "densepose_reference.npz"
TOL = 1e-5


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(REF) as data:
        return dict(data)


@pytest.fixture(scope="module")
def densepose_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("annotators")
    build(root / densepose.KIND / densepose.FILE)
    return root


NMS_CASES = range(6)
ROI_CASES = range(7)


@pytest.mark.parametrize("case", NMS_CASES)
def test_nms_equals_torchvision(ref, case):
    boxes, scores = torch.from_numpy(ref[f"nms{case}_boxes"]), torch.from_numpy(ref[f"nms{case}_scores"])
    thr = float(ref[f"nms{case}_thr"])
    expected = ref[f"nms{case}_keep"]
    assert tv_ops.nms(boxes, scores, thr).tolist() == expected.tolist()
    tv_ops.ensure_registered()
    assert torch.ops.torchvision.nms(boxes, scores, thr).tolist() == expected.tolist()  # through the dispatcher


def test_nms_cases_cover_ties_and_the_double_threshold(ref):
    assert f"nms{max(NMS_CASES) + 1}_keep" not in ref  # every recorded case is tested
    assert ref["nms1_scores"].size != np.unique(ref["nms1_scores"]).size  # tied scores: the stable order matters
    # IoU exactly float32(0.3) (above 0.3): torchvision compares in double, so the second box goes
    assert ref["nms4_keep"].tolist() == [0, 2] and float(ref["nms4_thr"]) == 0.3
    assert ref["nms3_boxes"].dtype == np.float64 and ref["nms5_boxes"].shape == (0, 4)


@pytest.mark.parametrize("case", ROI_CASES)
def test_roi_align_equals_torchvision(ref, case):
    aligned, ratio, scale, ph, pw = ref["roi_cases"][case]
    args = (torch.from_numpy(ref["roi_input"]), torch.from_numpy(ref["roi_rois"]), float(scale), int(ph), int(pw),
            int(ratio), bool(aligned))
    expected = ref[f"roi{case}"]
    ours = tv_ops.roi_align(*args)
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=TOL)
    tv_ops.ensure_registered()
    np.testing.assert_allclose(torch.ops.torchvision.roi_align(*args).numpy(), expected, rtol=0, atol=TOL)


def test_roi_align_cases_cover_the_kernel_paths(ref):
    cases = ref["roi_cases"]
    assert len(cases) == len(ROI_CASES) and f"roi{len(cases)}" not in ref
    assert {bool(a) for a in cases[:, 0]} == {True, False} and {0, 2, -1, 1} <= {int(r) for r in cases[:, 1]}
    rois = ref["roi_rois"]
    assert set(rois[:, 0].astype(int)) == {0, 1, 2} and (rois[:, 1:] < 0).any()  # several images, outside the map
    assert (ref["roi0"][6] == 0).all() and (ref["roi0"][5] == 0).all()  # wholly outside; inverted (no samples)
    assert (ref["roi1"][5] != 0).any()  # inverted but not aligned: at least a pixel, so samples


def test_roi_align_float64(ref):
    ours = tv_ops.roi_align(torch.from_numpy(ref["roi64_input"]), torch.from_numpy(ref["roi64_rois"]), 0.25, 4, 4,
                            0, True)
    assert ours.dtype == torch.float64
    np.testing.assert_allclose(ours.numpy(), ref["roi64"], rtol=0, atol=1e-12)


def test_colour_maps_are_opencvs(ref):
    np.testing.assert_array_equal(densepose.COLORMAPS["viridis"], ref["cv2_viridis_bgr"][:, ::-1])
    np.testing.assert_array_equal(densepose.COLORMAPS["parula"], ref["cv2_parula_bgr"][:, ::-1])
    assert tuple(densepose.COLORMAPS["viridis"][0]) == densepose.VIRIDIS_BACKGROUND


@pytest.mark.parametrize("cmap", ["viridis", "parula"])
def test_detect_equals_the_extension(ref, densepose_dir, cmap):
    """Shrinking (res 64 of a 100x120 picture): Darkroom's resize is OpenCV's INTER_AREA, so the whole path,
    picture to map, must give the extension's map pixel for pixel."""
    out = densepose.detect(ref["picture"], 64, [densepose_dir], cmap=cmap, device="cpu")
    expected = ref[f"map_64_{cmap}"]
    assert out.dtype == np.uint8 and out.shape == expected.shape == (64, 77, 3)
    np.testing.assert_array_equal(out, expected)
    parts = (out != densepose.VIRIDIS_BACKGROUND).any(-1) if cmap == "viridis" else out.any(-1)
    assert 0.05 < parts.mean() < 0.95 and len(np.unique(out.reshape(-1, 3), axis=0)) >= 4  # not a blank map


@pytest.mark.parametrize("cmap", ["viridis", "parula"])
def test_map_of_the_extensions_enlarged_input(ref, densepose_dir, cmap):
    """Enlarging goes through OpenCV's INTER_CUBIC in the extension (PIL's bicubic here, a few levels apart), so
    the model gets the extension's own padded input and the map must then be the extension's."""
    model = densepose.load(densepose_dir / densepose.KIND / densepose.FILE)
    out = densepose.densepose_map(model, ref["padded_128"], cmap)[:128, :154]
    np.testing.assert_array_equal(out, ref[f"map_128_{cmap}"])


def test_model_boxes_equal_with_torchvisions_ops(ref, densepose_dir):
    """The tiny model picks and pools its boxes with nms and roi_align: ours give torchvision's boxes."""
    model = densepose.load(densepose_dir / densepose.KIND / densepose.FILE)
    padded, _ = imageops.pad64(imageops.to_resolution(ref["picture"], 64))
    with torch.no_grad():
        for image, key in ((padded, "boxes_64"), (ref["padded_128"], "boxes_128")):
            boxes = model(torch.from_numpy(image).permute(2, 0, 1))[0].numpy()
            np.testing.assert_allclose(boxes, ref[key], rtol=0, atol=TOL)


@pytest.mark.parametrize("cmap", ["viridis", "parula"])
def test_post_processing_equals_the_extension(ref, cmap):
    """Overlapping boxes (later body over earlier), fractional corners (truncated), a box under a pixel wide
    (skipped), one on the canvas edge, tied fine scores (first index wins)."""
    boxes, coarse, fine = (torch.from_numpy(ref[k]) for k in ("syn_boxes", "syn_coarse", "syn_fine"))
    parts = densepose.part_labels(boxes, coarse, fine)
    assert parts[2] is None and parts[0][:4] == (3, 5, 37, 55)
    np.testing.assert_array_equal(densepose.paint((64, 96), parts, cmap), ref[f"syn_{cmap}"])
    np.testing.assert_array_equal(densepose.paint((8, 8), [], cmap), ref[f"empty_{cmap}"])


def test_a_box_past_the_picture_is_clipped():
    labels = np.full((4, 6), 24, np.uint8)
    out = densepose.paint((5, 5), [(-2, 3, 6, 4, labels)], "parula")
    assert out[3:, :4].all() and not out[:3].any() and not out[:, 4].any()


def test_missing_file_names_it(tmp_path):
    with pytest.raises(InvalidRequest, match=r"densepose_parula.*needs densepose_r50_fpn_dl\.torchscript.*downloads/"
                                             r"densepose") as info:
        densepose.detect(np.zeros((32, 32, 3), np.uint8), 64, [tmp_path], cmap="parula")
    assert str(tmp_path) in str(info.value)


@pytest.mark.parametrize("content", [b"\x89PNG not a model" * 40, None], ids=["not-a-zip", "a-state-dict"])
def test_file_that_is_not_torchscript(tmp_path, content):
    path = tmp_path / densepose.KIND / densepose.FILE
    path.parent.mkdir()
    if content is None:
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"densepose_r50_fpn_dl\.torchscript: not a TorchScript model file"):
        densepose.detect(np.zeros((32, 32, 3), np.uint8), 64, [tmp_path])


def test_file_calling_an_operator_darkroom_lacks(tmp_path, densepose_dir):
    """The real file's operators could not be listed (no copy here): one beyond nms and roi_align is named."""
    path = tmp_path / densepose.FILE
    with zipfile.ZipFile(densepose_dir / densepose.KIND / densepose.FILE) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("tiny_densepose.py"):
                assert b"ops.torchvision.roi_align(" in data
                data = data.replace(b"ops.torchvision.roi_align(", b"ops.torchvision.ps_roi_pool(")
            zout.writestr(info.filename, data)
    with pytest.raises(ModelLoadError, match=r"densepose_r50_fpn_dl\.torchscript calls the operator"
                                             r" torchvision::ps_roi_pool"):
        densepose.load(path)


@pytest.mark.parametrize(("net", "message"), [(torch.nn.Identity(), "did not return DensePose's"),
                                              (torch.nn.Conv2d(3, 1, 1), "failed on a CHW uint8 picture")])
def test_model_of_another_kind(tmp_path, net, message):
    torch.jit.save(torch.jit.script(net), str(tmp_path / densepose.FILE))
    with pytest.raises(ModelLoadError, match=message):
        densepose.detect(np.zeros((32, 32, 3), np.uint8), 64, [tmp_path])


_FRESH = """
import sys, threading, torch
torch.set_num_threads(1)
path = sys.argv[1]
try:
    torch.jit.load(path)
    print("LOADED-WITHOUT")
except RuntimeError as e:
    print("WITHOUT:", str(e).strip().splitlines()[0])
assert not any(m.startswith("darkroom") for m in sys.modules)
from darkroom.control.annotators import tv_ops
assert not hasattr(torch.ops.torchvision, "nms")  # importing registers nothing
errors = []
def register():
    try:
        tv_ops.ensure_registered()
    except Exception as e:
        errors.append(e)
threads = [threading.Thread(target=register) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
tv_ops.ensure_registered()
model = torch.jit.load(path)
boxes = model(torch.full((3, 64, 64), 128, dtype=torch.uint8))[0]
print("WITH:", tuple(boxes.shape), "errors", len(errors))
"""


def test_registration_is_what_makes_the_file_load(densepose_dir):
    """A fresh process with torch alone cannot load the file; after ensure_registered (from four threads at once,
    then again) it loads and runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _FRESH, str(densepose_dir / densepose.KIND / densepose.FILE)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert "WITHOUT: Unknown builtin op: torchvision::nms" in done.stdout
    assert re.search(r"WITH: \([1-9]\d*, 4\) errors 0", done.stdout), done.stdout


def test_the_preprocessor_table_runs_it(ref, densepose_dir, tmp_path):
    """densepose and densepose_parula are listed under the extension's labels and run from the annotator folder;
    without the file they are listed as unavailable, naming it."""
    from PIL import Image

    from darkroom.control import preprocess as pp

    assert pp.canonical_module("densepose_parula (black bg & blue torso)") == "densepose_parula"
    assert {"densepose", "densepose_parula"} <= set(pp.module_list()["module_list"])
    picture = Image.fromarray(ref["picture"])
    out = pp.detect("densepose", picture, resolution=64, annotator_dirs=[densepose_dir])
    np.testing.assert_array_equal(np.round(out * 255), densepose.detect(ref["picture"], 64, [densepose_dir]))
    ok, problem = pp.module_status("densepose_parula", [tmp_path])
    assert ok is False and densepose.FILE in problem
