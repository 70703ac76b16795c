"""The `darkroom` command: a thin layer over the library API (no generation logic here).

This is the entry module: it puts the command modules' commands on the group from
darkroom.cli.group. Each command group lives in its own module, which imports the group
module, never this one.
"""

from __future__ import annotations

from darkroom.cli.backup import backup, restore, verify
from darkroom.cli.bundle import bundle_group
from darkroom.cli.controlnet import controlnet_group
from darkroom.cli.doctor import doctor
from darkroom.cli.generate import generate
from darkroom.cli.group import cli
from darkroom.cli.help import help_command
from darkroom.cli.info import png_info, samplers
from darkroom.cli.models import models_group
from darkroom.cli.presets import presets
from darkroom.cli.serve import serve
from darkroom.cli.styles import styles_group
from darkroom.cli.upscale import upscale

for _command in (generate, png_info, samplers, presets, serve, backup, restore, verify, doctor):
    cli.add_command(_command)
cli.add_command(models_group, "models")
cli.add_command(bundle_group, "bundle")
cli.add_command(upscale)
cli.add_command(styles_group, "styles")
cli.add_command(controlnet_group, "controlnet")
cli.add_command(help_command, "help")

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="darkroom")
