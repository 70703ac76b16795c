"""`darkroom models ...`: list, info, import, export, verify, rescan (the work is in darkroom.services.model_manager
and, for export, darkroom.services.model_export)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from darkroom.cli.group import Context, user_errors
from darkroom.services.model_manager import KIND_SPECS, KINDS, ImportStopped, Progress, human_size, human_time

KIND_CHOICE = click.Choice(list(KINDS))
BAR_MIN_BYTES = 64 << 20
"""Reads shorter than this finish before a progress bar would tell anything."""


class _Bar(Progress):
    """A tqdm bar over bytes on stderr, for reads big enough to wait for."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, total: int, label: str) -> None:
        self.finish()
        if total >= BAR_MIN_BYTES:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr,
                            dynamic_ncols=True, mininterval=0.2, leave=False)

    def label(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text, refresh=False)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _manager(obj: Context):
    from darkroom.services.model_manager import ModelManager

    return ModelManager(obj.home)


def _dump(data) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


@click.group("models", invoke_without_command=True)
@click.pass_context
def models_group(ctx: click.Context) -> None:
    """The model library: checkpoints, LoRAs, VAEs and embeddings (`darkroom models` alone lists them)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_cmd)


@models_group.command("list", short_help="List model files by kind: family, size, short hash.")
@click.option("--kind", "kinds", type=KIND_CHOICE, multiple=True, help="Only this kind (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (hashes: null when not computed yet).")
@click.pass_obj
@user_errors
def list_cmd(obj: Context, kinds: tuple[str, ...], as_json: bool) -> None:
    """List every model file by kind: name, family or base model, size, short hash (instant: hashes
    not computed yet show as '-'; `darkroom models rescan` computes them)."""
    manager = _manager(obj)
    files = manager.files(kinds or None)
    if as_json:
        _dump([f.to_dict() for f in files])
        return
    if not files:
        where = ", ".join(str(d) for k in (kinds or KINDS) for d in manager.folders(k))
        click.echo(f"No models found in {where}. Copy .safetensors files there, `darkroom models import` them,"
                   " or use --models-dir.")
        return
    name_w = max(len(f.name) for f in files)
    name_w = max(name_w, *(len(KIND_SPECS[f.kind].title) + 6 for f in files))
    fam_w = min(max(len("FAMILY"), *(len(f.family) for f in files)), 30)
    for kind in KINDS:
        group = [f for f in files if f.kind == kind]
        if not group:
            continue
        title = f"{KIND_SPECS[kind].title} ({len(group)})"
        click.echo(f"{title:<{name_w}}  {'FAMILY':<{fam_w}} {'SIZE':>9}  {'HASH':<10}  PATH")
        for f in group:
            family = f.family if len(f.family) <= fam_w else f.family[: fam_w - 1] + "…"
            click.echo(f"{f.name:<{name_w}}  {family:<{fam_w}} {human_size(f.size):>9}  {f.short_hash or '-':<10}"
                       f"  {f.path}")
    for f in files:
        if f.note:
            click.echo(f"note: {f.note}", err=True)
    todo = [f for f in files if f.sha256 is None and f.hash_target is not None]
    if todo:
        size = sum(f.size for f in todo)
        click.echo(f"{len(todo)} file{'s' if len(todo) != 1 else ''} ({human_size(size)}) not hashed yet: run"
                   f" `darkroom models rescan` to hash {'them' if len(todo) != 1 else 'it'}", err=True)


def _meta_value(value: str) -> str:
    text = value.strip()
    if text[:1] in "{[":
        try:
            text = json.dumps(json.loads(text), ensure_ascii=False)
        except ValueError:
            pass
    text = " ".join(text.split())
    from darkroom.services.model_manager import MAX_META_VALUE

    if len(text) > MAX_META_VALUE:
        text = f"{text[:MAX_META_VALUE]}… ({len(value)} characters)"
    return text


@models_group.command("info", short_help="Show a model's family, precision, hashes, metadata.")
@click.argument("name_or_path")
@click.option("--kind", type=KIND_CHOICE, default=None, help="Look only among this kind.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (metadata in full).")
@click.pass_obj
@user_errors
def info_cmd(obj: Context, name_or_path: str, kind: str | None, as_json: bool) -> None:
    """Show what a model file is: kind, family, precision, size, SHA-256 and short hash (hashed now if
    needed), its metadata; for LoRAs base model, rank/alpha and trigger words; a preview beside it."""
    info = _manager(obj).info(name_or_path, kind=kind, progress=_Bar())
    data = info.to_dict()
    if as_json:
        _dump(data)
        return
    rows: list[tuple[str, str]] = [("name", data["name"]), ("kind", data["kind"]), ("family", data["family"])]
    if data["error"]:
        rows.append(("error", data["error"]))
    if data["precision"]:
        shares = sorted(((k, v) for k, v in data["dtypes"].items() if v >= 0.005), key=lambda kv: -kv[1])
        extra = "" if len(shares) < 2 else " (" + ", ".join(f"{k} {v:.0%}" for k, v in shares) + " of the bytes)"
        rows.append(("precision", data["precision"] + extra))
    rows.append(("size", f"{data['size_human']} ({data['size']:,} bytes)"))
    if data["parameters"] is not None:
        rows.append(("parameters", f"{data['parameters'] / 1e6:,.1f} M in {data['tensors']:,} tensors"))
    if data["native_size"]:
        rows.append(("native size", f"{data['native_size']} px"))
    if data["sha256"]:
        rows += [("SHA-256", data["sha256"]), ("short hash", f"{data['short_hash']} (AutoV2, as CivitAI shows it)")]
    rows.append(("path", data["path"]))
    rows.append(("preview", data["preview"] or "none"))
    lora = data["lora"]
    if lora:
        base = lora["base"] or "unknown"
        rows.append(("base model", base + (f" ({lora['base_evidence']})" if lora["base_evidence"] else "")))
        alpha = "none (scale 1)" if lora["alpha"] is None else str(lora["alpha"])
        rows.append(("rank / alpha", f"{lora['rank'] if lora['rank'] is not None else '?'} / {alpha}"))
        if lora["network"]:
            rows.append(("network", lora["network"]))
        if lora["alias"]:
            rows.append(("alias", lora["alias"]))
        rows.append(("trigger words", ", ".join(lora["trigger_words"]) or "none recorded"))
    if data["note"]:
        rows.append(("note", data["note"]))
    card = data["card"]
    rows += _card_rows(card)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    for problem in card["problems"]:
        click.echo(f"note: {problem}", err=True)
    meta = data["metadata"]
    click.echo(f"metadata ({len(meta)} key{'s' if len(meta) != 1 else ''})" + (":" if meta else ""))
    for key in sorted(meta):
        click.echo(f"  {key}: {_meta_value(meta[key])}")


CARD_ROWS = (("title", "title"), ("description", "description"), ("activation_text", "activation text"),
             ("negative_text", "negative text"), ("preferred_weight", "preferred weight"),
             ("base_model", "card base model"), ("notes", "notes"))


def _card_rows(card: dict) -> list[tuple[str, str]]:
    """The model card's lines for `info` (long texts on one line, shortened as metadata values are)."""
    if not card["sources"]:
        return [("card", "none (no NAME.json or NAME.civitai.info beside it)")]
    rows = [("card", ", ".join(card["sources"]))]
    rows += [(label, _meta_value(str(card[key]))) for key, label in CARD_ROWS if card[key] is not None]
    return rows


@models_group.command("import", short_help="Copy model files in by kind, checked by SHA-256.")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--kind", type=click.Choice(["auto", *KINDS]), default="auto", show_default=True,
              help="What the files are; auto reads each file's header.")
@click.option("--allow-pickle", is_flag=True,
              help="Also import .ckpt/.pt/.pth/.bin pickles (kind guessed from folder, name and size, or --kind).")
@click.option("--rename", is_flag=True,
              help="When a different file already has the name, import as NAME-2 (nothing is ever overwritten).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@user_errors
def import_cmd(obj: Context, sources: tuple[Path, ...], kind: str, allow_pickle: bool, rename: bool,
               as_json: bool) -> None:
    """Copy model files (or every model file in folders, e.g. a USB drive) into the home's folders by kind.

    Each copy is written beside its destination as a hidden .part file, synced, re-read and checked
    against the source's SHA-256, then given its name: an interrupted import leaves no half file.
    """
    t0 = time.monotonic()
    try:
        outcomes = _manager(obj).import_paths(sources, kind=kind, allow_pickle=allow_pickle, rename=rename,
                                              progress=_Bar())
    except ImportStopped as e:  # a full or read-only folder, a drive pulled out: say what got in, then why not
        if e.outcomes:
            _print_imports(e.outcomes, as_json, t0)
        raise
    _print_imports(outcomes, as_json, t0)
    if any(o.status in ("refused", "failed") for o in outcomes):
        sys.exit(1)


def _print_imports(outcomes, as_json: bool, t0: float) -> None:
    if as_json:
        _dump([o.to_dict() for o in outcomes])
    else:
        for o in outcomes:
            if o.status == "imported":
                click.echo(f"imported {o.kind}: {o.source} -> {o.dest} (SHA-256 {o.sha256[:10]} checked)"
                           + (f"; {o.note}" if o.note else ""))
                for side in o.sidecars:
                    click.echo(f"  with {side.name}")
            elif o.status == "already there":
                click.echo(f"already there: {o.source} is {o.dest} (same SHA-256 {o.sha256[:10]})")
            else:
                click.echo(f"{o.status}: {o.source}: {o.reason}", err=True)
        removed = sum(o.removed_parts for o in outcomes)
        if removed:
            click.echo(f"removed {removed} leftover .part file{'s' if removed != 1 else ''} of interrupted imports",
                       err=True)
        done = [o for o in outcomes if o.status == "imported"]
        counts = {s: sum(o.status == s for o in outcomes) for s in ("already there", "refused", "failed")}
        size = sum(o.dest.stat().st_size for o in done if o.dest and o.dest.exists())
        parts = [f"imported {len(done)} ({human_size(size)})"] + [f"{n} {s}" for s, n in counts.items() if n]
        click.echo(", ".join(parts) + f" in {human_time(time.monotonic() - t0)}")


@models_group.command("export", short_help="Copy models with their previews and cards to a drive, checked.")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.argument("names", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@user_errors
def export_cmd(obj: Context, dest: Path, names: tuple[str, ...], as_json: bool) -> None:
    """Copy the models NAMES (names, short hashes or paths, as `info` takes them) to DEST, a USB drive
    say, with the previews, .yaml and model cards (NAME.json, NAME.civitai.info) beside them.

    Each goes to DEST/<kind folder>/, written by the same verified copy as `import` (re-read from
    the drive and checked by SHA-256), and DEST/SHA256SUMS lists every file: `darkroom models import
    DEST` on the other machine checks them against it. Names that differ only in letter case are
    refused before anything is copied (FAT and exFAT drives keep them as one file); nothing is
    overwritten."""
    from darkroom.services.model_export import export_models

    t0 = time.monotonic()
    outcomes = export_models(_manager(obj), dest, names, progress=_Bar())
    if as_json:
        _dump([o.to_dict() for o in outcomes])
    else:
        for o in outcomes:
            if o.status == "refused":
                click.echo(f"refused: {o.name}: {o.reason}", err=True)
                continue
            verb = "exported" if o.status == "exported" else "already there:"
            click.echo(f"{verb} {o.kind} {o.name} -> {o.dest} (SHA-256 {o.sha256[:10]})")
            for side in o.sidecars:
                click.echo(f"  with {side.name}")
            for note in o.notes:
                click.echo(f"note: {note}", err=True)
        done = [o for o in outcomes if o.status != "refused"]
        size = sum(o.source.stat().st_size for o in done if o.status == "exported")
        click.echo(f"exported {sum(o.status == 'exported' for o in outcomes)} ({human_size(size)}), "
                   f"{sum(o.status == 'already there' for o in outcomes)} already there in "
                   f"{human_time(time.monotonic() - t0)}; {dest / 'SHA256SUMS'} lists them for"
                   f" `darkroom models import {dest}`")
    if any(o.status == "refused" for o in outcomes):
        sys.exit(1)


@models_group.command("verify", short_help="Rehash files; report changed or rotted ones.")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
@user_errors
def verify_cmd(obj: Context, names: tuple[str, ...], as_json: bool) -> None:
    """Rehash model files from disk (all, or NAMES) and compare with the hashes recorded when they were
    indexed: OK, CHANGED (edited since), ROTTED (contents changed, size and date did not), NEW, MISSING.
    Exits with 1 when any file changed or rotted."""
    t0 = time.monotonic()
    outcomes = _manager(obj).verify(names, progress=_Bar())
    if as_json:
        _dump([o.to_dict() for o in outcomes])
    else:
        for o in outcomes:
            line = f"{o.status:<8} {o.kind or '?':<10} {o.name}"
            click.echo(line + (f": {o.detail}" if o.detail else ""), err=o.status in ("CHANGED", "ROTTED"))
        counts = {s: sum(o.status == s for o in outcomes) for s in ("OK", "CHANGED", "ROTTED", "NEW", "MISSING")}
        size = sum(o.path.stat().st_size for o in outcomes if o.sha256 and o.path.is_file())
        click.echo(", ".join(f"{n} {s if s == 'OK' else s.lower()}" for s, n in counts.items() if n or s == "OK")
                   + f" ({human_size(size)} read in {human_time(time.monotonic() - t0)})")
    if any(o.status in ("CHANGED", "ROTTED") for o in outcomes):
        sys.exit(1)


@models_group.command("rescan", short_help="Hash the files not hashed yet.")
@click.pass_obj
@user_errors
def rescan_cmd(obj: Context) -> None:
    """Hash every model file not hashed yet (so `darkroom models list` shows all hashes at once) and
    forget the records of files that are gone."""
    s = _manager(obj).rescan(progress=_Bar())
    for path, reason in s.failed:
        click.echo(f"could not read {path}: {reason}", err=True)
    line = (f"hashed {s.hashed} file{'s' if s.hashed != 1 else ''} ({human_size(s.bytes)}) in {human_time(s.seconds)};"
            f" {s.already} already hashed")
    if s.forgotten:
        line += f"; forgot {s.forgotten} file{'s' if s.forgotten != 1 else ''} that are gone"
    click.echo(line)
    if s.failed:
        sys.exit(1)
