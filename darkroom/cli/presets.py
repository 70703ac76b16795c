"""`darkroom presets`: the few-step presets (LCM, Turbo, Lightning, Hyper-SD, DMD2, TCD) and their settings."""

from __future__ import annotations

import click


@click.command()
@click.option("--detect", "detect_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also say which preset `--preset auto` picks for this checkpoint or LoRA file.")
def presets(detect_path: str | None) -> None:
    """List the few-step presets for `darkroom generate --preset NAME` (docs/few-step.md)."""
    from darkroom.engine.presets import PRESETS, detect_preset

    for p in PRESETS:
        click.echo(f"{p.name:<10} {p.sampler:<8} {p.schedule:<12} {p.steps:>2} steps  CFG {p.cfg_scale:<4g}"
                   f" {p.description}")
    click.echo("auto       detected from the checkpoint's and LoRAs' metadata or names (the CLI's default)")
    if detect_path is not None:
        found = detect_preset(detect_path)
        click.echo(f"{detect_path}: {found or 'no few-step preset detected'}")
