"""Detected poses as data: the OpenPose JSON the extension's /controlnet/detect returns next to an openpose map,
and the map drawn back from such JSON (/controlnet/render_openpose_json, what pose editors send).

The JSON is OpenPose's output format as the extension writes it: per person `pose_keypoints_2d` (18 body
points), `hand_left_keypoints_2d`, `hand_right_keypoints_2d` (21 each) and `face_keypoints_2d` (70; 71 from the
CMU face net), each a flat list of x, y, confidence with x and y as fractions of the canvas and confidence 1
(found) or 0 (not found, x and y 0); a part not found at all is null. `animals` holds AP-10K's 17 points per
animal the same way, and `canvas_width`/`canvas_height` the map's size. One difference from the extension:
its canvas is the picture padded to a multiple of 64, Darkroom's the map it returns (the padding cut off), so
the JSON drawn back equals the map pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from darkroom.errors import InvalidRequest

Point = tuple[float, float]
Part = list[Point | None]

BODY_POINTS, HAND_POINTS, ANIMAL_POINTS = 18, 21, 17
FACE_POINTS = 71  # OpenPose's 70 landmarks, and the CMU face net's background map, whose peak the extension keeps


@dataclass
class Person:
    """One person's keypoints in canvas pixels (None: not found); a part never found is None."""

    body: Part
    left_hand: Part | None = None
    right_hand: Part | None = None
    face: Part | None = None


@dataclass
class PoseSet:
    """Everything one picture's pose detection found, in pixels of a `width` x `height` canvas."""

    height: int
    width: int
    people: list[Person] = field(default_factory=list)
    animals: list[Part] = field(default_factory=list)

    def to_json(self) -> dict:
        """The extension's pose JSON (fractions of the canvas)."""
        def flat(part: Part | None) -> list[float] | None:
            if not part:
                return None
            out: list[float] = []
            for p in part:
                out += [0.0, 0.0, 0.0] if p is None else [float(p[0]) / self.width, float(p[1]) / self.height, 1.0]
            return out

        return {"people": [{"pose_keypoints_2d": flat(p.body), "face_keypoints_2d": flat(p.face),
                            "hand_left_keypoints_2d": flat(p.left_hand),
                            "hand_right_keypoints_2d": flat(p.right_hand)} for p in self.people],
                "animals": [flat(a) for a in self.animals],
                "canvas_height": self.height, "canvas_width": self.width}

    @classmethod
    def from_json(cls, data: object, where: str = "pose") -> PoseSet:
        """A PoseSet from the extension's pose JSON; anything malformed is an InvalidRequest naming the field."""
        if not isinstance(data, dict):
            raise InvalidRequest(f"{where}: a pose is an object with people, canvas_width and canvas_height")
        height = _size(data.get("canvas_height"), f"{where}.canvas_height")
        width = _size(data.get("canvas_width"), f"{where}.canvas_width")
        people_data = data.get("people") or []
        animals_data = data.get("animals") or []
        if not isinstance(people_data, list) or not isinstance(animals_data, list):
            raise InvalidRequest(f"{where}: people and animals must be lists")
        people = []
        for i, person in enumerate(people_data):
            at = f"{where}.people[{i}]"
            if not isinstance(person, dict):
                raise InvalidRequest(f"{at}: a person is an object with pose_keypoints_2d")
            parts = {key: _points(person.get(key), width, height, f"{at}.{key}", count)
                     for key, count in (("pose_keypoints_2d", BODY_POINTS), ("hand_left_keypoints_2d", HAND_POINTS),
                                        ("hand_right_keypoints_2d", HAND_POINTS),
                                        ("face_keypoints_2d", FACE_POINTS))}
            people.append(Person(parts["pose_keypoints_2d"] or [None] * BODY_POINTS,
                                 parts["hand_left_keypoints_2d"], parts["hand_right_keypoints_2d"],
                                 parts["face_keypoints_2d"]))
        animals = [_points(a, width, height, f"{where}.animals[{i}]", ANIMAL_POINTS) or [None] * ANIMAL_POINTS
                   for i, a in enumerate(animals_data)]
        return cls(height, width, people, animals)

    def render(self, *, body: bool = True, hands: bool = True, face: bool = True) -> np.ndarray:
        """The map the extension draws for these poses (uint8 HxWx3): people's skeletons, hands and faces,
        else the animals'."""
        from darkroom.control.annotators import dwpose, openpose

        if self.people or not self.animals:
            return openpose.draw([p.body for p in self.people], self.height, self.width,
                                 hands=[(p.left_hand, p.right_hand) for p in self.people] if hands else None,
                                 faces=[p.face for p in self.people] if face else None, body=body)
        return dwpose.draw_animals(self.animals, self.height, self.width)


def _size(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 16384 \
            or int(value) != value:
        raise InvalidRequest(f"{where} must be a whole number of pixels from 1 to 16384, not {value!r}")
    return int(value)


def _points(values: object, width: int, height: int, where: str, count: int) -> Part | None:
    """Flat x, y, confidence triples (fractions of the canvas) to pixel points; confidence below 1 is "not
    found", as the extension reads it."""
    if values is None or values == []:
        return None
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) % 3 or len(values) > 3 * count:
        raise InvalidRequest(f"{where}: x, y, confidence triples expected (at most {count} points)")
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise InvalidRequest(f"{where}: every value must be a number") from None
    if not all(np.isfinite(numbers)):
        raise InvalidRequest(f"{where}: every value must be a finite number")
    points: Part = [None if c < 1.0 else (x * width, y * height)
                    for x, y, c in zip(numbers[0::3], numbers[1::3], numbers[2::3], strict=True)]
    return points + [None] * (count - len(points))
