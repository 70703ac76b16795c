"""The extension's per-unit `effective_region_mask` (where a ControlNet, T2I-Adapter or IP-Adapter acts),
`advanced_weighting` (per-layer factors in place of weight and control mode), merge input (several pictures
in one unit) and batch input (one run per picture), in the engine and through the A1111 route."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from PIL import Image

from darkroom.control_unit import ControlUnit
from darkroom.errors import InvalidRequest
from darkroom.home import Home
from darkroom.testing.tiny_adapter import write_tiny_adapter
from darkroom.testing.tiny_controlnet import write_tiny_controlnet
from darkroom.testing.tiny_ipadapter import write_tiny_clip_vision, write_tiny_ipadapter
from tests.control_util import generate_with_units, noise_image, png_bytes

KW = dict(prompt="a red circle", negative_prompt="ugly", steps=3, cfg_scale=6.0, seed=1234, width=64, height=64,
          sampler="Euler a")
HINT = png_bytes(noise_image())
OTHER = png_bytes(noise_image(seed=5))


def _mask(fill: str = "half") -> bytes:
    """White where the unit acts: everywhere, nowhere, or the left half."""
    image = Image.new("RGB", (64, 64), "white" if fill == "all" else "black")
    if fill == "half":
        image.paste((255, 255, 255), (0, 0, 32, 64))
    return png_bytes(image)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    root = tmp_path_factory.mktemp("region")
    home = Home(root / "home").ensure()
    engine = engine_factory(home)
    sd1 = tiny_model("sd1")["path"]
    write_tiny_controlnet(home.controlnets, "cn-sd1", "sd1", "single")
    write_tiny_adapter(home.controlnets, "ad-sd1", "full")
    write_tiny_ipadapter(home.controlnets, "ipa-plain", engine.cache.get(sd1).unet, "sd1", variant="plain",
                         clip_width=48, seed=1)
    write_tiny_clip_vision(home.root / "models" / "clip_vision" / "clip_h.pth", seed=3)
    return {"home": home, "engine": engine, "sd1": sd1}


def _run(setup, units=()):
    return generate_with_units(setup["engine"], setup["sd1"], units, **KW)[0]


UNITS = {"controlnet": dict(model="cn-sd1", module="none", resize_mode="Just Resize"),
         "adapter": dict(model="ad-sd1", module="none", resize_mode="Just Resize"),
         "ip-adapter": dict(model="ipa-plain", module="ip-adapter_clip_h")}


@pytest.mark.parametrize("kind", list(UNITS))
def test_the_region_restricts_the_unit(setup, kind):
    """A black region is no unit at all, a white one the unit unrestricted, half of one something between."""
    plain = _run(setup)
    free = _run(setup, [ControlUnit(image=HINT, **UNITS[kind])])
    nowhere = _run(setup, [ControlUnit(image=HINT, effective_region_mask=_mask("none"), **UNITS[kind])])
    everywhere = _run(setup, [ControlUnit(image=HINT, effective_region_mask=_mask("all"), **UNITS[kind])])
    half = _run(setup, [ControlUnit(image=HINT, effective_region_mask=_mask("half"), **UNITS[kind])])
    assert (free - plain).abs().max() > 1e-3
    torch.testing.assert_close(nowhere, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(everywhere, free, atol=1e-6, rtol=0)
    assert (half - plain).abs().max() > 1e-4 and (half - free).abs().max() > 1e-4


def test_advanced_weighting_replaces_weight_and_mode(setup):
    same = _run(setup, [ControlUnit(image=HINT, weight=0.7, **UNITS["controlnet"])])
    factors = _run(setup, [ControlUnit(image=HINT, advanced_weighting=[0.7] * 13,
                                       control_mode="My prompt is more important", **UNITS["controlnet"])])
    torch.testing.assert_close(factors, same, atol=1e-6, rtol=0)
    zeros = _run(setup, [ControlUnit(image=HINT, advanced_weighting=[0.0] * 13, **UNITS["controlnet"])])
    torch.testing.assert_close(zeros, _run(setup), atol=1e-6, rtol=0)
    adapter = _run(setup, [ControlUnit(image=HINT, advanced_weighting=[0.5] * 4, **UNITS["adapter"])])
    torch.testing.assert_close(adapter, _run(setup, [ControlUnit(image=HINT, weight=0.5, **UNITS["adapter"])]),
                               atol=1e-6, rtol=0)
    with pytest.raises(InvalidRequest, match=r"advanced_weighting has 2 factors; cn-sd1 takes 5 \(one per layer"):
        _run(setup, [ControlUnit(image=HINT, advanced_weighting=[1.0] * 2, **UNITS["controlnet"])])  # a tiny one
    with pytest.raises(ValueError, match="from -10 to 10"):
        ControlUnit(image=HINT, advanced_weighting=[float("nan")], **UNITS["controlnet"])


def test_units_that_take_no_region_say_so(setup):
    with pytest.raises(InvalidRequest, match="effective_region_mask works with ControlNets, T2I-Adapters and"
                                             " IP-Adapters, not the model-free reference_only"):
        _run(setup, [ControlUnit(model="None", module="reference_only", image=HINT, effective_region_mask=_mask())])


def test_a1111_unit_fields_over_http(api, studio):
    """The extension's API fields reach the unit; a bad one is a 422 naming it."""
    write_tiny_controlnet(studio.home.controlnets, "cn-sd1", "sd1", "single")
    b64 = (lambda data: base64.b64encode(data).decode())
    unit = {"model": "cn-sd1", "module": "none", "image": b64(HINT), "resize_mode": "Just Resize",
            "effective_region_mask": b64(_mask()), "advanced_weighting": [0.8] * 13}
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    unit["advanced_weighting"] = [0.8] * 3  # the tiny ControlNet adds to 5 layers
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and "advanced_weighting has 3 factors" in response.text
    unit["advanced_weighting"], unit["effective_region_mask"] = None, "not base64 at all"
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and "effective_region_mask" in response.text


def test_merged_pictures(setup):
    """An IP-Adapter unit averages its pictures' tokens (the same picture twice is the picture once); any other
    unit runs once per picture at weight / count, as the extension unfolds it."""
    ip = UNITS["ip-adapter"]
    once = _run(setup, [ControlUnit(image=HINT, **ip)])
    twice = _run(setup, [ControlUnit(image=HINT, merge_images=[HINT], **ip)])
    mixed = _run(setup, [ControlUnit(image=HINT, merge_images=[OTHER], **ip)])
    torch.testing.assert_close(twice, once, atol=1e-6, rtol=0)
    assert (mixed - once).abs().max() > 1e-4
    cn = UNITS["controlnet"]
    merged = _run(setup, [ControlUnit(image=HINT, merge_images=[OTHER], weight=0.8, **cn)])
    unfolded = _run(setup, [ControlUnit(image=HINT, weight=0.4, **cn), ControlUnit(image=OTHER, weight=0.4, **cn)])
    torch.testing.assert_close(merged, unfolded, atol=1e-6, rtol=0)


def test_merged_pictures_keep_their_own_masks(setup):
    """Each merged picture has its own mask, as in the extension: an inpaint unit unfolds with each picture's
    mask; an IP-Adapter unit CLIP-masks each picture by its own (black masks nothing, white changes the tokens)."""
    cn = dict(UNITS["controlnet"], module="inpaint_global_harmonious")
    first = dict(image=HINT, mask=_mask("all"))
    merged = _run(setup, [ControlUnit(**first, merge_images=[OTHER], merge_masks=[_mask("half")], weight=0.8, **cn)])
    unfolded = _run(setup, [ControlUnit(**first, weight=0.4, **cn),
                            ControlUnit(image=OTHER, mask=_mask("half"), weight=0.4, **cn)])
    other_mask = _run(setup, [ControlUnit(**first, merge_images=[OTHER], merge_masks=[_mask("none")], weight=0.8,
                                          **cn)])
    torch.testing.assert_close(merged, unfolded, atol=1e-6, rtol=0)
    assert (merged - other_mask).abs().max() > 1e-4
    ip = UNITS["ip-adapter"]
    once = _run(setup, [ControlUnit(image=HINT, **ip)])
    black = _run(setup, [ControlUnit(image=HINT, merge_images=[HINT], merge_masks=[_mask("none")], **ip)])
    white = _run(setup, [ControlUnit(image=HINT, merge_images=[HINT], merge_masks=[_mask("all")], **ip)])
    torch.testing.assert_close(black, once, atol=1e-6, rtol=0)
    assert (white - once).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"merge_masks has 2 entries for 1 merge_images"):
        ControlUnit(image=HINT, merge_images=[HINT], merge_masks=[None, None], **ip)


def test_merge_input_over_http(api, studio):
    write_tiny_controlnet(studio.home.controlnets, "cn-sd1", "sd1", "single")
    b64 = (lambda data: base64.b64encode(data).decode())
    unit = {"model": "cn-sd1", "module": "none", "input_mode": "merge", "resize_mode": "Just Resize",
            "image": [{"image": b64(HINT)}, {"image": b64(OTHER), "mask": None}]}
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": 3,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert infotext.count("Model: cn-sd1") == 2  # unfolded: one infotext entry per picture
    unit["image"][1]["mask"] = b64(_mask())  # each merged picture may bring its mask
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    unit["image"][1]["mask"] = "not an image"
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and "image[1].mask" in response.text
    unit["image"][1]["mask"] = None
    unit["input_mode"] = "simple"
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and 'several pictures need input_mode \\"merge\\"' in response.text
    unit["input_mode"] = "loopback"
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and "input_mode 'loopback' is not one of simple, merge, batch" in response.text


def test_batch_input_runs_the_job_once_per_picture(api, studio):
    """The extension's input_mode "batch": one whole run per picture (the other units unchanged), the same seed
    for every run, all images answered in order; bad batch input is a 422 naming the field."""
    write_tiny_controlnet(studio.home.controlnets, "cn-sd1", "sd1", "single")
    b64 = (lambda data: base64.b64encode(data).decode())
    fixed = {"model": "cn-sd1", "module": "none", "resize_mode": "Just Resize", "image": b64(OTHER), "weight": 0.5}
    batch = {"model": "cn-sd1", "module": "none", "resize_mode": "Just Resize", "input_mode": "batch",
             "batch_images": [b64(HINT), {"image": b64(OTHER)}, b64(_mask())]}
    body = {"prompt": "a red circle", "steps": 2, "width": 64, "height": 64, "seed": -1, "batch_size": 2,
            "alwayson_scripts": {"controlnet": {"args": [fixed, batch]}}}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    images, info = response.json()["images"], json.loads(response.json()["info"])
    assert len(images) == 6 and len(info["infotexts"]) == 6
    seeds = info["all_seeds"]
    assert seeds[0::2] == [seeds[0]] * 3 and seeds[1::2] == [seeds[0] + 1] * 3  # the same seeds every run
    for i, picture in enumerate((HINT, OTHER, _mask())):  # run i equals a plain request with picture i
        single = {k: v for k, v in batch.items() if k not in ("input_mode", "batch_images")} | {"image": b64(picture)}
        alone = api.post("/sdapi/v1/txt2img", json=body | {"seed": seeds[0], "alwayson_scripts": {
            "controlnet": {"args": [fixed, single]}}})
        assert alone.status_code == 200, alone.text
        assert alone.json()["images"] == images[2 * i:2 * i + 2], f"run {i} differs from its picture alone"
    assert images[0] != images[2]
    for bad, message in ((dict(batch_images="/some/folder"), "does not read a folder"),
                         (dict(batch_images=[]), "needs a list of base64 pictures"),
                         (dict(batch_images=["not a picture"]), "batch_images[0]"),
                         (dict(input_mode="simple", image=b64(HINT)), "only read with input_mode")):
        body["alwayson_scripts"]["controlnet"]["args"] = [fixed, batch | bad]
        response = api.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 422 and message in response.text, (bad, response.text)


def test_batch_plan_counts_against_the_limits_and_stops_on_interrupt(setup):
    import dataclasses
    import threading

    from darkroom.request import GenerationRequest
    from darkroom.services.control_batch import plan_control_batch, run_control_batch

    engine = setup["engine"]
    unit = ControlUnit(batch_images=[HINT, OTHER, HINT], **UNITS["controlnet"])
    req = GenerationRequest(model=str(setup["sd1"]), controlnet=[unit], n_iter=2, **KW)
    plan = plan_control_batch(engine, req)
    assert [r.controlnet[0].image for r in plan.requests] == [HINT, OTHER, HINT] and plan.runs == 6
    assert plan.total_steps == 6 * KW["steps"]
    with pytest.raises(InvalidRequest, match="runs once per picture through the job queue"):
        engine.generate(req)  # the engine alone refuses it: a batch runs through the queue
    limits = engine.limits
    try:
        engine.limits = dataclasses.replace(limits, max_batch_count=5)
        with pytest.raises(InvalidRequest, match=r"makes 6 batches; at most 5 \(the max_batch_count setting\)"):
            plan_control_batch(engine, req)
    finally:
        engine.limits = limits
    cancel, images, batches = threading.Event(), [], []
    result = run_control_batch(engine, plan_control_batch(engine, req.model_copy(update={"n_iter": 1})),
                               cancel=cancel, on_image=lambda im: (images.append(im), cancel.set()),
                               on_step=lambda e: batches.append((e.batch_index, e.batch_count)))
    assert result.interrupted and len(result.images) == 1 == len(images)  # the next runs never started
    assert set(batches) == {(0, 3)}
