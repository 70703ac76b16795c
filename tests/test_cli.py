"""The `darkroom` CLI as a user runs it: files written, parameters inside, one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from darkroom.cli import cli
from darkroom.metadata.images import read_image_metadata
from darkroom.metadata.infotext import parse_infotext

ROOT = Path(__file__).resolve().parent.parent


def run(home, *args):
    result = CliRunner().invoke(cli, ["--home", str(home.root), *args], catch_exceptions=False)
    return result


@pytest.fixture
def sd1_in_home(home, tiny_model):
    target = home.checkpoints / "tiny-sd1.safetensors"
    shutil.copy(tiny_model("sd1")["path"], target)
    return target


def test_generate_writes_pngs_with_infotext(home, sd1_in_home, tmp_path):
    out = tmp_path / "out"
    r = run(home, "generate", "a lighthouse at dusk", "--model", "tiny-sd1", "-n", "2", "--steps", "3", "--cfg", "7",
            "--sampler", "DPM++ 2M", "--schedule", "Karras", "--seed", "42", "-W", "64", "-H", "96", "-o", str(out),
            "--precision", "fp32")
    assert r.exit_code == 0, r.output
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-43.png"]
    assert str(files[0]) in r.output
    assert "Sampling" in r.output and "step" in r.output  # the progress bar
    params = parse_infotext(read_image_metadata(files[1]).parameters)
    assert params["Prompt"] == "a lighthouse at dusk"
    assert (params["Steps"], params["Sampler"], params["Schedule type"], params["CFG scale"]) == (
        "3", "DPM++ 2M", "Karras", "7")
    assert (params["Seed"], params["Size"], params["Model"]) == ("43", "64x96", "tiny-sd1")
    assert len(params["Model hash"]) == 10

    # png-info prints them; --from-png reruns them bit for bit
    r = run(home, "png-info", str(files[0]))
    assert r.exit_code == 0 and "Seed: 42" in r.output
    r = run(home, "generate", "--from-png", str(files[0]), "-o", str(tmp_path / "again"), "--precision", "fp32")
    assert r.exit_code == 0, r.output
    [again] = (tmp_path / "again").glob("*.png")
    assert again.read_bytes() == files[0].read_bytes()


def test_model_by_short_hash_and_default_output_folder(home, sd1_in_home):
    from darkroom.models.hashing import sha256_file

    short = sha256_file(sd1_in_home)[:10]
    r = run(home, "generate", "x", "--model", short, "--steps", "1", "-W", "64", "-H", "64", "--seed", "1")
    assert r.exit_code == 0, r.output
    assert list((home.outputs / "txt2img").glob("*/00000-1.png"))


def test_models_lists_family_size_hash(home, sd1_in_home, tiny_model):
    shutil.copy(tiny_model("sdxl")["path"], home.checkpoints / "tiny-xl.safetensors")
    shutil.copy(tiny_model("sd1-inpainting")["path"], home.checkpoints / "tiny-inpaint.safetensors")
    r = run(home, "models")
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines()[1:]}
    assert "SD1 " in lines["tiny-sd1"] and "MB" in lines["tiny-sd1"]
    assert "SDXL" in lines["tiny-xl"]
    assert "SD1 inpainting" in lines["tiny-inpaint"]


def test_png_info_without_parameters(home, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    r = run(home, "png-info", str(tmp_path / "plain.png"))
    assert r.exit_code == 1 and "no generation parameters found" in r.output


@pytest.mark.parametrize("case", ["truncated", "lora", "sd3", "text", "ckpt", "bad-width", "bad-sampler", "missing"])
def test_user_mistakes_are_one_line_errors(home, tiny_model, tmp_path, case):
    src = tiny_model("sd1")["path"]
    args = ["generate", "a cat", "--steps", "1", "-W", "64", "-H", "64"]
    expect = ""
    if case == "truncated":
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
        args += ["--model", str(bad)]
        expect = "cut.safetensors: file is truncated"
    elif case == "lora":
        bad = tmp_path / "style.safetensors"
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}, bad)
        args += ["--model", str(bad)]
        expect = "style.safetensors: this is a LoRA, not a checkpoint; put it in models/loras"
    elif case == "sd3":
        bad = tmp_path / "sd3.safetensors"
        save_file({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(2, 2)}, bad)
        args += ["--model", str(bad)]
        expect = "sd3.safetensors: not supported yet: detected SD3"
    elif case == "text":
        bad = tmp_path / "readme.safetensors"
        bad.write_text("not a model")
        args += ["--model", str(bad)]
        expect = "readme.safetensors: not a valid .safetensors file"
    elif case == "ckpt":
        bad = tmp_path / "old.ckpt"
        torch.save({"state_dict": {"x": torch.zeros(1)}}, bad)
        args += ["--model", str(bad)]
        expect = "old.ckpt: pickled checkpoints (.ckpt/.pt) can run arbitrary code"
    elif case == "bad-width":
        args += ["--model", str(src), "-W", "513"]
        expect = "width 513 is not a multiple of 8"
    elif case == "bad-sampler":
        args += ["--model", str(src), "--sampler", "Eulr"]
        expect = "unknown sampler 'Eulr'"
    elif case == "missing":
        args += ["--model", "no-such-model"]
        expect = "no model named 'no-such-model'"
    r = CliRunner().invoke(cli, ["--home", str(home.root), *args])
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert expect in r.output, r.output
    assert "Traceback" not in r.output
    assert expect in (home.logs / "darkroom.log").read_text()


def test_ckpt_loads_with_allow_pickle(home, tiny_model, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": load_file(tiny_model("sd1")["path"]), "global_step": 1}, ckpt)
    r = run(home, "generate", "x", "--model", str(ckpt), "--allow-pickle", "--steps", "1", "-W", "64", "-H", "64",
            "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "o").glob("*.png"))) == 1


def test_doctor_shows_device_versions_and_guard(home):
    r = run(home, "doctor")
    assert r.exit_code == 0, r.output
    for text in ("Device: cpu", "torch ", "diffusers ", "Network guard: installed", "none (all is well)",
                 str(home.checkpoints)):
        assert text in r.output


def _env(home):
    env = dict(os.environ, DARKROOM_HOME=str(home.root))
    env.pop("HF_HUB_OFFLINE", None)  # the entry point must set it by itself
    return env


def test_real_process_error_has_no_traceback(home, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 100)
    p = subprocess.run([sys.executable, "-m", "darkroom.cli", "generate", "x", "--model", str(bad)],
                       capture_output=True, text=True, env=_env(home), timeout=300)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith("error: broken.safetensors: not a valid .safetensors file"), lines
    assert len(lines) <= 2
    assert "Traceback" not in p.stderr


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -n` (root, Linux)")
def test_generation_with_no_network_at_all(home, tmp_path):
    """The README's main job, from a fresh home, in a network namespace with no interfaces."""
    p = subprocess.run(
        ["unshare", "-n", sys.executable, "-m", "darkroom.cli", "generate", "a red circle on a white background",
         "--steps", "4", "-W", "64", "-H", "64", "--seed", "3", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, env=_env(home), timeout=600,
    )
    assert p.returncode == 0, p.stderr
    [png] = (tmp_path / "out").glob("*.png")
    assert "Seed: 3" in read_image_metadata(png).parameters
    assert not (home.network_log).exists() or home.network_log.read_text() == ""


def test_v_prediction_from_sidecar_yaml_and_flag(home, tiny_model, engine_factory):
    from darkroom.api import build_engine

    src = tiny_model("sd2")["path"]
    target = home.checkpoints / "v2-768.safetensors"
    shutil.copy(src, target)
    engine = build_engine(home, device="cpu", precision="fp32")
    assert not engine.cache.get(target).v_prediction
    target.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    engine.cache.unload()
    loaded = engine.cache.get(target)
    assert loaded.v_prediction and loaded.detection.label == "SD2-v"
    forced = build_engine(home, device="cpu", precision="fp32", v_prediction=False)
    assert not forced.cache.get(target).v_prediction


def test_fresh_home_uses_builtin_starter_and_lists_it(home, tmp_path):
    r = run(home, "generate", "a red circle", "--steps", "2", "--seed", "5", "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert "darkroom-starter" in r.output and "trained on synthetic shapes" in r.output
    [png] = (tmp_path / "o").glob("*.png")
    params = parse_infotext(read_image_metadata(png).parameters)
    assert params["Model"] == "darkroom-starter" and params["Size"] == "128x128"
    r = run(home, "models")
    assert "darkroom-starter" in r.output and "SD1" in r.output


def test_missing_starter_file_is_a_clear_error(home, tmp_path, monkeypatch):
    from darkroom.models import starter

    gone = tmp_path / "gone" / "darkroom-starter.safetensors"
    monkeypatch.setattr(starter, "STARTER_FILE", gone)
    r = run(home, "generate", "a red circle", "--steps", "2", "--seed", "5", "-o", str(tmp_path / "o"))
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and str(gone) in r.output
    assert "reinstall Darkroom" in r.output and str(home.checkpoints) in r.output
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_keeps_finished_images(home, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "darkroom.cli", "generate", "a red circle", "--steps", "150", "-n", "4",
                          "--seed", "9", "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(home))
    deadline = time.monotonic() + 300
    while not list(out.glob("*.png")) and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 130, stderr
    kept = sorted(out.glob("*.png"))
    assert 1 <= len(kept) < 4 and "interrupted: kept" in stderr and "Traceback" not in stderr
    assert not list(out.glob(".*.tmp"))
    assert str(kept[0]) in stdout


def test_img2img_inpaint_and_hires_from_the_cli(home, sd1_in_home, tmp_path):
    from PIL import Image, ImageDraw

    src = tmp_path / "src.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(src)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 48), 0)
    ImageDraw.Draw(m).rectangle((0, 0, 31, 23), fill=255)
    m.save(mask)
    common = ["--model", "tiny-sd1", "--steps", "4", "--seed", "5", "--sampler", "Euler", "--precision", "fp32"]
    r = run(home, "generate", "a blue square", "-i", str(src), "--mask", str(mask), "--mask-blur", "0",
            "--masked-content", "fill", "-d", "0.9", "-o", str(tmp_path / "inp"), *common)
    assert r.exit_code == 0, r.output
    [out] = (tmp_path / "inp").glob("*.png")
    pixels = Image.open(out).convert("RGB")
    assert pixels.size == (64, 48) and pixels.getpixel((60, 40)) == (200, 40, 40)  # outside the mask: exact
    params = parse_infotext(read_image_metadata(out).parameters)
    assert params["Masked content"] == "fill" and params["Denoising strength"] == "0.9"
    # img2img writes into outputs/img2img/<date> by default
    r = run(home, "generate", "a blue square", "-i", str(src), "-d", "0.5", *common)
    assert r.exit_code == 0 and list((home.outputs / "img2img").rglob("*.png"))

    r = run(home, "generate", "a red circle", "-W", "64", "-H", "64", "--hires", "--hr-size", "96x80",
            "--hr-steps", "4", "-o", str(tmp_path / "hr"), *common)
    assert r.exit_code == 0, r.output
    [hr] = (tmp_path / "hr").glob("*.png")
    assert Image.open(hr).size == (96, 80)
    # the infotext carries the hires settings, so --from-png reruns the very same image
    r = run(home, "generate", "--from-png", str(hr), "-o", str(tmp_path / "again"), "--precision", "fp32")
    assert r.exit_code == 0, r.output
    [again] = (tmp_path / "again").glob("*.png")
    assert again.read_bytes() == hr.read_bytes()
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "--hires", "--hr-size", "big"])
    assert r.exit_code == 2 and "WIDTHxHEIGHT" in r.output


def test_models_dirs_from_settings(home, tiny_model, tmp_path):
    """Folders saved under "models_dirs" in settings.json are used like --models-dir (an A1111 root here)."""
    import json

    webui = tmp_path / "webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_model("sd1")["path"], webui / "models" / "Stable-diffusion" / "from-webui.safetensors")
    (home.root / "settings.json").write_text(json.dumps({"models_dirs": [str(webui)]}))
    r = run(home, "models")
    assert r.exit_code == 0 and "from-webui" in r.output


def test_generate_format_jpg_and_webp_keep_the_parameters(home, sd1_in_home, tmp_path):
    """--format writes JPEG/WebP with the infotext in EXIF (as the webui stores it), which png-info and
    --from-png read back."""
    for fmt, suffix, kind in (("jpg", ".jpg", "JPEG"), ("webp", ".webp", "WebP")):
        out = tmp_path / fmt
        r = run(home, "generate", "a red circle", "--model", "tiny-sd1", "--steps", "2", "--seed", "5", "-W", "64",
                "-H", "64", "-o", str(out), "--format", fmt)
        assert r.exit_code == 0, r.output
        [saved] = out.iterdir()
        assert saved.suffix == suffix
        meta = read_image_metadata(saved)
        assert meta.image_format == kind and parse_infotext(meta.parameters)["Seed"] == "5"
        r = run(home, "png-info", str(saved))
        assert r.exit_code == 0 and "Seed: 5" in r.output
    r = run(home, "generate", "x", "--format", "gif")
    assert r.exit_code == 2 and "gif" in r.output
