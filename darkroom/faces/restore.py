"""Restoring the faces of a picture with GFPGAN or CodeFormer, as the webui does.

Each face RetinaFace finds is aligned to the FFHQ template at the model's size, fed to the model as
RGB in [-1, 1], and the result pasted back with a feathered edge (align.py); CodeFormer gets its
fidelity `weight` (0: the most restored, 1: the closest to the input; the webui's
`code_former_weight`). The extras' visibility blends the restored picture with the original
(`Image.blend`, as the webui's postprocessing scripts). Faces are restored one after another and a
set `cancel` event stops between them (darkroom.errors.Interrupted).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from darkroom.errors import Interrupted, InvalidRequest
from darkroom.faces.align import paste_face, similarity, template, warp_face
from darkroom.faces.detect import Face, FaceDetector, RetinaFace
from darkroom.faces.load import (
    CODEFORMER,
    DETECTOR_FILE,
    MODELS,
    WEBUI_DIRS,
    WEBUI_FILES,
    FaceNet,
    face_dirs,
    find_detector,
    find_model,
    load_net,
)
from darkroom.home import Home
from darkroom.upscale.load import read_state_dict


class Detector(Protocol):
    def detect(self, image: Image.Image) -> list[Face]: ...


def _file_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


class FaceRestorer:
    """The face restorers of a Home, run on `device`.

    `model` and `codeformer_weight` are the settings `face_restoration_model` and `code_former_weight`
    (what `restore_faces: true` uses); `detector` replaces the RetinaFace file (tests)."""

    def __init__(self, home: Home, *, device: torch.device | str = "cpu", detector: Detector | None = None):
        self.home = home
        self.device = torch.device(device)
        self.model = CODEFORMER
        self.codeformer_weight = 0.5
        self.detector = detector
        self._nets: dict[tuple, FaceNet] = {}
        self._detectors: dict[tuple, FaceDetector] = {}
        self._lock = threading.Lock()

    def configure(self, settings: dict) -> None:
        """Take the model and the CodeFormer weight from the settings' values (a Settings listener)."""
        self.model = settings.get("face_restoration_model") or self.model
        weight = settings.get("code_former_weight")
        self.codeformer_weight = self.codeformer_weight if weight is None else float(weight)

    # --- names and files -----------------------------------------------------------------------
    @staticmethod
    def canonical(name: str | None) -> str:
        """"CodeFormer" or "GFPGAN" for what a user typed (any case); InvalidRequest naming both otherwise."""
        wanted = (name or "").strip().lower()
        for known in MODELS:
            if wanted == known.lower():
                return known
        raise InvalidRequest(f"unknown face restoration model {name!r}; choose {' or '.join(MODELS)}")

    def missing(self, name: str) -> list[str]:
        """The files `name` needs that are not found: the model's and the face detector's."""
        out = [] if find_model(self.home, name) else [WEBUI_FILES[name]]
        if self.detector is None and find_detector(self.home) is None:
            out.append(DETECTOR_FILE)
        return out

    def check(self, name: str | None = None) -> str:
        """The canonical model name, once its files are known to be there; else InvalidRequest (422) naming
        the missing files and the folders to put them in."""
        name = self.canonical(name or self.model)
        lacking = self.missing(name)
        if lacking:
            install = " and ".join(dict.fromkeys(
                [WEBUI_DIRS[name]] + (["models/GFPGAN"] if DETECTOR_FILE in lacking else [])))
            raise InvalidRequest(
                f"face restoration with {name} needs {' and '.join(lacking)}, not found; put "
                f"{'them' if len(lacking) > 1 else 'it'} in {self.home.faces} (or an A1111/Forge install's"
                f" {install}, given with --models-dir); searched: {', '.join(str(d) for d in face_dirs(self.home))}")
        return name

    def available(self) -> list[dict]:
        """The webui's /face-restorers items ({name, cmd_dir}) for the models whose files are all present."""
        out = []
        for name in MODELS:
            path = find_model(self.home, name)
            if path is not None and not self.missing(name):
                out.append({"name": name, "cmd_dir": str(path.parent)})
        return out

    # --- loading ----------------------------------------------------------------------------------
    def net(self, name: str) -> FaceNet:
        path = find_model(self.home, name)
        if path is None:
            self.check(name)
        key = (name, *_file_key(path), str(self.device))
        with self._lock:
            if key not in self._nets:
                self._nets.clear()  # one restoration model in memory at a time
                self._nets[key] = load_net(name, path, self.device)
            return self._nets[key]

    def face_detector(self) -> Detector:
        if self.detector is not None:
            return self.detector
        path = find_detector(self.home)
        if path is None:
            self.check()
        key = _file_key(path)
        with self._lock:
            if key not in self._detectors:
                net = RetinaFace.from_state_dict(read_state_dict(path), path.name)
                self._detectors = {key: FaceDetector(net, self.device)}
            return self._detectors[key]

    # --- running ----------------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self, image: Image.Image, name: str | None = None, *, weight: float | None = None,
                visibility: float = 1.0, cancel: threading.Event | None = None) -> Image.Image:
        """`image` with every face restored by `name` (default: self.model), blended in at `visibility`.

        Visibility 0 returns the image untouched without loading anything; an image without faces
        comes back unchanged."""
        if not 0.0 <= visibility <= 1.0:
            raise InvalidRequest(f"face restoration visibility {visibility} must be between 0 and 1")
        if visibility == 0:
            return image
        name = self.check(name)
        weight = self.codeformer_weight if weight is None else float(weight)
        if not 0.0 <= weight <= 1.0:
            raise InvalidRequest(f"CodeFormer weight {weight} must be between 0 and 1")
        detector, net = self.face_detector(), self.net(name)
        rgb = image.convert("RGB")
        faces = detector.detect(rgb)
        if not faces:
            return image
        w, h = rgb.size
        source = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
        source = source.permute(2, 0, 1).float()
        out = source.clone()
        points = template(net.size)
        for face in faces:
            if cancel is not None and cancel.is_set():
                raise Interrupted("face restoration interrupted")
            m = similarity(face.landmarks.double(), points)
            crop = warp_face(source, m, net.size)  # always from the original, as the webui's helper crops
            x = (crop / 127.5 - 1.0)[None].to(self.device)
            restored = ((net.run(x, weight)[0].float().cpu() + 1.0) * 127.5).round()
            out = paste_face(out, restored, m)
        pixels = out.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        result = Image.fromarray(pixels, "RGB")
        if visibility < 1.0:
            result = Image.blend(rgb, result, visibility)
        if image.mode == "RGBA":
            result.putalpha(image.getchannel("A"))
        elif image.mode != "RGB":
            result = result.convert(image.mode)
        return result
