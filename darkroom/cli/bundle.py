"""`darkroom bundle create|verify`: the offline bundle's commands (the work is in darkroom.carry.bundle)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from darkroom.cli.group import user_errors
from darkroom.home import Home


def _home(obj) -> Home:
    return obj.home if obj is not None and hasattr(obj, "home") else Home.resolve().ensure()


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class _Bars:
    """tqdm byte bars on stderr (drawn only on a terminal), closed together."""

    def __init__(self):
        self.bars = []

    def __call__(self, label: str, total: int):
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False, disable=None)
        self.bars.append(bar)
        return bar.update

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


@click.group("bundle")
def bundle_group() -> None:
    """Offline bundle: prepare online, carry on USB, install offline (see docs/bundle.md)."""


@bundle_group.command("create")
@click.argument("dest", type=click.Path(file_okay=False, path_type=Path))
@click.option("--models", "--model", "models", multiple=True, metavar="NAME_OR_PATH",
              help="A model to carry: a name in the models folders (checkpoint, LoRA, VAE, embedding) or a path;"
                   " repeatable. The built-in starter model is inside Darkroom's wheel already.")
@click.option("--platform", "platforms", multiple=True, metavar="TAG",
              help="Wheel platform of the offline machine, e.g. manylinux_2_28_x86_64, win_amd64,"
                   " macosx_11_0_arm64; repeatable (default: this machine).")
@click.option("--python-version", default=None, metavar="X.Y",
              help="Python version of the offline machine (default: this Python's).")
@click.option("--torch", "torch_variant", default="cpu", show_default=True, metavar="VARIANT",
              help="torch build: cpu, a CUDA build (cu124, cu128, ...), rocm6.4, xpu (from download.pytorch.org,"
                   " which must be reachable), or pypi (the build PyPI serves: CUDA on Linux).")
@click.option("--torch-index-url", default=None, metavar="URL",
              help="Where to get torch instead of download.pytorch.org/whl/<variant> (a mirror), or 'none' for"
                   " pip's configured sources only.")
@click.option("--source", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Darkroom checkout to build the wheel from (default: the one this Darkroom runs from).")
@click.option("--portable", is_flag=True,
              help="Freeze Darkroom with its own Python (PyInstaller) for a Linux x86-64 machine with no Python:"
                   " run DEST/darkroom straight from the folder, or DEST/install.sh. With --platform win_amd64:"
                   " a Windows x64 folder with the embeddable CPython 3.11 and CPU torch, built from PyPI and"
                   " not tested on Windows (see docs/bundle.md).")
@click.option("--build-root", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="ROOT",
              help="With --portable: freeze inside ROOT, an older Debian made by scripts/make_build_root.sh"
                   " (bullseye: the bundle then needs glibc 2.30, not this machine's). Needs root.")
@click.option("--since", type=click.Path(exists=True, path_type=Path), default=None, metavar="OLD",
              help="Write an update instead: only what changed against OLD (the installed bundle's folder or its"
                   " manifest.json); DEST/install.sh applies it to that install, keeping the old version for"
                   " --rollback.")
@click.pass_obj
@user_errors
def create(obj, dest: Path, models, platforms, python_version, torch_variant, torch_index_url, source,
           portable, build_root, since) -> None:
    """Write an offline bundle into DEST (new or empty): wheels, models, manifest, install.sh/install.ps1.

    Needs the network (pip downloads the wheels, ~300 MB with the CPU torch, a few GB with a CUDA one).
    On the offline machine, run `bash DEST/install.sh` (Windows: install.ps1).
    """
    from darkroom.carry.bundle import create_bundle, manifest_bytes

    if build_root is not None and (not portable or platforms):
        from darkroom.carry.bundle import BundleError

        raise BundleError("--build-root applies to a Linux portable bundle only: add --portable (and no --platform)")
    if portable:
        if since is not None:
            from darkroom.carry.bundle import BundleError

            raise BundleError("--since writes an update for a wheel bundle; a portable bundle is made whole")
        _create_portable(obj, dest, models, platforms, python_version, torch_variant, torch_index_url, source,
                         build_root)
        return
    bars = _Bars()
    try:
        manifest = create_bundle(dest, home=_home(obj), models=models, platforms=platforms,
                                 python_version=python_version, torch=torch_variant, torch_index_url=torch_index_url,
                                 source=source, echo=lambda line: click.echo(line, err=True), progress=bars,
                                 since=since)
    finally:
        bars.close()
    t = manifest["target"]
    if since is not None:
        u = manifest["update"]
        click.echo(f"Update written to {dest}: {len(manifest['files'])} files, {_size(manifest_bytes(manifest))}"
                   f" (darkroom {u['base']['darkroom_version']} -> {manifest['darkroom_version']}:"
                   f" {len(u['adds'])} added, {len(u['replaces'])} replaced, {len(u['removes'])} removed).")
        click.echo(f"Apply it on the offline machine: bash {dest}/install.sh   (back: install.sh --rollback)")
        return
    click.echo(f"Bundle written to {dest}: {len(manifest['files'])} files, {_size(manifest_bytes(manifest))}"
               f" (darkroom {manifest['darkroom_version']}, {t['torch_requirement']},"
               f" {t['os']} {t['machine'] or ''} Python {t['python']}, {len(manifest['models'])} model(s)).")
    click.echo(f"Check it after copying: darkroom bundle verify {dest}")
    click.echo(f"Install on the offline machine: bash {dest}/install.sh   (Windows: install.ps1)")


def _create_portable(obj, dest, models, platforms, python_version, torch_variant, torch_index_url, source,
                     build_root=None) -> None:
    from darkroom.carry.bundle import BundleError, manifest_bytes
    from darkroom.carry.portable import create_portable

    if platforms:  # the one cross-built target: a Windows x64 folder (darkroom.carry.portable_windows)
        _create_windows_portable(obj, dest, models, platforms, python_version, torch_variant, source)
        return
    if python_version:
        raise BundleError("--portable freezes this machine's Python for Linux x86-64: --python-version does not"
                          " apply (a Windows x64 folder: --platform win_amd64)")
    bars = _Bars()
    try:
        manifest = create_portable(dest, home=_home(obj), models=models, torch=torch_variant,
                                   torch_index_url=torch_index_url, source=source,
                                   echo=lambda line: click.echo(line, err=True), progress=bars,
                                   build_root=build_root)
    finally:
        bars.close()
    t = manifest["target"]
    click.echo(f"Portable bundle written to {dest}: {len(manifest['files'])} files,"
               f" {_size(manifest_bytes(manifest))} (darkroom {manifest['darkroom_version']}, {t['torch_requirement']},"
               f" Python {t['python']} frozen in, Linux x86-64 with glibc >= {t['glibc']},"
               f" {len(manifest['models'])} model(s)).")
    click.echo(f"Run it from the folder: {dest}/darkroom generate \"a red circle\"   (or {dest}/darkroom serve)")
    click.echo(f"Install on the offline machine (no Python needed): sh {dest}/install.sh")


def _create_windows_portable(obj, dest, models, platforms, python_version, torch_variant, source) -> None:
    from darkroom.carry.bundle import manifest_bytes
    from darkroom.carry.portable_windows import check_options, create_windows_portable

    check_options(platforms, python_version, torch_variant)
    bars = _Bars()
    try:
        manifest = create_windows_portable(dest, home=_home(obj), models=models, torch=torch_variant, source=source,
                                           echo=lambda line: click.echo(line, err=True), progress=bars)
    finally:
        bars.close()
    t = manifest["target"]
    click.echo(f"Windows portable folder written to {dest}: {len(manifest['files'])} files,"
               f" {_size(manifest_bytes(manifest))} (darkroom {manifest['darkroom_version']}, {t['torch_requirement']}"
               f" CPU, embeddable CPython {t['python']}, {len(manifest['models'])} model(s)). Built on Linux and"
               " NOT run on Windows here.")
    click.echo("On Windows: copy the folder, run `powershell -ExecutionPolicy Bypass -File verify.ps1`, then"
               " `darkroom.cmd serve` (see its README.txt).")


@bundle_group.command("verify")
@click.argument("bundle", type=click.Path(file_okay=False, exists=True, path_type=Path))
@user_errors
def verify(bundle: Path) -> None:
    """Check every file of BUNDLE against its manifest (missing, size, SHA-256); exit 1 naming bad files."""
    from darkroom.carry.bundle import BundleError, checker, manifest_bytes, verify_bundle

    bars = _Bars()
    try:
        manifest = checker().load_manifest(bundle)
    except checker().BundleError as e:
        raise BundleError(str(e)) from None
    try:
        report = verify_bundle(bundle, progress=bars("verifying", manifest_bytes(manifest)))
    finally:
        bars.close()
    for extra in report.extra:
        click.echo(f"note: {extra} is not in the manifest (ignored)", err=True)
    if report.problems:
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
        raise BundleError(f"{len(report.problems)} bad file(s) in {bundle}: {', '.join(report.bad_files)}")
    click.echo(f"OK: {len(manifest['files'])} files, {_size(manifest_bytes(manifest))}, match {bundle}/manifest.json"
               f" (darkroom {manifest.get('darkroom_version')}, for {manifest['target'].get('os')}"
               f" Python {manifest['target'].get('python')})")


@bundle_group.command("rollback")
@click.option("--venv", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The install to roll back (default: the one this Darkroom runs from).")
@user_errors
def rollback(venv: Path | None) -> None:
    """Return an install made by install.sh to the version it ran before its last install or update."""
    from darkroom.carry.update import rollback_install

    now = rollback_install(venv)
    click.echo(f"Now running Darkroom {now['darkroom_version']} (run rollback again to return).")
