"""ControlNet through the APIs: the A1111 extension's unit dicts and /controlnet/* routes (also with the real
`webuiapi` client over a socket), and the native /api/controlnet routes and job units the web UI uses."""

from __future__ import annotations

import base64
import io
import json

import pytest
import webuiapi
from PIL import Image, ImageDraw

from darkroom.errors import InvalidRequest
from darkroom.server.control_units import a1111_unit
from tests.server_util import live_server

FAST = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def drawn_shape(size: int = 64) -> Image.Image:
    """A white square on black: canny finds its outline, and as a control map it steers the tiny model."""
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill="white")
    return image


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64.partition(",")[2] if b64.startswith("data:") else b64)))


def error_of(r) -> str:
    body = r.json()
    assert body["error"] == body["detail"]
    return body["error"]


# --- the extension's unit dicts -> ControlUnit (no model needed) -------------------------------------


def test_webuiapi_unit_dict_translates_field_for_field():
    unit = webuiapi.ControlNetUnit(image=drawn_shape(), mask=drawn_shape(), module="canny", model="cn-canny",
                                   weight=0.8, resize_mode="Just Resize", processor_res=256, threshold_a=50,
                                   threshold_b=150, guidance_start=0.1, guidance_end=0.7, control_mode=2,
                                   pixel_perfect=True, hr_option="Low res only")
    got = a1111_unit(unit.to_dict(), "alwayson_scripts.ControlNet.args[0]")
    assert (got.module, got.model, got.weight, got.resize_mode) == ("canny", "cn-canny", 0.8, "Just Resize")
    assert (got.processor_res, got.threshold_a, got.threshold_b) == (256, 50, 150)
    assert (got.guidance_start, got.guidance_end) == (0.1, 0.7)
    assert got.control_mode == "ControlNet is more important" and got.pixel_perfect and got.hr_option == "Low res only"
    assert Image.open(io.BytesIO(got.image)).size == (64, 64) and got.mask is not None
    assert got.enabled and got.active


def test_older_clients_keys_and_image_dict():
    shape = png_b64(drawn_shape())
    got = a1111_unit({"input_image": shape, "guessmode": True, "lowvram": True, "model": "cn", "module": "none",
                      "resize_mode": 2, "control_mode": 1}, "u")
    assert got.image is not None and got.guess_mode and got.low_vram
    assert got.resize_mode == "Resize and Fill" and got.control_mode == "My prompt is more important"
    got = a1111_unit({"image": {"image": shape, "mask": shape}, "model": "cn"}, "u")
    assert got.image == got.mask == base64.b64decode(shape)
    got = a1111_unit({"image": "", "mask": None, "model": "None", "is_ui": True, "save_detected_map": True}, "u")
    assert got.image is None and got.mask is None and not got.active  # an empty unit, as webuiapi sends one


@pytest.mark.parametrize(("unit", "needle"), [
    ({"weight": 3}, "alwayson_scripts.controlnet.args[0].weight"),
    ({"weight": "heavy"}, "alwayson_scripts.controlnet.args[0].weight"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_end 0.2 is before guidance_start 0.8"),
    ({"control_mode": "Loud"}, "alwayson_scripts.controlnet.args[0].control_mode"),
    ({"resize_mode": 7}, "alwayson_scripts.controlnet.args[0].resize_mode"),
    ({"lowvram": "maybe"}, "alwayson_scripts.controlnet.args[0].lowvram"),  # named as the client spelled it
    ({"image": "not base64 at all!"}, "alwayson_scripts.controlnet.args[0].image"),
    ({"input_image": base64.b64encode(b"not an image").decode()}, "alwayson_scripts.controlnet.args[0].input_image"),
    ({"wobble": 1}, "alwayson_scripts.controlnet.args[0].wobble: not a ControlNet unit field"),
    ({"effective_region_mask": "abc"}, "alwayson_scripts.controlnet.args[0].effective_region_mask"),
    ({"prepared": True}, "args[0].prepared: not a ControlNet unit field"),  # Darkroom's own field, not the extension's
])
def test_bad_unit_fields_name_the_field(unit, needle):
    with pytest.raises(InvalidRequest) as e:
        a1111_unit({"model": "cn", **unit}, "alwayson_scripts.controlnet.args[0]")
    assert needle in str(e.value)


# --- /sdapi/v1 bodies -----------------------------------------------------------------------------------


def test_other_alwayson_scripts_are_still_refused(api, studio):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", **FAST, "alwayson_scripts": {
        "controlnet": {"args": []}, "ADetailer": {"args": [True]}, "Regional Prompter": {"args": []}}})
    assert r.status_code == 422, r.text
    message = error_of(r)
    assert "ADetailer, Regional Prompter" in message and "other than ControlNet" in message
    assert "controlnet," not in message
    assert studio.queue.jobs() == []


@pytest.mark.parametrize("key", ["ControlNet", "controlnet", "CONTROLNET"])
def test_controlnet_with_no_active_unit_generates_as_without(api, key):
    plain = api.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": 3, **FAST})
    empty = webuiapi.ControlNetUnit(enabled=False, model="None").to_dict()
    with_units = api.post("/sdapi/v1/txt2img", json={"prompt": "p", "seed": 3, **FAST, "alwayson_scripts": {
        key: {"args": [None, empty]}}})
    assert plain.status_code == with_units.status_code == 200, with_units.text
    assert plain.json()["images"] == with_units.json()["images"]
    assert "ControlNet" not in json.loads(with_units.json()["info"])["infotexts"][0]


@pytest.mark.parametrize(("script", "needle"), [
    ({"args": [{"model": "cn", "weight": 9}]}, "alwayson_scripts.controlnet.args[0].weight"),
    ({"args": ["a string"]}, "alwayson_scripts.controlnet.args[0]: expected a ControlNet unit"),
    ({"args": {"model": "cn"}}, "alwayson_scripts.controlnet.args: expected a list"),
    ("units", "alwayson_scripts.controlnet: expected"),
])
def test_bad_units_in_a_body_are_422_naming_the_field(api, studio, script, needle):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", **FAST, "alwayson_scripts": {"controlnet": script}})
    assert r.status_code == 422, r.text
    assert needle in error_of(r)
    assert studio.queue.jobs() == []


# --- /controlnet/* (the extension's routes) ----------------------------------------------------------


def test_controlnet_version_and_settings(api):
    assert api.get("/controlnet/version").json() == {"version": 2}
    assert api.get("/controlnet/settings").json() == {"control_net_unit_count": 8}


def test_module_list_in_the_extensions_shape(api):
    body = api.get("/controlnet/module_list").json()
    assert set(body) == {"module_list", "module_detail"}
    assert body["module_list"][0] == "none" and "canny" in body["module_list"]
    canny = body["module_detail"]["canny"]
    assert canny["model_free"] is False
    assert [s["name"] for s in canny["sliders"]][:1] == ["Resolution"] and len(canny["sliders"]) == 3
    labels = api.get("/controlnet/module_list", params={"alias_names": "true"}).json()["module_list"]
    assert len(labels) == len(body["module_list"]) and "lineart_realistic" in labels


def canny_outline_ok(image: Image.Image) -> None:
    """Canny of drawn_shape(): white on the square's edges, black inside it and in the corners."""
    gray = image.convert("L")
    w, h = gray.size
    assert gray.getpixel((w // 2, h // 2)) == 0 and gray.getpixel((2, 2)) == 0
    edge_column = [max(gray.getpixel((x, h // 2)) for x in range(w // 4 - 3, w // 4 + 4))]
    assert edge_column == [255]


def test_detect_canny_gives_the_outline(api):
    r = api.post("/controlnet/detect", json={"controlnet_module": "canny", "controlnet_input_images": [
        png_b64(drawn_shape())], "controlnet_processor_res": 128, "controlnet_threshold_a": 100,
        "controlnet_threshold_b": 200})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["info"] == "Success" and len(body["images"]) == 1
    image = decoded(body["images"][0])
    assert image.format == "PNG" and image.size == (128, 128)
    canny_outline_ok(image)


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"controlnet_module": "canny"}, 422, "controlnet_input_images: no image selected"),
    ({"controlnet_module": "no-such-module", "controlnet_input_images": ["x"]}, 422,
     "controlnet_module: unknown ControlNet preprocessor 'no-such-module'"),
    ({"controlnet_module": "lineart", "controlnet_input_images": [png_b64(drawn_shape())]}, 422, "sk_model.pth"),
    ({"controlnet_module": "depth_leres++", "controlnet_input_images": [png_b64(drawn_shape())]}, 422,
     "cannot run the depth_leres++ preprocessor yet"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["@@@"]}, 422, "controlnet_input_images[0]"),
    ({"controlnet_module": "canny", "controlnet_input_images": ["eA==", "eA=="], "controlnet_masks": ["eA=="]},
     422, "one mask per image"),
])
def test_detect_errors_are_clear(api, body, status, needle):
    r = api.post("/controlnet/detect", json=body)
    assert r.status_code == status, r.text
    assert needle in error_of(r)


# --- the native /api/controlnet routes (the web UI's) -------------------------------------------------


def test_native_listing_says_which_preprocessors_can_run(api):
    body = api.get("/api/controlnet").json()
    assert set(body) == {"models", "modules"} and isinstance(body["models"], list)
    rows = {m["name"]: m for m in body["modules"]}
    assert set(rows["canny"]) == {"name", "label", "model_free", "sliders", "available", "problem"}
    assert rows["canny"]["available"] is True and rows["canny"]["problem"] is None
    assert rows["canny"]["label"] == "canny" and rows["canny"]["sliders"][0]["name"] == "Resolution"
    assert rows["lineart"]["label"] == "lineart_realistic"
    assert rows["lineart"]["available"] is False and "sk_model.pth" in rows["lineart"]["problem"]


def test_native_detect_answers_a_data_url(api):
    shape = "data:image/png;base64," + png_b64(drawn_shape())
    r = api.post("/api/controlnet/detect", json={"module": "canny", "image": shape, "resolution": 64,
                                                  "threshold_a": 100, "threshold_b": 200})
    assert r.status_code == 200, r.text
    url = r.json()["image"]
    assert url.startswith("data:image/png;base64,")
    image = decoded(url)
    assert image.size == (64, 64)
    canny_outline_ok(image)
    r = api.post("/api/controlnet/detect", json={"module": "lineart", "image": shape})
    assert r.status_code == 422 and "sk_model.pth" in error_of(r)  # a missing annotator file, named
    r = api.post("/api/controlnet/detect", json={"module": "canny", "image": shape, "resolution": 1})
    assert r.status_code == 422 and "resolution" in error_of(r)


# --- with a ControlNet in the library -----------------------------------------------------------------


@pytest.fixture
def cn_model(studio) -> str:
    """A tiny SD1 ControlNet in the studio's models/controlnet; returns its A1111 title "cn-tiny [hash8]"."""
    from darkroom.testing.tiny_controlnet import write_tiny_controlnet

    write_tiny_controlnet(studio.home.controlnets, "cn-tiny", family="sd1")
    from darkroom.control.files import find_controlnets

    return next(f.title for f in find_controlnets(studio.home) if f.name == "cn-tiny")


def test_model_lists_name_the_library_files(api, studio, cn_model):
    titles = api.get("/controlnet/model_list", params={"update": "true"}).json()["model_list"]
    assert cn_model in titles and "None" not in titles  # the extension leaves "None" out too
    assert cn_model.startswith("cn-tiny [") and len(cn_model) == len("cn-tiny [12345678]")
    rows = {m["name"]: m for m in api.get("/api/controlnet").json()["models"]}
    assert rows["cn-tiny"] == {"name": "cn-tiny", "title": cn_model, "family": "sd1",
                               "path": str(studio.home.controlnets / "cn-tiny.safetensors"), "kind": "ControlNet",
                               "union_types": None}
    types = api.get("/controlnet/control_types").json()["control_types"]
    assert types["All"]["model_list"][0] == "None" and cn_model in types["All"]["model_list"]
    assert types["Canny"]["default_option"] == "canny" and types["Canny"]["model_list"] == ["None"]


def test_unknown_model_names_the_available_ones(api, studio, cn_model):
    unit = {"image": png_b64(drawn_shape()), "model": "control_v11p_sd15_canny [fef5e48e]"}
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", **FAST, "alwayson_scripts": {"ControlNet": {
        "args": [unit]}}})
    assert r.status_code == 422, r.text
    message = error_of(r)
    assert "alwayson_scripts.ControlNet.args[0].model" in message and "control_v11p_sd15_canny" in message
    assert cn_model in message
    unit["model"] = "/etc/passwd"  # only library files, never a path a client makes up
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", **FAST, "alwayson_scripts": {"ControlNet": {
        "args": [unit]}}})
    assert r.status_code == 422 and "/etc/passwd" in error_of(r)
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", **FAST, "alwayson_scripts": {"ControlNet": {
        "args": [{"model": "cn-tiny", "module": "depth_leres++"}]}}})
    assert r.status_code == 422 and "args[0].module" in error_of(r)
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "p", **FAST, "alwayson_scripts": {"ControlNet": {
        "args": [{"model": "cn-tiny", "module": "canny"}]}}})  # txt2img with no control image
    assert r.status_code == 422 and "args[0].image" in error_of(r)
    assert studio.queue.jobs() == []


def test_native_job_with_a_unit(api, studio, cn_model):
    from tests.server_util import wait_job

    shape = "data:image/png;base64," + png_b64(drawn_shape())
    base = {"prompt": "p", "seed": 11, "steps": 3, "width": 64, "height": 64, "sampler": "Euler", "preset": None}
    r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "cn-tiny", "image": shape, "weight": 1.5}]})
    assert r.status_code == 202, r.text
    state = wait_job(api, r.json()["job"]["id"])
    assert state["state"] == "done", state
    assert "ControlNet 0:" in state["images"][0]["infotext"] and "cn-tiny" in state["images"][0]["infotext"]
    # a prepared unit: the image is the canny map already, not detected again; its module is recorded
    r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "cn-tiny", "image": shape, "module": "canny",
                                                            "prepared": True}]})
    assert r.status_code == 202, r.text
    state = wait_job(api, r.json()["job"]["id"])
    assert state["state"] == "done" and "Module: canny" in state["images"][0]["infotext"], state
    r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "cn-tiny", "image": "@@", "weight": 1.5}]})
    assert r.status_code == 422 and "controlnet[0].image" in error_of(r)
    # merge input: more pictures, each with its own mask (or none); the counts must agree
    merged = {"model": "cn-tiny", "image": shape, "merge_images": [shape, shape], "merge_masks": [shape, None]}
    r = api.post("/api/jobs", json={**base, "controlnet": [merged]})
    assert r.status_code == 202, r.text
    state = wait_job(api, r.json()["job"]["id"])
    assert state["state"] == "done" and state["images"][0]["infotext"].count("Model: cn-tiny") == 3, state
    r = api.post("/api/jobs", json={**base, "controlnet": [{**merged, "merge_masks": [None]}]})
    assert r.status_code == 422 and "merge_masks has 1 entries for 2 merge_images" in error_of(r), r.text
    r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "nope", "image": shape}]})
    assert r.status_code == 422 and "controlnet[0].model" in error_of(r) and cn_model in error_of(r)
    r = api.post("/api/jobs", json={**base, "controlnet": [{"model": "cn-tiny", "image": shape, "weight": 5}]})
    assert r.status_code == 422 and "controlnet[0].weight: Input should be less than or equal to 2" in error_of(r)


def _client(url: str) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)


def test_webuiapi_drives_controlnet_over_a_socket(studio, cn_model):
    shape = drawn_shape()
    with live_server(studio) as url:
        api = _client(url)
        assert api.controlnet_version() == 2
        assert cn_model in api.controlnet_model_list()
        assert "canny" in api.controlnet_module_list()
        detected = api.controlnet_detect([shape], module="canny", processor_res=64, threshold_a=100,
                                         threshold_b=200)
        canny_outline_ok(detected.images[0])

        unit = webuiapi.ControlNetUnit(image=shape, module="none", model=cn_model, weight=1.5)
        common = {"prompt": "a square", "seed": 21, "width": 64, "height": 64, "cfg_scale": 7}
        plain = api.txt2img(**common)
        # a fresh alwayson_scripts each time: webuiapi writes the units into its shared default dict, which
        # would send them with every later webuiapi call in this process (other test files' too)
        steered = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})
        assert "ControlNet" not in plain.info["infotexts"][0]
        infotext = steered.info["infotexts"][0]
        assert "ControlNet 0:" in infotext and "cn-tiny" in infotext and "Module: none" in infotext
        assert steered.image.tobytes() != plain.image.tobytes()  # the unit steered the picture
        assert steered.info["extra_generation_params"]["ControlNet 0"].startswith("Module: none, Model: cn-tiny [")
        assert plain.info["extra_generation_params"] == {}

        init = plain.image
        img_common = {"images": [init], "prompt": "a square", "seed": 21, "denoising_strength": 0.8,
                      "width": 64, "height": 64}
        plain2 = api.img2img(**img_common)
        steered2 = api.img2img(**img_common, alwayson_scripts={}, controlnet_units=[
            webuiapi.ControlNetUnit(image=shape, module="canny", model=cn_model, weight=1.5, threshold_a=100,
                                    threshold_b=200, processor_res=64, control_mode=1)])
        infotext = steered2.info["infotexts"][0]
        assert "ControlNet 0:" in infotext and "Module: canny" in infotext
        assert steered2.image.tobytes() != plain2.image.tobytes()


def test_img2img_unit_without_image_uses_the_init_image(api, studio, cn_model):
    init = png_b64(drawn_shape())
    body = {"prompt": "p", **FAST, "seed": 2, "init_images": [init], "denoising_strength": 0.9}
    r = api.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [
        {"model": cn_model, "module": "canny", "input_image": "", "threshold_a": 100, "threshold_b": 200}]}}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "Module: canny" in info["extra_generation_params"]["ControlNet 0"]
    too_many = [{"model": "cn-tiny", "image": init}] * 9
    r = api.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": too_many}}})
    assert r.status_code == 422 and "at most 8 ControlNet units" in error_of(r)


def test_webuiapi_runs_the_newer_preprocessors_over_a_socket(studio, cn_model):
    """DW Pose through /controlnet/detect and inpaint_only+lama in txt2img, from webuiapi, with annotator files
    (tiny, in the real layouts) in the home's models/annotators."""
    import numpy as np

    from darkroom.testing.tiny_annotators import lama_state, save
    from darkroom.testing.tiny_onnx import dwpose_file, yolox_file

    annotators = studio.home.root / "models" / "annotators"
    yolox_file(annotators / "yolox_l.onnx", [(320, 320, 200, 400, 0.9, 0)])
    dwpose_file(annotators / "dw-ll_ucoco_384.onnx", {0: (144, 96, 0.9), 5: (192, 192, 0.8), 6: (96, 192, 0.8)})
    save(lama_state(), annotators / "ControlNetLama.pth")
    picture = drawn_shape()
    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (16, 16, 48, 48))
    with live_server(studio) as url:
        api = _client(url)
        assert {"dw_openpose_full", "inpaint_only+lama", "depth_zoe"} <= set(api.controlnet_module_list())
        pose = api.controlnet_detect([picture.resize((512, 512))], module="dw_openpose_full", processor_res=512)
        drawn = np.asarray(pose.images[0].convert("RGB"))
        assert drawn.shape == (512, 512, 3) and tuple(drawn[156, 256]) == (255, 0, 0)  # the nose, where put
        nose = pose.json["poses"][0]["people"][0]["pose_keypoints_2d"][:3]  # the pose JSON, as the extension's
        assert nose == [pytest.approx(0.5, abs=1e-3), pytest.approx(156 / 512, abs=1e-3), 1.0]
        drawn_back = api.custom_post("controlnet/render_openpose_json", payload=pose.json["poses"]).images[0]
        assert np.array_equal(np.asarray(drawn_back.convert("RGB")), drawn)
        unit = webuiapi.ControlNetUnit(image=picture, mask=mask, module="inpaint_only+lama", model=cn_model)
        out = api.txt2img(prompt="a square", seed=5, width=64, height=64, cfg_scale=7, controlnet_units=[unit],
                          alwayson_scripts={})
        assert "Module: inpaint_only+lama" in out.info["infotexts"][0]
        kept = np.asarray(out.image.convert("RGB")).astype(int) - np.asarray(picture.convert("RGB")).astype(int)
        far = np.ones((64, 64), bool)
        far[6:58, 6:58] = False  # outside the mask grown and blurred: the picture, pasted back
        assert np.abs(kept[far]).max() <= 1
