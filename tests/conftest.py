"""Shared fixtures: tiny models in the real file layouts, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import darkroom  # noqa: F401  (offline first)
from darkroom.home import Home

# Tiny test models gain nothing from a second thread, and OpenMP's spinning threads make them
# many times slower when the machine is busy (server tests run several threads at once).
torch.set_num_threads(1)


def pytest_configure(config):
    """Playwright's expect() waits 5 s by default: a loaded CI machine can miss that. Browser tests wait for a
    state; the deadline only guards against a hang, so it is minutes (as tests/test_ui_browser.TIMEOUT)."""
    try:
        from playwright.sync_api import expect
    except ImportError:  # a run without the dev dependencies
        return
    expect.set_options(timeout=120_000)


# id -> (family, build options)
VARIANTS = {
    "sd1": ("sd1", {}),
    "sd1-old-te-ema": ("sd1", {"old_te_keys": True, "ema": True}),
    "sd1-inpainting": ("sd1", {"inpainting": True}),
    "sd1-fp16": ("sd1", {"dtype": torch.float16}),
    "sd1-bf16": ("sd1", {"dtype": torch.bfloat16}),
    "sd2": ("sd2", {}),
    "sd2-v": ("sd2", {"v_prediction": True}),
    "sdxl": ("sdxl", {}),
    "sdxl-fp16": ("sdxl", {"dtype": torch.float16}),
    "sdxl-refiner": ("sdxl-refiner", {}),
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir):
    """tiny_model("sd1") -> build info dict (path, configs, state_dicts); cached per session."""
    from darkroom.testing.tiny import build_tiny_checkpoint

    built: dict[str, dict] = {}

    def get(variant: str) -> dict:
        if variant not in built:
            family, opts = VARIANTS[variant]
            built[variant] = build_tiny_checkpoint(model_dir / f"tiny-{variant}.safetensors", family, seed=1, **opts)
        return built[variant]

    return get


@pytest.fixture(scope="session")
def engine_factory():
    """A CPU fp32 engine over a given home (fp32 so comparisons with diffusers are tight)."""
    from darkroom.api import build_engine

    def make(home: Home, precision: str = "fp32"):
        return build_engine(home.ensure(), device="cpu", precision=precision)

    return make


@pytest.fixture
def home(tmp_path) -> Home:
    return Home(tmp_path / "home").ensure()


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Home:
    return Home(tmp_path_factory.mktemp("home")).ensure()


@pytest.fixture(scope="session")
def engine(engine_factory, session_home):
    return engine_factory(session_home)


@pytest.fixture
def studio(tmp_path, tiny_model):
    """A running Studio (job worker started) over a fresh home holding the tiny SD1 model."""
    from tests.server_util import studio_with

    s = studio_with(Home(tmp_path / "studio-home"), tiny_model("sd1")["path"])
    yield s
    s.close()


@pytest.fixture
def api(studio):
    """In-process HTTP client for the studio's app (Host 127.0.0.1:7860)."""
    from tests.server_util import client

    with client(studio) as c:
        yield c
