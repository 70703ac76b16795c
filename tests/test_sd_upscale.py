"""SD upscale (the webui's img2img script, issue 18): the grid, recombining, seeds, a real run, the CLI, and
the real `webuiapi` client's img2img with script_name="SD upscale" over a socket.

Reference: AUTOMATIC1111/stable-diffusion-webui scripts/sd_upscale.py (script_args [info, overlap,
upscaler_index, scale_factor]) and modules/images.py (split_grid, combine_grid).
"""

from __future__ import annotations

import io
import json
import shutil
import threading

import numpy as np
import pytest
from PIL import Image

from darkroom.engine.admission import Limits
from darkroom.errors import InvalidRequest
from darkroom.metadata.infotext import build_infotext, parse_infotext
from darkroom.request import GeneratedImage, GenerationRequest, GenerationResult
from darkroom.services.sd_upscale import (
    SDUpscale,
    combine,
    crop_tiles,
    plan_sd_upscale,
    run_sd_upscale,
    split_grid,
)
from darkroom.upscale import UpscalerLibrary


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# -- the grid -------------------------------------------------------------------------------------

def test_tile_positions_follow_the_webuis_rule():
    # columns = ceil((W - overlap) / (tile - overlap)); spread evenly, the last flush with the edge
    grid = split_grid(1000, 700, 512, 512, 64)
    assert grid.xs == (0, 244, 488) and grid.ys == (0, 188) and grid.count == 6
    # a 512x512 image upscaled x2 with the webui's defaults: 3x3 tiles
    grid = split_grid(1024, 1024, 512, 512, 64)
    assert grid.xs == grid.ys == (0, 256, 512) and grid.count == 9
    assert split_grid(512, 768, 512, 512, 0).count == 2  # one column, two rows
    assert split_grid(512, 512, 512, 512, 64).count == 1


@pytest.mark.parametrize(("size", "tile", "overlap"), [((1000, 700), (512, 512), 64), ((200, 130), (64, 48), 16),
                                                        ((96, 96), (64, 64), 0)])
def test_tiles_cover_the_image_and_an_identity_recombines_it_exactly(size, tile, overlap):
    grid = split_grid(*size, *tile, overlap)
    covered = np.zeros(size[::-1], dtype=bool)
    for left, top, right, bottom in grid.boxes():
        assert 0 <= left and right <= size[0] and 0 <= top and bottom <= size[1]
        covered[top:bottom, left:right] = True
    assert covered.all()
    image = noise(*size)
    tiles = crop_tiles(image, grid)
    assert all(t.size == tile for t in tiles)
    assert np.array_equal(arr(combine(grid, tiles)), arr(image))


def test_the_overlap_fades_in_linearly_across_columns_and_rows():
    grid = split_grid(960, 512, 512, 512, 64)  # two columns: the second starts at 448
    row = arr(combine(grid, [Image.new("RGB", (512, 512), "black"), Image.new("RGB", (512, 512), "white")]))
    seam = row[100, 448:448 + 64, 0].astype(int)
    assert list(seam) == [i * 255 // 64 for i in range(64)]  # the webui's ramp
    assert (row[:, :448] == 0).all() and (row[:, 448 + 64:] == 255).all()
    grid = split_grid(64, 112, 64, 64, 16)  # two rows: the second starts at 48
    col = arr(combine(grid, [Image.new("RGB", (64, 64), "white"), Image.new("RGB", (64, 64), "black")]))
    assert list(col[48:64, 5, 1].astype(int)) == [255 - i * 255 // 16 for i in range(16)]
    assert (col[:48] == 255).all() and (col[64:] == 0).all()


def test_impossible_grids_are_refused_with_the_reason():
    with pytest.raises(InvalidRequest, match="smaller than a tile"):
        split_grid(400, 400, 512, 512, 64)
    with pytest.raises(InvalidRequest, match="overlap 64 must be"):
        split_grid(512, 512, 64, 64, 64)


# -- the run, on an identity "img2img" --------------------------------------------------------------

class IdentityEngine:
    """Gives every tile back unchanged and records the requests (what the service asks of an engine)."""

    def __init__(self, home, limits: Limits | None = None):
        self.upscalers = UpscalerLibrary(home)
        self.limits = limits or Limits()
        self.requests: list[GenerationRequest] = []
        self.on_generate = None

    def check_inputs(self, req):
        return None

    def generate(self, req, *, on_step=None, cancel=None, skip=None, output_dir=None, on_image=None):
        self.requests.append(req)
        if self.on_generate is not None:
            self.on_generate(len(self.requests))
        result = GenerationResult(request=req, model_name="identity", model_hash="0123456789")
        if cancel is not None and cancel.is_set():
            result.interrupted = True
            return result
        if skip is not None and skip.is_set():
            skip.clear()
            return result
        infotext = build_infotext(req, seed=req.seed, model_name="identity", model_hash="0123456789",
                                  extra={"Denoising strength": req.denoising_strength})
        result.images.append(GeneratedImage(seed=req.seed, infotext=infotext, png=req.init_image))
        return result


def request(source: Image.Image, **kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a castle", "init_image": png(source), "width": 64, "height": 64,
                                "seed": 100, "denoising_strength": 0.4, **kw})


def test_identity_img2img_gives_the_upscaled_image_with_the_scripts_infotext(home, tmp_path):
    engine = IdentityEngine(home)
    source = noise(50, 40)
    result = run_sd_upscale(engine, plan_sd_upscale(engine, request(source), SDUpscale(2, 16, "lanczos")),
                            output_dir=tmp_path / "out")
    upscaled = engine.upscalers.upscale(source, 2, "Lanczos")
    assert upscaled.size == (96, 80) and len(engine.requests) == 2 * 2  # ceil((96-16)/48) x ceil((80-16)/48)
    (image,) = result.images
    assert np.array_equal(arr(Image.open(io.BytesIO(image.png))), arr(upscaled))
    params = parse_infotext(image.infotext)
    assert params["Size"] == "64x64" and params["Seed"] == "100" and params["SD upscale overlap"] == "16"
    assert params["SD upscale upscaler"] == "Lanczos" and image.infotext.rstrip().endswith(params["Version"])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00000-100.png"]  # the result only, not the tiles


def test_tile_seeds_follow_the_webuis_batches(home):
    engine = IdentityEngine(home)
    source = noise(64, 64)
    # batch size 2, two upscales: a batch starts one seed after the previous batch's start
    plan = plan_sd_upscale(engine, request(source, batch_size=2, n_iter=2), SDUpscale(2, 16, "Nearest"))
    assert plan.grid.count == 9 and plan.runs == 18
    result = run_sd_upscale(engine, plan)
    seeds = [r.seed for r in engine.requests]
    assert seeds[:9] == [100, 101, 101, 102, 102, 103, 103, 104, 104]
    assert seeds[9:] == [s + 1 for s in seeds[:9]]
    assert all(r.batch_size == 1 and r.n_iter == 1 and (r.width, r.height) == (64, 64) for r in engine.requests)
    assert result.seeds == [100, 101] and "Seed: 101," in result.images[1].infotext
    # with a variation strength the seed stays within a batch and the variation seed counts instead
    engine.requests.clear()
    run_sd_upscale(engine, plan_sd_upscale(engine, request(source, batch_size=2, subseed=7, subseed_strength=0.5),
                                           SDUpscale(2, 16, "Nearest")))
    assert [(r.seed, r.subseed) for r in engine.requests[:4]] == [(100, 7), (100, 8), (101, 7), (101, 8)]


def test_cancel_between_tiles_keeps_no_half_image(home, tmp_path):
    engine = IdentityEngine(home)
    cancel = threading.Event()
    told = []

    def on_tile(n, t):
        told.append((n, t))
        if t == 2:
            cancel.set()

    plan = plan_sd_upscale(engine, request(noise(64, 64)), SDUpscale(2, 16, "Lanczos"))
    result = run_sd_upscale(engine, plan, output_dir=tmp_path / "out", cancel=cancel, on_tile=on_tile)
    # cancelled before tile 2 started: tiles 0 and 1 ran, tile 2 was never asked for, no half image written
    assert result.interrupted and result.images == [] and told == [(0, 0), (0, 1), (0, 2)]
    assert len(engine.requests) == 2 and not (tmp_path / "out").exists()
    # cancelled inside tile 4 (the engine answers it): nothing more runs
    engine.requests.clear()
    cancel.clear()
    engine.on_generate = lambda count: cancel.set() if count == 4 else None
    result = run_sd_upscale(engine, plan, cancel=cancel)
    assert result.interrupted and len(engine.requests) == 4 and result.images == []


def test_a_skipped_tile_keeps_its_upscaled_pixels(home):
    engine = IdentityEngine(home)
    skip = threading.Event()
    engine.on_generate = lambda count: skip.set() if count == 2 else None
    source = noise(64, 64)
    plan = plan_sd_upscale(engine, request(source), SDUpscale(2, 16, "Lanczos"))
    result = run_sd_upscale(engine, plan, skip=skip)
    assert not result.interrupted and len(engine.requests) == 9 and not skip.is_set()
    upscaled = engine.upscalers.upscale(source, 2, "Lanczos")
    assert np.array_equal(arr(Image.open(io.BytesIO(result.images[0].png))), arr(upscaled))


@pytest.mark.parametrize(("fields", "options", "words"), [
    ({}, SDUpscale(8, 16, "Lanczos"), "max_side = 256"),  # 64 x 8 = 512 > 256
    ({"width": 256, "height": 256}, SDUpscale(2, 16, "Lanczos"), "smaller than a tile"),
    ({}, SDUpscale(2, 64, "Lanczos"), "overlap 64"),
    ({}, SDUpscale(2, 16, "4x-Nothing"), "4x-Nothing"),
    ({}, SDUpscale(0, 16, "Lanczos"), "over 0"),
    ({}, SDUpscale(2, -1, "Lanczos"), "overlap"),
    ({"mask": b"x"}, SDUpscale(), "mask"),
    ({"init_image": None}, SDUpscale(), "init image"),
])
def test_bad_requests_are_refused_before_anything_runs(home, fields, options, words):
    engine = IdentityEngine(home, Limits(max_side=256))
    with pytest.raises(InvalidRequest, match=words):
        plan_sd_upscale(engine, request(noise(64, 64)).model_copy(update=fields), options)
    assert engine.requests == []


# -- a real run on the tiny model -------------------------------------------------------------------

def test_real_run_on_the_tiny_model_redraws_every_tile(home, engine_factory, tiny_model):
    engine = engine_factory(home)
    source = noise(64, 64, seed=3)
    req = request(source, model=str(tiny_model("sd1")["path"]), steps=4, sampler="Euler", denoising_strength=0.5)
    events = []
    result = run_sd_upscale(engine, plan_sd_upscale(engine, req, SDUpscale(2, 16, "Lanczos")),
                            on_step=lambda e: events.append((e.batch_index, e.batch_count)))
    (image,) = result.images
    out = Image.open(io.BytesIO(image.png))
    assert out.size == (128, 128) and not result.interrupted
    assert not np.array_equal(arr(out), arr(engine.upscalers.upscale(source, 2, "Lanczos")))  # the tiles were redrawn
    assert sorted({i for i, _ in events}) == list(range(9)) and {c for _, c in events} == {9}  # progress per tile
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in image.infotext and "Size: 64x64" in image.infotext


def test_cli_sd_upscale(home, tiny_model, tmp_path):
    from tests.test_cli import run as run_cli

    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    src = tmp_path / "src.png"
    noise(48, 48).save(src)
    r = run_cli(home, "generate", "a harbour", "-i", str(src), "-W", "64", "-H", "64", "--steps", "2", "-d", "0.5",
                "--sampler", "Euler", "--seed", "5", "--precision", "fp32", "--sd-upscale", "2",
                "--sd-upscale-overlap", "32", "--sd-upscale-upscaler", "nearest")
    assert r.exit_code == 0, r.output
    (path,) = sorted((home.outputs / "img2img").glob("*/*.png"))
    assert str(path) in r.output and "96x96 (Nearest), 2x2 tiles of 64x64" in r.output
    assert Image.open(path).size == (96, 96) and "SD upscale overlap: 32" in Image.open(path).text["parameters"]
    r = run_cli(home, "generate", "a harbour", "--steps", "2", "--sd-upscale", "2")
    assert r.exit_code != 0 and "-i/--init-image" in r.output and "Traceback" not in r.output


# -- the webui's API with the real webuiapi client ------------------------------------------------------

def _client(url: str):
    import webuiapi

    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=4)


def _refused(call, *words: str) -> None:
    with pytest.raises(RuntimeError) as caught:
        call()
    status, text = caught.value.args
    assert status == 422 and all(w in json.loads(text)["detail"] for w in words), (status, text)


def test_webuiapi_img2img_with_the_sd_upscale_script(studio):
    from tests.server_util import live_server

    source = noise(64, 64, seed=5)
    small = {"prompt": "a lighthouse", "width": 64, "height": 64, "seed": 21, "denoising_strength": 0.5}
    with live_server(studio) as url:
        api = _client(url)
        assert "sd upscale" in api.get_scripts()["img2img"]
        info = {s["name"]: s for s in api.custom_get("script-info", baseurl=True) if s["is_img2img"]}["sd upscale"]
        assert [a["label"] for a in info["args"]][1:] == ["Tile overlap", "Upscaler", "Scale Factor"]
        assert info["args"][2]["choices"] == [u["name"] for u in api.get_upscalers()][:3] == ["None", "Lanczos",
                                                                                              "Nearest"]
        # the webui's order: [info, overlap, upscaler index into /upscalers, scale factor]
        result = api.img2img(images=[source], **small, script_name="SD upscale", script_args=[None, 16, 1, 2])
        assert len(result.images) == 1 and result.image.size == (128, 128)
        assert result.info["width"] == 64 and result.info["all_seeds"] == [21]
        assert result.info["extra_generation_params"] == {"SD upscale overlap": 16, "SD upscale upscaler": "Lanczos"}
        text = result.info["infotexts"][0]
        assert "SD upscale upscaler: Lanczos" in text and "Seed: 21," in text and "Size: 64x64" in text
        job = studio.queue.jobs()[-1]
        assert job.batches == 9 and job.images and job.images[0].seed == 21
        # the upscaler by name, any case in the script's name, two upscales
        result = api.img2img(images=[source], **small, n_iter=2, script_name="sd UPSCALE",
                             script_args=["", 32, "nearest", 1.5])
        assert [im.size for im in result.images] == [(96, 96)] * 2 and result.info["all_seeds"] == [21, 22]
        assert "SD upscale upscaler: Nearest" in result.info["infotexts"][1]
        before = len(studio.queue.jobs())
        run = api.img2img
        _refused(lambda: run(images=[source], **small, script_name="SD upscale", script_args=[None, 16, 99, 2]),
                 "upscaler 99", "/sdapi/v1/upscalers")
        _refused(lambda: run(images=[source], **small, script_name="SD upscale", script_args=[None, 16, 1, 200]),
                 "max_side")
        _refused(lambda: run(images=[source], **small, script_name="SD upscale", script_args=[None, "lots", 1, 2]),
                 "overlap")
        _refused(lambda: run(images=[source], **small, script_name="SD upscale", script_args=[None, 16, 1, 2, 5]),
                 "at most 4")
        _refused(lambda: api.txt2img(prompt="a", width=64, height=64, script_name="SD upscale",
                                     script_args=[None, 16, 1, 2]), "img2img")
        assert len(studio.queue.jobs()) == before  # nothing refused was queued
