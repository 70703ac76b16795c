"""Admission control (issue 17, Memory): limits from the settings and a memory estimate, checked by every
interface before anything is allocated. The free memory is always injected: nothing here depends on the
machine running the tests."""

from __future__ import annotations

import base64
import io
import time

import httpx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from darkroom.engine import admission, memory
from darkroom.engine.admission import Limits, admit
from darkroom.errors import InvalidRequest
from darkroom.request import GenerationRequest
from darkroom.settings import Settings
from tests.server_util import live_server

GB = 10**9
BIG = {"width": 4096, "height": 4096, "batch_size": 64}
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def est(arch, dtype=BF16, vae_dtype=None, device="cpu", tiled=True, **fields) -> memory.Estimate:
    req = GenerationRequest(**{"width": 512, "height": 512, **fields})
    return memory.estimate(arch, req, dtype=dtype, vae_dtype=vae_dtype or dtype, device=device, tiled_vae=tiled)


@pytest.fixture
def free_8gb(monkeypatch):
    """Every engine sees 8 GB free, whatever this machine has."""
    monkeypatch.setattr(memory, "available_memory", lambda device, reclaimable=0: 8 * GB)


# --- the estimator ------------------------------------------------------------------------------------------


def test_reference_sd15_is_the_benchmark_checkpoint_shape():
    """memory.SD15 agrees with the full-size configs benchmarks/step_time.py builds (no weights built here)."""
    from benchmarks.step_time import UNET_CONFIG, VAE_CONFIG

    arch = memory._arch("sd1", {"unet": 1, "vae": 1, "other": 1}, UNET_CONFIG, VAE_CONFIG)
    assert arch.unet_channels == memory.SD15.unet_channels and arch.vae_channels == memory.SD15.vae_channels
    assert arch.unet_attention == memory.SD15.unet_attention and arch.unet_layers == memory.SD15.unet_layers


@pytest.mark.parametrize("arch", [memory.SD15, memory.SDXL])
def test_estimate_grows_with_size_and_batch(arch):
    sizes = [est(arch, width=s, height=s).peak for s in (256, 512, 768, 1024, 2048, 4096)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    batches = [est(arch, batch_size=b).peak for b in (1, 2, 4, 8, 16)]
    assert batches == sorted(batches) and len(set(batches)) == len(batches)
    hires = est(arch, enable_hr=True, hr_scale=2.0)
    assert hires.unet == est(arch, width=1024, height=1024).unet  # the second pass is the larger UNet call


def test_cfg_1_halves_the_unet_activations():
    with_cfg, without = est(memory.SD15, cfg_scale=7.0), est(memory.SD15, cfg_scale=1.0)
    assert abs(with_cfg.unet - 2 * without.unet) <= 2
    assert with_cfg.vae == without.vae and with_cfg.weights == without.weights


def test_magnitudes_of_real_and_tiny_models(tiny_model):
    sd15 = est(memory.SD15)
    assert 1.9 * GB < sd15.weights < 2.3 * GB  # 1.07 G parameters at 2 bytes
    assert 2.5 * GB < sd15.peak < 6 * GB
    sdxl = est(memory.SDXL, FP16, FP32, "cuda", width=1024, height=1024)
    assert 6.5 * GB < sdxl.weights < 8 * GB and sdxl.peak < 14 * GB
    assert est(memory.SD15, width=4096, height=4096, batch_size=64).peak > 300 * GB  # the issue's request
    tiny = memory.read_arch(tiny_model("sd1")["path"])
    assert tiny.unet_channels == (32, 64) and est(tiny, FP32, width=64, height=64).peak < 1 * GB


def test_header_folder_and_loaded_model_agree(tmp_path, tiny_model, engine):
    from darkroom.testing.tiny import save_diffusers_folder

    path = tiny_model("sd1")["path"]
    header = memory.read_arch(path)
    folder = memory.read_arch(save_diffusers_folder(tmp_path / "folder", "sd1", seed=1))
    loaded = memory.arch_of_loaded(engine.cache.get(path))
    for arch in (folder, loaded):
        assert (arch.unet_params, arch.vae_params, arch.unet_channels, arch.unet_attention, arch.vae_channels) == (
            header.unet_params, header.vae_params, header.unet_channels, header.unet_attention, header.vae_channels)
    fp32 = 4 * (header.unet_params + header.vae_params + loaded.other_params)  # the engine runs in fp32
    assert 0 <= loaded.resident - fp32 < 1024  # plus small buffers (CLIP's int64 position ids)


@pytest.mark.parametrize("dtype, device", [(BF16, "cpu"), (FP32, "cpu"), (FP16, "cuda")])
def test_what_must_be_admitted_is(dtype, device):
    """512x512 SD1.5 and 1024x1024 SDXL fit 16 GB; a 2048x2048 hires-fix result of SD1.5 fits 24 GB."""
    vae = FP32 if device == "cuda" else dtype  # SDXL's VAE runs in fp32 under fp16
    assert est(memory.SD15, dtype, dtype, device).peak < 16 * GB
    assert est(memory.SDXL, dtype, vae, device, width=1024, height=1024).peak < 16 * GB
    hires = est(memory.SD15, dtype, dtype, device, width=1024, height=1024, enable_hr=True, hr_scale=2.0)
    assert hires.peak < 24 * GB


def test_tiling_rescues_the_vae_not_the_unet():
    tiled, untiled = est(memory.SD15, width=2048, height=2048), est(memory.SD15, width=2048, height=2048, tiled=False)
    assert tiled.vae < untiled.vae == tiled.vae_untiled and tiled.unet == untiled.unet
    # on a GPU the VAE's attention matrix grows with the square of the area: 4096x4096 untiled is the blow-up
    gpu = est(memory.SD15, FP16, FP16, "cuda", width=4096, height=4096, tiled=False)
    assert gpu.vae > 100 * GB > 10 * GB > est(memory.SD15, FP16, FP16, "cuda", width=4096, height=4096).vae


def test_available_memory_adds_what_the_engine_gives_back():
    free = memory.available_memory("cpu")
    assert free is not None and free > 0
    assert memory.available_memory("cpu", reclaimable=5 * GB) >= free + 4 * GB  # MemAvailable moves a little


# --- admit: the one-line messages ----------------------------------------------------------------------------


def sd15_cpu(r: GenerationRequest) -> memory.Estimate:
    return memory.estimate(memory.SD15, r, dtype=BF16, vae_dtype=BF16, device="cpu")


def test_the_issue_request_is_refused_naming_what_fits():
    req = GenerationRequest(**BIG)
    with pytest.raises(InvalidRequest) as e:
        admit(req, sd15_cpu, int(18.2 * GB), Limits(max_batch_size=64))
    msg = str(e.value)
    assert msg.startswith("4096x4096 x 64 images needs about ") and "this machine has 18.2 GB free" in msg
    assert "\n" not in msg and "at most batch size " in msg
    # what it proposes is admitted
    proposed = msg.split(": ", 1)[1]
    assert "at 512x512" in proposed and "1 image at " in proposed
    w, h = proposed.rsplit("1 image at ", 1)[1].split("x")
    admit(GenerationRequest(width=int(w), height=int(h)), sd15_cpu, int(18.2 * GB), Limits())
    with pytest.raises(InvalidRequest):
        admit(GenerationRequest(width=int(w) + 64, height=int(h) + 64), sd15_cpu, int(18.2 * GB), Limits())


def test_smaller_batch_at_the_same_size_is_proposed_first():
    req = GenerationRequest(width=512, height=512, batch_size=16)
    budget = sd15_cpu(req.model_copy(update={"batch_size": 3})).peak + 1000
    with pytest.raises(InvalidRequest, match=r"512x512 x 16 images needs about .*: at most batch size 3 at 512x512$"):
        admit(req, sd15_cpu, budget, Limits())
    assert admit(req.model_copy(update={"batch_size": 3}), sd15_cpu, budget, Limits()).peak <= budget


@pytest.mark.parametrize("fields, setting", [
    ({"width": 2048, "height": 512}, "max_side"),
    ({"enable_hr": True, "hr_scale": 4.0}, "max_side"),
    ({"batch_size": 9}, "max_batch_size"),
    ({"n_iter": 11}, "max_batch_count"),
    ({"steps": 31}, "max_steps"),
    ({"enable_hr": True, "hr_second_pass_steps": 40}, "max_steps"),
])
def test_limits_name_the_setting(fields, setting):
    limits = Limits(max_side=1024, max_batch_size=8, max_batch_count=10, max_steps=30)
    req = GenerationRequest(**{"width": 512, "height": 512, **fields})
    with pytest.raises(InvalidRequest, match=f"over the limit {setting} = ") as e:
        admit(req, sd15_cpu, None, limits)
    assert f"darkroom_{setting}" in str(e.value) and "\n" not in str(e.value)
    admit(req, sd15_cpu, None, Limits.from_values({**limits.as_dict(), setting: 4096}))


def test_unknown_free_memory_checks_the_limits_only():
    admit(GenerationRequest(width=4096, height=4096, batch_size=16), sd15_cpu, None, Limits())


# --- settings --------------------------------------------------------------------------------------------------


def test_limit_settings_are_validated_and_persisted(tmp_path):
    settings = Settings(tmp_path / "settings.json")
    assert Limits.from_settings(settings) == Limits(max_side=4096, max_batch_size=16, max_batch_count=100,
                                                    max_steps=500)
    seen = []
    settings.listeners.append(seen.append)
    settings.update(max_side=1024, max_steps=50)
    assert Limits.from_settings(Settings(tmp_path / "settings.json")).max_side == 1024 and seen[-1]["max_steps"] == 50
    for bad in ({"max_side": 1001}, {"max_side": 8192}, {"max_batch_size": 0}, {"max_steps": True},
                {"max_batch_count": "10"}):
        with pytest.raises(InvalidRequest, match=f"{next(iter(bad))} should be"):
            settings.update(**bad)
    assert settings.get("max_side") == 1024


# --- every interface ------------------------------------------------------------------------------------------


def png_b64(size=(64, 64)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def refused_at_once(r: httpx.Response, status: int = 422) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("error") or body["detail"]
    assert "4096x4096" in message and "8.0 GB free" in message and "at most batch size" in message, message
    return message


def test_every_http_route_refuses_at_once(studio, free_8gb):
    with live_server(studio) as url, httpx.Client(base_url=url, timeout=60) as c:
        t0 = time.monotonic()
        msg = refused_at_once(c.post("/api/jobs", json={"prompt": "x", **BIG}))
        assert "batch size 64 is over the limit max_batch_size = 16" in msg
        studio.settings.update(max_batch_size=64)  # then memory is what refuses it
        msg = refused_at_once(c.post("/api/jobs", json={"prompt": "x", **BIG}))
        assert "4096x4096 x 64 images needs about" in msg
        refused_at_once(c.post("/sdapi/v1/txt2img", json={"prompt": "x", **BIG}))
        refused_at_once(c.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [png_b64()], **BIG}))
        refused_at_once(c.post("/v1/images/generations", json={"prompt": "x", "size": "4096x4096", "n": 10,
                                                               "response_format": "b64_json"}), 400)
        image = base64.b64decode(png_b64())
        refused_at_once(c.post("/v1/images/edits", data={"prompt": "x", "size": "4096x4096", "n": "10"},
                               files={"image": ("in.png", image, "image/png")}), 400)
        assert time.monotonic() - t0 < 60 and studio.queue.jobs() == []  # nothing queued, nothing generated


def test_img2img_takes_its_size_from_the_init_image(studio, monkeypatch):
    engine = studio.engine
    seen = []
    monkeypatch.setattr(memory, "available_memory", lambda device, reclaimable=0: 8 * GB)
    original = memory.estimate
    monkeypatch.setattr(memory, "estimate", lambda arch, r, **kw: seen.append((r.width, r.height)) or original(
        arch, r, **kw))
    settled = engine.admit(GenerationRequest(init_image=base64.b64decode(png_b64((100, 60)))))
    assert (settled.width, settled.height) == (96, 56) == seen[0]
    assert engine.cache.current is None  # nothing was loaded to find out
    assert engine.admit(GenerationRequest()).width == 512  # the tiny model's family native size, from its header


def test_settings_routes_change_the_limits(studio):
    with live_server(studio) as url, httpx.Client(base_url=url, timeout=60) as c:
        options = c.get("/sdapi/v1/options").json()
        assert options["darkroom_max_side"] == 4096 and options["darkroom_max_steps"] == 500
        assert c.get("/api/status").json()["limits"]["max_batch_size"] == 16
        assert c.post("/sdapi/v1/options", json={"darkroom_max_steps": 10}).status_code == 200
        assert c.get("/api/status").json()["limits"]["max_steps"] == 10 and studio.engine.limits.max_steps == 10
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 11, "width": 64, "height": 64})
        assert r.status_code == 422 and "steps 11 is over the limit max_steps = 10" in r.json()["error"]
        r = c.post("/sdapi/v1/options", json={"darkroom_max_steps": 0})
        assert r.status_code == 422 and "max_steps should be a whole number" in r.json()["error"]
        r = c.post("/api/jobs", json={"prompt": "x", "steps": 3, "width": 64, "height": 64,
                                      "xy": {"x": "steps=2,12"}})
        assert r.status_code == 422 and "X/Y plot cell" in r.json()["error"] and "max_steps" in r.json()["error"]


def test_cli_refuses_in_one_line(home, tiny_model, monkeypatch):
    import shutil

    from darkroom.cli import cli

    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    monkeypatch.setattr(memory, "available_memory", lambda device, reclaimable=0: 8 * GB)
    Settings(home.root / "settings.json").update(max_batch_size=64)
    args = ["--home", str(home.root), "generate", "x", "-W", "4096", "-H", "4096", "-b", "64", "--device", "cpu"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "4096x4096 x 64 images needs about" in lines[0] and "at most batch size" in lines[0]
    Settings(home.root / "settings.json").update(max_steps=5)  # the CLI reads the home's settings
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "-W", "64", "-H", "64", "-s", "6"])
    assert r.exit_code == 2 and "steps 6 is over the limit max_steps = 5" in r.output
    # an X/Y plot whose last cell is over a limit: refused before the first cell runs
    r = CliRunner().invoke(cli, ["--home", str(home.root), "generate", "x", "-W", "64", "-H", "64", "-s", "2",
                                 "--x", "steps=1,2,9", "--device", "cpu"])
    assert r.exit_code == 2 and "X/Y plot cell (Steps: 9)" in r.output and "max_steps = 5" in r.output, r.output
    assert list(home.outputs.rglob("*.png")) == []


def test_admit_runs_without_loading_the_model(engine, session_home, tiny_model, free_8gb):
    import shutil

    path = session_home.checkpoints / "tiny-admit.safetensors"
    shutil.copy(tiny_model("sd1")["path"], path)
    with pytest.raises(InvalidRequest, match="needs about"):
        engine.admit(GenerationRequest(model=str(path), **BIG).model_copy(update={"batch_size": 16}))
    assert engine.cache.current is None or engine.cache.current.path != path
    with pytest.raises(InvalidRequest, match="over the limit max_batch_size"):
        engine.generate(GenerationRequest(model=str(path), width=64, height=64, batch_size=17, steps=1))
    admission.admit_engine(engine, GenerationRequest(model=str(path), width=64, height=64, steps=1))


def test_web_ui_inputs_follow_the_limits(studio):
    """The generate form's maxima come from the settings (GET /api/status), in a real browser."""
    from pathlib import Path

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    studio.settings.update(max_side=1536, max_batch_size=4, max_batch_count=9, max_steps=60)
    with live_server(studio) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            sync_api.expect(page.locator("#batch-size")).to_have_attribute("max", "4", timeout=60_000)
            ids = ["width", "height", "hr-resize-x", "batch-size", "batch-count", "steps", "hr-steps"]
            maxima = page.evaluate("(ids) => ids.map((id) => document.getElementById(id).max)", ids)
        finally:
            browser.close()
    assert maxima == ["1536", "1536", "1536", "4", "9", "60", "60"]


def test_a_reference_unit_counts_its_attention_bank(studio, monkeypatch):
    """A reference unit keeps every self-attention input of its extra UNet pass while the real pass runs: that
    bank is counted (per unit), so a request that fits without one can be refused with one."""
    from darkroom.control_unit import ControlUnit

    r = GenerationRequest(width=512, height=512, cfg_scale=7)
    # SD1.5 at 512: 5 blocks (2 down, 3 up) at 64 x 64 x 320, 32 x 32 x 640, 16 x 16 x 1280, the middle's one at
    # 8 x 8 x 1280; two CFG rows of bf16, with the estimator's 25 % margin
    values = 5 * 4096 * 320 + 5 * 1024 * 640 + 5 * 256 * 1280 + 64 * 1280
    assert memory.attention_bank_bytes(memory.SD15, r, dtype=BF16) == int(values * 2 * 2 * memory.MARGIN)
    assert memory.attention_bank_bytes(memory.SD15, r.model_copy(update={"enable_hr": True, "hr_scale": 2.0}),
                                       dtype=BF16) == 4 * memory.attention_bank_bytes(memory.SD15, r, dtype=BF16)
    monkeypatch.setattr(memory, "available_memory", lambda device, reclaimable=0: 8 * GB)
    monkeypatch.setattr(memory, "attention_bank_bytes", lambda arch, req, dtype: 6 * GB)
    reference = ControlUnit(module="reference_only", model="None", image=base64.b64decode(png_b64()))
    studio.engine.admit(GenerationRequest(prompt="x", width=64, height=64))  # fits
    with pytest.raises(InvalidRequest, match="memory|GB"):
        studio.engine.admit(GenerationRequest(prompt="x", width=64, height=64, controlnet=[reference, reference]))
