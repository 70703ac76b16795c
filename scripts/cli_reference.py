"""Write docs/cli.md from the CLI's own --help texts (a test checks it is up to date).

Usage: .venv/bin/python scripts/cli_reference.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from darkroom.cli import cli

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def render() -> str:
    runner = CliRunner()
    parts = ["# darkroom CLI reference\n", "Generated from `darkroom --help` by `scripts/cli_reference.py`.\n"]
    import click

    commands: list[list[str]] = [[]]
    for name in sorted(cli.commands):
        commands.append([name])
        group = cli.commands[name]
        if isinstance(group, click.Group):  # `models list`, `bundle create`, ...
            commands += [[name, sub] for sub in sorted(group.commands)]
    for cmd in commands:
        result = runner.invoke(cli, [*cmd, "--help"], prog_name="darkroom", terminal_width=100)
        title = " ".join(["darkroom", *cmd])
        parts.append(f"## `{title}`\n\n```\n{result.output.rstrip()}\n```\n")
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
