"""`darkroom backup`, `restore` and `verify`: thin click commands over darkroom.carry.backup."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from darkroom.carry.backup import backup_home, human_bytes, restore_home, verify_backup
from darkroom.cli.group import Context, user_errors
from darkroom.errors import DarkroomError


class _Bar:
    """A tqdm bar in bytes on stderr, made when the total is known."""

    def __init__(self):
        self.bar = None

    def start(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, dynamic_ncols=True,
                        file=sys.stderr, mininterval=0.2, leave=False)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command()
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--models/--no-models", default=False, show_default=True,
              help="Also back up the models folders (often many GB; unchanged files are never copied twice).")
@click.option("--outputs/--no-outputs", default=True, show_default=True, help="Back up the outputs folder.")
@click.pass_obj
@user_errors
def backup(obj: Context, dest: Path, models: bool, outputs: bool) -> None:
    """Snapshot settings, history (a consistent SQLite copy, img2img sources), outputs, optionally models into DEST.

    Incremental: files are stored once by content under DEST/objects, each backup adds a
    snapshot under DEST/snapshots/<time>/. Interrupting a backup never harms earlier ones.
    """
    r = backup_home(obj.home, dest, models=models, outputs=outputs, progress=_Bar())
    click.echo(f"Snapshot {r.snapshot_id} in {r.dest}: {r.files} files ({human_bytes(r.total_bytes)}); "
               f"copied {r.copied} ({human_bytes(r.copied_bytes)}), unchanged {r.skipped}; {r.seconds:.1f} s")
    if r.history_rows is not None:
        click.echo(f"History: {r.history_rows} images indexed (consistent snapshot).")
    if r.leftovers_removed:
        click.echo(f"Removed {r.leftovers_removed} leftover temp file(s) of an interrupted backup.")
    for note in r.notes:
        click.echo(f"Note: {note}.")


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--snapshot", "snapshot_id", default=None, metavar="ID",
              help="Snapshot to restore (default: the latest; `darkroom verify SRC` lists them).")
@click.option("--force", is_flag=True,
              help="Replace files in the home that differ from the snapshot (old versions are kept in "
                   "<home>/restore-saved/<time>/).")
@click.option("--exact", is_flag=True,
              help="Also move files that the snapshot does not have out of outputs/, history-sources/ (and models/ "
                   "when it has them) into the safety folder; with --force.")
@click.pass_obj
@user_errors
def restore(obj: Context, src: Path, snapshot_id: str | None, force: bool, exact: bool) -> None:
    """Bring the home back to a snapshot in the backup folder SRC (every file checked by hash as written)."""
    r = restore_home(obj.home, src, snapshot_id=snapshot_id, force=force, exact=exact, progress=_Bar())
    click.echo(f"Restored snapshot {r.snapshot_id} into {obj.home.root}: {r.restored} files written "
               f"({human_bytes(r.restored_bytes)}), {r.unchanged} already identical; {r.seconds:.1f} s")
    if r.replaced:
        click.echo(f"Replaced {len(r.replaced)}: {', '.join(r.replaced)}")
    if r.safety_dir is not None:
        click.echo(f"Old versions kept in {r.safety_dir}")
    history = {"absent": "not in the snapshot", "unchanged": "already identical", "restored": "restored",
               "replaced": "restored over the existing one"}[r.history]
    rows = f" ({r.history_rows} images)" if r.history_rows is not None and r.history != "absent" else ""
    click.echo(f"History database: {history}{rows}.")
    if r.removed:
        click.echo(f"Moved {len(r.removed)} file(s) not in the snapshot into the safety folder.")
    if left := len(r.extra) - len(r.removed):
        click.echo(f"Left alone {left} file(s) not in the snapshot (use --exact --force to move them away); "
                   "Darkroom indexes any extra outputs at start-up.")


@click.command()
@click.argument("dest", type=click.Path(path_type=Path))
@user_errors
def verify(dest: Path) -> None:
    """Check every file of every snapshot in the backup folder DEST: present and matching its hash."""
    r = verify_backup(dest, progress=_Bar())
    for s in r.snapshots:
        click.echo(f"snapshot {s.id}: {len(s.files)} files, "
                   f"{human_bytes(sum(int(e.get('size', 0)) for e in s.files.values()))}")
    for sid in r.incomplete:
        click.echo(f"snapshot {sid}: incomplete (an interrupted backup; ignored)")
    if r.leftovers:
        click.echo(f"{r.leftovers} temp file(s) of an interrupted backup (the next backup removes them)")
    for line in r.problems:
        click.echo(line)
    click.echo(f"Checked {r.objects_checked} objects ({human_bytes(r.bytes_checked)}) in {r.seconds:.1f} s.")
    if not r.ok:
        raise DarkroomError(f"{len(r.problems)} problem(s) in {dest}: {len(r.missing)} missing, "
                            f"{len(r.corrupt)} corrupt")
    click.echo("OK: every snapshot is complete and every file matches its hash.")
