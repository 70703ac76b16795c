"""DensePose (densepose, densepose_parula) from densepose_r50_fpn_dl.torchscript: body parts painted per person.

The file is detectron2's DensePose R50-FPN (DeepLab head) exported to TorchScript: given a CHW uint8 picture it
returns each person's box (x1, y1, x2, y2 in pixels) and, on a square grid over the box, coarse body/background
scores [N, 2, S, S], fine scores for 24 parts and background [N, 25, S, S] and the U, V chart coordinates. It
calls torchvision's nms and roi_align, which Darkroom provides itself (tv_ops) as torchvision cannot be
installed beside its torch.

As the extension: the picture (short side at the resolution, padded to a multiple of 64) goes in as RGB; each
box is truncated to whole pixels (x, y, w, h), both score maps are scaled to w x h (bilinear, corners not
aligned) and each pixel takes the fine argmax where the coarse argmax is body, else 0 (U and V do not reach the
map). Part i (1-24) is painted with colour map entry int(i * 255 / 24), OpenCV's VIRIDIS or PARULA, over a
black canvas, later boxes over earlier ones where they are body; for viridis every channel still 0 is then set
to viridis' first colour (68, 1, 84), so the background reads purple. The map is cropped like the picture.
Unlike the extension, a box that reaches past the picture is clipped to it (the extension cannot paste it).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from darkroom.control.annotators import files, imageops, tv_ops
from darkroom.errors import InvalidRequest, ModelLoadError
from darkroom.fsutil import NotARegularFile, open_regular

FILE, KIND = "densepose_r50_fpn_dl.torchscript", "densepose"
LABELS = {"viridis": "densepose (pruple bg & purple torso)", "parula": "densepose_parula (black bg & blue torso)"}
PART_LABELS = 24
VAL_SCALE = np.float32(255.0 / PART_LABELS)  # the extension's val_scale, applied in float32 as numpy does

# OpenCV's COLORMAP_VIRIDIS and COLORMAP_PARULA as RGB (cv2.applyColorMap on 0..255, BGR turned round): the data
# only, 256 colours each as hex bytes; tests/test_controlnet_densepose.py checks them against OpenCV's output.
_VIRIDIS_HEX = (
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769"
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a"
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85"
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b"
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d"
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e"
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e"
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d"
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88"
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81"
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74"
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863"
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d"
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32"
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a"
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725"
)
_PARULA_HEX = (
    "352a87332c8a322e8d302f8f2f31922d33952c35982a379b28389e273aa0253ca3243ea6223fa92141ac1f43af1d45b1"
    "1c47b41a48b7194aba174cbd164ebf1450c21251c51153c80f55cb0e57ce0c58d00b5ad3095cd6085ed90660dc0461df"
    "0363e10464e10465e00566e00567df0668df066adf076bde076cde086ddd086edd096fdc0970dc0a71dc0b72db0b73db"
    "0c74da0c75da0d76da0d77d90e78d90e7ad80f7bd80f7cd8107dd7107ed7117fd61180d61281d61382d51383d51484d4"
    "1485d41386d31387d31388d3128ad2128bd2118cd1118dd1108ed0108fd00f90d00f91cf0f92cf0e93ce0e94ce0d95cd"
    "0d96cd0c97cc0c98cc0c9acc0b9bcb0b9ccb0a9dca0a9eca099fc909a0c908a1c808a2c808a3c807a4c707a5c706a6c6"
    "07a7c608a8c40aa8c30ba9c20da9c10eaabf10abbe12abbd13acbb15acba16adb918adb819aeb61bafb51dafb41eb0b3"
    "20b0b121b1b023b1af24b2ae26b3ac28b3ab29b4aa2bb4a92cb5a72eb5a62fb6a531b6a433b7a234b8a136b8a037b99f"
    "39b99d3cb99c3fb99b42ba9945ba9848ba974aba954dba9450bb9353bb9156bb9058bb8e5bbb8d5ebc8c61bc8a64bc89"
    "67bc8869bc866cbc856fbd8472bd8275bd8178bd807abd7e7dbe7d80be7c83be7a86be7988be788bbf768ebf7591bf74"
    "93bf7296bf7298bf719abe709cbe6f9fbe6ea1be6da3be6ca5be6ba7bd6aaabd69acbd68aebd68b0bd67b3bd66b5bd65"
    "b7bc64b9bc63bbbc62bebc61c0bc60c2bc5fc4bb5ec7bb5ec9bb5dcbbb5ccdbb5bd0bb5ad2bb59d4ba58d6ba57d8ba56"
    "daba55dbbb54dcbc53ddbc51debd50dfbe4fe0be4ee2bf4ce3bf4be4c04ae5c149e6c147e7c246e8c345e9c343eac442"
    "ebc541ecc540eec63eefc63df0c73cf1c83bf2c839f3c938f4ca37f5ca36f6cb34f7cb33f9cc32facd31fbcd2ffcce2e"
    "fccf2dfcd12cfcd22bfcd32afcd529fbd628fbd827fbd926fbdb25fbdc24fbdd23fbdf22fbe021fbe220fbe31ffbe41e"
    "fae61dfae71cfae91bfaea1afaeb19faed18faee17faf016faf115faf314f9f413f9f512f9f711f9f810f9fa0ff9fb0e"
)
COLORMAPS = {name: np.frombuffer(bytes.fromhex(text), np.uint8).reshape(256, 3)
             for name, text in (("viridis", "".join(_VIRIDIS_HEX)), ("parula", "".join(_PARULA_HEX)))}
VIRIDIS_BACKGROUND = (68, 1, 84)
Part = tuple[int, int, int, int, np.ndarray]  # x, y, w, h of a box and its [h, w] part labels
_UNKNOWN_OP = re.compile(r"Unknown builtin op: ([A-Za-z0-9_.]+::[A-Za-z0-9_]+)")


def load(path: Path) -> torch.jit.ScriptModule:
    """The TorchScript model on the CPU, torchvision's operators registered first. A file that is not a
    TorchScript archive, or that calls an operator Darkroom lacks, is a clear ModelLoadError."""
    tv_ops.ensure_registered()
    try:
        with open_regular(path, what="a TorchScript model file") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; the file is TorchScript
            model = torch.jit.load(fh, map_location="cpu")
    except NotARegularFile as e:
        raise ModelLoadError(str(e)) from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:
        text = str(e)
        op = _UNKNOWN_OP.search(text)
        if op:
            raise ModelLoadError(f"{path.name} calls the operator {op.group(1)}, which Darkroom does not provide"
                                 f" (it provides {', '.join('torchvision::' + n for n in tv_ops.SCHEMAS)}); use"
                                 f" the extension's {FILE}",
                                 hint=str(path)) from None
        first = (text.strip().splitlines() or [type(e).__name__])[0].split(". This is an internal")[0]
        raise ModelLoadError(f"{path.name}: not a TorchScript model file, as {FILE} is"
                             f" ({type(e).__name__}: {first[:200]})", hint=str(path)) from None
    return model.eval()


def _outputs(result) -> tuple[torch.Tensor, ...]:
    """The model's (boxes, coarse, fine, u, v), or a ModelLoadError saying it is another kind of model."""
    ok = isinstance(result, (tuple, list)) and len(result) == 5 and all(isinstance(t, torch.Tensor) for t in result)
    if ok:
        boxes, coarse, fine = result[0], result[1], result[2]
        n = boxes.shape[0] if boxes.dim() == 2 else -1
        ok = (boxes.dim() == 2 and boxes.shape[1] == 4 and coarse.dim() == 4 and fine.dim() == 4
              and coarse.shape[0] == fine.shape[0] == n)
    if not ok:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in (result if isinstance(result, (tuple, list)) else [result])]
        raise ModelLoadError(f"{FILE}: the model did not return DensePose's (boxes [N, 4], coarse [N, 2, S, S],"
                             f" fine [N, 25, S, S], u, v), but {shapes}")
    return tuple(result)


def part_labels(boxes: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor) -> list[Part | None]:
    """Per box: (x, y, w, h, labels) with labels [h, w] uint8 (0 background, 1-24 parts), the extension's
    rule; None for a box less than a pixel wide or high (the extension paints nothing there)."""
    xyxy = boxes.detach()
    parts: list[Part | None] = []
    for i in range(xyxy.shape[0]):
        x0, y0, x1, y1 = xyxy[i]
        x, y, w, h = (int(v) for v in torch.stack([x0, y0, x1 - x0, y1 - y0]).long().tolist())  # truncated
        if w <= 0 or h <= 0:
            parts.append(None)
            continue
        body = F.interpolate(coarse[i:i + 1], (h, w), mode="bilinear", align_corners=False).argmax(1) > 0
        fine_i = F.interpolate(fine[i:i + 1], (h, w), mode="bilinear", align_corners=False).argmax(1)
        parts.append((x, y, w, h, (fine_i * body.long())[0].to(torch.uint8).cpu().numpy()))
    return parts


def paint(shape: tuple[int, int], parts: Sequence[Part | None], cmap: str) -> np.ndarray:
    """The uint8 RGB map (height, width) of `part_labels`' result with colour map `cmap`."""
    table = COLORMAPS[cmap]
    canvas = np.zeros((*shape, 3), np.uint8)
    height, width = shape
    for part in parts:
        if part is None:
            continue
        x, y, w, h, labels = part
        top, left, bottom, right = max(y, 0), max(x, 0), min(y + h, height), min(x + w, width)
        if bottom <= top or right <= left:
            continue
        labels = labels[top - y:bottom - y, left - x:right - x]
        colours = table[(labels.astype(np.float32) * VAL_SCALE).clip(0, 255).astype(np.uint8)]
        region = canvas[top:bottom, left:right]
        body = labels > 0
        region[body] = colours[body]
    if cmap == "viridis":  # channel by channel, as the extension does
        for c, value in enumerate(VIRIDIS_BACKGROUND):
            plane = canvas[:, :, c]
            plane[plane == 0] = value
    return canvas


def densepose_map(model, img: np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """The map of a uint8 RGB picture at its own size (the model's input as it is)."""
    device = next(iter(model.parameters()), torch.empty(0)).device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1)
        try:
            result = model(x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # another kind of TorchScript model, one that wants another input
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(f"{FILE}: the model failed on a CHW uint8 picture, which DensePose's takes"
                                 f" ({first[:200]})") from None
        boxes, coarse, fine, _u, _v = _outputs(result)
        parts = part_labels(boxes, coarse, fine)
    return paint(img.shape[:2], parts, cmap)


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], cmap: str = "viridis",
           device: str | None = None) -> np.ndarray:
    """The densepose (cmap viridis) or densepose_parula (cmap parula) map at the unit's resolution."""
    if cmap not in COLORMAPS:
        raise InvalidRequest(f"DensePose colour map {cmap!r} must be one of {', '.join(COLORMAPS)}")
    path = files.find(FILE, KIND, dirs)
    if path is None:
        raise InvalidRequest(f"{LABELS[cmap]} needs {FILE}; put it in"
                             f" {Path(dirs[0]) if dirs else '<home>/models/annotators'} or keep it in the"
                             f" extension's annotator/downloads/{KIND}",
                             hint="searched: " + ", ".join(str(d) for d in dirs) if dirs else
                             "no annotator folders were given")
    model = load(path).to(device or "cpu")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img[:, :, :3], res))
    return densepose_map(model, padded, cmap)[:h, :w]
