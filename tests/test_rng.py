"""The webui's noise sources (CPU, GPU, NV), ENSD and variation seeds: numbers, engine, infotext, CLI, A1111 API."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
import webuiapi
from click.testing import CliRunner
from PIL import Image

from darkroom.cli import cli
from darkroom.engine import rng
from darkroom.engine.rng import Noise, Philox, slerp
from darkroom.errors import InvalidRequest
from darkroom.metadata.images import encode_png, read_image_metadata
from darkroom.metadata.infotext import build_infotext, parse_infotext, request_from_infotext
from darkroom.request import GenerationRequest
from tests.server_util import live_server

SHAPE = (4, 8, 8)


def pixels(png: bytes) -> list:
    """Decoded pixels: PNG bytes also carry the infotext, which differs whenever a setting does."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).tolist()


def cpu_draws(seed: int, count: int, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


# --- Philox: torch.randn as NVIDIA GPUs draw it -------------------------------------------------------------


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (counter, key -> output)."""
    def one(counter, key):
        out = rng._philox4x32_10([np.array([c], dtype=np.uint64) for c in counter], key)
        return [int(x[0]) for x in out]

    assert one([0, 0, 0, 0], (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert one([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert one([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_philox_matches_cuda_randn_seed_0():
    """torch.manual_seed(0); torch.randn(3, 4, device="cuda") on an NVIDIA GPU begins with these."""
    draw = Philox(0).randn((3, 4))
    assert draw.shape == (3, 4) and draw.dtype == torch.float32
    expected = [-0.92466259, -0.42534415, -2.6438457, 0.14518388, -0.12086647, -0.57972564]
    assert draw.flatten()[:6].tolist() == pytest.approx(expected, abs=2e-7)


def test_philox_draws_continue_the_counter_as_cuda_does():
    """Element i of a draw is subsequence i at counter = draws so far: it does not depend on the shape, and a
    second draw is neither the first again nor its continuation (CUDA moves the offset on one block per draw)."""
    g = Philox(0)
    first, second = g.randn((3, 4)), g.randn((2, 5))
    assert torch.equal(Philox(0).randn((10,)), first.flatten()[:10])
    assert torch.equal(second.flatten(), _philox_at(0, offset=1, n=10))
    assert not torch.equal(second.flatten(), first.flatten()[:10])
    assert g.offset == 2
    big = Philox(123).randn((4, 128, 128))  # an SDXL latent: vectorised, and a proper normal sample
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def _philox_at(seed: int, offset: int, n: int) -> torch.Tensor:
    g = Philox(seed)
    g.offset = offset
    return g.randn((n,))


# --- Noise: sources, batches, ENSD, variation seeds ---------------------------------------------------------


def test_cpu_source_is_plain_torch_generators():
    """Source CPU with no delta is what Darkroom always drew, so existing images do not change."""
    noise, stream = Noise([5, 6]).start(SHAPE)
    assert stream.exact
    later = stream.next()
    for i, seed in enumerate((5, 6)):
        first, second = cpu_draws(seed, 2)
        assert torch.equal(noise[i], first) and torch.equal(later[i], second)
    # the generators diffusers gets are the very ones next() draws from
    _, stream = Noise([5]).start(SHAPE)
    assert torch.equal(torch.randn(SHAPE, generator=stream.generators[0]), cpu_draws(5, 2)[1])
    assert torch.equal(stream.next()[0], cpu_draws(5, 3)[2])


@pytest.mark.parametrize("source", ["CPU", "GPU", "NV"])
def test_ensd_changes_only_the_later_draws(source):
    plain_noise, plain = Noise([40, 41], source=source).start(SHAPE)
    delta_noise, delta = Noise([40, 41], source=source, seed_delta=31337).start(SHAPE)
    assert torch.equal(plain_noise, delta_noise)
    # the webui reseeds each image's generator with seed + delta after the first draw
    assert torch.equal(delta.next(), torch.stack([rng.randn(source, s + 31337, SHAPE) for s in (40, 41)]))
    assert not torch.equal(plain.next(), delta.next())


@pytest.mark.parametrize("source", ["CPU", "GPU", "NV"])
def test_batch_equals_singles_for_each_source(source):
    kw = dict(subseed_strength=0.3, source=source, seed_delta=7)
    batch, stream = Noise([10, 11, 12], [50, 51, 52], **kw).start(SHAPE)
    later = [stream.next() for _ in range(2)]
    for i in range(3):
        single, one = Noise([10 + i], [50 + i], **kw).start(SHAPE)
        assert torch.equal(batch[i], single[0])
        assert all(torch.equal(draw[i], one.next()[0]) for draw in later)


def test_nv_is_philox_and_gpu_without_cuda_too():
    nv, stream = Noise([3], source="nv").start((3, 4))
    assert torch.equal(nv[0], Philox(3).randn((3, 4)))
    assert torch.equal(stream.next()[0], _philox_at(3, 1, 12).reshape(3, 4))
    assert not stream.exact  # diffusers cannot take Philox: a deterministic CPU stand-in
    if not torch.cuda.is_available():
        assert torch.equal(Noise([3], source="GPU").start((3, 4))[0], nv)
    with pytest.raises(ValueError, match="not one of CPU, GPU, NV"):
        Noise([1], source="TPU")


def test_variation_seed_slerp_is_the_webuis_columnwise_one():
    """The webui interpolates each (channel, column) on its own arc: changing one column of the variation
    noise changes that column of the result only. Strength 0 keeps the seed's noise exactly."""
    a, b = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1)), torch.randn(
        (1, *SHAPE), generator=torch.Generator().manual_seed(2))
    mixed = slerp(0.3, a, b)
    b2 = b.clone()
    b2[0, :, :, 5] *= -2
    mixed2 = slerp(0.3, a, b2)
    changed = (mixed != mixed2).any(dim=2)[0]  # (channel, column)
    assert changed[:, 5].all() and not changed[:, :5].any() and not changed[:, 6:].any()
    assert torch.equal(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b, atol=1e-5)
    # and it is what Noise mixes in, on the request's source
    noise, _ = Noise([8], [9], 0.3, source="NV").start(SHAPE)
    assert torch.equal(noise, slerp(0.3, Philox(8).randn(SHAPE)[None], Philox(9).randn(SHAPE)[None]))


# --- the engine ---------------------------------------------------------------------------------------------


def small(model, **kw) -> GenerationRequest:
    base = dict(prompt="a red circle", steps=3, width=64, height=64, seed=7, sampler="Euler a", cfg_scale=5.0,
                model=model)
    return GenerationRequest(**{**base, **kw})


def test_engine_sources_and_ensd(engine, tiny_model):
    model = str(tiny_model("sd1")["path"])
    plain = engine.generate(small(model))
    ensd = engine.generate(small(model, eta_noise_seed_delta=31337))
    assert pixels(plain.images[0].png) != pixels(ensd.images[0].png)  # Euler a draws later noise: ENSD changes it
    assert "ENSD: 31337" in ensd.images[0].infotext and "RNG: CPU" in ensd.images[0].infotext
    euler = [engine.generate(small(model, sampler="Euler", eta_noise_seed_delta=d)) for d in (0, 31337)]
    assert pixels(euler[0].images[0].png) == pixels(euler[1].images[0].png)  # deterministic: ENSD changes nothing
    assert "ENSD" not in parse_infotext(euler[1].images[0].infotext)  # nor is it written (as the webui)
    nv = engine.generate(small(model, randn_source="NV"))
    gpu = engine.generate(small(model, randn_source="GPU"))
    assert pixels(nv.images[0].png) != pixels(plain.images[0].png)
    assert parse_infotext(nv.images[0].infotext)["RNG"] == "NV"
    assert parse_infotext(gpu.images[0].infotext)["RNG"] == "GPU"  # written: Darkroom's own default is CPU
    # each image's infotext gives back its request
    for result, source, delta in ((ensd, "CPU", 31337), (nv, "NV", 0), (gpu, "GPU", 0)):
        back = request_from_infotext(result.images[0].infotext)
        assert (back.randn_source, back.eta_noise_seed_delta) == (source, delta)


def test_engine_batch_equals_singles_nv_with_ensd(engine, tiny_model):
    model = str(tiny_model("sd1")["path"])
    batch = engine.generate(small(model, randn_source="NV", eta_noise_seed_delta=5, batch_size=2, seed=30))
    for i, seed in enumerate((30, 31)):
        single = engine.generate(small(model, randn_source="NV", eta_noise_seed_delta=5, seed=seed))
        a = np.asarray(Image.open(io.BytesIO(single.images[0].png))).astype(int)
        b = np.asarray(Image.open(io.BytesIO(batch.images[i].png))).astype(int)
        assert np.abs(a - b).max() <= 1


# --- infotext ------------------------------------------------------------------------------------------------

WEBUI = ("a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7,"
         " Seed: 1234, Size: 512x512, Model hash: abc1234567, Model: v1-5, Version: v1.10.1")


@pytest.mark.parametrize(("extra", "source", "delta"), [
    ("", "GPU", 0),  # the webui writes no RNG key for its default, GPU, and reads a missing one as GPU
    (", RNG: NV", "NV", 0),
    (", ENSD: 31337, RNG: CPU", "CPU", 31337),
    (", RNG: cuda", "NV", 0),  # stable-diffusion.cpp's Philox, a port of the webui's NV
])
def test_infotext_rng_and_ensd_read(extra, source, delta):
    req = request_from_infotext(WEBUI + extra)
    assert (req.randn_source, req.eta_noise_seed_delta) == (source, delta)


def test_darkroom_infotext_without_rng_is_cpu():
    """Darkroom's infotexts built without the key were made with its default, CPU; the webui's mean GPU."""
    ours = WEBUI.replace("Version: v1.10.1", "Version: darkroom-0.1.0")
    assert request_from_infotext(ours).randn_source == "CPU"
    gpu = GenerationRequest(prompt="x", seed=3, width=64, height=64, randn_source="GPU")
    assert request_from_infotext(build_infotext(gpu, seed=3, model_name=None, model_hash=None)).randn_source == "GPU"


def test_infotext_round_trip_and_bad_values():
    req = GenerationRequest(prompt="x", seed=3, width=64, height=64, randn_source="NV", eta_noise_seed_delta=31337)
    text = build_infotext(req, seed=3, model_name="m", model_hash=None)
    assert "ENSD: 31337" in text and "RNG: NV" in text
    back = request_from_infotext(text)
    assert (back.randn_source, back.eta_noise_seed_delta) == ("NV", 31337)
    with pytest.raises(InvalidRequest, match="ENSD"):
        request_from_infotext(WEBUI + ", ENSD: -5")
    with pytest.raises(ValueError, match="randn_source 'tpu' is not one of CPU, GPU, NV"):
        GenerationRequest(randn_source="tpu")
    assert GenerationRequest(randn_source=" nv ").randn_source == "NV"


# --- CLI ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "source", "delta"), [(", RNG: NV, ENSD: 31337", "NV", 31337), ("", "GPU", 0)])
def test_from_png_picks_the_images_source(home, tiny_model, tmp_path, monkeypatch, extra, source, delta):
    from darkroom.engine.generate import Engine

    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny-sd1.safetensors")
    text = ("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 12, Size: 64x64, Model: tiny-sd1,"
            " Version: v1.10.1" + extra)
    png = tmp_path / "webui.png"
    png.write_bytes(encode_png(Image.new("RGB", (64, 64)), text))
    seen = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, req, **kw: seen.append(req) or real(self, req, **kw))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "--from-png", str(png), "-o", str(out),
                                 "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert (seen[0].randn_source, seen[0].eta_noise_seed_delta) == (source, delta)
    written = parse_infotext(read_image_metadata(next(out.glob("*.png"))).parameters)
    assert written["RNG"] == source and written.get("ENSD") == (str(delta) if delta else None)
    # the flags override the image's
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "--from-png", str(png), "-o", str(out),
                                 "--rng", "cpu", "--ensd", "0", "--precision", "fp32"])
    assert r.exit_code == 0, r.output
    assert (seen[1].randn_source, seen[1].eta_noise_seed_delta) == ("CPU", 0)


def test_cli_bad_rng_flags_are_one_line(home):
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "--rng", "tpu"])
    assert r.exit_code == 2 and "'tpu' is not one of 'cpu', 'gpu', 'nv'" in r.output
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "--ensd", "-1"])
    assert r.exit_code != 0 and "Traceback" not in r.output and "eta_noise_seed_delta" in r.output


# --- A1111 API ------------------------------------------------------------------------------------------------

FAST = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 5, "sampler_name": "Euler a"}


def txt2img(api, **fields):
    r = api.post("/sdapi/v1/txt2img", json={**FAST, **fields})
    assert r.status_code == 200, r.text
    return pixels(base64.b64decode(r.json()["images"][0])), json.loads(r.json()["info"])["infotexts"][0]


def test_a1111_override_settings_per_request(api, studio):
    plain, plain_text = txt2img(api)
    ensd, text = txt2img(api, override_settings={"eta_noise_seed_delta": 31337})
    assert ensd != plain and "ENSD: 31337" in text and "ENSD" not in plain_text
    nv, text = txt2img(api, override_settings={"randn_source": "nv"})
    assert nv != plain and "RNG: NV" in text
    for bad, needle in (({"randn_source": "TPU"}, "override_settings.randn_source 'TPU' is not one of"),
                        ({"eta_noise_seed_delta": -1}, "override_settings.eta_noise_seed_delta -1 is out of range"),
                        ({"eta_noise_seed_delta": "x"}, "must be a whole number")):
        r = api.post("/sdapi/v1/txt2img", json={**FAST, "override_settings": bad})
        assert r.status_code == 422 and needle in r.json()["detail"]
    # the stored options did not move
    assert (studio.settings.get("randn_source"), studio.settings.get("eta_noise_seed_delta")) == ("CPU", 0)


def test_a1111_options_are_the_defaults(api, studio):
    opts = api.get("/sdapi/v1/options").json()
    assert (opts["randn_source"], opts["eta_noise_seed_delta"]) == ("CPU", 0)
    r = api.post("/sdapi/v1/options", json={"randn_source": "nv", "eta_noise_seed_delta": "31337"})
    assert r.status_code == 200
    opts = api.get("/sdapi/v1/options").json()
    assert (opts["randn_source"], opts["eta_noise_seed_delta"]) == ("NV", 31337)
    _, text = txt2img(api)
    assert "RNG: NV" in text and "ENSD: 31337" in text
    _, text = txt2img(api, override_settings={"randn_source": "CPU", "eta_noise_seed_delta": 0})
    assert "RNG: CPU" in text and "ENSD" not in text
    r = api.post("/sdapi/v1/options", json={"randn_source": "quantum"})
    assert r.status_code == 422 and "randn_source 'quantum'" in r.json()["detail"]
    assert studio.settings.get("randn_source") == "NV"


def test_a1111_pasted_infotext_brings_its_source(api):
    _, text = txt2img(api, infotext=WEBUI.replace("512x512", "64x64") + ", ENSD: 31337")
    params = parse_infotext(text)
    assert params["RNG"] == "GPU" and params["ENSD"] == "31337"  # no RNG key pasted: the webui's GPU


def test_webuiapi_client_override_settings(studio):
    with live_server(studio) as url:
        host, port = url.removeprefix("http://").split(":")
        client = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
        kw = dict(prompt="a red circle", seed=3, width=64, height=64)
        plain = client.txt2img(**kw)
        result = client.txt2img(**kw, override_settings={"randn_source": "NV", "eta_noise_seed_delta": 31337})
        text = result.info["infotexts"][0]
        assert "RNG: NV" in text and "ENSD: 31337" in text
        assert np.asarray(result.image).tolist() != np.asarray(plain.image).tolist()
