"""X/Y plot: the webui's value syntax, cells that are ordinary generations, and an exact labelled grid."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from darkroom.errors import InvalidRequest
from darkroom.metadata.images import read_image_metadata
from darkroom.metadata.infotext import parse_infotext
from darkroom.request import GenerationRequest
from darkroom.services.xyplot import draw_grid, find_axis, parse_axis, plan_xy, run_xy
from tests.test_cli import run as run_cli

SIDE = 64


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models are far faster on one thread when the machine is busy (two threads spin-wait on each other)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_engine(home, engine_factory):
    return engine_factory(home)


def base(tiny_model, **kw) -> GenerationRequest:
    fields = dict(prompt="a red cube", model=str(tiny_model("sd1")["path"]), width=SIDE, height=SIDE, steps=2,
                  cfg_scale=5.0, sampler="Euler", schedule="Automatic")
    return GenerationRequest(**{**fields, **kw})


# -- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "text", "values"), [
    ("Steps", "10, 20,30", (10, 20, 30)),
    ("steps", "1-5", (1, 2, 3, 4, 5)),
    ("STEPS", "1-10 (+3)", (1, 4, 7, 10)),
    ("steps", "10-1 (-3)", (10, 7, 4, 1)),
    ("steps", "5-3", (5, 4, 3)),
    ("steps", "1-10 [4]", (1, 4, 7, 10)),
    ("steps", "1-3, 8, 20-30 (+5)", (1, 2, 3, 8, 20, 25, 30)),
    ("seed", "-1, 7", (-1, 7)),
    ("cfg_scale", "1.5-3 (+0.5)", (1.5, 2.0, 2.5, 3.0)),
    ("CFG Scale", "2-8 [4]", (2.0, 4.0, 6.0, 8.0)),
    ("cfg", "7, 3.5", (7.0, 3.5)),
    ("Denoising", "0-1 (+0.25)", (0.0, 0.25, 0.5, 0.75, 1.0)),
    ("Var. strength", "0-1 [3]", (0.0, 0.5, 1.0)),
    ("sampler", 'Euler a, "DPM++ 2M", DDIM', ("Euler a", "DPM++ 2M", "DDIM")),
    ("sampler_name", '"DPM++ 2M Karras",Euler', ("DPM++ 2M Karras", "Euler")),
    ("Schedule type", "Karras, uniform", ("Karras", "uniform")),
    ("prompt s/r", '"red, shiny", blue', ("red, shiny", "blue")),
    ("model", "a.safetensors, b", ("a.safetensors", "b")),
    ("Size", "64x64, 128x96", ("64x64", "128x96")),
    ("clip-skip", "1-2", (1, 2)),
    ("hr_second_pass_steps", "2-6 [3]", (2, 4, 6)),
    ("Hires upscale", "1.5, 2", (1.5, 2.0)),
    ("Hires upscaler", "Latent, Lanczos", ("Latent", "Lanczos")),
    ("Var. seed", "1-3", (1, 2, 3)),
    ("Width", "64-128 (+32)", (64, 96, 128)),
    ("height", "64", (64,)),
    ("eta", "0, 0.5", (0.0, 0.5)),
])
def test_values_parse_as_the_webui(name, text, values):
    axis = parse_axis(name, text)
    assert axis.values == values
    assert all(type(v) is type(values[0]) for v in axis.values)
    assert axis.text == text


def test_axis_names_and_labels():
    assert find_axis("cfg scale") is find_axis("CFG Scale") is find_axis("cfg_scale") is find_axis("cfg")
    assert find_axis("checkpoint name").field == "model"
    assert parse_axis("steps", "20").labels() == ["Steps: 20"]
    assert parse_axis("cfg", "7, 2.5").labels() == ["CFG Scale: 7", "CFG Scale: 2.5"]
    assert parse_axis("sampler", "Euler a").labels() == ["Sampler: Euler a"]
    assert parse_axis("Prompt S/R", "cube, ball").labels() == ["cube", "ball"]  # as the webui: the text alone
    assert parse_axis("model", "dir/tiny.safetensors").labels() == ["Checkpoint name: tiny"]


@pytest.mark.parametrize(("name", "text", "words"), [
    ("steps", "10, abc", ["Steps", "'abc'"]),
    ("steps", "2.5", ["Steps", "'2.5'"]),
    ("steps", "0, 5", ["Steps", "0", "greater than or equal to 1"]),
    ("steps", "1-10 (-2)", ["Steps", "'1-10 (-2)'", "step"]),
    ("steps", "1-10 (+0)", ["Steps", "step"]),
    ("cfg", "7, lots", ["CFG Scale", "'lots'"]),
    ("cfg", "1-2 [0]", ["CFG Scale", "'1-2 [0]'"]),
    ("seed", "1-100000", ["Seed", "at most"]),
    ("sampler", "Euler, Eulr", ["Sampler", "'Eulr'", "unknown sampler"]),
    ("schedule", "Karras, Sometimes", ["Schedule type", "'Sometimes'"]),
    ("width", "64, 65", ["Width", "65", "multiple of 8"]),
    ("Size", "64x64, big", ["Size", "'big'", "WIDTHxHEIGHT"]),
    ("hires upscaler", "Bicubic", ["Hires upscaler", "'Bicubic'"]),
    ("denoising", "0.5, 1.5", ["Denoising", "1.5"]),
    ("steps", " , ", ["Steps", "no values"]),
    ("Zoom", "1, 2", ["'Zoom'", "Steps", "CFG Scale"]),
])
def test_bad_values_name_the_axis_and_value(name, text, words):
    with pytest.raises(InvalidRequest) as e:
        parse_axis(name, text)
    for word in words:
        assert word in str(e.value)


class FakeEngine:
    """Planning needs only the engine's checks; nothing is generated."""

    def check_inputs(self, req):
        from darkroom.engine import samplers

        return samplers.resolve(req.sampler, req.schedule)

    def model_path(self, req):
        if req.model == "missing":
            raise InvalidRequest("no model named 'missing'")
        return Path("tiny.safetensors")


def test_prompt_search_and_replace():
    req = GenerationRequest(prompt="a cat on a mat, cat ears", negative_prompt="ugly cat", seed=5)
    plan = plan_xy(FakeEngine(), req, parse_axis("Prompt S/R", "cat, dog, red fox"), None)
    assert [c.request.prompt for c in plan.cells] == [
        "a cat on a mat, cat ears", "a dog on a mat, dog ears", "a red fox on a mat, red fox ears"]
    assert [c.request.negative_prompt for c in plan.cells] == ["ugly cat", "ugly dog", "ugly red fox"]
    assert [c.x_label for c in plan.cells] == ["cat", "dog", "red fox"]
    # two S/R axes combine; the text to find must be in one of the prompts
    plan = plan_xy(FakeEngine(), req, parse_axis("sr", "cat, dog"), parse_axis("sr", "mat, rug"))
    assert [c.request.prompt for c in plan.cells][-1] == "a dog on a rug, dog ears"
    with pytest.raises(InvalidRequest, match="'horse' is not in the prompt"):
        plan_xy(FakeEngine(), req, parse_axis("Prompt S/R", "horse, dog"), None)


def test_plan_shares_one_seed_and_checks_every_cell_first():
    req = GenerationRequest(prompt="x", seed=-1, schedule="Karras")
    plan = plan_xy(FakeEngine(), req, parse_axis("steps", "1-3"), parse_axis("cfg", "1, 5"))
    seeds = {c.request.seed for c in plan.cells}
    assert len(seeds) == 1 and -1 not in seeds
    assert len({c.request.subseed for c in plan.cells}) == 1
    assert [(c.x, c.y, c.request.steps, c.request.cfg_scale) for c in plan.cells] == [
        (0, 0, 1, 1.0), (1, 0, 2, 1.0), (2, 0, 3, 1.0), (0, 1, 1, 5.0), (1, 1, 2, 5.0), (2, 1, 3, 5.0)]
    assert plan.total_steps == 12
    # a seed axis: -1 values get their own random seed
    plan = plan_xy(FakeEngine(), req, parse_axis("seed", "-1, -1, 3"), None)
    fixed = [c.request.seed for c in plan.cells]
    assert fixed[2] == 3 and -1 not in fixed and plan.x.labels()[2] == "Seed: 3"
    # an axis value valid alone but not with the base request fails at planning
    with pytest.raises(InvalidRequest, match="DDIM.*Karras"):
        plan_xy(FakeEngine(), req, parse_axis("sampler", "Euler, DDIM"), None)
    with pytest.raises(InvalidRequest, match="Checkpoint name: missing"):
        plan_xy(FakeEngine(), req, parse_axis("model", "here, missing"), None)
    with pytest.raises(InvalidRequest, match="both set Steps"):
        plan_xy(FakeEngine(), req, parse_axis("steps", "1"), parse_axis("steps", "2"))
    with pytest.raises(InvalidRequest, match="X or a Y"):
        plan_xy(FakeEngine(), req, None, None)
    # the slow-to-switch axis (checkpoints) is generated in the outer loop
    plan = plan_xy(FakeEngine(), req, parse_axis("model", "a, b"), parse_axis("steps", "1, 2, 3"))
    assert [plan.cells[i].request.model for i in plan.order] == ["a", "a", "a", "b", "b", "b"]


def test_draw_grid_boxes_and_labels():
    cells = [Image.new("RGB", (40 + 10 * i, 30), (i * 40, 100, 200)) for i in range(4)]
    long = "a blue sphere on a long wooden table under a window"  # wraps onto several lines
    grid, boxes = draw_grid(cells, 2, ["Steps: 1", "Sampler: DPM++ 2M SDE"], ["Sampler: Euler a", long])
    arr = np.asarray(grid)
    for cell, (x0, y0, x1, y1) in zip(cells, boxes, strict=True):
        assert (x1 - x0, y1 - y0) == cell.size
        assert (arr[y0:y1, x0:x1] == np.asarray(cell)).all()
    assert boxes[1][0] == boxes[3][0] and boxes[2][1] == boxes[3][1]  # columns and rows line up
    left, top = boxes[0][0], boxes[0][1]
    assert left > 0 and top > 0
    assert (arr[:top, left:] < 128).any() and (arr[top:, :left] < 128).any()  # text in both margins
    # no axis on one side: no margin there
    grid, boxes = draw_grid(cells[:2], 2, ["a", "b"], None)
    assert boxes[0][0] == 0 and boxes[0][1] > 0


# -- generation --------------------------------------------------------------------------------

def test_grid_of_sampler_by_steps(tiny_engine, tiny_model, tmp_path):
    out, grids = tmp_path / "out", tmp_path / "grids"
    x, y = parse_axis("steps", "1-3"), parse_axis("Sampler", "Euler, DDIM")
    cells_seen = []
    result = run_xy(tiny_engine, base(tiny_model, seed=-1), x, y, output_dir=out, grid_dir=grids,
                    on_cell=lambda n, cell: cells_seen.append((n, cell.x, cell.y)))
    assert not result.interrupted
    assert cells_seen == [(n, n % 3, n // 3) for n in range(6)]
    assert len(result.images) == 6 and len(list(out.glob("*.png"))) == 6
    assert [p.name for p in grids.glob("*.png")] == ["grid-00000.png"]
    assert result.grid_path == str(grids / "grid-00000.png")
    assert Path(result.grid_path).read_bytes() == result.grid_png

    seed = result.seeds[0]
    assert set(result.seeds) == {seed} and seed != -1
    for cell in result.cells:
        params = parse_infotext(cell.images[0].infotext)
        assert params["Steps"] == str(x.values[cell.x])
        assert params["Sampler"] == y.values[cell.y]
        assert params["Seed"] == str(seed)
        assert read_image_metadata(Path(cell.images[0].path)).parameters == cell.images[0].infotext

    grid = pixels(result.grid_png)
    assert grid.shape[1] > 3 * SIDE and grid.shape[0] > 2 * SIDE  # cells plus label margins
    for cell in result.cells:
        left, top, right, bottom = cell.box
        assert (right - left, bottom - top) == (SIDE, SIDE)
        assert left == result.cells[0].box[0] + cell.x * SIDE and top == result.cells[0].box[1] + cell.y * SIDE
        assert np.array_equal(grid[top:bottom, left:right], pixels(cell.images[0].png))
    assert len({pixels(c.images[0].png).tobytes() for c in result.cells}) == 6  # every cell really differs

    info = parse_infotext(read_image_metadata(Path(result.grid_path)).parameters)
    first = parse_infotext(result.cells[0].images[0].infotext)
    assert {k: info[k] for k in first} == first
    assert (info["Script"], info["X Type"], info["X Values"], info["Y Type"], info["Y Values"]) == (
        "X/Y/Z plot", "Steps", "1-3", "Sampler", "Euler, DDIM")

    # a cell is an ordinary generation: the same request alone gives the same pixels
    alone = tiny_engine.generate(result.cells[4].request)
    assert np.array_equal(pixels(alone.images[0].png), pixels(result.cells[4].images[0].png))


def test_batch_cells_side_by_side_and_seed_axis(tiny_engine, tiny_model, tmp_path):
    result = run_xy(tiny_engine, base(tiny_model, steps=1, batch_size=2), parse_axis("seed", "10, -1"), None,
                    grid_dir=tmp_path)
    grid = pixels(result.grid_png)
    assert [c.box[2] - c.box[0] for c in result.cells] == [2 * SIDE, 2 * SIDE]
    random_seed = result.cells[1].request.seed
    assert result.seeds == [10, 11, random_seed, random_seed + 1]
    for cell in result.cells:
        left, top, _, bottom = cell.box
        for k, image in enumerate(cell.images):
            assert np.array_equal(grid[top:bottom, left + k * SIDE:left + (k + 1) * SIDE], pixels(image.png))
    info = parse_infotext(result.infotext)
    assert (info["X Type"], info["X Values"], info["Fixed X Values"]) == ("Seed", "10, -1", f"10, {random_seed}")
    assert "Y Type" not in info


def test_invalid_cell_fails_before_any_image(tiny_engine, tiny_model, tmp_path):
    out = tmp_path / "out"
    # each value is valid alone, but DDIM takes no Karras schedule: nothing may be generated
    with pytest.raises(InvalidRequest, match="DDIM"):
        run_xy(tiny_engine, base(tiny_model, schedule="Karras"), parse_axis("steps", "1, 2"),
               parse_axis("sampler", "Euler, DDIM"), output_dir=out, grid_dir=out)
    assert not out.exists() or not any(out.iterdir())


def test_cancel_keeps_finished_cells_and_writes_no_grid(tiny_engine, tiny_model, tmp_path):
    cancel = threading.Event()

    def on_cell(n, cell):
        if n == 1:
            cancel.set()

    result = run_xy(tiny_engine, base(tiny_model, steps=1), parse_axis("cfg", "1, 2, 3"), None,
                    output_dir=tmp_path / "out", grid_dir=tmp_path / "grids", cancel=cancel, on_cell=on_cell)
    assert result.interrupted and result.grid_png is None and result.grid_path is None
    assert len(result.images) == 1 and len(list((tmp_path / "out").glob("*.png"))) == 1
    assert not (tmp_path / "grids").exists()


# -- CLI -----------------------------------------------------------------------------------------

def test_cli_grid(home, tiny_model):
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    r = run_cli(home, "generate", "a lighthouse", "--steps", "2", "-W", "64", "-H", "64", "--sampler", "Euler",
                "--x", "steps=1,2", "--y", "cfg=1,5", "--precision", "fp32")
    assert r.exit_code == 0, r.output
    images = sorted((home.outputs / "txt2img").glob("*/*.png"))
    grids = list((home.outputs / "txt2img-grids").glob("*/grid-00000.png"))
    assert len(images) == 4 and len(grids) == 1
    for path in [*images, *grids]:
        assert str(path) in r.output
    assert "2x2 grid" in r.output
    steps_cfg = {(p["Steps"], p["CFG scale"]) for p in
                 (parse_infotext(read_image_metadata(f).parameters) for f in images)}
    assert steps_cfg == {("1", "1"), ("2", "1"), ("1", "5"), ("2", "5")}
    info = parse_infotext(read_image_metadata(grids[0]).parameters)
    assert (info["X Type"], info["X Values"], info["Y Type"], info["Y Values"]) == ("Steps", "1,2", "CFG Scale", "1,5")
    width, height = Image.open(grids[0]).size
    assert width > 2 * 64 and height > 2 * 64

    # mistakes are one-line errors, before anything is generated
    r = run_cli(home, "generate", "x", "--x", "sampler=Euler,Nope", "-o", str(home.root / "bad"))
    assert r.exit_code == 2 and "Sampler value 'Nope'" in r.output and "Traceback" not in r.output
    r = run_cli(home, "generate", "x", "--y", "steps:3")
    assert r.exit_code == 2 and "AXIS=VALUES" in r.output
    assert not (home.root / "bad").exists()
