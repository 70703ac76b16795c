"""The ControlNet extension's batch input: a unit given a list of pictures runs the whole job once per picture.

As the extension (its `input_mode: "batch"`): run i gives every batch unit its i-th picture (with no mask) and
leaves the other units as they are; there are as many runs as the shortest batch unit has pictures; every
run uses the same seed (a random one is drawn once), as the extension does unless its "increment seed" option
is set. Each run is a whole job (batch size and batch count included); the images of all runs are kept in
order. The extension answers an API call with no images unless its "show batch images" option is set, and
saves them to a folder; Darkroom answers with all of them (and saves them where it saves any job's).
An interrupt stops the run in progress and starts no other; a skip skips the current batch only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darkroom.errors import InvalidRequest
from darkroom.request import GenerationRequest


@dataclass
class ControlBatchPlan:
    """One request per control picture, checked before anything runs."""

    requests: list[GenerationRequest]

    @property
    def runs(self) -> int:
        """Batches in all (every run's batch count)."""
        return sum(r.n_iter for r in self.requests)

    @property
    def total_steps(self) -> int:
        return sum(r.steps_per_batch * r.n_iter for r in self.requests)

    @property
    def images_total(self) -> int:
        return sum(r.batch_size * r.n_iter for r in self.requests)


@dataclass
class ControlBatchResult:
    images: list = field(default_factory=list)
    interrupted: bool = False
    model_name: str = ""
    model_hash: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def has_batch(request: GenerationRequest) -> bool:
    return any(u.batch_images for u in request.controlnet if u.enabled)


def plan_control_batch(engine, request: GenerationRequest) -> ControlBatchPlan:
    """The runs of a request whose ControlNet units include batch units, each admitted (limits and memory)
    like any request; the number of batches in all counts against the batch count limit."""
    from darkroom.engine.generate import random_seed

    units = [u for u in request.controlnet if u.enabled]
    count = min(len(u.batch_images) for u in units if u.batch_images)
    seed = random_seed() if request.seed == -1 else request.seed
    subseed = random_seed() if request.subseed == -1 else request.subseed
    requests = []
    for i in range(count):
        run_units = [u.model_copy(update={"image": u.batch_images[i], "mask": None, "batch_images": None})
                     if u.batch_images else u for u in request.controlnet]
        requests.append(request.model_copy(update={"seed": seed, "subseed": subseed, "controlnet": run_units}))
    most = getattr(getattr(engine, "limits", None), "max_batch_count", None)
    if most is not None and count * request.n_iter > most:
        raise InvalidRequest(f"a ControlNet batch of {count} pictures x batch count {request.n_iter} makes"
                             f" {count * request.n_iter} batches; at most {most} (the max_batch_count setting):"
                             " send fewer pictures or raise the setting")
    admit = getattr(engine, "admit", None)
    if admit is not None:
        admit(requests[0])  # every run has the same size, batch and passes: one check holds for all
    return ControlBatchPlan(requests)


def run_control_batch(engine, plan: ControlBatchPlan, *, output_dir: Path | None = None, on_step=None,
                      cancel=None, skip=None, on_image: Callable[[Any], None] | None = None) -> ControlBatchResult:
    """Run the plan's requests in turn; progress counts every run's batches as the job's batches."""
    from darkroom.engine.sampling import renumbered_batches

    result = ControlBatchResult()
    t0 = time.perf_counter()
    offset = 0
    for request in plan.requests:
        if cancel is not None and cancel.is_set():
            result.interrupted = True
            break
        done = engine.generate(request, on_step=renumbered_batches(on_step, offset, plan.runs), cancel=cancel,
                               skip=skip, output_dir=output_dir, on_image=on_image)
        offset += request.n_iter
        for key, value in done.timings.items():
            result.timings[key] = result.timings.get(key, 0.0) + value
        result.images += done.images
        result.model_name, result.model_hash = done.model_name or result.model_name, done.model_hash
        if done.interrupted:
            result.interrupted = True
            break
    result.timings["total"] = time.perf_counter() - t0
    return result

