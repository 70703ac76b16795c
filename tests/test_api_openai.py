"""The OpenAI-compatible images API (/v1): in process, then with the official `openai` client over a socket."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from darkroom.server.security import Security
from tests.server_util import live_server

# Darkroom's extension fields (OpenAI has no steps) keep each generation well under a second
FAST = {"steps": 3, "sampler": "Euler"}


def generate(api, **fields):
    return api.post("/v1/images/generations", json={"prompt": "a red circle", "size": "64x64", **FAST, **fields})


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def openai_error(r, status: int, param: str | None) -> str:
    """The OpenAI error shape, which the openai client turns into BadRequestError etc."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"].startswith("DR-")  # its help page
    assert error["type"] == "invalid_request_error" and error["param"] == param
    return error["message"]


def test_b64_images_are_private(api, studio):
    r = generate(api, n=2, response_format="b64_json", model="dall-e-3", quality="hd", style="vivid", user="u1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and body["size"] == "64x64" and len(body["data"]) == 2
    images = [decode(d["b64_json"]) for d in body["data"]]
    assert [im.size for im in images] == [(64, 64), (64, 64)]
    assert all(d["revised_prompt"] is None and "url" not in d for d in body["data"])
    # an unknown model name (dall-e-3) means the current model; seeds follow one batch
    infotexts = [im.info["parameters"] for im in images]
    assert all("Model: tiny-sd1" in t for t in infotexts)
    seeds = [int(t.split("Seed: ")[1].split(",")[0]) for t in infotexts]
    assert seeds[1] == seeds[0] + 1
    job = studio.queue.jobs()[-1]
    assert job.source == "openai" and job.request.batch_size == 2 and job.private
    assert api.get("/api/history").json()["total"] == 0 and not list(studio.home.outputs.rglob("*.png"))


def test_url_images_are_saved_and_served(api):
    body = generate(api).json()  # response_format defaults to "url", as OpenAI's
    (item,) = body["data"]
    assert item["url"].startswith("http://127.0.0.1:7860/api/images/")
    png = api.get(item["url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert api.get("/api/history").json()["total"] == 1


def test_model_choice_and_native_size(api):
    body = generate(api, model="darkroom-starter", response_format="b64_json", size="64x32").json()
    image = decode(body["data"][0]["b64_json"])
    assert image.size == (64, 32) and "Model: darkroom-starter" in image.info["parameters"]
    body = generate(api, size=None, response_format="b64_json").json()
    assert body["size"] == "64x64" and decode(body["data"][0]["b64_json"]).size == (64, 64)  # tiny-sd1's own size


@pytest.mark.parametrize(("fields", "param", "needle"), [
    ({"size": "100x100"}, "size", "multiple of 8"),
    ({"size": "8192x8192"}, "size", "4096"),
    ({"size": "large"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": ""}, "prompt", "prompt"),
    ({"prompt": "   "}, "prompt", "prompt must not be empty"),
    ({"prompt": None}, "prompt", "prompt"),
    ({"n": 11}, "n", "n"),
    ({"n": 0}, "n", "n"),
    ({"response_format": "jpeg"}, "response_format", "b64_json"),
])
def test_bad_requests_in_openai_shape(api, studio, fields, param, needle):
    assert needle in openai_error(generate(api, **fields), 400, param)
    assert studio.queue.jobs() == []


def test_extension_fields_reproduce(api):
    first = generate(api, response_format="b64_json", seed=5, n=2, negative_prompt="blurry").json()["data"]
    again = generate(api, response_format="b64_json", seed=5, n=2, negative_prompt="blurry").json()["data"]
    assert first == again
    infotext = decode(first[1]["b64_json"]).info["parameters"]
    assert "Seed: 6" in infotext and "Steps: 3" in infotext and "Negative prompt: blurry" in infotext
    assert "Nope" in openai_error(generate(api, sampler="Nope"), 400, None)
    assert "steps" in openai_error(generate(api, steps=0), 400, "steps")


def test_missing_prompt_and_bad_json(api):
    assert "prompt" in openai_error(api.post("/v1/images/generations", json={"n": 1}), 400, "prompt")
    r = api.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_models(api):
    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {"tiny-sd1", "darkroom-starter"}
    assert all(m["object"] == "model" and m["owned_by"] == "darkroom" and m["created"] > 0 for m in body["data"])
    assert api.get("/v1/models/tiny-sd1").json()["id"] == "tiny-sd1"
    assert "nope" in openai_error(api.get("/v1/models/nope"), 404, "model")


def test_openai_client(studio):
    with live_server(studio) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-local", max_retries=0)
        result = client.images.generate(model="dall-e-3", prompt="a red circle", n=2, size="64x64",
                                        response_format="b64_json", extra_body=FAST)
        assert len(result.data) == 2 and all(decode(d.b64_json).size == (64, 64) for d in result.data)
        assert {m.id for m in client.models.list()} == {"tiny-sd1", "darkroom-starter"}
        with pytest.raises(openai.BadRequestError) as bad:
            client.images.generate(prompt="x", size="100x100", response_format="b64_json")
        assert bad.value.param == "size" and "multiple of 8" in bad.value.message


def test_openai_client_with_token(studio):
    with live_server(studio, Security(token="secret")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0)
        result = client.images.generate(prompt="a blue square", size="64x64", response_format="b64_json",
                                        extra_body=FAST)
        assert decode(result.data[0].b64_json).size == (64, 64)
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.images.generate(prompt="x", size="64x64", response_format="b64_json")
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
