"""The `darkroom` click group and what every command module shares: the per-invocation Context
and the one-line rendering of user mistakes. Command modules import this module; the entry
module (darkroom.cli) imports them, so nothing imports back up.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

import darkroom
from darkroom.errors import DarkroomError, InvalidRequest
from darkroom.home import Home
from darkroom.offline import guard as offline

log = logging.getLogger("darkroom")


def warn(message: str) -> None:
    """A problem Darkroom works around (no log file, no home folders): said on stderr, never fatal."""
    click.echo(f"warning: {message}", err=True)


class LogFile(logging.FileHandler):
    """<home>/logs/darkroom.log. Logging never stops Darkroom: a write that fails (full disk, read-only
    home) warns once on stderr and turns the file off, instead of logging's traceback per record."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.broken = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.broken:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if not self.broken:
            self.broken = True
            warn(f"cannot write the log file {self.baseFilename} ({_reason(sys.exc_info()[1])}); going on"
                 " without it")


def _reason(error: BaseException | None) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


class Context:
    """Objects built once per invocation and passed down (no globals)."""

    def __init__(self, home: Home):
        self.home = home

    def setup_logging(self) -> None:
        """Log to <home>/logs/darkroom.log; a home where it cannot be written (read-only) warns and goes on."""
        log.setLevel(logging.INFO)
        path = self.home.logs / "darkroom.log"
        try:
            self.home.logs.mkdir(parents=True, exist_ok=True)
            handler: logging.Handler = LogFile(path)
        except OSError as e:
            warn(f"cannot write the log file {path} ({_reason(e)}); going on without it")
            handler = logging.NullHandler()  # not logging's last resort, which would repeat errors on stderr
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)


def user_errors(fn):
    """Render user mistakes as one line on stderr with a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except DarkroomError as e:
            log.error("%s [%s]", e, e.code)
            click.echo(f"error: {e}{help_note(e.code)}", err=True)
            sys.exit(2 if isinstance(e, darkroom.errors.InvalidRequest) else 1)
        except ValidationError as e:
            msgs = [_validation_line(err) for err in e.errors()]
            log.error("invalid request: %s", "; ".join(msgs))
            click.echo(f"error: invalid request: {'; '.join(msgs)}{help_note(InvalidRequest.code)}", err=True)
            sys.exit(2)

    return wrapper


def help_note(code: str) -> str:
    """What the one-line error ends with: its code and the command that explains it (darkroom/help)."""
    return f" [{code}] (darkroom help {code})"


def _validation_line(err) -> str:
    """`width: ...` for a field's error; a check across fields (seed and batch size) names them itself."""
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {msg}" if loc else msg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="DARKROOM_HOME",
              help="Folder holding all Darkroom state (default: $DARKROOM_HOME, else the per-user data folder).")
@click.option("--models-dir", "models_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Extra models folder used in place (an AUTOMATIC1111/Forge or ComfyUI root, or a plain folder);"
                   " repeatable. Folders listed under \"models_dirs\" in <home>/settings.json are always used.")
@click.version_option(darkroom.__version__, prog_name="darkroom")
@click.pass_context
def cli(ctx: click.Context, home: Path | None, models_dirs: tuple[Path, ...]) -> None:
    """Darkroom: private, offline Stable Diffusion. Never opens an outbound connection."""
    from darkroom.settings import Settings

    h = Home.resolve(home)
    if not any(isinstance(x, logging.NullHandler) for x in log.handlers):
        log.addHandler(logging.NullHandler())  # until the log file is set up, problems reach the terminal by warn()
    settings = Settings(h.root / "settings.json")
    for problem in settings.problems:
        warn(problem)
    saved = settings.get("models_dirs") or []
    h.extra_model_dirs = list(dict.fromkeys(Path(p).expanduser().resolve() for p in [*models_dirs, *saved]))
    try:
        h.ensure()
    except OSError as e:  # a read-only home: listing models and generating elsewhere (-o) still work
        warn(f"cannot create the folders of {h.root} ({_reason(e)}); going on with what is there")
    offline.process_guard(h.network_log)
    obj = Context(h)
    obj.setup_logging()
    ctx.obj = obj



def _compile_option(ctx, param, value):
    """`--compile` is read where the engine is built (darkroom.api.compile_mode), through the same variable a
    user can set for a server started elsewhere."""
    if value is not None:
        os.environ["DARKROOM_COMPILE"] = value
    return value


def vram_options(command):
    """`--vram MODE|BUDGET` (env DARKROOM_VRAM), the webui's `--medvram`/`--lowvram` and `--fp8` (env
    DARKROOM_FP8): how the model is placed on a GPU (darkroom/engine/placement.py, docs/gpu.md). The
    command receives `vram` (None: auto) and `fp8`."""
    options = [
        click.option("--vram", default=None, envvar="DARKROOM_VRAM", metavar="MODE",
                     help="GPU memory: auto (from the free VRAM), high, medium, low, or a budget such as 4GB"
                          " (docs/gpu.md)."),
        click.option("--medvram", "vram", flag_value="medium",
                     help="Same as --vram medium: one model component on the GPU at a time."),
        click.option("--lowvram", "vram", flag_value="low",
                     help="Same as --vram low: the UNet's blocks streamed through the GPU, tiled VAE."),
        click.option("--fp8", is_flag=True, envvar="DARKROOM_FP8",
                     help="Store the UNet's weights as fp8 (half the VRAM; computed in fp16/bf16)."),
        click.option("--compile", type=click.Choice(["off", "unet"]), default=None, expose_value=False,
                     callback=_compile_option, metavar="MODE",
                     help="torch.compile the UNet on the CPU: unet (about 1.09x faster steps after a one-minute"
                          " compile per image size, cached in the home) or off. Default: the torch_compile"
                          " setting (off); also $DARKROOM_COMPILE."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
