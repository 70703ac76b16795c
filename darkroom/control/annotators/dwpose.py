"""DW Pose (dw_openpose_full): whole-body keypoints from yolox_l.onnx and dw-ll_ucoco_384.onnx, drawn as
OpenPose skeletons with hands and faces; animal_openpose: AP-10K animal keypoints from the same detector and
rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx.

Both files are ONNX graphs run with onnxruntime on the CPU (the extension runs the same graphs through
OpenCV's dnn module, also on the CPU). The steps are the extension's (after IDEA-Research's DWPose):

1. YOLOX finds people: the picture, scaled to fit 640 x 640 and put in its top-left corner over grey 114,
   goes in as RGB 0-255 (NCHW float). The graph gives, per anchor of the 8/16/32-pixel grids, the box
   centre offset and log size in grid cells and the objectness and 80 class scores (already sigmoid).
   Score = objectness x class; per class, boxes above 0.1 go through non-maximum suppression at IoU 0.45;
   the person boxes (class 0) above 0.3 are kept. When boxes were found but none is a person, the whole
   picture is taken as one box (the extension's quirk); when none were found at all, nobody is drawn.
2. RTMPose (DWPose's distilled whole-body model) places 133 COCO-WholeBody keypoints per box: the box,
   widened 1.25x and to the model's 3:4 aspect, is warped onto 288 x 384 pixels (bilinear, black outside),
   normalised with ImageNet's RGB mean and deviation, and the model's SimCC outputs (one 1-D distribution
   per keypoint and axis at half-pixel bins) give each keypoint at its peaks, with the smaller of the two
   peak values as its score.
3. OpenPose's 18 body points are taken from COCO's 17 plus a neck between the shoulders (present when both
   shoulders score above 0.3); keypoints scoring under 0.3 are left out. The body, both hands (21 points)
   and the 68 face points (with the eyes added: OpenPose faces have 70) are drawn as openpose_full draws
   them. Feet are found but, as in the extension, not drawn.

animal_openpose takes the boxes of COCO's animal classes (bird to giraffe, 14-23; none: an empty map),
places AP-10K's 17 keypoints with the 256 x 256 RTMPose model the same way, and draws all 17 limbs of
each animal (whatever their scores, as the extension) as 5-pixel lines in the extension's colours.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from darkroom.control.annotators import files, imageops
from darkroom.control.annotators.poses import Person, PoseSet
from darkroom.errors import ModelLoadError
from darkroom.fsutil import open_regular

DET_FILE, POSE_FILE, KIND = "yolox_l.onnx", "dw-ll_ucoco_384.onnx", "openpose"
ANIMAL_FILE = "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx"
DET_SIZE = 640
STRIDES = (8, 16, 32)
POSE_SIZE = (288, 384)  # (width, height)
ANIMAL_SIZE = (256, 256)
ANIMAL_CLASSES = tuple(range(14, 24))  # COCO's bird, cat, dog, horse, sheep, cow, elephant, bear, zebra, giraffe
SIMCC_SPLIT = 2.0
NMS_IOU, CANDIDATE_SCORE, PERSON_SCORE, KEYPOINT_SCORE = 0.45, 0.1, 0.3, 0.3
POSE_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
POSE_STD = np.array([58.395, 57.12, 57.375], np.float32)
WHOLE_BODY, ANIMAL_POINTS = 133, 17
# OpenPose body point <- COCO point (after the neck is inserted at 17): nose 0, neck 1, right arm 2-4, left arm
# 5-7, right leg 8-10, left leg 11-13, right/left eye 14/15, right/left ear 16/17
OPENPOSE_FROM_COCO = (0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
FACE, LEFT_HAND, RIGHT_HAND = slice(23, 91), slice(91, 112), slice(112, 133)  # in COCO-WholeBody's order

Graph = Callable[[np.ndarray], list[np.ndarray]]
Point = tuple[float, float]


def session(path: Path, what: str) -> Graph:
    """An onnxruntime session of the file as a function of its one input; a file that is not such a graph
    is a ModelLoadError naming it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ModelLoadError(f"the {what} needs onnxruntime, which this install lacks (run scripts/setup)") from None
    try:
        with open_regular(path, what=f"the {what} file") as fh:
            data = fh.read()
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph optimisations
    try:
        sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path.name}: not an ONNX {what} ({first[:160]})") from None
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"{path.name}: not the {what} (it takes {len(inputs)} inputs, not one picture)")
    name = inputs[0].name

    def run(x: np.ndarray) -> list[np.ndarray]:
        try:
            return sess.run(None, {name: x})
        except Exception as e:  # onnxruntime's own errors: an input of another shape, a graph that fails
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(first.removeprefix("[ONNXRuntimeError] : ")[:200]) from None
    return run


# --- 1. people: YOLOX --------------------------------------------------------------------------------------

def letterbox(img: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, float]:
    """The picture scaled to fit size x size, in the top-left corner over grey 114, as 1x3xSxS float32."""
    h, w = img.shape[:2]
    ratio = min(size / h, size / w)
    nh, nw = int(h * ratio), int(w * ratio)
    canvas = np.full((size, size, 3), 114, np.uint8)
    canvas[:nh, :nw] = imageops.resize(img, nw, nh, imageops.LINEAR)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], dtype=np.float32), ratio


def decode_boxes(raw: np.ndarray, size: int = DET_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX's raw output (anchors x (4 + 1 + classes)) to boxes (x0, y0, x1, y1 in input pixels) and class
    scores (objectness x class)."""
    grids, strides = [], []
    for stride in STRIDES:
        n = size // stride
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], 1))
        strides.append(np.full((n * n, 1), stride))
    grid, stride = np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)
    if raw.shape[0] != grid.shape[0] or raw.shape[1] < 6:
        raise ValueError(f"{raw.shape[0]} anchors of {raw.shape[1]} values, not {grid.shape[0]} of 4 + 1 + classes")
    centre = (raw[:, :2] + grid) * stride
    half = np.exp(raw[:, 2:4]) * stride / 2
    return np.concatenate([centre - half, centre + half], 1), raw[:, 4:5] * raw[:, 5:]


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU) -> list[int]:
    """Greedy non-maximum suppression; areas count the end pixels (+1), as YOLOX's demo does."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order = list(np.argsort(scores)[::-1])
    keep = []
    while order:
        i, rest = order[0], np.array(order[1:], dtype=int)
        keep.append(int(i))
        if not len(rest):
            break
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        order = list(rest[overlap <= iou])
    return keep


def people(detector: Graph, img: np.ndarray, classes: Sequence[int] = (0,)) -> np.ndarray | None:
    """Boxes of `classes` (default: people; n x 4, picture pixels); an empty array when only other things were
    found, None when nothing was."""
    x, ratio = letterbox(img)
    raw = np.asarray(detector(x)[0], dtype=np.float32)
    boxes, scores = decode_boxes(raw.reshape(raw.shape[-2], raw.shape[-1]))
    boxes = boxes / ratio
    found = []
    for cls in range(scores.shape[1]):
        candidates = np.flatnonzero(scores[:, cls] > CANDIDATE_SCORE)
        if len(candidates):
            kept = candidates[nms(boxes[candidates], scores[candidates, cls])]
            found += [(boxes[k], scores[k, cls], cls) for k in kept]
    if not found:
        return None
    return np.array([box for box, score, cls in found if cls in classes and score > PERSON_SCORE]).reshape(-1, 4)


# --- 2. keypoints: RTMPose with SimCC ---------------------------------------------------------------------

def box_frame(box: np.ndarray, model_size: tuple[int, int] = POSE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(centre, size) of a box widened 1.25x and then to the pose model's aspect (DWPose's 3:4)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    w, h = (x1 - x0) * 1.25, (y1 - y0) * 1.25
    aspect = model_size[0] / model_size[1]
    size = np.array([w, w / aspect]) if w > h * aspect else np.array([h * aspect, h])
    return centre, size


def crop(img: np.ndarray, centre: np.ndarray, size: np.ndarray,
         model_size: tuple[int, int] = POSE_SIZE) -> np.ndarray:
    """The frame warped onto the pose model's input (bilinear, black outside the picture), float32 HxWx3."""
    out_w, out_h = model_size
    step = size[0] / out_w  # picture pixels per input pixel, the same both ways
    xs = (np.arange(out_w) - out_w / 2) * step + centre[0]
    ys = (np.arange(out_h) - out_h / 2) * step + centre[1]
    map_y, map_x = np.meshgrid(ys, xs, indexing="ij")
    return imageops.remap(img.astype(np.float32), map_x, map_y, border="constant")


def simcc_peaks(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K x 2 locations in input pixels, K scores) from K x Wx and K x Wy SimCC distributions; a keypoint
    with no positive peak is at -1."""
    locs = np.stack([simcc_x.argmax(1), simcc_y.argmax(1)], 1).astype(np.float32)
    scores = np.minimum(simcc_x.max(1), simcc_y.max(1))
    locs[scores <= 0] = -1
    return locs / SIMCC_SPLIT, scores


def keypoints(pose: Graph, img: np.ndarray, boxes: np.ndarray, model_size: tuple[int, int] = POSE_SIZE,
              count: int = WHOLE_BODY) -> tuple[np.ndarray, np.ndarray]:
    """(boxes x count x 2 picture pixels, boxes x count scores), one box at a time."""
    all_points, all_scores = [], []
    for box in boxes:
        centre, size = box_frame(box, model_size)
        x = (crop(img, centre, size, model_size) - POSE_MEAN) / POSE_STD
        simcc_x, simcc_y = (np.asarray(o, dtype=np.float32) for o in pose(x.transpose(2, 0, 1)[None])[:2])
        if simcc_x.ndim != 3 or simcc_x.shape[1] != count or simcc_y.shape[1] != count:
            raise ValueError(f"outputs of shapes {simcc_x.shape} and {simcc_y.shape}, not SimCC of {count} keypoints")
        locs, scores = simcc_peaks(simcc_x[0], simcc_y[0])
        all_points.append(locs / np.array(model_size, np.float32) * size + centre - size / 2)
        all_scores.append(scores)
    return np.array(all_points).reshape(-1, count, 2), np.array(all_scores).reshape(-1, count)


# --- 3. OpenPose people -----------------------------------------------------------------------------------

def _part(points: np.ndarray, scores: np.ndarray) -> list[Point | None] | None:
    """Points scoring at least 0.3 (others None); None when none does."""
    part = [(float(x), float(y)) if s >= KEYPOINT_SCORE else None for (x, y), s in zip(points, scores, strict=True)]
    return None if all(p is None for p in part) else part


def openpose_people(points: np.ndarray, scores: np.ndarray) -> tuple[list, list, list]:
    """(bodies of 18 points, (left hand, right hand) pairs, faces of 70 points) per person."""
    bodies, hands, faces = [], [], []
    for pts, sc in zip(points, scores, strict=True):
        neck = pts[[5, 6]].mean(0)
        neck_score = float(sc[5] > KEYPOINT_SCORE and sc[6] > KEYPOINT_SCORE)
        coco_pts, coco_sc = np.insert(pts[:17], 17, neck, 0), np.append(sc[:17], neck_score)
        body = _part(coco_pts[list(OPENPOSE_FROM_COCO)], coco_sc[list(OPENPOSE_FROM_COCO)]) or [None] * 18
        face = _part(pts[FACE], sc[FACE])
        if face is not None:
            face += [body[14], body[15]]  # OpenPose's 69th and 70th face points are the eyes
        bodies.append(body)
        hands.append((_part(pts[LEFT_HAND], sc[LEFT_HAND]), _part(pts[RIGHT_HAND], sc[RIGHT_HAND])))
        faces.append(face)
    return bodies, hands, faces


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], found: list | None = None) -> np.ndarray:
    """The dw_openpose_full map: bodies, hands and faces at the unit's resolution (padded to 64 as the
    extension detects, cropped back); the PoseSet is appended to `found`."""
    det_path, pose_path = files.find(DET_FILE, KIND, dirs), files.find(POSE_FILE, KIND, dirs)
    detector, pose = session(det_path, "YOLOX person detector"), session(pose_path, "DWPose keypoint model")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    try:
        boxes = people(detector, padded)
    except (ValueError, IndexError) as e:
        raise ModelLoadError(f"{det_path.name}: not the YOLOX person detector ({e})") from None
    bodies: list = []
    hands: list = []
    faces: list = []
    if boxes is not None:
        if not len(boxes):  # things but no person: the whole picture, as the extension does
            boxes = np.array([[0, 0, padded.shape[1], padded.shape[0]]], np.float32)
        try:
            points, scores = keypoints(pose, padded, boxes)
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"{pose_path.name}: not the DWPose whole-body model ({e})") from None
        bodies, hands, faces = openpose_people(points, scores)
    poses = PoseSet(h, w, [Person(body, *both, face) for body, both, face in zip(bodies, hands, faces, strict=True)])
    if found is not None:
        found.append(poses)
    return poses.render()


# --- animal_openpose --------------------------------------------------------------------------------------

# AP-10K limbs (keypoint pairs, 0-based: eyes 0-1, nose 2, neck 3, tail root 4, then the legs) and the
# extension's colour for each
ANIMAL_LIMBS = ((0, 1), (1, 2), (0, 2), (2, 3), (3, 8), (8, 9), (9, 10), (3, 5), (5, 6), (6, 7), (3, 4), (4, 14),
                (14, 15), (15, 16), (4, 11), (11, 12), (12, 13))
ANIMAL_COLORS = ((255, 255, 255), (100, 255, 100), (150, 255, 255), (100, 50, 255), (50, 150, 200), (0, 255, 255),
                 (0, 150, 0), (0, 0, 255), (0, 0, 150), (255, 50, 255), (255, 0, 255), (255, 0, 0), (150, 0, 0),
                 (255, 255, 100), (0, 150, 0), (255, 255, 0), (150, 150, 150))
ANIMAL_LINE = 5


def draw_animals(animals: Sequence, height: int, width: int) -> np.ndarray:
    """Each animal's 17 limbs as 5-pixel lines with round ends (OpenCV's thick lines), uint8 HxWx3; a limb with
    an end not found (None, from pose JSON) is left out."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height))
    pen = ImageDraw.Draw(canvas)
    r = ANIMAL_LINE // 2
    for points in animals:
        for (a, b), color in zip(ANIMAL_LIMBS, ANIMAL_COLORS, strict=True):
            if points[a] is None or points[b] is None:
                continue
            ends = [(int(points[a][0]), int(points[a][1])), (int(points[b][0]), int(points[b][1]))]
            pen.line(ends, fill=color, width=ANIMAL_LINE)
            for x, y in ends:
                pen.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return np.asarray(canvas, dtype=np.uint8).copy()


def detect_animals(img: np.ndarray, res: int, dirs: Sequence[Path], found: list | None = None) -> np.ndarray:
    """The animal_openpose map at the unit's resolution (padded to 64, cropped back); the PoseSet is appended
    to `found`."""
    det_path, pose_path = files.find(DET_FILE, KIND, dirs), files.find(ANIMAL_FILE, KIND, dirs)
    detector, pose = session(det_path, "YOLOX detector"), session(pose_path, "AP-10K RTMPose keypoint model")
    padded, (h, w) = imageops.pad64(imageops.to_resolution(img, res))
    try:
        boxes = people(detector, padded, ANIMAL_CLASSES)
    except (ValueError, IndexError) as e:
        raise ModelLoadError(f"{det_path.name}: not the YOLOX detector ({e})") from None
    animals: list = []
    if boxes is not None and len(boxes):
        try:
            points, _ = keypoints(pose, padded, boxes, ANIMAL_SIZE, ANIMAL_POINTS)
        except (ValueError, IndexError) as e:
            raise ModelLoadError(f"{pose_path.name}: not the AP-10K RTMPose model ({e})") from None
        animals = [[(float(x), float(y)) for x, y in animal] for animal in points]
    poses = PoseSet(h, w, animals=animals)
    if found is not None:
        found.append(poses)
    return poses.render()
