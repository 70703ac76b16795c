"""`darkroom generate`: txt2img, img2img, inpainting, hires fix, X/Y plots and SD upscale to PNGs, with progress."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import click

from darkroom.cli.control_spec import HELP as CONTROLNET_HELP
from darkroom.cli.control_spec import parse_units, units_from_png
from darkroom.cli.group import Context, log, user_errors, vram_options
from darkroom.fsutil import read_regular
from darkroom.home import Home
from darkroom.metadata.images import MAX_IMAGE_FILE_BYTES
from darkroom.request import MAX_TOKEN_MERGING
from darkroom.services.xyplot import axis_names

RESIZE_CHOICES = {"just-resize": 0, "crop": 1, "fill": 2}
FILL_CHOICES = {"fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3}


def _engine(home: Home, device: str | None, precision: str | None, allow_pickle: bool, v_prediction: bool | None,
            vram: str | None = None, fp8: bool = False):
    from darkroom.api import build_engine
    from darkroom.engine.admission import Limits
    from darkroom.settings import Settings

    engine = build_engine(home, device=device, precision=precision, allow_pickle=allow_pickle,
                          v_prediction=v_prediction, vram=vram, fp8=fp8)
    settings = Settings(home.root / "settings.json")
    engine.limits = Limits.from_settings(settings)  # as the server's (docs/limits.md)
    engine.faces.configure(settings.as_dict())  # --restore-faces: the face_restoration_model setting
    return engine

@click.command()
@click.argument("prompt", required=False, default=None)
@click.option("-N", "--negative", "negative_prompt", default=None, help="Negative prompt.")
@click.option("--style", "styles", multiple=True, metavar="NAME",
              help="Apply a prompt style from styles.csv (repeatable, applied in order; see `darkroom styles`).")
@click.option("--dynamic-prompts/--no-dynamic-prompts", default=None,
              help="Expand {a|b} variants and __name__ wildcards per image, seeded by each image's seed (default on;"
                   " text without them is never changed).")
@click.option("--combinatorial", is_flag=True, default=None,
              help="Dynamic prompts: one image per combination instead of a random pick per image.")
@click.option("--tiling", is_flag=True, default=None, help="Seamless tiling: the image wraps around at its edges.")
@click.option("--token-merging", "token_merging_ratio", type=click.FloatRange(0, MAX_TOKEN_MERGING), default=None,
              metavar="RATIO",
              help="Token merging (ToMe, the webui's option): merge this share of the full-resolution self-attention"
                   " tokens, e.g. 0.5. Faster (SD1.x/2.x; SDXL and the starter model have no attention there), changes"
                   " the picture.")
@click.option("--token-merging-hr", "token_merging_ratio_hr", type=click.FloatRange(0, MAX_TOKEN_MERGING), default=None,
              metavar="RATIO", help="Token merging in the hires pass (default: --token-merging's).")
@click.option("--restore-faces", is_flag=True, default=None,
              help="Restore faces with the face_restoration_model setting (CodeFormer or GFPGAN): needs its file and"
                   " detection_Resnet50_Final.pth in models/faces or an A1111 install's models/GFPGAN, Codeformer.")
@click.option("-m", "--model", default=None, help="Checkpoint: a name or short hash in the models folders, or a path.")
@click.option("-n", "--count", "n_iter", type=int, default=None,
              help="How many batches to make (images = count x batch size).")
@click.option("-b", "--batch-size", type=int, default=None, help="Images sampled together in one batch.")
@click.option("-s", "--steps", type=int, default=None)
@click.option("--cfg", "cfg_scale", type=float, default=None, help="Classifier-free guidance scale.")
@click.option("--sampler", default=None,
              help="A1111 sampler name, e.g. 'Euler a', 'DPM++ 2M' (see `darkroom samplers`).")
@click.option("--schedule", default=None, help="Schedule type: Automatic, Uniform, Karras, Exponential, SGM Uniform.")
@click.option("--preset", default=None,
              help="Few-step preset: lcm, turbo, lightning, hyper, hyper-cfg, dmd2, tcd, standard (see `darkroom"
                   " presets`); it sets sampler, schedule, steps and CFG unless given here. Default: auto (detected"
                   " from the checkpoint's and LoRAs' metadata or names; 'standard' turns it off).")
@click.option("--seed", type=int, default=None, help="-1 picks a random seed (recorded in the image).")
@click.option("-W", "--width", type=int, default=None)
@click.option("-H", "--height", type=int, default=None)
@click.option("--clip-skip", type=int, default=None)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the PNGs (default: <home>/outputs/txt2img/<date>).")
@click.option("--format", "output_format", type=click.Choice(["png", "jpg", "jpeg", "webp"], case_sensitive=False),
              default=None, help="File format of the images (default png); JPEG and WebP carry the parameters in"
                                 " EXIF, as the webui writes them, so png-info reads them too.")
@click.option("--from-png", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Rerun the parameters stored in an image; options given here override them.")
@click.option("-i", "--init-image", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="img2img: start from this image (size defaults to the image's).")
@click.option("--mask", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Inpaint: white = repaint (a transparent PNG's painted pixels count as white).")
@click.option("-d", "--strength", "denoising_strength", type=float, default=None,
              help="Denoising strength for img2img and the hires fix (0 keeps the image, 1 ignores it).")
@click.option("--resize-mode", type=click.Choice(list(RESIZE_CHOICES)), default=None,
              help="How the init image is fitted to the size (default: just-resize).")
@click.option("--mask-blur", type=int, default=None, help="Mask edge blur in pixels (default 4).")
@click.option("--masked-content", type=click.Choice(list(FILL_CHOICES)), default=None,
              help="What the masked area starts from (default: original).")
@click.option("--only-masked", "inpaint_full_res", is_flag=True, default=None,
              help="Inpaint just the masked area at full resolution, then paste it back.")
@click.option("--only-masked-padding", "inpaint_full_res_padding", type=int, default=None,
              help="Pixels of context around the mask for --only-masked (default 32).")
@click.option("--invert-mask", "inpainting_mask_invert", is_flag=True, default=None,
              help="Repaint the black part of the mask.")
@click.option("--controlnet", "controlnet", multiple=True, metavar="SPEC", help=CONTROLNET_HELP)
@click.option("--hires", "enable_hr", is_flag=True, default=None,
              help="Hires fix: generate at the size given, upscale, then refine at the larger size.")
@click.option("--hr-scale", type=float, default=None, help="Hires upscale factor (default 2).")
@click.option("--hr-upscaler", default=None,
              help="Latent (default), Latent (nearest), Lanczos, Nearest, or an upscaler model by name (see"
                   " `darkroom upscale --list`).")
@click.option("--hr-steps", "hr_second_pass_steps", type=int, default=None,
              help="Steps of the second pass (default: the same as --steps).")
@click.option("--hr-size", default=None, metavar="WxH", help="Hires target size instead of --hr-scale.")
@click.option("--vae", default=None, help="A separate VAE: a name in the VAE folders or a path (default: Automatic).")
@click.option("--subseed", type=int, default=None, help="Variation seed.")
@click.option("--subseed-strength", type=float, default=None, help="How far to move towards the variation seed.")
@click.option("--rng", "randn_source", type=click.Choice(["cpu", "gpu", "nv"], case_sensitive=False), default=None,
              help="Noise source, the webui's RNG setting: cpu (default, the same everywhere), gpu (NVIDIA GPU noise,"
                   " also without one), nv (the webui's CPU copy of it). --from-png takes the image's.")
@click.option("--ensd", "eta_noise_seed_delta", type=int, default=None, metavar="N",
              help="The webui's eta noise seed delta: ancestral/SDE steps draw noise from seed + N (default 0).")
@click.option("--x", "x_axis", default=None, metavar="AXIS=VALUES",
              help="X/Y plot: one image per value in the columns, plus a labelled grid (<outputs>/txt2img-grids, or"
                   " -o), e.g. 'steps=10-30 (+10)'. VALUES: comma-separated (CSV quotes), ranges 1-5, 1-10 (+3),"
                   " 1-10 [4], 1.5-3 (+0.5). AXIS: " + ", ".join(axis_names()) + " (or the request field name).")
@click.option("--y", "y_axis", default=None, metavar="AXIS=VALUES",
              help="X/Y plot: the values in the rows, e.g. 'sampler=Euler a,DPM++ 2M'.")
@click.option("--sd-upscale", "sd_upscale", type=float, default=None, metavar="FACTOR",
              help="SD upscale (with -i): upscale the image by FACTOR, then redraw it with img2img in tiles of -W x -H"
                   " (default: the model's size), as the webui's script; -d sets how much each tile changes.")
@click.option("--sd-upscale-overlap", type=int, default=None, metavar="N",
              help="SD upscale: pixels the tiles overlap, blended (default 64).")
@click.option("--sd-upscale-upscaler", default=None, metavar="NAME",
              help="SD upscale: Lanczos (default), Nearest, None (keeps the size) or an upscaler model by name (see"
                   " `darkroom upscale --list`).")
@click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:N, mps.")
@click.option("--precision", default=None, help="auto (default), fp32, fp16, bf16.")
@vram_options
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt pickles (loaded with torch.load(weights_only=True)).")
@click.option("--v-pred/--no-v-pred", "v_prediction", default=None,
              help="Force v-prediction on/off (default: from the file's metadata, v_pred key or sidecar .yaml).")
@click.pass_obj
@user_errors
def generate(obj: Context, prompt, negative_prompt, model, n_iter, batch_size, steps, cfg_scale, sampler, schedule,
             seed, width, height, clip_skip, output, from_png, init_image, mask, denoising_strength, resize_mode,
             mask_blur, masked_content, inpaint_full_res, inpaint_full_res_padding, inpainting_mask_invert, enable_hr,
             hr_scale, hr_upscaler, hr_second_pass_steps, hr_size, vae, subseed, subseed_strength, x_axis, y_axis,
             device, precision, allow_pickle, v_prediction, preset, vram, fp8, randn_source=None,
             eta_noise_seed_delta=None, styles=(), dynamic_prompts=None, combinatorial=None, tiling=None,
             restore_faces=None, token_merging_ratio=None, token_merging_ratio_hr=None, output_format=None,
             sd_upscale=None, sd_upscale_overlap=None,
             sd_upscale_upscaler=None, controlnet=()) -> None:
    """Generate images from PROMPT (txt2img, img2img, inpainting, hires fix) and write PNGs with their parameters."""
    from darkroom.api import output_folder, request_from_png
    from darkroom.models import starter
    from darkroom.request import GenerationRequest
    from darkroom.services.xyplot import parse_axis_option

    axes = [None if a is None else parse_axis_option(a) for a in (x_axis, y_axis)]
    hr_resize_x = hr_resize_y = None
    if hr_size:
        try:
            hr_resize_x, hr_resize_y = (int(v) for v in hr_size.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{hr_size!r} is not WIDTHxHEIGHT, e.g. 1024x768",
                                     param_hint="--hr-size") from None
    fields = dict(prompt=prompt, negative_prompt=negative_prompt, model=model, n_iter=n_iter, batch_size=batch_size,
                  steps=steps, cfg_scale=cfg_scale, sampler=sampler, schedule=schedule, seed=seed, width=width,
                  height=height, clip_skip=clip_skip, denoising_strength=denoising_strength,
                  resize_mode=None if resize_mode is None else RESIZE_CHOICES[resize_mode], mask_blur=mask_blur,
                  inpainting_fill=None if masked_content is None else FILL_CHOICES[masked_content],
                  inpaint_full_res=inpaint_full_res, inpaint_full_res_padding=inpaint_full_res_padding,
                  inpainting_mask_invert=inpainting_mask_invert, enable_hr=enable_hr, hr_scale=hr_scale,
                  hr_upscaler=hr_upscaler, hr_second_pass_steps=hr_second_pass_steps, hr_resize_x=hr_resize_x,
                  hr_resize_y=hr_resize_y, vae=vae, subseed=subseed, subseed_strength=subseed_strength,
                  init_image=_read(init_image), mask=_read(mask), preset=preset,
                  randn_source=randn_source and randn_source.upper(), eta_noise_seed_delta=eta_noise_seed_delta)
    fields.update(styles=list(styles) or None, dynamic_prompts=dynamic_prompts, combinatorial=combinatorial,
                  tiling=tiling, restore_faces=restore_faces, output_format=output_format and output_format.lower(),
                  token_merging_ratio=token_merging_ratio, token_merging_ratio_hr=token_merging_ratio_hr)
    given = {k: v for k, v in fields.items() if v is not None}
    if controlnet:  # replaces the units of --from-png's image
        given["controlnet"] = parse_units(controlnet)
    if from_png is not None:
        base = request_from_png(from_png)
        if not controlnet:  # its ControlNet units, with the maps stored in the PNG
            base = base.model_copy(update={"controlnet": units_from_png(from_png)})
        req = base.model_copy(update=given)
        # the image's settings count as given, except those an explicit --preset replaces
        unset = {"sampler", "schedule", "steps", "cfg_scale"} - set(given) if preset else set()
        req = GenerationRequest.model_validate(req.model_dump(exclude=unset))
    else:
        if prompt is None:
            raise click.UsageError("give a PROMPT (or --from-png FILE)")
        req = GenerationRequest(**{"preset": "auto", **given})
    engine = _engine(obj.home, device, precision, allow_pickle, v_prediction, vram, fp8)
    req = engine.apply_preset(req)  # before the progress bar counts the steps
    path = engine.model_path(req)
    note = starter.description(path)
    click.echo(f"Model: {path.name}" + (f"  ({note})" if note else ""), err=True)
    if req.preset not in (None, "auto"):
        click.echo(f"Preset {req.preset}: {req.sampler}, {req.schedule}, {req.steps} steps,"
                   f" CFG {req.cfg_scale:g}", err=True)
    out_dir = output or output_folder(obj.home, "img2img" if req.is_img2img else "txt2img")

    cancel = threading.Event()
    if sd_upscale is not None or sd_upscale_overlap is not None or sd_upscale_upscaler is not None:
        if any(axes):
            raise click.UsageError("--sd-upscale and --x/--y cannot be combined; run them one after the other")
        return _generate_sd_upscale(engine, req, sd_upscale, sd_upscale_overlap, sd_upscale_upscaler, out_dir, cancel)
    if any(axes):
        return _generate_grid(obj, engine, req, axes, output, out_dir, cancel)
    from darkroom.services.control_batch import has_batch

    if has_batch(req):
        return _generate_control_batch(engine, req, out_dir, cancel)
    progress = _Progress(req)
    with _sigint_cancels(cancel):
        try:
            result = engine.generate(req, on_step=progress.update, cancel=cancel, output_dir=out_dir)
        finally:
            progress.close()
    for image in result.images:
        click.echo(image.path)
    done = f"{len(result.images)} image(s) in {out_dir}"
    if result.interrupted:
        done = f"interrupted: kept {done}"
    t = result.timings
    click.echo(f"{done} (seed {result.seeds[0] if result.seeds else req.seed}; load {t.get('load', 0):.1f}s,"
               f" sampling {t.get('sampling', 0):.1f}s, total {t.get('total', 0):.1f}s)", err=True)
    log.info("generated %d image(s) into %s", len(result.images), out_dir)
    if result.interrupted:
        sys.exit(130)


def _generate_control_batch(engine, req, out_dir: Path, cancel) -> None:
    """A ControlNet batch unit (batch=FOLDER): the job once per picture, as the extension's batch input."""
    from darkroom.services.control_batch import plan_control_batch, run_control_batch

    plan = plan_control_batch(engine, req)
    progress = _Progress(req, total=plan.total_steps)
    with _sigint_cancels(cancel):
        try:
            result = run_control_batch(engine, plan, output_dir=out_dir, on_step=progress.update, cancel=cancel)
        finally:
            progress.close()
    for image in result.images:
        click.echo(image.path)
    done = f"{len(result.images)} image(s) from {len(plan.requests)} control pictures in {out_dir}"
    click.echo(("interrupted: kept " if result.interrupted else "") + done
               + f" (seed {plan.requests[0].seed}; total {result.timings.get('total', 0):.1f}s)", err=True)
    if result.interrupted:
        sys.exit(130)


def _generate_grid(obj: Context, engine, req, axes, output: Path | None, out_dir: Path, cancel) -> None:
    """The X/Y plot path of `generate`: validate every cell, run them, print the images and the grid."""
    from darkroom.api import output_folder
    from darkroom.services.xyplot import plan_xy, run_plan

    plan = plan_xy(engine, req, *axes)
    grid_dir = output or output_folder(obj.home, "img2img-grids" if req.is_img2img else "txt2img-grids")
    progress = _Progress(req, total=plan.total_steps)

    def on_cell(n, cell) -> None:
        progress.prefix = f"cell {n + 1}/{len(plan.cells)}, "

    with _sigint_cancels(cancel):
        try:
            result = run_plan(engine, plan, output_dir=out_dir, grid_dir=grid_dir, on_step=progress.update,
                              cancel=cancel, on_cell=on_cell)
        finally:
            progress.close()
    for image in result.images:
        click.echo(image.path)
    if result.grid_path:
        click.echo(result.grid_path)
    done = f"{len(result.images)} image(s) in {out_dir}"
    done = f"interrupted: kept {done}, no grid" if result.interrupted else f"{plan.columns}x{plan.rows} grid, {done}"
    click.echo(f"{done} (seed {plan.cells[0].request.seed}; sampling {result.timings.get('sampling', 0):.1f}s,"
               f" total {result.timings.get('total', 0):.1f}s)", err=True)
    log.info("X/Y plot: %d image(s) into %s, grid %s", len(result.images), out_dir, result.grid_path)
    if result.interrupted:
        sys.exit(130)


def _generate_sd_upscale(engine, req, factor, overlap, upscaler, out_dir: Path, cancel) -> None:
    """The SD upscale path of `generate`: check it all, then upscale and redraw tile by tile; print the images."""
    from darkroom.services.sd_upscale import DEFAULT_FACTOR, DEFAULT_OVERLAP, SDUpscale, plan_sd_upscale, run_sd_upscale

    if req.init_image is None:
        raise click.UsageError("--sd-upscale upscales an image: give it with -i/--init-image")
    options = SDUpscale(DEFAULT_FACTOR if factor is None else factor, DEFAULT_OVERLAP if overlap is None else overlap,
                        upscaler or "Lanczos")
    plan = plan_sd_upscale(engine, req, options)
    grid = plan.grid
    click.echo(f"SD upscale: {plan.source_size[0]}x{plan.source_size[1]} -> {grid.width}x{grid.height}"
               f" ({plan.options.upscaler}), {len(grid.xs)}x{len(grid.ys)} tiles of {grid.tile_w}x{grid.tile_h}",
               err=True)
    progress = _Progress(req, total=plan.total_steps)

    def on_tile(n, t) -> None:
        progress.prefix = f"upscale {n + 1}/{plan.upscales}, " if plan.upscales > 1 else ""

    with _sigint_cancels(cancel):
        try:
            result = run_sd_upscale(engine, plan, output_dir=out_dir, on_step=progress.update, cancel=cancel,
                                    on_tile=on_tile)
        finally:
            progress.close()
    for image in result.images:
        click.echo(image.path)
    done = f"{len(result.images)} image(s) in {out_dir}"
    if result.interrupted:
        done = f"interrupted: kept {done}"
    click.echo(f"{done} (seed {plan.request.seed}; sampling {result.timings.get('sampling', 0):.1f}s,"
               f" total {result.timings.get('total', 0):.1f}s)", err=True)
    log.info("SD upscale: %d image(s) into %s", len(result.images), out_dir)
    if result.interrupted:
        sys.exit(130)


@contextlib.contextmanager
def _sigint_cancels(cancel: threading.Event):
    """Ctrl-C sets `cancel` (finish the current step, keep the images); a second Ctrl-C aborts at once.

    Only the main thread may install a signal handler: run from another thread (the command invoked
    from a program's worker thread), Ctrl-C keeps Python's default and the generation runs as usual.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum, frame):
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        click.echo("\nInterrupting after this step (Ctrl-C again to abort at once)...", err=True)

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _read(path: Path | None) -> bytes | None:
    """An init image or mask file: a regular file only (a FIFO would block for ever), of sane size."""
    return None if path is None else read_regular(path, what="an image file", limit=MAX_IMAGE_FILE_BYTES)


class _Progress:
    """A tqdm bar over all steps of all batches: step count, it/s and ETA."""

    def __init__(self, req, total: int | None = None):
        self.total = total or req.steps_per_batch * req.n_iter
        self.bar = None
        self.prefix = ""  # e.g. "cell 2/6, " for an X/Y plot

    def update(self, event) -> None:
        if self.bar is None:  # created at the first step, so model loading does not skew it/s and ETA
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="step", desc="Sampling", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.2)
        self.bar.set_postfix_str(f"{self.prefix}image batch {event.batch_index + 1}/{event.batch_count}",
                                 refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

