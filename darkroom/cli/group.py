"""The `darkroom` click group and what every command module shares: the per-invocation Context
and the one-line rendering of user mistakes. Command modules import this module; the entry
module (darkroom.cli) imports them, so nothing imports back up.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

import darkroom
from darkroom.errors import DarkroomError
from darkroom.home import Home
from darkroom.offline import guard as offline

log = logging.getLogger("darkroom")


class Context:
    """Objects built once per invocation and passed down (no globals)."""

    def __init__(self, home: Home):
        self.home = home

    def setup_logging(self) -> None:
        self.home.logs.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.home.logs / "darkroom.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def user_errors(fn):
    """Render user mistakes as one line on stderr with a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        try:
            return fn(*args, **kwargs)
        except DarkroomError as e:
            log.error("%s", e)
            click.echo(f"error: {e}", err=True)
            sys.exit(2 if isinstance(e, darkroom.errors.InvalidRequest) else 1)
        except ValidationError as e:
            msgs = [f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg'].removeprefix('Value error, ')}"
                    for err in e.errors()]
            log.error("invalid request: %s", "; ".join(msgs))
            click.echo(f"error: invalid request: {'; '.join(msgs)}", err=True)
            sys.exit(2)

    return wrapper


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
    saved = Settings(h.root / "settings.json").get("models_dirs") or []
    h.extra_model_dirs = list(dict.fromkeys(Path(p).expanduser().resolve() for p in [*models_dirs, *saved]))
    h.ensure()
    offline.process_guard(h.network_log)
    obj = Context(h)
    obj.setup_logging()
    ctx.obj = obj

