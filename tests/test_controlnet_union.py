"""ControlNet Union (xinsir's ControlNet++ for SDXL): found and loaded in both layouts users keep, run with the
control type a unit asks for (or its preprocessor implies) exactly as diffusers' union pipeline runs it, and
driven through the A1111 extension's `union_control_type`, the native API and the CLI."""

from __future__ import annotations

import base64
import shutil

import pydantic
import pytest
import torch
import webuiapi

from darkroom.control_unit import UNION_CONTROL_TYPES, ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_union import tiny_union_state, write_tiny_union
from tests.control_util import generate_with_units, noise_image
from tests.control_util import png_bytes as _png

KW = dict(prompt="a red circle", negative_prompt="", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
HARD_EDGE = UNION_CONTROL_TYPES.index("Hard Edge")
DEPTH = UNION_CONTROL_TYPES.index("Depth")


HINT = noise_image()


def _unit(model="union", **kw) -> ControlUnit:
    kw.setdefault("image", _png(HINT))
    kw.setdefault("module", "none")
    return ControlUnit(model=model, resize_mode="Just Resize", **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("union")
    home = Home(root / "home").ensure()
    write_tiny_union(home.controlnets, "union", "single")
    write_tiny_union(home.controlnets, "union-folder", "diffusers")
    write_tiny_union(home.controlnets, "union-six", "single", num_control_type=6, seed=1)
    return {"root": root, "home": home, "engine": engine_factory(home), "sdxl": tiny_model("sdxl")["path"]}


def _run(setup, units, **kw):
    return generate_with_units(setup["engine"], setup["sdxl"], units, **{**KW, **kw})


# --- files -------------------------------------------------------------------------------------------------


def test_both_layouts_are_listed_as_sdxl_and_load_exactly(setup):
    from darkroom.control.files import find_controlnets
    from darkroom.control.load import header_kind, load_controlnet

    files = {f.name: f for f in find_controlnets(setup["home"])}
    want = tiny_union_state()
    configs = []
    for name in ("union", "union-folder"):
        f = files[name]
        assert f.supported and f.family == "sdxl", f
        kind = header_kind(f.path)
        assert kind.supported and kind.union and kind.family == "sdxl"
        loaded = load_controlnet(f.path, dtype=torch.float32)
        assert type(loaded.model).__name__ == "ControlNetUnionModel" and loaded.family == "sdxl"
        state = loaded.model.state_dict()
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        configs.append(loaded.model.config)
    # the single file's config, read from its shapes, is the one the folder's config.json holds
    for key in ("num_control_type", "num_trans_channel", "num_trans_head", "num_trans_layer", "num_proj_channel",
                "addition_time_embed_dim", "block_out_channels", "down_block_types"):
        assert configs[0][key] == configs[1][key], key
    assert files["union-six"].supported


def test_union_shapes_without_metadata_get_xinsirs_values_and_the_original_layout_loads():
    from darkroom.control.config import classify
    from darkroom.control.union import union_config

    shapes = {k: tuple(v.shape) for k, v in tiny_union_state(num_control_type=6).items()}
    kind = classify(shapes)
    assert kind.supported and kind.union and kind.family == "sdxl" and kind.layout == "diffusers"
    cfg = union_config(shapes)
    assert (cfg["num_control_type"], cfg["num_trans_channel"], cfg["num_trans_head"]) == (6, 32, 8)
    assert cfg["addition_time_embed_dim"] == 8  # read from control_add_embedding, not assumed
    # the original layout's ControlNet part (the extension's conversion keeps the union layers' names)
    from darkroom.control.keys import controlnet_to_original
    from darkroom.testing.tiny_union import tiny_union_config

    state = tiny_union_state()
    union = {k: v for k, v in state.items() if k.startswith(("task_", "control_add", "transformer_layes", "spatial"))}
    plain = {k: v for k, v in state.items() if k not in union}
    original = {**controlnet_to_original(plain, tiny_union_config()), **{f"control_model.{k}": v
                                                                          for k, v in union.items()}}
    kind = classify({k: tuple(v.shape) for k, v in original.items()})
    assert kind.supported and kind.union and kind.layout == "original"
    import json
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from darkroom.control.load import load_controlnet

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "original-union.safetensors"
        heads = {"attention_head_dim": tiny_union_config()["attention_head_dim"], "num_trans_head": 2}
        save_file({k: v.contiguous() for k, v in original.items()}, str(path),
                  metadata={"darkroom_config": json.dumps({"controlnet": heads})})
        loaded = load_controlnet(path, dtype=torch.float32).model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


# --- the control type ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "want"), [
    (None, "Unknown"), ("", "Unknown"), ("unknown", "Unknown"), ("Hard Edge", "Hard Edge"), ("canny", "Hard Edge"),
    ("anime_lineart", "Hard Edge"), ("soft edge", "Soft Edge"), ("hed", "Soft Edge"), (0, "OpenPose"),
    ("5", "Segmentation"), ("normalmap", "Normal Map"), ("repaint", "Inpaint"), ("Tile", "Tile")])
def test_union_control_type_spellings(given, want):
    assert _unit(union_control_type=given).union_control_type == want


def test_unknown_union_control_type_names_the_accepted_ones():
    with pytest.raises(pydantic.ValidationError) as err:
        _unit(union_control_type="sparkle")
    assert "union_control_type" in str(err.value) and "Hard Edge" in str(err.value)


def test_preprocessor_implies_the_type():
    from darkroom.control.union import module_type

    assert module_type("canny") == module_type("lineart_anime") == "Hard Edge"
    assert module_type("depth_anything") == "Depth" and module_type("openpose") == "OpenPose"
    assert module_type("scribble_xdog") == module_type("hed_safe") == "Soft Edge"
    assert module_type("tile_resample") == module_type("blur_gaussian") == "Tile"
    assert module_type("inpaint_only") == "Inpaint"
    assert module_type("none") is module_type("invert") is module_type("shuffle") is None


# --- parity with diffusers ------------------------------------------------------------------------------------


def _diffusers_latents(setup, mode: int, weight: float = 1.0):
    import diffusers

    from darkroom.engine import samplers
    from darkroom.models.configs import scheduler_config
    from darkroom.testing.tiny import save_diffusers_folder

    config = save_diffusers_folder(setup["root"] / "cfg-sdxl", "sdxl", seed=1)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    folder = write_tiny_union(setup["root"], "ref-union", "diffusers")
    controlnet = diffusers.ControlNetUnionModel.from_pretrained(str(folder), local_files_only=True)
    pipe = diffusers.StableDiffusionXLControlNetUnionPipeline.from_single_file(
        str(setup["sdxl"]), config=str(config), controlnet=controlnet, local_files_only=True,
        torch_dtype=torch.float32)
    spec, schedule = samplers.resolve(KW["sampler"], "Automatic")
    pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=KW["seed"])
    out = pipe(prompt=KW["prompt"], negative_prompt=None, control_image=[HINT], control_mode=[mode],
               height=KW["height"], width=KW["width"], num_inference_steps=KW["steps"], guidance_scale=KW["cfg_scale"],
               controlnet_conditioning_scale=weight, generator=[torch.Generator("cpu").manual_seed(KW["seed"])],
               output_type="latent").images
    shutil.rmtree(config)
    shutil.rmtree(folder)
    return out


def test_matches_diffusers_union_pipeline(setup):
    """Same checkpoint, union weights (ours from the single file), seed, scheduler and control type as diffusers'
    union pipeline: the final latents agree; with another control type they do not (so the check can fail)."""
    ours, result = _run(setup, [_unit(union_control_type="Hard Edge")])
    theirs = _diffusers_latents(setup, HARD_EDGE)
    tolerance = 1e-4 * max(1.0, theirs.abs().max().item())
    assert (ours - theirs).abs().max().item() < tolerance
    other = _diffusers_latents(setup, DEPTH)
    assert (ours - other).abs().max().item() > 100 * tolerance
    depth, _ = _run(setup, [_unit(union_control_type="depth")])
    assert (depth - other).abs().max().item() < tolerance
    plain, _ = _run(setup, [])
    assert (ours - plain).abs().max().item() > 100 * tolerance
    # the extension writes no union type into the infotext line, so neither do we
    line = result.images[0].infotext
    assert "ControlNet 0: \"Module: none, Model: union [" in line and "Union" not in line and "Edge" not in line


def test_the_folder_and_the_file_give_the_same_image(setup):
    a, _ = _run(setup, [_unit(union_control_type="canny")])
    b, _ = _run(setup, [_unit("union-folder", union_control_type=HARD_EDGE)])
    assert torch.equal(a, b)


def test_unknown_type_comes_from_the_preprocessor(setup):
    """A prepared canny map with the type left Unknown runs as Hard Edge (canny's type), as if named."""
    named, _ = _run(setup, [_unit(union_control_type="Hard Edge")])
    inferred, _ = _run(setup, [_unit(module="canny", prepared=True)])
    assert torch.equal(named, inferred)


def test_weight_window_and_modes_apply_as_for_controlnets(setup):
    full, _ = _run(setup, [_unit(union_control_type=3)])
    half, _ = _run(setup, [_unit(union_control_type=3, weight=0.5)])
    assert (full - half).abs().max().item() > 1e-3
    theirs = _diffusers_latents(setup, HARD_EDGE, weight=0.5)
    assert (half - theirs).abs().max().item() < 1e-4 * max(1.0, theirs.abs().max().item())
    windowed, _ = _run(setup, [_unit(union_control_type=3, guidance_end=0.4)])
    assert (windowed - full).abs().max().item() > 1e-3
    prompt, _ = _run(setup, [_unit(union_control_type=3, control_mode="My prompt is more important")])
    assert (prompt - full).abs().max().item() > 1e-3


def test_a_plain_controlnet_ignores_the_union_type(setup):
    from darkroom.testing.tiny_controlnet import write_tiny_controlnet

    write_tiny_controlnet(setup["home"].controlnets, "cn-sdxl", "sdxl", "diffusers-single")
    a, _ = _run(setup, [_unit("cn-sdxl")])
    b, _ = _run(setup, [_unit("cn-sdxl", union_control_type="Depth")])
    assert torch.equal(a, b)


def test_missing_or_unknown_type_is_a_clear_error(setup):
    with pytest.raises(InvalidRequest) as err:
        _run(setup, [_unit()])
    message = str(err.value)
    assert "ControlNet unit 0" in message and "union is a ControlNet Union model" in message
    assert "union_control_type" in message and "OpenPose" in message and "Inpaint" in message
    with pytest.raises(InvalidRequest) as err:  # a 6-type model has no Inpaint (promax adds it)
        _run(setup, [_unit("union-six", union_control_type="inpaint")])
    assert "knows 6 control types" in str(err.value) and "promax" in str(err.value)


# --- the APIs and the CLI ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model):
    from tests.server_util import studio_with

    home = Home(tmp_path_factory.mktemp("union-studio") / "home")
    home.ensure()
    write_tiny_union(home.controlnets, "union", "single")
    write_tiny_union(home.controlnets, "union-six", "single", num_control_type=6, seed=1)
    s = studio_with(home, tiny_model("sdxl")["path"])
    yield s
    s.close()


class UnionUnit(webuiapi.ControlNetUnit):
    """webuiapi's unit with the extension's `union_control_type` (newer webuiapi sends it the same way: the
    type's name, left out while Unknown)."""

    def __init__(self, *args, union_control_type: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.union_control_type = union_control_type

    def to_dict(self):
        d = super().to_dict()
        if self.union_control_type:
            d["union_control_type"] = self.union_control_type
        return d


def test_webuiapi_drives_a_union_model_over_a_socket(studio):
    from tests.server_util import live_server

    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
        titles = api.controlnet_model_list()
        title = next(t for t in titles if t.startswith("union ["))
        common = {"prompt": "a square", "seed": 21, "width": 64, "height": 64, "cfg_scale": 7}

        def run(**unit):
            # a fresh alwayson_scripts each time: webuiapi writes the units into its shared default dict
            return api.txt2img(**common, alwayson_scripts={}, controlnet_units=[UnionUnit(
                image=HINT, module="none", model=title, weight=1.5, resize_mode="Just Resize", **unit)])

        edges = run(union_control_type="Hard Edge")
        again = run(union_control_type="canny")
        depth = run(union_control_type="Depth")
        assert edges.image.tobytes() == again.image.tobytes()
        assert edges.image.tobytes() != depth.image.tobytes()  # the type reached the model
        infotext = edges.info["infotexts"][0]
        assert "ControlNet 0:" in infotext and "Module: none" in infotext and "Hard Edge" not in infotext

        with pytest.raises(RuntimeError) as err:  # no type, and preprocessor none cannot say
            run()
        status, text = err.value.args
        assert status == 422 and "alwayson_scripts.ControlNet.args[0].union_control_type" in text
        assert "Soft Edge" in text and "Hard Edge" in text
        with pytest.raises(RuntimeError) as err:
            run(union_control_type="Sparkle")
        assert err.value.args[0] == 422 and "union_control_type" in err.value.args[1]
    assert studio.queue.jobs() == [] or all(j.state == "done" for j in studio.queue.jobs())


def test_a1111_body_errors_before_queueing(studio):
    from tests.server_util import client

    image = base64.b64encode(_png(HINT)).decode("ascii")
    body = {"prompt": "p", "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
    with client(studio) as api:
        before = len(studio.queue.jobs())
        r = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {"model": "union-six", "image": image, "module": "inpaint_only", "union_control_type": "Unknown"}]}}})
        assert r.status_code == 422 and "knows 6 control types" in r.json()["error"], r.text
        r = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
            {"model": "union", "image": image, "union_control_type": 42}]}}})
        assert r.status_code == 422 and "args[0].union_control_type" in r.json()["error"], r.text
        assert len(studio.queue.jobs()) == before


def test_native_job_takes_the_type(studio):
    from tests.server_util import client, wait_job

    shape = "data:image/png;base64," + base64.b64encode(_png(HINT)).decode("ascii")
    base = {"prompt": "p", "seed": 11, "steps": 3, "width": 64, "height": 64, "sampler": "Euler", "preset": None}
    with client(studio) as api:
        r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "union", "image": shape,
                                                                "union_control_type": "segment"}]})
        assert r.status_code == 202, r.text
        assert wait_job(api, r.json()["job"]["id"])["state"] == "done"
        r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "union", "image": shape}]})
        assert r.status_code == 422 and "controlnet[0].union_control_type" in r.json()["error"]


def test_cli_spec_takes_the_type(tmp_path):
    from darkroom.cli.control_spec import parse_unit

    path = tmp_path / "map.png"
    HINT.save(path)
    assert parse_unit(f"model=union,image={path},union=canny").union_control_type == "Hard Edge"
    assert parse_unit(f"model=union,image={path},union_control_type=Soft Edge").union_control_type == "Soft Edge"
    assert parse_unit(f"model=union,image={path}").union_control_type == "Unknown"


def test_cli_lists_and_generates_with_a_union_model(setup, tmp_path):
    from click.testing import CliRunner

    from darkroom.cli import cli
    from darkroom.metadata.images import read_image_metadata

    home = setup["home"]
    r = CliRunner().invoke(cli, ["--home", str(home.root), "controlnet", "list"])
    assert r.exit_code == 0, r.output
    assert "union [" in r.output and "union-folder [" in r.output
    assert "not usable" not in r.output.split("union-folder [")[1].splitlines()[0]
    hint = tmp_path / "map.png"
    HINT.save(hint)
    out = tmp_path / "out"
    args = ["--home", str(home.root), "generate", "a red circle", "--model", str(setup["sdxl"]), "--steps", "2",
            "--width", "64", "--height", "64", "--seed", "3", "-o", str(out)]
    r = CliRunner().invoke(cli, [*args, "--controlnet", f"model=union,image={hint},union=canny"])
    assert r.exit_code == 0, r.output
    assert "ControlNet 0:" in read_image_metadata(next(out.glob("*.png"))).parameters
    r = CliRunner().invoke(cli, [*args, "--controlnet", f"model=union,image={hint}"])
    assert r.exit_code != 0 and "union_control_type" in r.output and "Hard Edge" in r.output


def test_a_folder_saved_with_the_plain_class_name_still_loads_as_union(tmp_path):
    """Union configs saved before diffusers had the class say ControlNetModel; their union fields tell."""
    import json

    from darkroom.control.load import header_kind, load_controlnet

    folder = write_tiny_union(tmp_path, "old-union", "diffusers")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "_class_name": "ControlNetModel"}))
    assert header_kind(folder).union
    assert type(load_controlnet(folder, dtype=torch.float32).model).__name__ == "ControlNetUnionModel"


def test_two_units_on_one_union_model_are_two_calls(setup):
    from darkroom.control.files import find_controlnets, resolve

    setup["engine"].cache.get(setup["sdxl"])
    path = resolve(find_controlnets(setup["home"]), "union").path
    model = setup["engine"].controlnets.get(path, dtype=torch.float32, device="cpu").model
    types = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: types.append(kw["control_type_idx"]), with_kwargs=True)
    try:
        both, _ = _run(setup, [_unit(union_control_type="canny"), _unit(union_control_type="depth", weight=0.7)])
    finally:
        handle.remove()
    assert types == [[HARD_EDGE], [DEPTH]] * KW["steps"]
    edges, _ = _run(setup, [_unit(union_control_type="canny")])
    assert (both - edges).abs().max().item() > 1e-3
