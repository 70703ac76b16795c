"""`darkroom styles`: the prompt styles of the webui's styles.csv (list, add or change, delete).

The files are the home's `styles.csv` and those of the A1111/Forge installs given with
--models-dir, read and written in place as the webui does (darkroom/text/styles.py).
"""

from __future__ import annotations

import json

import click

from darkroom.cli.group import Context, user_errors


def _library(obj: Context):
    from darkroom.text.styles import StyleLibrary

    return StyleLibrary(obj.home)


@click.group("styles", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the styles as JSON (name, prompt, negative_prompt, ...).")
@click.pass_context
@user_errors
def styles_group(ctx: click.Context, as_json: bool) -> None:
    """List the prompt styles for `darkroom generate --style NAME` (and the files they come from)."""
    if ctx.invoked_subcommand is not None:
        return
    library = _library(ctx.obj)
    found = library.styles()
    if as_json:
        click.echo(json.dumps([{**s.as_a1111(), "description": s.description, "file": str(s.path)}
                               for s in found.values()], indent=2, ensure_ascii=False))
        return
    for style in found.values():
        parts = [f"prompt: {style.prompt}" if style.prompt else "",
                 f"negative: {style.negative_prompt}" if style.negative_prompt else ""]
        click.echo(f"{style.name}  ({'; '.join(p for p in parts if p) or 'empty'})")
    files = [str(p) for p in library.files() if p.exists()]
    click.echo(f"{len(found)} style(s) from {', '.join(files) or 'no styles file yet'}", err=True)


@styles_group.command("add")
@click.argument("name")
@click.argument("prompt", default="")
@click.option("-N", "--negative", "negative_prompt", default="", help="The style's negative prompt.")
@click.option("--description", default="", help="A note kept in a 'description' column.")
@click.pass_obj
@user_errors
def add(obj: Context, name: str, prompt: str, negative_prompt: str, description: str) -> None:
    """Add style NAME, or change it where it is. `{prompt}` in PROMPT marks where the user's prompt goes;
    without it the style is appended after a comma."""
    from darkroom.text.styles import Style

    path = _library(obj).save(Style(name, prompt, negative_prompt, description))
    click.echo(f"saved style {name!r} in {path}")


@styles_group.command("delete")
@click.argument("name")
@click.pass_obj
@user_errors
def delete(obj: Context, name: str) -> None:
    """Delete style NAME from every styles file that has it."""
    for path in _library(obj).delete(name):
        click.echo(f"deleted style {name!r} from {path}")
