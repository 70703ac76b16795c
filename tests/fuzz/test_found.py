"""What the fuzz found, each as a plain example, so it stays covered whatever the random examples become."""

from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from darkroom.home import Home
from darkroom.request import MAX_SEED
from tests.fuzz.strategies import (
    COMFY_INPUTS,
    IMAGE_64,
    b64,
    encoded,
)
from tests.fuzz.support import (
    HANG_GUARD,
    check,
    check_cli,
    fuzz,
    guarded,
    post_json,
    run_cli,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),  # Pillow, reading the fuzz's images
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),  # hypothesis, printing 70k-character examples
]


def test_an_unknown_field_named_with_a_line_break_or_a_lone_surrogate(served):
    # the field's name is quoted in the one-line message (it was written raw: a message of two lines)
    r = check(post_json(served, "/api/jobs", {"prompt": "x", "a\r\nb": 1}))
    assert r.status_code == 422 and "'a\\r\\nb': Extra inputs are not permitted" in r.json()["error"]
    r = check(post_json(served, "/api/jobs", {"prompt": "x", "\ud800": 1}))
    assert r.status_code == 422


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1.5, True, 2**64])
def test_clip_skip_option_that_is_not_a_whole_number(served, value):
    r = check(post_json(served, "/sdapi/v1/options", {"CLIP_stop_at_last_layers": value}))
    assert r.status_code == 422, r.text  # Infinity was a 500 (OverflowError); 1.5 and true were rounded
    assert "CLIP_stop_at_last_layers" in r.json()["error"]
    assert served.studio.settings.get("clip_skip") in (None, 1)


def test_openai_model_ids_with_a_slash_and_unknown_v1_routes(served):
    r = check(served.request("GET", "/v1/models/..%2Ftiny-sd1"), openai=True)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = check(served.request("GET", "/v1/models/org/tiny-sd1"), openai=True)  # reaches the route: OpenAI's shape
    assert r.status_code == 404 and "'org/tiny-sd1'" in r.json()["error"]["message"]
    r = check(served.request("GET", "/v1/no-such-route"), openai=True)
    assert r.status_code == 404
    r = check(served.request("DELETE", "/v1/images/generations"), openai=True)
    assert r.status_code == 405


PPM_HEADER_TOO_LONG = b"P6\n" + b"1" * 20  # Pillow's PPM reader raises ValueError, not OSError


def test_an_image_whose_decoder_raises_value_error(served):
    served.begin()
    try:
        r = check(post_json(served, "/sdapi/v1/img2img", {"prompt": "x", **A1111_FAST,
                                                          "init_images": [b64(PPM_HEADER_TOO_LONG)]}))
        assert r.status_code == 422 and r.json()["error"].startswith("init_images[0]: not a readable image")
        r = check(served.request("POST", "/v1/images/edits", files={"image": ("a.ppm", PPM_HEADER_TOO_LONG)},
                                 data={"prompt": "x", "size": "64x64", "steps": "1"}), openai=True)
        assert r.status_code == 400 and r.json()["error"]["param"] == "image"
        r = check(post_json(served, "/api/jobs", {"prompt": "x", **FAST_NATIVE,
                                                  "init_image": b64(PPM_HEADER_TOO_LONG)}))
        job = served.studio.queue.get(r.json()["job"]["id"])
        assert job.done_event.wait(HANG_GUARD)
        assert (job.state, job.error_status) == ("error", 422) and job.error.startswith("init image: not a readable")
    finally:
        served.settle()


A1111_FAST = {"steps": 1, "width": 64, "height": 64, "sampler_name": "Euler"}
FAST_NATIVE = {"steps": 1, "width": 64, "height": 64, "sampler": "Euler"}


def test_clip_skip_past_the_text_encoders_layers(served, cli_env):
    # the tiny model's text encoder (like the built-in starter model's) has 3 layers: clip skip 5 was an IndexError
    served.begin()
    try:
        r = check(post_json(served, "/sdapi/v1/txt2img", {"prompt": "x", **A1111_FAST,
                                                          "override_settings": {"CLIP_stop_at_last_layers": 5}}))
        assert r.status_code == 422, r.text
        assert "clip skip 5 is more than the" in r.json()["error"] and "use 1 to" in r.json()["error"]
    finally:
        served.settle()
    home, _, _ = cli_env
    args = ["generate", "x", "-m", "tiny-sd1", "--steps", "1", "-W", "64", "-H", "64", "--clip-skip", "5"]
    r = run_cli(home, *args)
    check_cli(r, args)
    assert r.exit_code == 2 and "error: clip skip 5 is more than the" in r.stderr


def test_an_output_folder_name_too_long_for_the_file_system(cli_env):
    home, files, _ = cli_env
    args = ["generate", "x", "-m", "tiny-sd1", "--steps", "1", "-W", "64", "-H", "64", "-o",
            str(files.root / ("x" * 300))]
    r = run_cli(home, *args)
    check_cli(r, args)  # was an OSError traceback (ENAMETOOLONG)
    assert r.exit_code == 1 and "a folder name in the path is too long for the file system" in r.stderr


def test_generate_from_a_thread_that_is_not_the_main_one(cli_env):
    # signal.signal() works in the main thread only: a program running the command in a worker thread got a
    # ValueError traceback before anything was generated (Ctrl-C handling is the main thread's)
    home, files, _ = cli_env
    args = ["generate", "x", "-m", "tiny-sd1", "--steps", "1", "-W", "64", "-H", "64", "-o", str(files.root / "thread")]
    r = run_cli(home, *args)  # run_cli runs it in a thread
    check_cli(r, args)
    assert r.exit_code == 0 and list((files.root / "thread").glob("*.png"))


def comfy_png(graph: object) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", graph if isinstance(graph, str) else json.dumps(graph))
    return encoded(Image.new("RGB", (8, 8)), "PNG", pnginfo=info)


def test_a_comfyui_graph_whose_inputs_all_link_to_one_another(served, cli_env):
    # every literal search followed every link 8 deep: (inputs per node) ** 9 visits, hours for 12 inputs
    inputs = {name: ["0", 0] for name in COMFY_INPUTS[:12]}
    data = comfy_png({"0": {"class_type": "KSampler", "inputs": inputs}})
    r = check(post_json(served, "/sdapi/v1/png-info", {"image": b64(data)}))
    assert r.status_code == 200 and r.json()["parameters"] == {}
    r = check(served.request("POST", "/api/png-info", files={"file": ("comfy.png", data, "image/png")}))
    assert r.json()["format"] == "ComfyUI"
    home, files, _ = cli_env
    path = files.root / "comfy.png"
    path.write_bytes(data)
    check_cli(run_cli(home, "png-info", str(path)), ["png-info", str(path)], no_parameters_ok=True)


def test_json_in_a_png_nested_deeper_than_the_parser_goes(served):
    data = comfy_png("[" * 100_000 + "]" * 100_000)  # json.loads raises RecursionError, not ValueError
    r = check(post_json(served, "/sdapi/v1/png-info", {"image": b64(data)}))
    assert r.status_code == 200
    r = check(served.request("POST", "/api/png-info", files={"file": ("deep.png", data, "image/png")}))
    assert r.status_code == 200 and r.json()["format"] == "none"


PARAMETER_LINE_CHARS = st.sampled_from([*'ab1_ -/:,"\\\n\té\u00a0x', "Steps", "Size: 64x64", ", ", '"a,b"', ': "'])


@fuzz(3000)
@given(line=st.lists(PARAMETER_LINE_CHARS, max_size=30).map("".join))
def test_parameter_pairs_read_a_line_as_the_webuis_regex_does(line):
    from darkroom.metadata.infotext import _PARAM_RE, parameter_pairs

    assert parameter_pairs(line) == _PARAM_RE.findall(line)


@pytest.mark.parametrize("line", ["x" * 2_000_000, "a b " * 500_000, ":" * 2_000_000, " " * 2_000_000 + ":"])
def test_a_parameter_line_of_megabytes_is_read_in_linear_time(line):
    # the webui's regex alone took 20 s for 70,000 characters and ~hours for these (quadratic): the hang guard fails it
    from darkroom.metadata.infotext import parse_infotext

    assert guarded(parse_infotext, line)["Prompt"] == line.strip()


def test_a_one_line_infotext_of_64k_characters_through_the_apis(served):
    served.begin()
    try:
        r = check(post_json(served, "/sdapi/v1/txt2img", {"prompt": "x", **A1111_FAST, "infotext": "x" * 70_000}))
        assert r.status_code == 422 and "no generation parameters line" in r.json()["error"]
    finally:
        served.settle()


def test_storage_errors_for_paths_the_file_system_refuses(tmp_path):
    import errno

    from darkroom.errors import StorageError

    for code, words in ((errno.ENAMETOOLONG, "too long for the file system"), (errno.ELOOP, "symbolic links")):
        error = StorageError.wrap(OSError(code, os.strerror(code)), tmp_path)
        assert isinstance(error, StorageError) and words in str(error)


def test_models_info_with_a_name_too_long_for_a_file(cli_env):
    home, _, _ = cli_env
    args = ["models", "info", "x" * 300]
    check_cli(run_cli(home, *args), args)


def test_hires_fix_with_inpainting(served, cli_env):
    # the result (hires size) was laid over the source (its own size): ValueError "images do not match"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    served.begin()
    try:
        r = check(post_json(served, "/api/jobs", {"prompt": "x", **FAST_NATIVE, "init_image": b64(IMAGE_64),
                                                  "mask": b64(encoded(mask)), "enable_hr": True, "hr_scale": 2}))
        job = served.studio.queue.get(r.json()["job"]["id"])
        assert job.done_event.wait(HANG_GUARD)
        assert job.state == "done", job.error
        with Image.open(io.BytesIO(job.images[0].png)) as image:
            assert image.size == (128, 128)
            assert image.getpixel((2, 2)) == (200, 40, 40)  # outside the mask: the (upscaled) source
    finally:
        served.settle()
    home, files, _ = cli_env
    (files.root / "mask.png").write_bytes(encoded(mask))
    args = ["generate", "x", "-m", "tiny-sd1", "--steps", "1", "-i", str(files.png), "--mask",
            str(files.root / "mask.png"), "--hires", "--hr-steps", "1", "-o", str(files.root / "hires-inpaint")]
    r = run_cli(home, *args)
    check_cli(r, args)
    assert r.exit_code == 0


def test_an_image_whose_seed_is_past_sqlites_integers(tmp_path):
    from darkroom.metadata.images import encode_png
    from darkroom.services.studio import build_studio

    home = Home(tmp_path / "home").ensure()
    folder = home.outputs / "txt2img" / "2026-01-01"
    folder.mkdir(parents=True)
    seed = MAX_SEED  # a valid seed (ComfyUI's are 64-bit); image k of a batch uses seed + k
    (folder / f"00000-{seed}.png").write_bytes(encode_png(
        Image.new("RGB", (8, 8)), f"x\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: {seed}, Size: 8x8"))
    studio = build_studio(home, device="cpu", precision="fp32", start=False)  # `darkroom serve` starting
    try:
        assert studio.history.count() == 1
    finally:
        studio.close()
