"""ControlNet on the command line: `generate --controlnet SPEC` (parsing, one-line errors, a real run with a tiny
ControlNet, --from-png rerunning the units), `darkroom controlnet list` and `darkroom controlnet detect`."""

from __future__ import annotations

import shutil

import click
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from darkroom.cli import cli
from darkroom.cli.control_spec import parse_unit
from darkroom.metadata.images import read_image_metadata
from darkroom.metadata.infotext import parse_infotext


def run(home, *args):
    return CliRunner().invoke(cli, ["--home", str(home.root), *args])


def drawn_shape(path, size: int = 64):
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill="white")
    image.save(path)
    return path


@pytest.fixture
def shape(tmp_path):
    return drawn_shape(tmp_path / "shape.png")


# --- SPEC parsing ---------------------------------------------------------------------------------------


def test_spec_with_aliases_and_words(shape):
    unit = parse_unit(f"model=control_v11p_sd15_canny,image={shape},module=canny,weight=0.8,start=0.1,end=0.8,"
                      "mode=prompt,resize=fill,res=256,a=50,b=150,pixel_perfect,hr=low")
    assert (unit.model, unit.module, unit.weight) == ("control_v11p_sd15_canny", "canny", 0.8)
    assert (unit.guidance_start, unit.guidance_end) == (0.1, 0.8)
    assert unit.control_mode == "My prompt is more important" and unit.resize_mode == "Resize and Fill"
    assert (unit.processor_res, unit.threshold_a, unit.threshold_b) == (256, 50, 150)
    assert unit.pixel_perfect and unit.hr_option == "Low res only"
    assert unit.image == shape.read_bytes() and unit.mask is None
    full = parse_unit(f"model=m,image={shape},control_mode=ControlNet is more important,resize_mode=0")
    assert full.control_mode == "ControlNet is more important" and full.resize_mode == "Just Resize"


@pytest.mark.parametrize(("spec", "needle"), [
    ("model=m,wobble=1", "unknown key 'wobble'"),
    ("model=m,weight", "weight needs a value"),
    ("model=m,weight=9", "weight: Input should be less than or equal to 2"),
    ("model=m,mode=loud", "control_mode 'loud' is not one of"),
    ("model=m,model=n", "model is given twice"),
    ("model=m,start=0.9,end=0.1", "guidance_end 0.1 is before guidance_start 0.9"),
    ("", "empty unit"),
])
def test_spec_mistakes_name_the_key(spec, needle):
    with pytest.raises(click.BadParameter) as e:
        parse_unit(spec)
    assert needle in e.value.format_message() and "--controlnet" in str(e.value.param_hint)


def test_spec_image_files_are_checked(tmp_path):
    with pytest.raises(click.BadParameter) as e:
        parse_unit(f"model=m,image={tmp_path / 'missing.png'}")
    assert f"image file '{tmp_path / 'missing.png'}' not found" in e.value.format_message()
    with pytest.raises(click.BadParameter) as e:
        parse_unit(f"model=m,mask={tmp_path}")  # a folder
    assert str(tmp_path) in e.value.format_message() and "folder" in e.value.format_message()


def test_generate_rejects_a_bad_spec_in_one_line(home, tmp_path):
    r = run(home, "generate", "p", "--controlnet", f"model=m,image={tmp_path / 'nope.png'}")
    assert r.exit_code == 2
    assert "--controlnet" in r.output and "nope.png' not found" in r.output and "Traceback" not in r.output


# --- darkroom controlnet list / detect -------------------------------------------------------------------


def test_controlnet_list_shows_models_modules_and_folders(home):
    from darkroom.testing.tiny_controlnet import write_tiny_controlnet

    write_tiny_controlnet(home.controlnets, "cn-tiny")
    r = run(home, "controlnet", "list")
    assert r.exit_code == 0, r.output
    assert "cn-tiny [" in r.output and "sd1" in r.output
    assert "\n  canny\n" in r.output
    assert "lineart (lineart_realistic)\tunavailable: lineart_realistic needs sk_model.pth" in r.output
    assert str(home.controlnets) in r.output and str(home.root / "models" / "annotators") in r.output


def test_controlnet_detect_writes_the_map(home, shape, tmp_path):
    out = tmp_path / "edges.png"
    r = run(home, "controlnet", "detect", "canny", str(shape), "-o", str(out), "--resolution", "64")
    assert r.exit_code == 0, r.output
    edges = Image.open(out).convert("L")
    assert edges.size == (64, 64) and edges.getpixel((32, 32)) == 0
    assert max(edges.getpixel((x, 32)) for x in range(13, 20)) == 255  # the square's left side
    r = run(home, "controlnet", "detect", "lineart", str(shape), "-o", str(out))
    assert r.exit_code == 2 and "sk_model.pth" in r.output and "Traceback" not in r.output
    r = run(home, "controlnet", "detect", "canny", str(tmp_path / "gone.png"), "-o", str(out))
    assert r.exit_code == 2 and "gone.png: no such file" in r.output


# --- a real run -----------------------------------------------------------------------------------------


@pytest.fixture
def sd1_and_cn(home, tiny_model):
    from darkroom.testing.tiny_controlnet import write_tiny_controlnet

    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    write_tiny_controlnet(home.controlnets, "cn-tiny")
    return home


def test_generate_with_a_controlnet_and_rerun_from_png(sd1_and_cn, shape, tmp_path):
    home = sd1_and_cn
    common = ["--model", "tiny-sd1", "--steps", "3", "--seed", "5", "-W", "64", "-H", "64", "--sampler", "Euler",
              "--precision", "fp32"]
    r = run(home, "generate", "a square", *common, "-o", str(tmp_path / "plain"))
    assert r.exit_code == 0, r.output
    r = run(home, "generate", "a square", *common, "-o", str(tmp_path / "cn"),
            "--controlnet", f"model=cn-tiny,image={shape},module=canny,weight=1.5,a=100,b=200,end=0.9")
    assert r.exit_code == 0, r.output
    [plain] = (tmp_path / "plain").glob("*.png")
    [steered] = (tmp_path / "cn").glob("*.png")
    assert Image.open(plain).tobytes() != Image.open(steered).tobytes()
    params = parse_infotext(read_image_metadata(steered).parameters)
    line = params["ControlNet 0"]
    assert "Module: canny" in line and "cn-tiny" in line and "Weight: 1.5" in line

    # --from-png reruns the unit (its settings from the infotext, its map from the PNG): the same picture
    r = run(home, "generate", "--from-png", str(steered), "-o", str(tmp_path / "again"), "--precision", "fp32")
    assert r.exit_code == 0, r.output
    [again] = (tmp_path / "again").glob("*.png")
    assert Image.open(again).tobytes() == Image.open(steered).tobytes()
    # the stored map is not detected again, yet the rerun's line names the original preprocessor
    assert parse_infotext(read_image_metadata(again).parameters)["ControlNet 0"] == line
    # --controlnet with --from-png replaces the image's units
    r = run(home, "generate", "--from-png", str(steered), "-o", str(tmp_path / "other"), "--precision", "fp32",
            "--controlnet", f"model=cn-tiny,image={shape},weight=0.5")
    assert r.exit_code == 0, r.output
    [other] = (tmp_path / "other").glob("*.png")
    assert "Weight: 0.5" in parse_infotext(read_image_metadata(other).parameters)["ControlNet 0"]


def test_a_batch_folder_runs_once_per_picture(sd1_and_cn, tmp_path):
    """batch=FOLDER: the job once per picture of the folder (name order), the same seed each time; each image
    equals a plain run with that picture; an empty or missing folder is a one-line error."""
    home = sd1_and_cn
    frames = tmp_path / "frames"
    frames.mkdir()
    drawn_shape(frames / "frame0.png")
    other = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(other).ellipse((4, 30, 30, 60), fill="white")
    other.save(frames / "frame1.png")
    (frames / "notes.txt").write_text("not a picture")
    common = ["--model", "tiny-sd1", "--steps", "2", "--seed", "5", "-W", "64", "-H", "64", "--sampler", "Euler",
              "--precision", "fp32"]
    r = run(home, "generate", "a square", *common, "-o", str(tmp_path / "batch"),
            "--controlnet", f"model=cn-tiny,batch={frames}")
    assert r.exit_code == 0, r.output
    assert "2 image(s) from 2 control pictures" in r.output and "seed 5" in r.output
    made = sorted((tmp_path / "batch").glob("*.png"))
    assert len(made) == 2
    for k, image in enumerate(made):
        r = run(home, "generate", "a square", *common, "-o", str(tmp_path / f"alone{k}"),
                "--controlnet", f"model=cn-tiny,image={frames / f'frame{k}.png'}")
        assert r.exit_code == 0, r.output
        [alone] = (tmp_path / f"alone{k}").glob("*.png")
        assert Image.open(alone).tobytes() == Image.open(image).tobytes(), k
    assert Image.open(made[0]).tobytes() != Image.open(made[1]).tobytes()
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, needle in ((tmp_path / "nowhere", "not found"), (empty, "holds no PNG, JPEG or WebP")):
        r = run(home, "generate", "a square", *common, "--controlnet", f"model=cn-tiny,batch={folder}")
        assert r.exit_code != 0 and needle in r.output and "Traceback" not in r.output, r.output
