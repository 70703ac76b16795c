"""`darkroom controlnet`: which ControlNet models and preprocessors this install can use (and where it
looks for their files), and a preprocessor run on one picture, to check a control map before generating."""

from __future__ import annotations

from pathlib import Path

import click

from darkroom.cli.group import Context, log, user_errors
from darkroom.fsutil import read_regular
from darkroom.metadata.images import MAX_IMAGE_FILE_BYTES


@click.group("controlnet")
def controlnet_group() -> None:
    """ControlNet models and preprocessors (generate with `darkroom generate --controlnet SPEC`)."""


@controlnet_group.command("list")
@click.pass_obj
@user_errors
def list_command(obj: Context) -> None:
    """List the ControlNet models found, the preprocessors (and the files those with weights need), and the
    folders searched."""
    from darkroom.control.files import controlnet_dirs, find_controlnets
    from darkroom.control.preprocess import annotator_dirs, module_list, module_status
    from darkroom.humanize import human_size

    problems: list[str] = []
    files = find_controlnets(obj.home, problems)
    click.echo("Models:")
    for f in files:
        state = f.family or "?" if f.supported else f"not usable: {f.detail}"
        click.echo(f"  {f.title}\t{state}\t{human_size(f.size)}\t{f.path}")
    if not files:
        click.echo("  none: put ControlNet files (control_v11p_sd15_canny.safetensors, ...) in a folder below")
    for problem in problems:
        click.echo(f"  skipped: {problem}")
    click.echo("Preprocessors:")
    dirs = annotator_dirs(obj.home)
    listed = module_list(alias_names=False)["module_list"]
    labels = module_list(alias_names=True)["module_list"]
    for name, label in zip(listed, labels, strict=True):
        ok, problem = module_status(name, dirs)
        shown = name if name == label else f"{name} ({label})"
        click.echo(f"  {shown}" + ("" if ok else f"\tunavailable: {(problem or '').split(';')[0]}"))
    click.echo("ControlNet folders:")
    for folder, _ in controlnet_dirs(obj.home):
        click.echo(f"  {folder}")
    click.echo("Preprocessor weight folders:")
    for folder in dirs:
        click.echo(f"  {folder}")


@controlnet_group.command("detect")
@click.argument("module")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The PNG to write the control map to.")
@click.option("--resolution", type=int, default=512, show_default=True,
              help="Preprocessor resolution: the short side the picture is resized to first.")
@click.option("--threshold-a", "-a", type=float, default=-1, help="The preprocessor's first slider (-1: default).")
@click.option("--threshold-b", "-b", type=float, default=-1, help="The preprocessor's second slider (-1: default).")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A mask (white = repaint), for the inpaint preprocessors.")
@click.pass_obj
@user_errors
def detect_command(obj: Context, module: str, image: Path, output: Path, resolution: int, threshold_a: float,
                   threshold_b: float, mask: Path | None) -> None:
    """Run preprocessor MODULE (canny, scribble, invert, ...) on IMAGE and write the control map."""
    import io

    import numpy as np
    from PIL import Image

    from darkroom.control.preprocess import annotator_dirs, detect
    from darkroom.engine.img2img import open_image
    from darkroom.fsutil import write_atomic

    picture = open_image(_read(image, "an image file"), str(image))
    mask_image = None if mask is None else open_image(_read(mask, "a mask file"), str(mask))
    result = detect(module, picture.convert("RGB"), resolution=resolution, threshold_a=threshold_a,
                    threshold_b=threshold_b, mask=mask_image, annotator_dirs=annotator_dirs(obj.home))
    pixels = np.clip(np.asarray(result, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    write_atomic(output, buffer.getvalue())
    log.info("control map of %s by %s written to %s", image, module, output)
    click.echo(output)


def _read(path: Path, what: str) -> bytes:
    """A picture file; a missing or unreadable one is one line naming it."""
    from darkroom.errors import InvalidRequest
    from darkroom.fsutil import read_error

    if not path.exists():
        raise InvalidRequest(f"{path}: no such file")
    try:
        return read_regular(path, what=what, limit=MAX_IMAGE_FILE_BYTES)
    except OSError as e:
        raise read_error(e, path) from None
