"""`darkroom upscale`: upscale images with an upscaler model (ESRGAN, SwinIR, ...) or Lanczos/Nearest, as the
webui's Extras tab does; `darkroom upscale --list` shows what is found in the models folders."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from darkroom.cli.group import Context, log, user_errors


@click.command()
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-u", "--upscaler", default="Lanczos", show_default=True,
              help="Upscaler: Lanczos, Nearest, or a model's name (a file stem such as 4x-UltraSharp, or a webui"
                   " name such as 'R-ESRGAN 4x+'; see --list).")
@click.option("--scale", type=float, default=None, help="Upscale by this factor (default 4; sides rounded down to"
                                                         " multiples of 8, as the webui does).")
@click.option("-W", "--width", type=int, default=None, help="Upscale to this width instead (with -H).")
@click.option("-H", "--height", type=int, default=None, help="Upscale to this height instead (with -W).")
@click.option("--crop", is_flag=True, help="With -W/-H: crop the result to exactly that size (centered).")
@click.option("--upscaler-2", default="None", help="A second upscaler blended over the first (see --visibility).")
@click.option("--visibility", type=float, default=0.5, show_default=True,
              help="How much of --upscaler-2 shows (0-1).")
@click.option("--gfpgan", "gfpgan", type=click.FloatRange(0, 1), default=0.0, metavar="V",
              help="Restore faces with GFPGAN after upscaling, blended in at visibility V (0-1).")
@click.option("--codeformer", "codeformer", type=click.FloatRange(0, 1), default=0.0, metavar="V",
              help="Restore faces with CodeFormer after upscaling (and GFPGAN), at visibility V (0-1).")
@click.option("--codeformer-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True, metavar="W",
              help="CodeFormer's fidelity: 0 restores the most, 1 keeps closest to the input.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs (default: <home>/outputs/extras/<date>).")
@click.option("--list", "list_only", is_flag=True, help="List the upscalers found and exit.")
@click.option("--device", default=None, help="cpu, cuda, cuda:1, mps (default: the best available).")
@click.pass_obj
@user_errors
def upscale(obj: Context, images: tuple[Path, ...], upscaler: str, scale: float | None, width: int | None,
            height: int | None, crop: bool, upscaler_2: str, visibility: float, output: Path | None, list_only: bool,
            device: str | None, gfpgan: float = 0.0, codeformer: float = 0.0, codeformer_weight: float = 0.5) -> None:
    """Upscale IMAGE files; each PNG keeps the source's parameters and adds the webui's postprocessing text."""
    from darkroom.errors import InvalidRequest
    from darkroom.upscale import UpscalerLibrary

    if list_only:
        library = UpscalerLibrary(obj.home)
        click.echo("None\nLanczos\nNearest")
        for f in library.files():
            click.echo(f"{f.name}\tx{f.scale}\t{f.path}")
        return
    if not images:
        raise InvalidRequest("give one or more IMAGE files to upscale (or --list to see the upscalers)")
    if (width is None) != (height is None):
        raise InvalidRequest("give both -W and -H to upscale to a size (or --scale to upscale by a factor)")
    if width is not None and scale is not None:
        raise InvalidRequest("give either --scale or -W/-H, not both")
    if crop and width is None:
        raise InvalidRequest("--crop needs -W and -H")
    faces = [(name, v, w) for name, v, w in (("GFPGAN", gfpgan, None), ("CodeFormer", codeformer, codeformer_weight))
             if v > 0]  # after the upscale, GFPGAN first: the webui's postprocessing order
    _run(obj, images, upscaler, scale, width, height, crop, upscaler_2, visibility, output, device, faces)


def _run(obj: Context, images, upscaler, scale, width, height, crop, upscaler_2, visibility, output, device,
         faces=()) -> None:
    from darkroom.api import output_folder
    from darkroom.engine.device import choose_device
    from darkroom.engine.img2img import open_image
    from darkroom.fsutil import read_regular, writes_to
    from darkroom.metadata.images import MAX_IMAGE_FILE_BYTES, read_image_metadata
    from darkroom.upscale import Extras, Resize, UpscalerLibrary, encode_extras_png

    choice = choose_device(device)
    library = UpscalerLibrary(obj.home, device=choice.device, dtype=choice.dtype)
    resize = Resize(mode=1, width=width, height=height, crop=crop) if width else Resize(scale=scale or 4.0)
    extras = Extras(resize, library.canonical(upscaler), library.canonical(upscaler_2) if visibility > 0 else "None",
                    visibility)
    extras.check()
    from darkroom.faces import FaceRestorer

    restorer = FaceRestorer(obj.home, device=choice.device)
    for name, _, _ in faces:
        restorer.check(name)  # missing files: one line naming them, before any work
    out_dir = output or output_folder(obj.home, "extras")
    bar = _Bar()
    try:
        for n, path in enumerate(images, 1):
            bar.prefix = f"image {n}/{len(images)}"
            data = read_regular(path, what="an image file", limit=MAX_IMAGE_FILE_BYTES)
            image = open_image(data, str(path))
            result, info = library.postprocess(image, extras, progress=bar.update)
            for name, v, w in faces:
                result = restorer.restore(result, name, weight=w, visibility=v)
                info[f"{name} visibility"] = round(v, 3)  # the webui's postprocessing keys
                if w is not None:
                    info["CodeFormer weight"] = round(w, 3)
            parameters = read_image_metadata(data, name=str(path)).parameters
            target = out_dir / f"{path.stem}-{'upscaled' if info else 'copy'}.png"
            with writes_to(out_dir, "save the upscaled image"):
                out_dir.mkdir(parents=True, exist_ok=True)
                target.write_bytes(encode_extras_png(result, parameters, info))
            bar.done_image()
            click.echo(str(target))
            log.info("upscaled %s to %s (%dx%d)", path, target, *result.size)
    finally:
        bar.close()
    click.echo(f"{len(images)} image(s) in {out_dir}", err=True)
    sys.stdout.flush()


class _Bar:
    """A tqdm bar over the tiles of the current pass (created at the first tile)."""

    def __init__(self):
        self.bar = None
        self.prefix = ""

    def update(self, done: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None or self.bar.total != total or done == 1:
            self.close()
            self.bar = tqdm(total=total, unit="tile", desc="Upscaling", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.2)
        self.bar.set_postfix_str(self.prefix, refresh=False)
        self.bar.update(done - self.bar.n)

    def done_image(self) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
