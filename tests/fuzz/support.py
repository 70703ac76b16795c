"""Strategies, the studio under test and its budget, and the CLI harness the fuzz tests share
(see tests/fuzz/__init__.py for what the fuzz is and how to hunt with it)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from PIL import Image

from darkroom.home import Home
from darkroom.request import GenerationResult
from darkroom.services.jobs import FINISHED
from tests.fuzz.strategies import (
    GENERATION_FIELDS,
    IMAGE_64,
    axes,
    encode,
    infotexts,
    models_,
    mostly,
    one_in,
    pngs_with_text,
    prompts,
    samplers_,
    schedules,
    sides,
    some_images,
    with_wrong,
)

HANG_GUARD = 600.0  # seconds: only a hang gets anywhere near this, however loaded the machine
EXPLORE = int(os.environ.get("DARKROOM_FUZZ_EXPLORE", "0") or 0)
"""0 (CI): the same examples every run. N > 0: N times as many, from a new random seed each run (to hunt)."""


def fuzz(examples: int):
    """Reproducible (derandomized) examples with no per-example deadline: only the hang guard times."""
    return settings(max_examples=examples * max(1, EXPLORE), deadline=None, derandomize=not EXPLORE, database=None,
                    print_blob=bool(EXPLORE),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much, HealthCheck.large_base_example])


def guarded(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a thread; a call still running after HANG_GUARD seconds fails the test."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD)
    assert not thread.is_alive(), f"hung for {HANG_GUARD:.0f} s: {getattr(fn, '__name__', fn)} {args!r:.300}"
    if "error" in box:
        raise box["error"]
    return box["result"]


# --- the studio under test, and its budget ---------------------------------------------------------------

MAX_COST = 32.0  # about 2 s on a loaded 2-core machine: 3 steps x 4 images at 64x64, or 3 steps at 128x128
MAX_CALLS = 4  # generations per example (an X/Y plot makes one per cell)


def _declared_size(data: bytes | None) -> tuple[int, int] | None:
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: nothing is decoded
            return image.size
    except Exception:  # not an image: the engine refuses it without sampling
        return None


def cost(req) -> float:
    """What a request costs to generate, in 64x64-image sampling steps (time grows as pixels ** 1.66 here:
    128x128 takes 10 times as long as 64x64 on the tiny model, its VAE's attention included)."""
    w, h = req.width, req.height
    if w is None or h is None:
        native = _declared_size(req.init_image) or (64, 64)
        w, h = w or native[0], h or native[1]
    pixels = w * h
    if req.enable_hr:
        try:
            hx, hy = req.model_copy(update={"width": w, "height": h}).hires_size()
            pixels = max(pixels, hx * hy)
        except (ArithmeticError, ValueError):
            pass
    return req.image_count * (pixels / 4096) ** 1.66 * max(1, req.steps_per_batch)


class Budget:
    """Wraps an engine's `generate`: a request over MAX_COST, or past MAX_CALLS generations in one
    example, ends as if interrupted before its first step (what a user pressing Interrupt gets)."""

    def __init__(self, engine):
        self.real = engine.generate
        self.calls = 0
        self.capped = 0
        engine.generate = self

    def reset(self) -> None:
        self.calls = self.capped = 0

    def __call__(self, req, **kw):
        self.calls += 1
        if self.calls > MAX_CALLS or cost(req) > MAX_COST:
            self.capped += 1
            return GenerationResult(request=req, interrupted=True)
        return self.real(req, **kw)


@dataclass
class Served:
    studio: object
    client: object
    budget: Budget
    checked: set[str] = field(default_factory=set)  # ids of the finished jobs already checked

    def begin(self) -> None:
        self.budget.reset()

    def settle(self) -> None:
        """Interrupt whatever an example left queued or running; every job must end, and none with an
        internal error (a job's error carries the HTTP status its route would answer with)."""
        queue = self.studio.queue
        for job in queue.jobs():
            if job.state not in FINISHED:
                queue.interrupt(job.id)
        for job in queue.jobs():
            if job.id in self.checked:
                continue
            self.checked.add(job.id)
            assert job.done_event.wait(HANG_GUARD), f"job {job.id} never finished: {job.request.describe()}"
            assert (job.error_status or 0) < 500, (
                f"job failed with an internal error: {job.error}\nrequest: {job.request.describe()}")

    def request(self, method: str, url: str, **kw):
        return guarded(self.client.request, method, url, **kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    from tests.server_util import client, studio_with

    studio = studio_with(Home(tmp_path_factory.mktemp("fuzz-server") / "home"), tiny_model("sd1")["path"])
    budget = Budget(studio.engine)
    try:
        with client(studio) as c:
            yield Served(studio, c, budget)
    finally:
        studio.close()


def tally(what: str) -> None:
    """Count an outcome for --hypothesis-show-statistics (statuses, job states); nothing outside @given."""
    with contextlib.suppress(InvalidArgument):
        event(what)


def check(r, *, openai: bool = False):
    """2xx, or 4xx with a one-line message (in OpenAI's error shape for /v1); never 5xx."""
    where = f"{r.request.method} {r.request.url.path}"
    tally(f"{r.request.url.path.split('/')[-1][:20]}: {r.status_code}")
    assert r.status_code < 500, f"{where} -> {r.status_code}: {r.text[:3000]}"
    if r.status_code < 400:
        return r
    try:
        body = r.json()
    except ValueError:
        raise AssertionError(f"{where} -> {r.status_code} without a JSON error: {r.text[:500]!r}") from None
    error = body.get("error")
    if openai:
        assert isinstance(error, dict), f"{where} -> {r.status_code} not in OpenAI's error shape: {body}"
        message = error.get("message")
    else:
        message = error if isinstance(error, str) else body.get("detail")
    assert isinstance(message, str) and message.strip(), f"{where} -> {r.status_code} with no message: {body}"
    assert "\n" not in message and "\r" not in message, f"{where}: a message of several lines: {message[:2000]!r}"
    assert not message.startswith("internal error"), f"{where} -> {r.status_code}: {message}"
    return r


def post_json(served: Served, url: str, body, **kw):
    return served.request("POST", url, content=encode(body), headers={"content-type": "application/json"}, **kw)


def follow_job(served: Served, r) -> None:
    """A queued native job ends (done, error or interrupted), and never with an internal error."""
    if r.status_code == 202:
        job_id = r.json()["job"]["id"]
        job = served.studio.queue.get(job_id)
        assert job.done_event.wait(HANG_GUARD), f"job {job_id} never finished"
        tally(f"job {job.state}" + (f" ({len(job.images)} images)" if job.images else ""))
        check(served.request("GET", f"/api/jobs/{job_id}"))
        for n in range(len(job.images) + 1):
            check(served.request("GET", f"/api/jobs/{job_id}/images/{n}"))
        check(served.request("GET", f"/api/jobs/{job_id}/grid"))
        check(served.request("GET", f"/api/jobs/{job_id}/preview"))



# --- the CLI -------------------------------------------------------------------------------------------------


@dataclass
class Files:
    root: Path
    png: Path  # a plain 64x64 PNG
    params_png: Path  # a PNG with Darkroom's parameters (steps 1 at 64x64)
    folder: Path
    fifo: Path
    missing: Path
    made: int = 0  # files made for examples so far


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory, tiny_model):
    """A home with the tiny model, files of every kind to point options at, and a Budget around every engine
    `darkroom generate` builds."""
    import importlib
    import shutil

    from darkroom.metadata.images import encode_png

    generate_module = importlib.import_module("darkroom.cli.generate")  # the package's `generate` is the command

    root = tmp_path_factory.mktemp("fuzz-cli")
    home = Home(root / "home").ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    files = Files(root, root / "plain.png", root / "params.png", root / "folder", root / "pipe.png", root / "gone.png")
    files.png.write_bytes(IMAGE_64)
    files.params_png.write_bytes(encode_png(Image.new("RGB", (64, 64)), "a cat\nSteps: 1, Sampler: Euler, CFG scale: 7,"
                                            " Seed: 1, Size: 64x64, Model: tiny-sd1"))
    files.folder.mkdir()
    os.mkfifo(files.fifo)
    budgets: list[Budget] = []
    real_engine = generate_module._engine

    def engine_with_budget(*args, **kwargs):
        engine = real_engine(*args, **kwargs)
        budgets.append(Budget(engine))
        return engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate_module, "_engine", engine_with_budget)
        mp.chdir(root)  # a relative path the fuzz makes up (`-o -W`) lands here, not in the checkout
        yield home, files, budgets


def run_cli(home: Home, *args: str):
    """`darkroom --home HOME ARGS` in process under the hang guard; the log handlers it adds are closed."""
    from darkroom.cli import cli

    logger = logging.getLogger("darkroom")
    before = list(logger.handlers)
    try:
        return guarded(CliRunner().invoke, cli, ["--home", str(home.root), *args])
    finally:
        for handler in logger.handlers[:]:
            if handler not in before:
                logger.removeHandler(handler)
                handler.close()


def check_cli(r, args, *, interrupted_ok: bool = False, no_parameters_ok: bool = False):
    """Exit 0, or non-zero with the last stderr line an `error: ...` (or click's usage error, exit 2); no traceback."""
    command = " ".join(a[:80] for a in args)[:1500]
    shown = f"darkroom {command}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        import traceback

        trace = "".join(traceback.format_exception(r.exception))
        raise AssertionError(f"crashed with {type(r.exception).__name__}: {shown}\n{trace}")
    assert "Traceback (most recent call last)" not in r.output, shown
    if r.exit_code == 0:
        return
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if r.exit_code == 2 and (last.startswith("Error: ") or "Usage:" in r.stderr):
        return  # click's own usage error
    if interrupted_ok and r.exit_code == 130:
        return
    if no_parameters_ok and r.exit_code == 1 and "no generation parameters found" in r.stdout:
        return
    assert last.startswith("error: "), f"exit {r.exit_code} without an 'error: ' line: {shown}"
    assert len(last) > len("error: ") + 3, shown


SPECIAL_PATHS = ("folder", "fifo", "missing", "empty", "devnull", "long", "under-a-file")
# (no path with a NUL character: an operating system's argv cannot carry one)


@st.composite
def cli_paths(draw, files: Files, usual: str) -> str:
    """A path for an option: mostly `usual` ("image": a file of random image bytes, "params": a PNG with a
    random infotext, "out": a new folder), sometimes one that is not what the option reads."""
    kind = draw(mostly(st.just(usual), st.sampled_from(("image", "params", "plain", *SPECIAL_PATHS)), 4))
    files.made += 1
    fresh = files.root / f"made-{files.made}"
    if kind == "image":
        fresh.write_bytes(draw(some_images))
        return str(fresh)
    if kind == "params":
        from darkroom.metadata.images import encode_png

        fresh.write_bytes(encode_png(Image.new("RGB", (64, 64)), draw(infotexts()).encode("utf-8", "replace")
                                     .decode("utf-8")) if draw(st.booleans()) else draw(pngs_with_text()))
        return str(fresh)
    if kind == "out":
        return str(fresh)
    if kind == "empty":
        fresh.write_bytes(b"")
        return str(fresh)
    return {"plain": str(files.png), "folder": str(files.folder), "fifo": str(files.fifo),
            "missing": str(files.missing), "devnull": "/dev/null", "long": str(files.root / ("x" * 300)),
            "under-a-file": str(files.png / "out")}[kind]


CLI_VALUES = {
    "-n": with_wrong(st.integers(1, 2)), "-b": with_wrong(st.integers(1, 2)),
    "--cfg": with_wrong(st.floats(0, 20)), "--schedule": schedules, "--seed": GENERATION_FIELDS["seed"],
    "--clip-skip": with_wrong(st.integers(1, 12)), "-m": models_, "-d": with_wrong(st.floats(0, 1)),
    "--resize-mode": with_wrong(st.sampled_from(("just-resize", "crop", "fill"))),
    "--mask-blur": with_wrong(st.integers(0, 64)),
    "--masked-content": with_wrong(st.sampled_from(("fill", "original", "latent-noise", "latent-nothing"))),
    "--only-masked-padding": with_wrong(st.integers(0, 64)), "--hr-scale": with_wrong(st.floats(1, 2)),
    "--hr-upscaler": GENERATION_FIELDS["hr_upscaler"], "--hr-steps": with_wrong(st.integers(0, 3)),
    "--hr-size": with_wrong(st.sampled_from(("128x128", "64x64", "axb", "1x2x3", "9" * 5000 + "x8", "x", "64X64"))),
    "--vae": GENERATION_FIELDS["vae"], "--subseed": GENERATION_FIELDS["subseed"],
    "--subseed-strength": with_wrong(st.floats(0, 1)), "--x": axes, "--y": axes,
    "--device": with_wrong(st.sampled_from(("cpu", "auto", "cuda", "cuda:7", "mps", "garbage", ""))),
    "--precision": with_wrong(st.sampled_from(("fp32", "auto", "fp16", "bf16", "fp8", ""))),
}
CLI_FLAGS = ("--only-masked", "--invert-mask", "--hires", "--allow-pickle", "--v-pred", "--no-v-pred")
CLI_PATHS = {"-o": "out", "--from-png": "params", "-i": "image", "--mask": "image"}


def arg_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


@st.composite
def generate_args(draw, files: Files) -> list[str]:
    args = ["generate"]
    if draw(one_in(10)) is False:
        args.append(arg_text(draw(prompts)))
    core = {"--steps": st.integers(1, 3), "-W": sides, "-H": sides, "--sampler": samplers_, "-m": st.just("tiny-sd1"),
            "--device": st.just("cpu"), "--precision": st.just("fp32")}
    for option, strategy in core.items():
        if draw(one_in(10)) is False:
            args += [option, arg_text(draw(strategy))]
    for option in draw(st.lists(st.sampled_from(sorted(CLI_VALUES)), unique=True, max_size=4)):
        value = draw(CLI_VALUES[option])
        if value is not None:
            args += [option, arg_text(value)]
    args += draw(st.lists(st.sampled_from(CLI_FLAGS), unique=True, max_size=2))
    for option in draw(st.lists(st.sampled_from(sorted(CLI_PATHS)), unique=True, max_size=2)):
        args += [option, draw(cli_paths(files, CLI_PATHS[option]))]
    if draw(one_in(20)):
        args.insert(draw(st.integers(1, len(args))), draw(st.sampled_from(("--bogus", "-", "--", "-W", "--steps="))))
    return args
