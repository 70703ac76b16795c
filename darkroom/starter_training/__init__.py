"""The starter model's world: procedurally drawn scenes with captions (`scenes`) and a judge for generations (`judge`).

For training and evaluating the starter model (scripts/) and the tests; the runtime never imports it (an
import-linter contract checks that).

Training: `sample_example(rng)` gives a scene plus a caption; `render(example.scene, size, jitter_seed)` draws it.
Evaluation: generate from each `eval_set()` example's text, then
`darkroom.starter_training.judge.summarise([judge(image, example) for ...])`.

Only the scene API is re-exported here: it needs no torch, and re-exporting the function `judge` would hide the
module `darkroom.starter_training.judge` behind it.
"""

from darkroom.starter_training.scenes import (
    COLOURS,
    HELD_OUT,
    PALETTE,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Claims,
    Example,
    ObjectClaim,
    Scene,
    SceneObject,
    caption,
    describe,
    eval_set,
    has_held_out,
    parse_caption,
    partial_caption,
    render,
    sample_example,
    sample_scene,
)

__all__ = [
    "COLOURS", "HELD_OUT", "PALETTE", "POSITIONS", "RELATIONS", "SHAPES", "SIZES", "Claims", "Example",
    "ObjectClaim", "Scene", "SceneObject", "caption", "describe", "eval_set", "has_held_out", "parse_caption",
    "partial_caption", "render", "sample_example", "sample_scene",
]
