"""darkroom.upscale: finding upscaler files, loading them safely with spandrel, tiled runs, the webui's rules."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.errors import Interrupted, InvalidRequest, ModelLoadError, ModelNotFound
from darkroom.home import Home
from darkroom.testing import tiny_upscalers
from darkroom.upscale import Extras, Resize, UpscalerLibrary, detect_architecture, tiled
from darkroom.upscale.load import build, read_state_dict
from darkroom.upscale.resize import upscale_by


def picture(w: int = 40, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth, like a photo


class Payload:
    """Stands for what a malicious pickle carries: an object that is not a tensor or plain data."""


@pytest.fixture
def library(home: Home) -> UpscalerLibrary:
    tiny_upscalers.save("esrgan", home.upscalers / "4x-Tiny.safetensors")
    tiny_upscalers.save("compact", home.upscalers / "realesr-general-x4v3.safetensors")
    tiny_upscalers.save("swinir", home.upscalers / "2x-TinySwin.safetensors")
    return UpscalerLibrary(home)


@pytest.mark.parametrize(("kind", "arch", "scale"), [("esrgan", "ESRGAN", 4), ("compact", "RealESRGAN Compact", 4),
                                                     ("swinir", "SwinIR", 2)])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_spandrel_detects_the_tiny_networks(tmp_path, kind, arch, scale, suffix):
    path = tiny_upscalers.save(kind, tmp_path / f"{kind}{suffix}")
    assert detect_architecture(path, ) == (arch, scale)
    up = build(path, read_state_dict(path), name=kind, device=torch.device("cpu"),
               dtype=torch.float32)
    x = torch.rand(1, 3, 16, 16)
    assert torch.allclose(up.model(x), tiny_upscalers.build(kind)(x), atol=1e-5)  # same network, same weights


def test_spandrel_imports_without_leaving_torchvision_behind():
    from darkroom.upscale.spandrel_import import import_spandrel

    assert import_spandrel().ModelLoader is not None  # a plain `import spandrel` fails here: no torchvision

    assert not any(name == "torchvision" or name.startswith("torchvision.") for name in sys.modules)
    assert importlib.util.find_spec("torchvision") is None
    from diffusers.utils import import_utils as diffusers_utils
    from transformers.utils import import_utils as transformers_utils

    assert not diffusers_utils.is_torchvision_available() and not transformers_utils.is_torchvision_available()


def test_discovery_in_home_a1111_and_comfyui_layouts(tmp_path, home):
    a1111, comfy = tmp_path / "webui", tmp_path / "ComfyUI"
    tiny_upscalers.save("esrgan", a1111 / "models/RealESRGAN/RealESRGAN_x4plus.pth")
    tiny_upscalers.save("compact", a1111 / "models/ESRGAN/sub/4x-UltraSharp.pth")
    tiny_upscalers.save("swinir", a1111 / "models/SwinIR/SwinIR_4x.pth")
    tiny_upscalers.save("esrgan", comfy / "models/upscale_models/4x_NMKD-Siax.safetensors")
    tiny_upscalers.save("esrgan", home.upscalers / "2x-Home.safetensors")
    (a1111 / "models/ESRGAN/notes.txt").write_text("not a model")
    os.mkfifo(a1111 / "models/ESRGAN/pipe.pth")  # a special file is skipped, never opened
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (a1111 / "models/ESRGAN/linked").symlink_to(outside, target_is_directory=True)
    tiny_upscalers.save("esrgan", outside / "4x-Outside.pth")  # behind a symlinked folder: not searched
    home.extra_model_dirs = [a1111, comfy]
    files = {f.name: f for f in UpscalerLibrary(home).files()}
    assert set(files) == {"2x-Home", "R-ESRGAN 4x+", "4x-UltraSharp", "SwinIR 4x", "4x_NMKD-Siax"}
    assert files["R-ESRGAN 4x+"].realesrgan and not files["4x-UltraSharp"].realesrgan
    assert (files["2x-Home"].scale, files["R-ESRGAN 4x+"].scale, files["4x_NMKD-Siax"].scale) == (2, 4, 4)
    assert files["4x_NMKD-Siax"].folder == "upscale_models"
    lib = UpscalerLibrary(home)
    assert lib.canonical("r-esrgan 4x+") == "R-ESRGAN 4x+" and lib.canonical("RealESRGAN_x4plus") == "R-ESRGAN 4x+"
    assert lib.canonical("4x-ultrasharp.pth") == "4x-UltraSharp" and lib.canonical("lanczos") == "Lanczos"
    with pytest.raises(InvalidRequest, match=r"no upscaler named 'R-ESRGAN 2x\+'; available: None, Lanczos, Nearest"):
        lib.canonical("R-ESRGAN 2x+")


def test_pickles_are_read_weights_only(tmp_path, home):
    """.pth upscalers load with no opt-in (torch's weights-only unpickler); one holding more is refused."""
    path = tiny_upscalers.save("esrgan", home.upscalers / "4x-Pickle.pth")
    assert UpscalerLibrary(home).load("4x-Pickle").architecture == "ESRGAN"
    evil = tmp_path / "evil.pth"
    torch.save({"params_ema": tiny_upscalers.state_of("esrgan"), "why": Payload()}, evil)
    with pytest.raises(ModelLoadError, match="refused: this pickle holds more than tensors"):
        read_state_dict(evil)
    assert path.exists()


def test_missing_unknown_and_damaged_files(tmp_path, home):
    with pytest.raises(ModelNotFound, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    home.upscalers.mkdir(parents=True)
    save_file({"weight": torch.zeros(3, 3)}, str(home.upscalers / "4x-Odd.safetensors"))
    (home.upscalers / "4x-Broken.safetensors").write_bytes(b"not safetensors at all")
    lib = UpscalerLibrary(home)
    with pytest.raises(ModelLoadError, match="4x-Odd.safetensors: unknown upscaler architecture"):
        lib.load("4x-Odd")
    with pytest.raises(ModelLoadError, match="4x-Broken.safetensors: not a readable safetensors file"):
        lib.load("4x-Broken")


@pytest.mark.parametrize("kind", ["esrgan", "compact"])
def test_tiled_equals_untiled(kind):
    net = tiny_upscalers.build(kind)
    image = picture(72, 56)
    whole = tiled.run_tiled(net, image, 4, tile=1024, device=torch.device("cpu"), dtype=torch.float32)
    seen = []
    tiles = tiled.run_tiled(net, image, 4, tile=32, overlap=16, device=torch.device("cpu"), dtype=torch.float32,
                            progress=lambda done, total: seen.append((done, total)))
    assert whole.size == tiles.size == (288, 224)
    assert seen == [(n, 12) for n in range(1, 13)]  # 4 x 3 tiles (starts 0, 16, 32, 40 and 0, 16, 24)
    diff = np.abs(np.asarray(whole, dtype=np.int16) - np.asarray(tiles, dtype=np.int16))
    # stated tolerance: 2 levels of 255 at most anywhere, 0.2 on average (the networks' reach is within the margin)
    assert diff.max() <= 2 and diff.mean() < 0.2, (diff.max(), diff.mean())


def test_tiles_answer_cancel():
    cancel = threading.Event()
    calls = []

    def net(x):
        calls.append(x.shape)
        cancel.set()
        return torch.nn.functional.interpolate(x, scale_factor=2)

    with pytest.raises(Interrupted):
        tiled.run_tiled(net, picture(96, 96), 2, tile=32, device=torch.device("cpu"), dtype=torch.float32,
                        cancel=cancel)
    assert len(calls) == 1


def test_tile_size_follows_the_budget():
    assert tiled.tile_size(4, 64 * 2**20) < tiled.tile_size(4, 1 * 2**30) <= tiled.MAX_TILE
    assert tiled.tile_size(4, 2**30, "HAT") < tiled.tile_size(4, 2**30, "ESRGAN")
    assert tiled.tile_size(4, 1) == tiled.MIN_TILE


def test_lanczos_and_nearest_equal_pils_resize(library):
    image = picture(40, 24)
    assert np.array_equal(np.asarray(library.upscale(image, 2, "Lanczos")),
                          np.asarray(image.resize((80, 48), Image.LANCZOS)))
    assert np.array_equal(np.asarray(library.upscale(image, 3, "nearest")),
                          np.asarray(image.resize((120, 72), Image.NEAREST)))
    # the webui aims at multiples of 8: 40x24 by 1.5 is 60x36 first, then Lanczos to 56x32
    assert np.array_equal(np.asarray(library.upscale(image, 1.5, "Lanczos")),
                          np.asarray(image.resize((60, 36), Image.LANCZOS).resize((56, 32), Image.LANCZOS)))
    assert library.upscale(image, 2, "None").size == (40, 24)


def test_a_4x_model_asked_for_2x_runs_once_then_downsizes(library):
    image = picture(40, 24)
    model = library.load("4x-Tiny")
    once = library.model_pass(model)(image)
    assert once.size == (160, 96)
    got = library.upscale(image, 2, "4x-Tiny")
    assert np.array_equal(np.asarray(got), np.asarray(once.resize((80, 48), Image.LANCZOS)))
    # a 2x model asked for 4x runs twice
    assert library.upscale(image, 4, "2x-TinySwin").size == (160, 96)


def test_extras_scale_to_crop_and_second_upscaler(library):
    image = picture(40, 24)
    out, info = library.postprocess(image, Extras(Resize(mode=1, width=96, height=96, crop=True), "Lanczos"))
    assert out.size == (96, 96)  # by max(96/40, 96/24) = 4 -> 160x96, centered on 96x96
    expected = Image.new("RGB", (96, 96))
    expected.paste(image.resize((160, 96), Image.LANCZOS), (48 - 80, 0))
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    assert info == {"Postprocess upscale to": "96x96", "Postprocess crop to": "96x96",
                    "Postprocess upscaler": "Lanczos"}
    uncropped, _ = library.postprocess(image, Extras(Resize(mode=1, width=96, height=96, crop=False), "Lanczos"))
    assert uncropped.size == (160, 96)
    blend, info = library.postprocess(image, Extras(Resize(scale=2), "Lanczos", "Nearest", 0.25))
    lanczos, nearest = upscale_by(image, 2, resizer="Lanczos"), upscale_by(image, 2, resizer="Nearest")
    assert np.array_equal(np.asarray(blend), np.asarray(Image.blend(lanczos, nearest, 0.25)))
    assert info["Postprocess upscaler 2"] == "Nearest" and info["Postprocess upscale by"] == 2
    same, info = library.postprocess(image, Extras(Resize(scale=2), "None", "Lanczos", 1.0))
    assert same.size == image.size and info == {}
    with pytest.raises(InvalidRequest, match="visibility"):
        library.postprocess(image, Extras(Resize(scale=2), "Lanczos", "Nearest", 1.5))
