"""Seamless tiling (A1111 "Tiling"): images that wrap around at their edges, the model put back after."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webuiapi
from click.testing import CliRunner
from PIL import Image

from darkroom.cli import cli
from darkroom.engine.tiling import seamless
from darkroom.metadata.infotext import parse_infotext, request_from_infotext
from darkroom.request import GenerationRequest
from tests.server_util import live_server


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.float64)


def seams(a: np.ndarray) -> tuple[float, float]:
    """How much worse the wrap seams are than neighbouring pixels inside: (x axis, y axis) ratios."""
    inner_x, inner_y = np.abs(np.diff(a, axis=1)).mean(), np.abs(np.diff(a, axis=0)).mean()
    return np.abs(a[:, 0] - a[:, -1]).mean() / inner_x, np.abs(a[0] - a[-1]).mean() / inner_y


@pytest.fixture(scope="module")
def starter_engine(engine_factory, tmp_path_factory):
    """An engine with no checkpoints: it uses the trained starter model, whose pictures are smooth shapes
    (a random tiny model draws pixel noise, where no seam shows either way)."""
    from darkroom.home import Home

    return engine_factory(Home(tmp_path_factory.mktemp("starter-home")))


def test_tiled_image_wraps_and_untiled_does_not(starter_engine):
    req = GenerationRequest(prompt="a red circle on a blue background", steps=8, width=64, height=64, seed=1)
    off = starter_engine.generate(req)
    on = starter_engine.generate(req.model_copy(update={"tiling": True}))
    assert on.model_name == "darkroom-starter"
    off_x, off_y = seams(pixels(off.images[0].png))
    on_x, on_y = seams(pixels(on.images[0].png))
    # untiled, the left and right (top and bottom) edges are unrelated pictures: far apart
    assert off_x > 4 and off_y > 4, (off_x, off_y)
    # tiled, they continue each other like any two neighbouring columns (rows) inside
    assert on_x < 2 and on_y < 2, (on_x, on_y)
    assert "Tiling: True" in on.images[0].infotext and "Tiling" not in off.images[0].infotext
    # the model was put back: the same untiled request gives the same image after a tiled one
    assert starter_engine.generate(req).images[0].png == off.images[0].png


def test_every_conv_wraps_exactly_and_is_restored(engine, tiny_model):
    """Inside `seamless`, UNet and VAE commute with a circular shift of their input (they compute on a
    torus); outside, they do not, and every conv has its padding back, also after an error."""
    engine.generate(GenerationRequest(prompt="x", steps=1, width=64, height=64, seed=1,
                                      model=str(tiny_model("sd1")["path"])))
    model = engine.cache.current
    convs = [m for m in (*model.unet.modules(), *model.vae.modules()) if isinstance(m, torch.nn.Conv2d)]
    before = [c.padding_mode for c in convs]
    assert set(before) == {"zeros"}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, model.unet.config.in_channels, 16, 16, generator=g)
    step = 2 ** (len(model.unet.config.down_block_types) - 1)  # a shift the UNet's strided convs can follow
    ctx = torch.randn(1, 77, model.unet.config.cross_attention_dim, generator=g)
    f = model.vae_scale_factor

    def shift_gap():
        with torch.no_grad():
            unet = model.unet(z, 10, encoder_hidden_states=ctx).sample
            unet_shifted = model.unet(z.roll(step, dims=-1), 10, encoder_hidden_states=ctx).sample
            vae = model.vae.decode(z).sample
            vae_shifted = model.vae.decode(z.roll(3, dims=-2)).sample
        return ((unet_shifted - unet.roll(step, dims=-1)).abs().max().item(),
                (vae_shifted - vae.roll(3 * f, dims=-2)).abs().max().item())

    with seamless(model) as switched:
        assert switched == len(convs) and {c.padding_mode for c in convs} == {"circular"}
        inside = shift_gap()
    assert max(inside) < 1e-4, inside
    assert min(shift_gap()) > 1e-3  # zero padding: the edges differ once shifted
    assert [c.padding_mode for c in convs] == before
    with pytest.raises(RuntimeError), seamless(model):
        raise RuntimeError("interrupted")
    assert [c.padding_mode for c in convs] == before
    with seamless(model, enabled=False) as switched:
        assert switched == 0 and [c.padding_mode for c in convs] == before


def test_infotext_round_trip():
    text = "a tile\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Tiling: True"
    assert request_from_infotext(text).tiling is True
    assert request_from_infotext(text.replace(", Tiling: True", "")).tiling is False


def test_a1111_pasted_infotext_brings_tiling(api):
    pasted = "a tile\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Tiling: True"
    r = api.post("/sdapi/v1/txt2img", json={"infotext": pasted})
    assert r.status_code == 200, r.text
    assert "Tiling: True" in json.loads(r.json()["info"])["infotexts"][0]


def test_webuiapi_tiling_over_a_socket(studio):
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=2)
        result = api.txt2img(prompt="a tile", seed=3, width=64, height=64, tiling=True)
        assert parse_infotext(result.info["infotexts"][0])["Tiling"] == "True"
        assert parse_infotext(result.image.info["parameters"])["Tiling"] == "True"


def test_cli_tiling_flag(home, tiny_model, tmp_path):
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "a tile", "--tiling", "--model",
                                 str(tiny_model("sd1")["path"]), "--steps", "1", "-W", "64", "-H", "64", "--seed", "2",
                                 "-o", str(out), "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    [png] = out.glob("*.png")
    assert parse_infotext(Image.open(png).info["parameters"])["Tiling"] == "True"
