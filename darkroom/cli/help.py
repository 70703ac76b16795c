"""`darkroom help [CODE]`: the troubleshooting page of an error code, from the package (no network)."""

from __future__ import annotations

import sys

import click


@click.command("help")
@click.argument("code", required=False)
def help_command(code: str | None) -> None:
    """Explain an error code (DR-...: cause, fix, related commands); without one, list every code.

    Error messages end with their code, e.g. [DR-MODEL-NOT-FOUND]. The pages ship with Darkroom
    and work offline; `darkroom serve` shows them at /docs too.
    """
    from darkroom import help as pages

    if code is None:
        click.echo(pages.index_text())
        return
    text = pages.page(code)
    if text is None:
        click.echo(f"error: no help page for {code!r}; the known codes are:", err=True)
        width = max(map(len, pages.codes()))
        click.echo("\n".join(f"  {c:<{width}}  {pages.title(c)}" for c in pages.codes()), err=True)
        sys.exit(2)
    click.echo(text.rstrip("\n"))
