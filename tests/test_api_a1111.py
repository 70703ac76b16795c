"""The AUTOMATIC1111 API (/sdapi/v1): in process, then with the real `webuiapi` client over a socket.

Clients written for the webui must work unchanged, so the shapes checked here are the ones
webuiapi, Open WebUI and SillyTavern read; generation itself is tested elsewhere.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import pytest
import webuiapi
from PIL import Image

from darkroom.engine import samplers
from darkroom.errors import ModelLoadError
from darkroom.server.security import Security
from darkroom.services.jobs import Job
from tests.server_util import HANG_GUARD, live_server

FAST = {"steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}


def txt2img(api, **fields):
    return api.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", **FAST, **fields})


def ok(api, **fields) -> tuple[list[Image.Image], dict, dict]:
    r = txt2img(api, **fields)
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["info"], str)  # a JSON *string*, as webui clients json.loads it
    images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in body["images"]]
    return images, json.loads(body["info"]), body


def error_of(r) -> str:
    body = r.json()
    assert body["error"] == body["detail"]
    return body["error"]


# --- txt2img --------------------------------------------------------------------------------------


def test_txt2img_batch_info_and_echo(api, studio):
    images, info, body = ok(api, seed=5, batch_size=2, negative_prompt="blurry")
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert info["seed"] == 5 and info["all_seeds"] == [5, 6]
    assert info["all_prompts"] == ["a red circle"] * 2 and info["all_negative_prompts"] == ["blurry"] * 2
    assert info["width"] == 64 and info["height"] == 64 and info["steps"] == 3 and info["batch_size"] == 2
    assert info["sampler_name"] == "Euler" and info["cfg_scale"] == 7.0 and info["clip_skip"] == 1
    model = next(m for m in studio.models() if m.name == "tiny-sd1")
    assert info["sd_model_name"] == "tiny-sd1" and info["sd_model_hash"] == model.hash
    assert info["sd_vae_name"] is None and info["extra_generation_params"] == {} and info["index_of_first_image"] == 0
    assert len(info["infotexts"]) == 2 and "Seed: 6" in info["infotexts"][1]
    assert "Model: tiny-sd1" in info["infotexts"][0]
    assert info["infotexts"][0] == images[0].info["parameters"]  # the PNGs carry their infotext
    assert len(info["job_timestamp"]) == 14 and info["version"].startswith("darkroom-")
    params = body["parameters"]  # the request echoed with the webui's defaults filled in
    assert params["seed"] == 5 and params["negative_prompt"] == "blurry" and params["n_iter"] == 1
    assert params["send_images"] is True and params["save_images"] is False and params["enable_hr"] is False


def test_same_seed_same_images_and_random_seed_reported(api):
    first = txt2img(api, seed=7).json()["images"]
    second = txt2img(api, seed=7).json()["images"]
    assert first == second
    _, info, body = ok(api, seed=-1, n_iter=2)
    assert body["parameters"]["seed"] == -1
    assert info["seed"] >= 0 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    assert f"Seed: {info['seed'] + 1}" in info["infotexts"][1]


def test_save_images_decides_history(api, studio):
    _, _, body = ok(api, seed=1)  # the webui API's default: nothing written
    assert api.get("/api/history").json()["total"] == 0 and not list(studio.home.outputs.rglob("*.png"))
    _, _, body = ok(api, seed=2, save_images=True, send_images=False)
    assert body["images"] == []
    history = api.get("/api/history").json()
    assert history["total"] == 1 and history["items"][0]["seed"] == 2
    assert len(list(studio.home.outputs.rglob("*.png"))) == 1


def test_override_settings_model_clip_skip_and_infotext(api):
    starter = next(m["title"] for m in api.get("/sdapi/v1/sd-models").json() if m["model_name"] == "darkroom-starter")
    _, info, _ = ok(api, seed=3, steps=2, override_settings={"sd_model_checkpoint": starter,
                                                             "CLIP_stop_at_last_layers": 2, "sd_vae": "Automatic"})
    assert info["sd_model_name"] == "darkroom-starter" and info["clip_skip"] == 2
    assert "Clip skip: 2" in info["infotexts"][0]
    # the webui's `infotext` field fills what the request leaves unset; what it sets wins
    pasted = "a blue square\nNegative prompt: ugly\nSteps: 9, Sampler: Euler, CFG scale: 5, Seed: 42, Size: 64x64"
    r = api.post("/sdapi/v1/txt2img", json={"infotext": pasted, "steps": 2})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert (info["prompt"], info["negative_prompt"], info["seed"], info["steps"], info["cfg_scale"]) == (
        "a blue square", "ugly", 42, 2, 5.0)


def test_eta_kept_only_where_it_matters(api):
    # webuiapi sends eta=1.0 every time; for Euler it changes nothing, so it is not recorded
    _, info, _ = ok(api, seed=4, eta=1.0)
    assert "Eta" not in info["infotexts"][0]
    _, info, _ = ok(api, seed=4, eta=0.5, sampler_name="DDIM", steps=2)
    assert "Eta: 0.5" in info["infotexts"][0]


@pytest.mark.parametrize(("fields", "needle"), [
    ({"sampler_name": "Nope Sampler"}, "Nope Sampler"),
    ({"width": 513}, "width 513 is not a multiple of 8"),
    ({"steps": 0}, "steps"),
    ({"scheduler": "Wobbly"}, "Wobbly"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler 'R-ESRGAN 4x+' is not supported"),
    ({"restore_faces": True}, "needs codeformer-v0.1.0.pth and detection_Resnet50_Final.pth"),  # files absent
    ({"styles": ["No Such Style"]}, "unknown style 'No Such Style'"),
    ({"subseed_strength": 1.3}, "subseed_strength"),
    ({"script_name": "prompt matrix"}, "script_name"),  # the X/Y/Z plot runs: tests/test_api_scripts.py
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "ADetailer"),  # ControlNet: tests/test_controlnet_api.py
    ({"refiner_checkpoint": "sdxl-refiner"}, "refiner_checkpoint"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 40}}, "CLIP_stop_at_last_layers"),
])
def test_txt2img_refuses_what_it_cannot_do(api, studio, fields, needle):
    r = txt2img(api, **fields)
    assert r.status_code == 422, r.text
    assert needle in error_of(r)
    assert studio.queue.jobs() == []  # refused before anything was queued


def test_txt2img_unknown_model_and_bad_img2img(api):
    r = txt2img(api, override_settings={"sd_model_checkpoint": "no-such-model [0123456789]"})
    assert r.status_code == 404 and "no-such-model" in error_of(r) and "tiny-sd1" in error_of(r)
    r = txt2img(api, override_settings={"sd_model_checkpoint": "/etc/passwd"})
    assert r.status_code == 404  # only library models, never a path a client makes up
    r = api.post("/sdapi/v1/img2img", json={"init_images": ["x"], "prompt": "p"})
    assert r.status_code == 422 and "init_images" in error_of(r)  # img2img itself: tests/test_api_img2img.py


def test_failed_job_is_an_error(api, studio, monkeypatch):
    def boom(*args, **kwargs):
        raise ModelLoadError("tiny-sd1: the weights are damaged")

    monkeypatch.setattr(studio.engine, "generate", boom)
    r = txt2img(api, seed=1)
    # the job keeps the error's status where the queue records it (Job.error_status), else 500
    assert r.status_code == (422 if hasattr(Job, "error_status") else 500)
    assert "weights are damaged" in error_of(r)


# --- progress, control, options ------------------------------------------------------------------------


def test_progress_idle_and_controls(api):
    p = api.get("/sdapi/v1/progress").json()
    assert p["progress"] == 0 and p["current_image"] is None and p["eta_relative"] == 0
    assert p["state"]["job_count"] == 0 and p["state"]["sampling_step"] == 0 and p["state"]["interrupted"] is False
    assert api.post("/sdapi/v1/interrupt").json() == {}
    assert api.post("/sdapi/v1/skip", json={}).json() == {}


def test_progress_while_running_has_preview(api, studio):
    from darkroom.request import GenerationRequest

    studio.queue.preview_every = 0.0
    job = studio.queue.submit(GenerationRequest(prompt="x", steps=400, width=64, height=64, sampler="Euler"))
    try:
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            p = api.get("/sdapi/v1/progress").json()
            if p["state"]["sampling_step"] > 0 and p["current_image"]:
                break
            time.sleep(0.05)
        assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 400 and p["state"]["job_count"] == 1
        Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).load()
        assert api.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()["current_image"] is None
    finally:
        studio.queue.interrupt(job.id)
        studio.queue.wait(job, 20)
    assert job.state == "interrupted"


def test_options_read_and_write(api, studio):
    models = {m["model_name"]: m for m in api.get("/sdapi/v1/sd-models").json()}
    opts = api.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == models["tiny-sd1"]["title"]
    assert opts["sd_checkpoint_hash"] == models["tiny-sd1"]["sha256"]
    assert (opts["sd_vae"], opts["CLIP_stop_at_last_layers"], opts["samples_format"]) == ("Automatic", 1, "png")
    r = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": models["darkroom-starter"]["title"],
                                            "CLIP_stop_at_last_layers": 2, "show_progressbar": True})
    assert r.status_code == 200 and r.json() is None
    opts = api.get("/sdapi/v1/options").json()
    assert opts["sd_model_checkpoint"] == models["darkroom-starter"]["title"] and opts["CLIP_stop_at_last_layers"] == 2
    assert studio.settings.get("current_model") == "darkroom-starter" and studio.settings.get("clip_skip") == 2
    # a bad value changes nothing, not even the good values sent with it
    r = api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3, "sd_model_checkpoint": "ghost"})
    assert r.status_code == 404 and "ghost" in error_of(r)
    assert studio.settings.get("clip_skip") == 2
    assert api.post("/sdapi/v1/options", json={"samples_format": "gif"}).status_code == 422  # png/jpg/webp only
    assert api.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "two"}).status_code == 422
    api.post("/sdapi/v1/options", json=api.get("/sdapi/v1/options").json())  # a client echoing it all back
    assert api.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2


# --- lists ------------------------------------------------------------------------------------------------


def test_model_and_sampler_lists(api, studio):
    rows = api.get("/sdapi/v1/sd-models").json()
    assert {r["model_name"] for r in rows} == {"tiny-sd1", "darkroom-starter"}
    for r in rows:
        assert r["title"] == f"{r['model_name']} [{r['hash']}]" and r["hash"] == r["sha256"][:10]
        assert len(r["sha256"]) == 64 and r["config"] is None and r["filename"].endswith(".safetensors")
    (studio.home.checkpoints / "broken.safetensors").write_bytes(b"\x00" * 20)
    assert api.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    assert "broken" in {m.name for m in studio.models()}
    assert {r["model_name"] for r in api.get("/sdapi/v1/sd-models").json()} == {"tiny-sd1", "darkroom-starter"}

    names = {s["name"]: s for s in api.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(names)
    assert "k_euler_a" in names["Euler a"]["aliases"] and names["Euler"]["options"] == {}
    schedulers = api.get("/sdapi/v1/schedulers").json()
    assert {s["label"] for s in schedulers} == set(samplers.SCHEDULE_NAMES)
    for s in schedulers:  # every listed name is accepted back in a request
        assert samplers.resolve("DPM++ 2M", s["name"])[0].name == "DPM++ 2M"


def test_other_lists_are_truthful(api, studio):
    assert api.get("/sdapi/v1/sd-vae").json() == []  # nothing in the folders yet
    assert api.get("/sdapi/v1/loras").json() == []
    assert api.get("/sdapi/v1/prompt-styles").json() == []
    assert api.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert [u["name"] for u in api.get("/sdapi/v1/upscalers").json()] == ["None", "Lanczos", "Nearest"]
    assert [m["name"] for m in api.get("/sdapi/v1/latent-upscale-modes").json()] == ["Latent", "Latent (nearest)"]
    assert api.get("/sdapi/v1/scripts").json() == {"txt2img": ["x/y/z plot", "controlnet"],
                                                   "img2img": ["sd upscale", "x/y/z plot", "controlnet"]}
    flags = api.get("/sdapi/v1/cmd-flags").json()
    assert flags["ckpt_dir"] == str(studio.home.checkpoints) and flags["api"] is True
    mem = api.get("/sdapi/v1/memory").json()
    assert mem["ram"]["total"] > 0 and mem["ram"]["free"] + mem["ram"]["used"] == mem["ram"]["total"]
    assert "error" in mem["cuda"] or mem["cuda"]["system"]["total"] > 0
    for route in ("refresh-loras", "refresh-vae", "unload-checkpoint", "reload-checkpoint"):
        assert api.post(f"/sdapi/v1/{route}").status_code == 200, route


# --- png-info -----------------------------------------------------------------------------------------------


def test_png_info(api):
    r = txt2img(api, seed=9)
    image_b64, infotext = r.json()["images"][0], json.loads(r.json()["info"])["infotexts"][0]
    for sent in (image_b64, "data:image/png;base64," + image_b64):
        info = api.post("/sdapi/v1/png-info", json={"image": sent}).json()
        assert info["info"] == infotext and "parameters" not in info["items"]
        params = info["parameters"]
        assert params["Prompt"] == "a red circle" and params["Seed"] == "9" and params["Sampler"] == "Euler"
        assert (params["Size-1"], params["Size-2"]) == ("64", "64")
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    info = api.post("/sdapi/v1/png-info", json={"image": base64.b64encode(plain.getvalue()).decode()}).json()
    assert info == {"info": "", "items": {}, "parameters": {}}
    assert api.post("/sdapi/v1/png-info", json={"image": ""}).json()["info"] == ""
    for garbage in ("%%%not base64%%%", base64.b64encode(b"hello, not an image").decode()):
        r = api.post("/sdapi/v1/png-info", json={"image": garbage})
        assert r.status_code == 422, r.text


# --- the real webuiapi client over a socket ------------------------------------------------------------------


def _client(url: str, **kw) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3, **kw)


def test_webuiapi_client(studio):
    with live_server(studio) as url:
        api = _client(url)
        result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64)
        assert len(result.images) == 1 and result.image.size == (64, 64)
        assert result.info["seed"] == 3 and result.info["sd_model_name"] == "tiny-sd1"
        assert result.parameters["seed"] == 3
        titles = api.util_get_model_names()
        assert len(titles) == 2 and any(t.startswith("darkroom-starter [") for t in titles)
        assert {"Euler", "Euler a", "DPM++ 2M"} <= set(api.util_get_sampler_names())
        assert "karras" in api.util_get_scheduler_names()
        assert api.util_get_current_model().startswith("tiny-sd1 [")
        api.util_set_model("darkroom-starter")
        assert api.util_get_current_model().startswith("darkroom-starter [")
        result = api.txt2img(prompt="a blue square", seed=4, width=64, height=64, steps=2)
        assert result.info["sd_model_name"] == "darkroom-starter"
        png = api.png_info(result.image)  # webuiapi sends a data: URL carrying the PNG's text chunks
        assert "Model: darkroom-starter" in png.info and png.parameters["Seed"] == "4"
        api.set_options({"sd_model_checkpoint": "tiny-sd1"})
        assert api.get_options()["sd_model_checkpoint"].startswith("tiny-sd1 [")
        assert api.get_progress()["state"]["job_count"] == 0


def test_webuiapi_loras_and_a_lora_in_the_prompt(studio, tiny_model):
    from darkroom.testing.tiny_lora import write_tiny_lora

    write_tiny_lora(studio.home.loras / "inked.safetensors", tiny_model("sd1"), tag_frequency={"s": {"ink": 3}})
    with live_server(studio) as url:
        api = _client(url)
        loras = api.get_loras()
        assert [lo["name"] for lo in loras] == ["inked"]
        assert "ss_tag_frequency" in loras[0]["metadata"]
        plain = api.txt2img(prompt="a red circle", seed=3, width=64, height=64)
        styled = api.txt2img(prompt="a red circle <lora:inked:1>", seed=3, width=64, height=64)
        assert "Lora hashes" in styled.info["infotexts"][0]
        assert styled.image.tobytes() != plain.image.tobytes()


def test_webuiapi_interrupt(studio):
    with live_server(studio) as url:
        api = _client(url)
        out: dict = {}

        def run():
            t0 = time.monotonic()
            out["result"] = api.txt2img(prompt="long", seed=1, width=64, height=64, steps=400)
            out["seconds"] = time.monotonic() - t0

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline and api.get_progress()["state"]["sampling_step"] == 0:
            time.sleep(0.05)
        assert api.get_progress()["state"]["sampling_step"] > 0
        assert api.interrupt() == {}
        thread.join(HANG_GUARD)  # the waiting txt2img returns once the job stops (its step count shows when)
        assert not thread.is_alive()
        job = studio.queue.jobs()[-1]
        assert job.state == "interrupted" and job.step < 400
        assert out["result"].images == [] and out["result"].info["all_seeds"] == [1]


def test_webuiapi_basic_auth(studio):
    security = Security.for_serve(listen=False, token=None, api_auth="user:pass")
    with live_server(studio, security) as url:
        api = _client(url)
        with pytest.raises(RuntimeError) as refused:
            api.txt2img(prompt="x", width=64, height=64)
        assert refused.value.args[0] == 401
        api.set_auth("user", "pass")
        assert len(api.get_sd_models()) == 2
        assert api.txt2img(prompt="x", seed=2, width=64, height=64).image.size == (64, 64)
        api.set_auth("user", "wrong")
        with pytest.raises(RuntimeError):
            api.txt2img(prompt="x", width=64, height=64)


def test_vaes_loras_embeddings_from_the_folders(api, studio, tiny_model):
    """The lists come from the real folders; sd_vae switches the VAE (options or per request)."""
    import shutil

    from safetensors.torch import save_file

    from darkroom.testing.ldm_export import vae_to_ldm
    from darkroom.testing.tiny_lora import write_tiny_lora

    vae = {k: v.contiguous() for k, v in vae_to_ldm(tiny_model("sd1")["state_dicts"]["vae"], "").items()}
    save_file(vae, str(studio.home.vae / "crisp.safetensors"))
    write_tiny_lora(studio.home.loras / "inked.safetensors", tiny_model("sd1"))
    assert [v["model_name"] for v in api.get("/sdapi/v1/sd-vae").json()] == ["crisp.safetensors"]
    assert [lo["name"] for lo in api.get("/sdapi/v1/loras").json()] == ["inked"]
    r = txt2img(api, override_settings={"sd_vae": "crisp.safetensors"})
    assert r.status_code == 200 and "VAE: crisp.safetensors" in json.loads(r.json()["info"])["infotexts"][0]
    r = txt2img(api, override_settings={"sd_vae": "other.vae.safetensors"})
    assert r.status_code == 404 and "other.vae.safetensors" in error_of(r)
    assert api.post("/sdapi/v1/options", json={"sd_vae": "crisp"}).status_code == 200
    assert api.get("/sdapi/v1/options").json()["sd_vae"] == "crisp.safetensors"
    assert "VAE: crisp.safetensors" in json.loads(txt2img(api).json()["info"])["infotexts"][0]
    api.post("/sdapi/v1/options", json={"sd_vae": "Automatic"})
    assert "VAE:" not in json.loads(txt2img(api).json()["info"])["infotexts"][0]
    shutil.rmtree(studio.home.vae)
