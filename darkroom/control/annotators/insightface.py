"""InsightFace face detection and recognition for IP-Adapter FaceID, on the user's own ONNX files.

The extension embeds a FaceID unit's picture with insightface's FaceAnalysis (pack buffalo_l, det_size 640 x 640)
and takes the largest face's `normed_embedding`. This reproduces the two models of that pipeline which the
embedding depends on, with onnxruntime and numpy (no insightface, OpenCV or scikit-image), after insightface 0.7.3's
model_zoo/scrfd.py, utils/face_align.py, model_zoo/arcface_onnx.py and app/face_analysis.py:

1. SCRFD (det_10g.onnx) finds faces: the picture, scaled to fit 640 x 640 (OpenCV's bilinear resize) in the
   top-left corner of a black canvas, goes in as (RGB - 127.5) / 128. Per stride 8, 16 and 32 the graph gives two
   anchors per location with a score, the box edges' distances from the anchor centre and five keypoints' offsets
   (both in strides). Faces scoring 0.5 or more go through insightface's own greedy NMS (IoU 0.4, areas counted
   with +1 pixel) and are scaled back to the picture.
2. ArcFace (w600k_r50.onnx) embeds each face: the picture warped so the five keypoints fit the ArcFace 112 x 112
   template (a least-squares similarity, scikit-image's Umeyama estimate; a bilinear warp, black outside), as
   (RGB - 127.5) / 127.5. The raw 512-float output is the embedding; FaceID takes it divided by its L2 norm.

OpenCV 4's resize and warpAffine and scikit-image's estimate are reproduced in their own arithmetic (fixed
point, float32 where they use it), so on the same files the boxes, keypoints and embedding are insightface's to the
bit (checked against insightface 0.7.3 with OpenCV 4.14 and scikit-image 0.26; OpenCV 5's warp differs slightly).

Left out: the pack's other models (genderage.onnx, 2d106det.onnx, 1k3d68.onnx): FaceID uses the embedding
only; SCRFD exports without keypoints (6 or 10 outputs): alignment needs them. Nothing is ever downloaded: a
missing pack is an error saying where to put its files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from darkroom.control.annotators import imageops
from darkroom.control.annotators.dwpose import Graph, session
from darkroom.errors import InvalidRequest, ModelLoadError

PACKS = ("buffalo_l", "antelopev2")
PACK_FILES = {"buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),  # (detection, recognition)
              "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx")}
USERS = {"buffalo_l": "FaceID", "antelopev2": "InstantID"}  # what each pack is for, in messages
DET_SIZE = 640
DET_MEAN, DET_STD = 127.5, 128.0
# ArcFaceONNX takes 127.5 / 127.5 for these (PyTorch-exported) graphs; only MXNet exports, whose first nodes are
# named Sub/_minus and Mul/_mul, normalise inside the graph (0 / 1): no pack the extension uses is one.
REC_MEAN, REC_STD = 127.5, 127.5
DET_THRESH, NMS_THRESH = 0.5, 0.4
# SCRFD's output layouts with keypoints, by output count: (strides, anchors per location); the extension's
# files have 9 outputs (scores, boxes, keypoints per stride)
LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}
# where the five keypoints (eyes, nose, mouth corners) go on the 112 x 112 ArcFace input
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
_CACHE_SIZE = 4  # loaded sessions kept: the two packs' two files


@dataclass(frozen=True, eq=False)
class Face:
    """A detected face in picture pixels; `embedding` (512 float32, raw) once recognised."""

    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    kps: np.ndarray  # 5 x 2: eyes, nose, mouth corners
    det_score: float
    embedding: np.ndarray | None = None

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return (x2 - x1) * (y2 - y1)

    @property
    def normed_embedding(self) -> np.ndarray:
        """The embedding over its L2 norm: what FaceID adapters take."""
        if self.embedding is None:
            raise ValueError("the face has not been recognised (no embedding)")
        return self.embedding / np.linalg.norm(self.embedding)


# --- the files ----------------------------------------------------------------------------------------------

def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def pack_dir(pack: str, dirs: Sequence[Path]) -> Path:
    """The folder holding the pack's detection and recognition files: in each of `dirs`, the extension's
    `insightface/models/<pack>`, a models/insightface folder's `models/<pack>`, or `<pack>`; first match wins."""
    if pack not in PACK_FILES:
        raise InvalidRequest(f"unknown InsightFace pack {pack!r}; known: {', '.join(PACKS)}")
    det, rec = PACK_FILES[pack]
    for d in dirs:
        for folder in (Path(d) / "insightface" / "models" / pack, Path(d) / "models" / pack, Path(d) / pack):
            if _is_file(folder / det) and _is_file(folder / rec):
                return folder
    raise InvalidRequest(f"{USERS[pack]} needs InsightFace's {pack} models: {det} and {rec} in <home>/models/"
                         f"insightface/models/{pack}, the extension's annotator/downloads/insightface/models/{pack},"
                         f" or ComfyUI's models/insightface/models/{pack}",
                         hint="searched: " + ", ".join(str(d) for d in dirs))


_SESSIONS: dict[str, tuple[tuple[int, int], Graph]] = {}


def _graph(path: Path, what: str) -> Graph:
    """The file's onnxruntime session, kept while the file is unchanged (same mtime and size): loading ArcFace
    takes seconds, and FaceID embeds a picture per generation."""
    try:
        st = path.stat()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _SESSIONS.get(str(path))
    if cached is not None and cached[0] == stamp:
        return cached[1]
    graph = session(path, what)
    _SESSIONS.pop(str(path), None)
    while len(_SESSIONS) >= _CACHE_SIZE:
        del _SESSIONS[next(iter(_SESSIONS))]
    _SESSIONS[str(path)] = (stamp, graph)
    return graph


# --- 1. detection: SCRFD ------------------------------------------------------------------------------------

def _letterbox(rgb: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, float]:
    """SCRFD's input: the picture scaled to fit size x size (keeping its aspect) in the top-left corner of a black
    canvas, normalised, as 1x3xSxS float32; and the scale."""
    h, w = rgb.shape[:2]
    if h / w > 1.0:
        nh, nw = size, max(1, int(size / (h / w)))
    else:
        nw, nh = size, max(1, int(size * (h / w)))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:nh, :nw] = imageops.resize(rgb, nw, nh, imageops.LINEAR)  # OpenCV's INTER_LINEAR, bit for bit
    blob = (canvas.astype(np.float32) - DET_MEAN) * np.float32(1.0 / DET_STD)
    return np.ascontiguousarray(blob.transpose(2, 0, 1)[None]), nh / h


def nms(dets: np.ndarray, thresh: float = NMS_THRESH) -> list[int]:
    """scrfd.py's greedy NMS over rows (x1, y1, x2, y2, score): areas and overlaps count +1 pixel per side."""
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= thresh]
    return keep


def _decode(outs: list[np.ndarray], size: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """SCRFD's outputs to (N x 5 boxes with scores, N x 5 x 2 keypoints) in input pixels, over the threshold."""
    layout = LAYOUTS.get(len(outs))
    if layout is None:
        raise ModelLoadError(f"{name}: not an SCRFD detector with keypoints ({len(outs)} outputs, not 9 or 15)")
    strides, anchors = layout
    outs = [o[0] if o.ndim == 3 else o for o in outs]  # batched exports: a leading batch of one
    dets, kpss = [], []
    for level, stride in enumerate(strides):
        n = (size // stride) ** 2 * anchors
        scores, boxes, kps = (outs[level + k * len(strides)] for k in range(3))
        if scores.size != n or boxes.shape != (n, 4) or kps.shape != (n, 10):
            raise ModelLoadError(f"{name}: not an SCRFD detector with keypoints (stride {stride} outputs of"
                                 f" {scores.shape}, {boxes.shape}, {kps.shape}; {n} anchors expected)")
        side = size // stride
        centres = np.stack(np.mgrid[:side, :side][::-1], axis=-1).astype(np.float32).reshape(-1, 2) * stride
        centres = np.repeat(centres, anchors, axis=0)
        scores = scores.reshape(-1)
        hit = scores >= DET_THRESH
        c, d = centres[hit], boxes[hit] * stride
        box = np.stack([c[:, 0] - d[:, 0], c[:, 1] - d[:, 1], c[:, 0] + d[:, 2], c[:, 1] + d[:, 3]], axis=-1)
        dets.append(np.hstack([box, scores[hit, None]]))
        kpss.append(np.tile(c, 5).reshape(-1, 5, 2) + (kps[hit] * stride).reshape(-1, 5, 2))
    return np.vstack(dets).astype(np.float32), np.vstack(kpss).astype(np.float32)


def detect(rgb: np.ndarray, det_graph: Graph, *, name: str = "the face detector") -> list[Face]:
    """The faces SCRFD finds in an HxWx3 uint8 RGB picture (an alpha channel is dropped), best score first, as
    FaceAnalysis(det_size=(640, 640)).get gives them (without embeddings); `name` is the file, for errors."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or not rgb.size:
        raise ValueError(f"face detection takes an HxWx3 uint8 picture, not {rgb.dtype} {rgb.shape}")
    rgb = np.ascontiguousarray(rgb[:, :, :3])
    blob, scale = _letterbox(rgb)
    try:
        outs = det_graph(blob)
    except ValueError as e:
        raise ModelLoadError(f"{name}: not an SCRFD face detector ({e})") from None
    dets, kpss = _decode(outs, DET_SIZE, name)
    dets[:, :4] /= scale
    kpss /= scale
    order = dets[:, 4].argsort()[::-1]
    dets, kpss = dets[order], kpss[order]
    return [Face(bbox=tuple(float(v) for v in dets[i, :4]), kps=kpss[i], det_score=float(dets[i, 4]))
            for i in nms(dets)]


# --- 2. recognition: ArcFace ----------------------------------------------------------------------------

def estimate_norm(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2 x 3 similarity taking the five keypoints onto the ArcFace template at `size` (a multiple of 112, or
    of 128 with the template shifted right by 8/128): Umeyama's least squares, step by step as scikit-image's
    SimilarityTransform.estimate does it, in float32 where it is (the keypoints are): the same matrix to the bit."""
    if size % 112 == 0:
        dst = ARCFACE_DST * (size / 112.0)
    elif size % 128 == 0:
        dst = ARCFACE_DST * (size / 128.0)
        dst[:, 0] += 8.0 * size / 128.0
    else:
        raise ValueError(f"ArcFace alignment is for sizes that are multiples of 112 or 128, not {size}")
    src = np.asarray(kps, np.float32).reshape(5, 2)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    a = dst_c.T @ src_c / len(src)
    d = np.ones(2)
    if np.linalg.det(a) < 0:
        d[1] = -1.0  # a reflection would fit better: keep a rotation
    u, s, vt = np.linalg.svd(a)
    rank = np.count_nonzero(s > s.max() * 2 * np.finfo(float).eps)
    if rank == 0:
        raise ValueError("the face keypoints are all at one place")
    if rank == 1 and np.linalg.det(u) * np.linalg.det(vt) < 0:
        rot = u @ np.diag([1.0, -1.0]) @ vt
    else:
        rot = u @ np.diag(d) @ vt if rank == 2 else u @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ d)
    return np.hstack([rot * scale, (dst_mean - scale * (rot @ src_mean.T))[:, None]])


def norm_crop(rgb: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The face aligned on the ArcFace template, size x size: OpenCV 4's warpAffine (bilinear, black outside) in
    its own arithmetic, the same bytes: source coordinates rounded to 1/32 pixel, weights in 1/1024.
    (OpenCV 5 samples at unrounded coordinates: about one value in 25 one level off.)"""
    (m00, m01, m02), (m10, m11, m12) = estimate_norm(kps, size)
    det = m00 * m11 - m01 * m10
    det = 1.0 / det if det else 0.0
    a11, a12, a21, a22 = m11 * det, -m01 * det, -m10 * det, m00 * det  # the inverse, as OpenCV computes it
    b1, b2 = -a11 * m02 - a12 * m12, -a21 * m02 - a22 * m12
    xs, ys = np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64)[:, None]

    def fixed(row: np.ndarray, col: np.ndarray) -> np.ndarray:  # the row's and the column's parts in 1/1024
        return (np.rint(row * 1024).astype(np.int64) + np.rint(col * 1024).astype(np.int64) + 16) >> 5  # in 1/32

    sx, sy = fixed(a12 * ys + b1, a11 * xs), fixed(a22 * ys + b2, a21 * xs)
    fx, fy, sx, sy = sx & 31, sy & 31, sx >> 5, sy >> 5
    img = rgb[:, :, :3]
    h, w = img.shape[:2]
    acc = np.zeros((size, size, 3), np.int64)
    for dy, wy in ((0, 32 - fy), (1, fy)):
        for dx, wx in ((0, 32 - fx), (1, fx)):
            x, y = sx + dx, sy + dy
            inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
            acc += img[y.clip(0, h - 1), x.clip(0, w - 1)] * (wy * wx * inside)[..., None]
    return ((acc + 512) >> 10).clip(0, 255).astype(np.uint8)


def embed(aligned: np.ndarray, rec_graph: Graph, *, name: str = "the face recognition model") -> np.ndarray:
    """ArcFace's raw embedding (float32, flat) of an aligned face."""
    blob = (aligned.astype(np.float32) - REC_MEAN) * np.float32(1.0 / REC_STD)  # OpenCV's blobFromImage
    try:
        out = rec_graph(np.ascontiguousarray(blob.transpose(2, 0, 1)[None]))
    except ValueError as e:
        raise ModelLoadError(f"{name}: not an ArcFace recognition model for 112 x 112 faces ({e})") from None
    return np.asarray(out[0], np.float32).reshape(-1)


def faces(rgb: np.ndarray, dirs: Sequence[Path], pack: str = "buffalo_l") -> list[Face]:
    """The faces in an RGB picture, each with its embedding, best detection score first (FaceAnalysis.get)."""
    folder = pack_dir(pack, dirs)
    det_file, rec_file = PACK_FILES[pack]
    det = _graph(folder / det_file, "SCRFD face detector")
    found = detect(rgb, det, name=det_file)
    if not found:
        return []
    rec = _graph(folder / rec_file, "ArcFace recognition model")
    return [Face(f.bbox, f.kps, f.det_score, embed(norm_crop(rgb, f.kps), rec, name=rec_file)) for f in found]


def largest_face(found: Sequence[Face]) -> Face:
    """The face with the largest box (the last of equals, as the extension's sort); none is an InvalidRequest."""
    if not found:
        raise InvalidRequest("no face was found in the picture; FaceID and InstantID need a picture with a visible"
                             " face")
    return max(reversed(found), key=lambda f: f.area)
