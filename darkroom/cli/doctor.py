"""`darkroom doctor`: offline readiness, and with `--prove-offline` the proof run (darkroom.offline.proof)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from darkroom.cli.group import user_errors


@click.command()
@click.option("--device", default=None, help="Device to report and to prove on: auto (default), cpu, cuda, mps.")
@click.option("--precision", default=None, help="auto (default), fp32, fp16, bf16.")
@click.option("--deep", is_flag=True,
              help="Also load every checkpoint fully on the CPU (reads all weights: slow for big models).")
@click.option("--prove-offline", is_flag=True,
              help="Generate an image and do a web-server round trip in a child process with no network"
                   " (unshare -n where possible, else the in-process guard) and report every connection"
                   " attempted and every file read outside Darkroom and Python. Exit 0: no outbound"
                   " attempt; 1: an attempt was seen; 2: the proof did not complete.")
@click.option("-m", "--model", default=None,
              help="Checkpoint for --prove-offline (default: the selected one, else the first, else the starter).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--report", "report_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a diagnostics file to carry to a connected machine (JSON if it ends in .json, else"
                   " text): versions, device, settings, model names and families, the checks, the end of the log"
                   " and the network guard's record, with your home folder, user name, paths and prompts left out.")
@click.pass_obj
@user_errors
def doctor(obj, device, precision, deep, prove_offline, model, as_json, report_file) -> None:
    """Check offline readiness: models, tokenizer, configs, offline switches, the network guard and its record."""
    from darkroom.offline import proof as prove
    from darkroom.offline import readiness

    ready = readiness.readiness(obj.home, device=device, precision=precision, deep=deep)
    if report_file is not None:
        from darkroom.offline import report

        report.write_report(report_file, report.build_report(obj.home, ready))
        click.echo(f"Diagnostics written to {report_file} (read it before you share it)", err=True)
    if not prove_offline:
        click.echo(json.dumps(ready, indent=2) if as_json else readiness.render_readiness(ready))
        sys.exit(0 if ready["ok"] else 1)
    if not as_json:
        click.echo(readiness.render_readiness(ready))
        click.echo("")
    ns_ok, why = prove.namespace_available()
    click.echo("Proving offline operation in a child process "
               + ("with no network (unshare -n)..." if ns_ok else f"guarded in-process only ({why})..."), err=True)
    report = prove.prove_offline(obj.home, model=model, device=device, precision=precision)
    click.echo(json.dumps({"readiness": ready, "proof": report}, indent=2) if as_json else prove.render_proof(report))
    sys.exit(prove.exit_code(report))
