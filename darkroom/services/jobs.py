"""The job queue: one worker per device runs every request (UI, A1111 API, OpenAI API) in order.

Each job carries its own cancel and skip events, live progress (step, batch, ETA) and a
preview image, and a revision number bumped on every change so that watchers (server-sent
events, the A1111 progress route) can ask "what changed since rev N" without locks.
Finished images are written and indexed one by one as they come out of the engine, so a
crash loses at most the batch in progress.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from darkroom.errors import DarkroomError, Interrupted, InvalidRequest
from darkroom.request import GeneratedImage, GenerationRequest

log = logging.getLogger("darkroom.jobs")

QUEUED, RUNNING, DONE, ERROR, INTERRUPTED = "queued", "running", "done", "error", "interrupted"
FINISHED = (DONE, ERROR, INTERRUPTED)


class QueueFull(DarkroomError):
    status = 503
    code = "DR-QUEUE-FULL"


class JobNotFound(DarkroomError):
    status = 404
    code = "DR-JOB-NOT-FOUND"


@dataclass
class JobImage:
    seed: int
    infotext: str
    png: bytes
    path: str | None = None
    history_id: int | None = None


@dataclass
class Job:
    request: GenerationRequest
    private: bool = False
    source: str = "api"
    # the id is the capability to read a job's prompt and images, so it is unguessable (122 random bits)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    client: str | None = None  # who submitted it (the web UI's per-tab id): a private job is shown only to them
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    step: int = 0
    steps: int = 0
    batch: int = 0
    batches: int = 1
    started: float | None = None
    finished: float | None = None
    sampling_started: float | None = None
    last_step_at: float | None = None  # when the latest step ended, for the ETA
    steps_done: int = 0  # across batches, for the ETA
    phase: str = "sample"  # "hires" during the hires fix's second pass
    error: str | None = None
    error_status: int | None = None  # the HTTP status of `error` (422 bad input, 404 missing model, ...)
    error_code: str | None = None  # its DR-... code (darkroom/help: the troubleshooting page)
    images: list[JobImage] = field(default_factory=list)
    preview_png: bytes | None = None
    preview_rev: int = 0
    rev: int = 0
    plan: object | None = None  # an xyplot.XYPlan (X/Y grid), sd_upscale.SDUpscalePlan, control_batch.ControlBatchPlan
    grid_png: bytes | None = None
    grid_history_id: int | None = None
    model_name: str = ""
    model_hash: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    skip: threading.Event = field(default_factory=threading.Event, repr=False)
    done_event: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def total_steps(self) -> int:
        """Every sampling step the job will run: img2img strength, hires passes and grid cells included."""
        if self.plan is not None:
            return max(1, self.plan.total_steps)
        return max(1, self.request.steps_per_batch * self.request.n_iter)

    @property
    def progress(self) -> float:
        if self.state in FINISHED:
            return 1.0
        return min(1.0, self.steps_done / self.total_steps)

    @property
    def eta(self) -> float | None:
        """Seconds left: the mean step time so far (first step to latest) times the steps left, less the
        time since the latest step, so that it counts down between steps instead of swinging with each."""
        if self.state != RUNNING or self.steps_done < 2 or self.sampling_started is None or self.last_step_at is None:
            return None
        per_step = (self.last_step_at - self.sampling_started) / (self.steps_done - 1)
        left = per_step * (self.total_steps - self.steps_done) - (time.time() - self.last_step_at)
        return max(0.0, left)

    @property
    def stage(self) -> str:
        """What the job is doing, in the UI's words: queued, loading (the model, the prompt), sampling,
        decoding (after a batch's last step), stopping (interrupt asked, not yet honoured), stopped, done, failed."""
        if self.state in FINISHED:
            return {DONE: "done", ERROR: "failed", INTERRUPTED: "stopped"}[self.state]
        if self.state == QUEUED:
            return "queued"
        if self.cancel.is_set():
            return "stopping"
        if not self.steps_done:
            return "loading"
        return "decoding" if self.steps and self.step >= self.steps else "sampling"

    @property
    def images_total(self) -> int:
        """How many images the job makes: every batch, every cell of an X/Y plot or every run of a ControlNet
        batch."""
        planned = getattr(self.plan, "images_total", None)  # a ControlNet batch's runs
        if planned is not None:
            return planned
        cells = getattr(self.plan, "cells", None)
        if cells:
            return sum(c.request.batch_size * c.request.n_iter for c in cells)
        return self.request.batch_size * self.request.n_iter


class JobQueue:
    """FIFO of jobs run by one worker thread over one Engine."""

    def __init__(self, engine, *, output_dir: Callable[[GenerationRequest], Path] | None = None, history=None,
                 max_pending: int = 100, keep_finished: int = 50, preview_every: float = 0.5,
                 prepare: Callable[[GenerationRequest], GenerationRequest] | None = None):
        self.engine = engine
        self.output_dir = output_dir
        self.history = history
        self.max_pending = max_pending
        self.keep_finished = keep_finished
        self.preview_every = preview_every
        self.prepare = prepare
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._current: Job | None = None
        self._stop = False
        self._thread: threading.Thread | None = None
        self.version = 0

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> JobQueue:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="darkroom-jobs", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            for job in self._pending:
                job.cancel.set()
            if self._current:
                self._current.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # --- submitting and control ------------------------------------------------------------------

    def submit(self, request: GenerationRequest, *, private: bool = False, source: str = "api",
               xy: tuple[str | None, str | None] | None = None, client: str | None = None,
               sd_upscale=None) -> Job:
        """Queue a generation; with `xy` ("axis=values" for x and y) an X/Y grid of them; with `sd_upscale`
        (an sd_upscale.SDUpscale) the init image upscaled and redrawn tile by tile."""
        if self.prepare is not None:
            request = self.prepare(request)
        request = self.engine.apply_preset(request)  # few-step preset: the job's step count is the real one
        self.engine.check_inputs(request)  # an unknown sampler fails now, not when its turn comes
        plan = None
        from darkroom.services.control_batch import has_batch, plan_control_batch

        if has_batch(request):
            if (xy is not None and any(xy)) or sd_upscale is not None:
                raise InvalidRequest("a ControlNet batch unit (several pictures, input_mode \"batch\") cannot be"
                                     " combined with the X/Y/Z plot or SD upscale script")
            plan = plan_control_batch(self.engine, request)  # checked and admitted
            request = request.model_copy(update={"seed": plan.requests[0].seed, "subseed": plan.requests[0].subseed})
        elif xy is not None and any(xy):
            from darkroom.services.xyplot import parse_axis_option, plan_xy

            x, y = (parse_axis_option(a) if a else None for a in xy)
            # every cell validated (and prepared, as the request was) before anything is queued
            plan = plan_xy(self.engine, request, x, y, prepare=self.prepare)
        elif sd_upscale is not None:
            from darkroom.services.sd_upscale import plan_sd_upscale

            plan = plan_sd_upscale(self.engine, request, sd_upscale)  # checked and one tile admitted
            request = plan.request  # seeds resolved, the tile size as width x height
        self._admit(request, plan)
        job = Job(request=request, private=private, source=source, steps=request.steps, plan=plan, client=client,
                  batches=getattr(plan, "runs", request.n_iter))  # an SD upscale's tiles count as its batches
        with self._cond:
            if len(self._pending) >= self.max_pending:
                raise QueueFull(f"queue full: {len(self._pending)} jobs are waiting; try again when some have finished")
            self._pending.append(job)
            self._jobs[job.id] = job
            self._touch(job)
            self._cond.notify_all()
        return job

    def _admit(self, request: GenerationRequest, plan) -> None:
        """Limits and memory (darkroom/engine/admission.py): a request too big is refused now (HTTP 422), not
        a failed job later; an X/Y plot's cells were admitted by plan_xy. Engines without `admit` (test
        fakes) skip it."""
        admit = getattr(self.engine, "admit", None)
        if admit is not None and plan is None:
            admit(request)

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (finished jobs are kept for the last {self.keep_finished})")
        return job

    @property
    def current(self) -> Job | None:
        return self._current

    def position(self, job: Job) -> int:
        """0 while running, 1.. while waiting, -1 when finished."""
        with self._cond:
            if job is self._current:
                return 0
            try:
                return self._pending.index(job) + 1
            except ValueError:
                return -1

    def pending(self) -> int:
        return len(self._pending)

    def jobs(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def listing(self, finished: int = 5) -> list[Job]:
        """The queue as a panel shows it: the running job, the waiting ones in order, then the last
        `finished` jobs that ended (newest first)."""
        with self._cond:
            ended = [j for j in self._jobs.values() if j.state in FINISHED]
            ended.sort(key=lambda j: j.finished or 0.0, reverse=True)
            return ([self._current] if self._current else []) + list(self._pending) + ended[:finished]

    def interrupt(self, job_id: str | None = None) -> Job | None:
        """Stop a job (the current one when no id): finished images are kept; a waiting job is dropped."""
        with self._cond:
            job = self._jobs.get(job_id) if job_id else self._current
            if job_id and job is None:
                raise JobNotFound(f"no job {job_id!r}")
            if job is None:
                return None
            job.cancel.set()
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, INTERRUPTED)
            self._touch(job)
        return job

    def skip(self) -> Job | None:
        """Abandon the current batch of the running job and go on with its next one."""
        job = self._current
        if job is not None:
            job.skip.set()
        return job

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        job.done_event.wait(timeout)
        return job

    def wait_change(self, since: int, timeout: float) -> int:
        """Block until the queue's version passes `since` (or timeout); returns the version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version > since or self._stop, timeout)
            return self.version

    # --- the worker ----------------------------------------------------------------------------

    def _touch(self, job: Job) -> None:
        # callers hold self._cond or run on the worker thread; a lost race only delays a watcher by one tick
        self.version += 1
        job.rev = self.version

    def _notify(self, job: Job) -> None:
        with self._cond:
            self._touch(job)
            self._cond.notify_all()

    def _finish(self, job: Job, state: str) -> None:
        job.state = state
        job.finished = time.time()
        job.done_event.set()
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for old in finished[: max(0, len(finished) - self.keep_finished)]:
            self._jobs.pop(old.id, None)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stop)
                if self._stop:
                    return
                job = self._pending.pop(0)
                self._current = job
                job.state = RUNNING
                job.started = time.time()
                self._touch(job)
                self._cond.notify_all()
            state = self._run(job)
            with self._cond:
                self._current = None
                self._finish(job, state)
                self._touch(job)
                self._cond.notify_all()

    def _run(self, job: Job) -> str:
        from darkroom.engine.preview import preview_image

        last_preview = 0.0

        def on_step(event) -> None:
            nonlocal last_preview
            job.last_step_at = time.time()
            if job.sampling_started is None:
                job.sampling_started = job.last_step_at
            job.batch, job.step, job.steps, job.phase = event.batch_index, event.step, event.steps, event.phase
            job.steps_done += 1
            now = time.monotonic()
            if event.model is not None and (now - last_preview >= self.preview_every or event.step == event.steps):
                last_preview = now
                try:
                    buf = io.BytesIO()
                    preview_image(event.model, event.latents, event.denoised).save(buf, format="PNG")
                    job.preview_png = buf.getvalue()
                    job.preview_rev += 1
                except Exception:  # a preview must never break a generation
                    log.exception("preview failed")
            self._notify(job)

        def on_image(image: GeneratedImage) -> None:
            done = JobImage(seed=image.seed, infotext=image.infotext, png=image.png, path=image.path)
            if image.path and self.history is not None:
                try:
                    done.history_id = self.history.add(image.path, image.infotext, job_id=job.id,
                                                       source=job.request.init_image, mask=job.request.mask)
                except Exception:  # the file is safe on disk; reconcile() indexes it at next start
                    log.exception("could not index %s", image.path)
            job.images.append(done)
            self._notify(job)

        out = None if job.private or self.output_dir is None else self.output_dir(job.request)
        try:
            if job.plan is not None:
                return self._run_plan(job, out, on_step, on_image)
            result = self.engine.generate(job.request, on_step=on_step, cancel=job.cancel, skip=job.skip,
                                          output_dir=out, on_image=on_image)
        except Interrupted:  # stopped before sampling began (e.g. while a long prompt was encoded)
            return INTERRUPTED
        except DarkroomError as e:
            job.error, job.error_status, job.error_code = str(e), e.status, e.code
            log.warning("job %s failed: %s", job.id, e)
            return ERROR
        except Exception as e:
            job.error, job.error_status = f"internal error: {type(e).__name__}: {e} (details in logs/darkroom.log)", 500
            job.error_code = "DR-INTERNAL"
            log.exception("job %s crashed", job.id)
            return ERROR
        job.model_name, job.model_hash, job.timings = result.model_name, result.model_hash, result.timings
        job.request = result.request  # with the native size filled in
        return INTERRUPTED if result.interrupted else DONE

    def _run_plan(self, job: Job, out: Path | None, on_step, on_image) -> str:
        from darkroom.services.control_batch import ControlBatchPlan, run_control_batch
        from darkroom.services.sd_upscale import SDUpscalePlan, run_sd_upscale

        if isinstance(job.plan, ControlBatchPlan):
            result = run_control_batch(self.engine, job.plan, output_dir=out, on_step=on_step, cancel=job.cancel,
                                       skip=job.skip, on_image=on_image)
            job.model_name, job.model_hash, job.timings = result.model_name, result.model_hash, result.timings
            return INTERRUPTED if result.interrupted else DONE
        if not isinstance(job.plan, SDUpscalePlan):
            return self._run_grid(job, out, on_step, on_image)
        result = run_sd_upscale(self.engine, job.plan, output_dir=out, on_step=on_step, cancel=job.cancel,
                                skip=job.skip, on_image=on_image)
        job.model_name, job.model_hash, job.timings = result.model_name, result.model_hash, result.timings
        return INTERRUPTED if result.interrupted else DONE

    def _run_grid(self, job: Job, out: Path | None, on_step, on_image) -> str:
        from darkroom.services.xyplot import run_plan

        grid_dir = None if out is None else out.parent.parent / f"{out.parent.name}-grids" / out.name
        result = run_plan(self.engine, job.plan, output_dir=out, grid_dir=grid_dir, on_step=on_step,
                          cancel=job.cancel, on_image=on_image)
        job.grid_png, job.timings = result.grid_png, result.timings
        if result.grid_path and self.history is not None:
            try:
                job.grid_history_id = self.history.add(result.grid_path, result.infotext or "", job_id=job.id)
            except Exception:
                log.exception("could not index %s", result.grid_path)
        return INTERRUPTED if result.interrupted else DONE
