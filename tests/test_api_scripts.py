"""The webui's remaining list routes and the X/Y/Z plot script, with the real `webuiapi` client over a socket.

Payload shapes: `script_args` in the order of scripts/xyz_grid.py's `ui()` return value (16 values
since webui 1.6; axis types as indices into its axis list), as in the X/Y/Z example in
SipherAGI/sd-webui-agent-scheduler issue 103 (`[11, "", [...], 0, "", [], 0, "", [], true, false,
false, false, 0, false]`); the older 11-value order without dropdowns, and axis names as text,
as in AUTOMATIC1111/stable-diffusion-webui issue 10471. The list routes as webuiapi calls them
(get_hypernetworks, get_face_restorers, get_scripts, custom_get/custom_post) and the shapes of the
webui's modules/api/models.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
import webuiapi

from darkroom.server.a1111_scripts import IMG2IMG_AXES, TXT2IMG_AXES
from tests.server_util import live_server

SMALL = {"width": 64, "height": 64, "steps": 2, "seed": 11}
STEPS = TXT2IMG_AXES.index("Steps")  # 4, as in the webui's txt2img list
CFG = TXT2IMG_AXES.index("CFG Scale")


def _client(url: str) -> webuiapi.WebUIApi:
    host, port = url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)


def _xyz(x_type=STEPS, x_values="1,2", y_type=0, y_values="", z_type=0, z_values="", *, lone=False, sub=False,
         legend=True) -> list:
    return [x_type, x_values, [], y_type, y_values, [], z_type, z_values, [], legend, lone, sub, False, 0, False,
            False]


def _refused(call, *words: str) -> None:
    with pytest.raises(RuntimeError) as caught:
        call()
    status, text = caught.value.args
    assert status == 422 and all(w in json.loads(text)["detail"] for w in words), (status, text)


def test_every_list_route_answers_the_webuis_shape(studio):
    with live_server(studio) as url:
        api = _client(url)
        assert api.get_hypernetworks() == [] and api.get_face_restorers() == []
        # ControlNet listed as the webui lists an always-on extension script
        assert api.get_scripts() == {"txt2img": ["x/y/z plot", "controlnet"],
                                     "img2img": ["sd upscale", "x/y/z plot", "controlnet"]}
        assert api.custom_get("extensions", baseurl=True) == []
        info = api.custom_get("script-info", baseurl=True)
        assert [(s["name"], s["is_img2img"], s["is_alwayson"]) for s in info] == [
            ("x/y/z plot", False, False), ("x/y/z plot", True, False), ("sd upscale", True, False),
            ("controlnet", False, True), ("controlnet", True, True)]
        unit = info[3]["args"][0]["value"]  # a unit slot's defaults, in the extension's field names
        assert unit["module"] == "none" and unit["model"] == "None" and unit["weight"] == 1.0
        assert "prepared" not in unit and len(info[3]["args"]) == 3
        assert len(info[0]["args"]) == 16 and info[0]["args"][0]["choices"] == list(TXT2IMG_AXES)
        assert info[1]["args"][0]["choices"] == list(IMG2IMG_AXES) and info[0]["args"][9]["label"] == "Draw legend"
        assert httpx.post(f"{url}/sdapi/v1/refresh-embeddings", timeout=60).status_code == 200
        r = httpx.post(f"{url}/sdapi/v1/interrogate", json={"image": "", "model": "clip"}, timeout=60)
        assert r.status_code == 422 and "captioning model" in r.json()["detail"]


def test_xyz_plot_through_webuiapi_returns_the_grid_then_the_cells(studio):
    with live_server(studio) as url:
        api = _client(url)
        result = api.txt2img(prompt="a red circle", **SMALL, script_name="x/y/z plot", script_args=_xyz())
        assert len(result.images) == 1  # the grid alone, as the webui without "Include Sub Images"
        grid = result.image
        assert grid.width >= 2 * 64 and grid.height > 64  # two columns and the label row
        assert "X Type: Steps" in result.info["infotexts"][0] and "Script: X/Y/Z plot" in result.info["infotexts"][0]
        # include_lone_images: the grid, then each cell; the name in any case
        result = api.txt2img(prompt="a red circle", **SMALL, script_name="X/Y/Z Plot",
                             script_args=_xyz(y_type=CFG, y_values="5,7", lone=True))
        assert len(result.images) == 1 + 4 and all(im.size == (64, 64) for im in result.images[1:])
        assert result.info["index_of_first_image"] == 1 and "Steps: 2, " in result.info["infotexts"][2]
        assert "CFG scale: 7" in result.info["infotexts"][4]


def test_xyz_plot_older_argument_orders_and_axis_names(studio):
    with live_server(studio) as url:
        api = _client(url)
        old = ["Steps", "1,2", 0, "", 0, "", True, False, False, False, 0]  # webui <= 1.2 order, type by name
        result = api.txt2img(prompt="a cat", **SMALL, script_name="xyz plot", script_args=old)
        assert len(result.images) == 1 and result.image.width >= 128
        dropdown = [TXT2IMG_AXES.index("Sampler"), "", ["Euler", "Euler a"], 0, "", [], 0, "", [], True, True]
        result = api.txt2img(prompt="a cat", **SMALL, script_name="x/y/z plot", script_args=dropdown)
        assert len(result.images) == 3 and "Sampler: Euler a" in result.info["infotexts"][2]


def test_xyz_plot_and_other_scripts_are_refused_with_the_reason(studio):
    with live_server(studio) as url:
        api = _client(url)
        run = api.txt2img
        _refused(lambda: run(prompt="a", **SMALL, script_name="x/y/z plot", script_args=_xyz(z_type=STEPS,
                                                                                              z_values="1,2")),
                 "Z axis")
        churn = TXT2IMG_AXES.index("Sigma Churn")
        _refused(lambda: run(prompt="a", **SMALL, script_name="x/y/z plot", script_args=_xyz(x_type=churn)),
                 "'Sigma Churn'", "Steps")
        _refused(lambda: run(prompt="a", **SMALL, script_name="x/y/z plot", script_args=_xyz(x_values="2,abc")),
                 "abc")
        _refused(lambda: run(prompt="a", **SMALL, script_name="x/y/z plot", script_args=_xyz(legend=False)),
                 "draw_legend")
        _refused(lambda: run(prompt="a", **SMALL, script_name="SD upscale", script_args=[]), "img2img")
        _refused(lambda: run(prompt="a", **SMALL, script_name="prompt matrix", script_args=[]), "'prompt matrix'",
                 "X/Y/Z plot", "SD upscale")
        assert studio.queue.jobs() == [] or all(j.plan is None for j in studio.queue.jobs())  # nothing was queued
