"""`darkroom png-info` and `darkroom samplers`: print what an image or the sampler table holds."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from darkroom.cli.group import user_errors


@click.command("png-info")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@user_errors
def png_info(files: tuple[Path, ...]) -> None:
    """Print the generation parameters stored in images (Darkroom, A1111, Forge, ComfyUI, sd.cpp)."""
    from darkroom.metadata.images import describe, read_image_metadata

    status = 0
    for i, f in enumerate(files):
        if len(files) > 1:
            click.echo(("\n" if i else "") + f"== {f}")
        meta = read_image_metadata(f)
        click.echo(describe(meta, str(f)))
        status = status or (0 if meta.parameters else 1)
    sys.exit(status)


@click.command()
def samplers() -> None:
    """List the samplers and the schedule types each accepts."""
    from darkroom.engine.samplers import ALL_SCHEDULES, SAMPLERS

    for s in SAMPLERS:
        accepted = "all schedule types" if s.schedules == ALL_SCHEDULES else ", ".join(s.schedules)
        click.echo(f"{s.name:<14} schedules: Automatic (= {s.default_schedule}), {accepted}")
    click.echo(f"\nAll schedule types: {', '.join(ALL_SCHEDULES)}")

