"""Where the face restoration files are, and building their networks.

Files are looked up by the names the webui downloads them as, in the Darkroom home's `models/faces`
and, used in place, in each A1111/Forge install's `models/GFPGAN` (GFPGANv1.4.pth, and the face
detector `detection_Resnet50_Final.pth` that the webui has facexlib save there) and
`models/Codeformer` (codeformer-v0.1.0.pth), and ComfyUI's `models/facerestore_models` and
`models/facedetection`. Pickles are read with `torch.load(weights_only=True)` only
(darkroom.upscale.load.read_state_dict).

GFPGAN is spandrel's GFPGANv1Clean, built with the sizes read from the file (spandrel's own loader
fixes them at the 512 px release's, which would leave the tests no small model); CodeFormer is the
`spandrel_extra_arches` package's (installed `--no-deps` like spandrel: requirements-nodeps.txt).
RestoreFormer is not offered: spandrel's RestoreFormer needs torchvision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from darkroom.errors import ModelLoadError
from darkroom.home import Home, is_folder
from darkroom.models.library import has_suffix, walk_models
from darkroom.upscale.load import read_state_dict
from darkroom.upscale.spandrel_import import import_spandrel

GFPGAN, CODEFORMER = "GFPGAN", "CodeFormer"
MODELS = (CODEFORMER, GFPGAN)  # the webui's face_restoration_model choices, in its order
DETECTOR_FILE = "detection_Resnet50_Final.pth"
WEBUI_FILES = {GFPGAN: "GFPGANv1.4.pth", CODEFORMER: "codeformer-v0.1.0.pth"}
"""The file the webui downloads for each model: the one asked for when none is found."""
WEBUI_DIRS = {GFPGAN: "models/GFPGAN", CODEFORMER: "models/Codeformer"}
INSTALL_DIRS = ("models/GFPGAN", "models/Codeformer", "models/facerestore_models", "models/facedetection")
SUFFIXES = (".pth", ".safetensors")
_PREFERRED = {GFPGAN: ("gfpganv1.4", "gfpganv1.3"), CODEFORMER: ("codeformer-v0.1.0", "codeformer")}


def face_dirs(home: Home) -> list[Path]:
    """The home's models/faces, then each extra models folder's webui and ComfyUI face folders."""
    dirs = [home.faces]
    for extra in home.extra_model_dirs:
        dirs += [extra / sub for sub in INSTALL_DIRS if is_folder(extra / sub)]
    return list(dict.fromkeys(dirs))


def _files(home: Home) -> list[Path]:
    found = []
    for folder in face_dirs(home):
        if is_folder(folder):
            found += walk_models(folder, has_suffix(SUFFIXES))
    return found


def find_model(home: Home, name: str) -> Path | None:
    """The file of GFPGAN or CodeFormer: the webui's release names first, then any file named after the model
    (GFPGANv1.3.pth, codeformer.pth, ...), the first folder first."""
    key = name.lower()
    files = [p for p in _files(home) if key in p.name.lower() and "restoreformer" not in p.name.lower()]
    for stem in _PREFERRED[name]:
        for p in files:
            if p.stem.lower() == stem:
                return p
    return files[0] if files else None


def find_detector(home: Home) -> Path | None:
    return next((p for p in _files(home) if p.name.lower() == DETECTOR_FILE.lower()), None)


def read_weights(path: Path) -> dict[str, Any]:
    """The tensors of a face model file, unwrapped from the training checkpoint's `params_ema`/`params`."""
    state = read_state_dict(path)
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(state.get(key), dict):
            return state[key]
    return state


@dataclass
class FaceNet:
    """A restoration network: `run(x, weight)` maps RGB faces in [-1, 1] [n, 3, size, size] to the same."""

    name: str
    path: Path
    size: int
    model: torch.nn.Module

    def run(self, x: torch.Tensor, weight: float) -> torch.Tensor:
        if self.name == CODEFORMER:
            out = self.model(x, weight=weight, adain=True)[0]
        else:  # fixed noise (the file's buffers): the same face gives the same result, as a seed promises
            out = self.model(x, return_rgb=False, randomize_noise=False)[0]
        return out.clamp(-1, 1)


def _count(state: dict[str, Any], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)})


def gfpgan_config(state: dict[str, Any]) -> dict[str, Any]:
    """GFPGANv1Clean's constructor arguments, read from the shapes of its weights."""
    out_size = 2 ** (_count(state, "toRGB.") + 2)
    narrow = state["stylegan_decoder.constant_input.weight"].shape[1] / 512
    multiplier = 2
    if out_size >= 64:  # the first width that depends on the multiplier: the unet's at 64 px (half of 256 * m * n)
        multiplier = round(state["condition_scale.3.0.weight"].shape[0] / (128 * narrow))
    style = state["stylegan_decoder.style_mlp.1.weight"].shape[0]
    log_size = int(math.log2(out_size))
    return dict(out_size=out_size, num_style_feat=style, channel_multiplier=multiplier, decoder_load_path=None,
                fix_decoder=False, num_mlp=_count(state, "stylegan_decoder.style_mlp."), input_is_latent=True,
                different_w=state["final_linear.weight"].shape[0] == (log_size * 2 - 2) * style, narrow=narrow,
                sft_half=state["condition_scale.0.2.weight"].shape[0] == state["condition_scale.0.0.weight"].shape[0])


def build_gfpgan(path: Path, state: dict[str, Any]) -> FaceNet:
    if not {"toRGB.0.weight", "stylegan_decoder.style_mlp.1.weight"} <= state.keys():
        raise ModelLoadError(f"{path.name}: not a GFPGAN model (v1.3/v1.4 'clean' layout expected)")
    import_spandrel()
    from spandrel.architectures.GFPGAN import GFPGAN as GFPGANv1Clean

    try:
        config = gfpgan_config(state)
        model = GFPGANv1Clean(**config)
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"{path.name}: cannot be built as GFPGAN ({first})") from None
    return FaceNet(GFPGAN, path, config["out_size"], model)


def build_codeformer(path: Path, state: dict[str, Any]) -> FaceNet:
    spandrel = import_spandrel()
    try:
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormerArch
    except ImportError as e:
        raise ModelLoadError(f"CodeFormer needs the spandrel_extra_arches package ({e}); run scripts/setup, which"
                             " installs requirements-nodeps.txt") from None
    arch = CodeFormerArch()
    if not arch.detect(state):
        raise ModelLoadError(f"{path.name}: not a CodeFormer model")
    try:
        descriptor = arch.load(state)
    except (KeyError, RuntimeError, ValueError, IndexError, spandrel.UnsupportedModelError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"{path.name}: cannot be built as CodeFormer ({first})") from None
    return FaceNet(CODEFORMER, path, 512, descriptor.model)


def load_net(name: str, path: Path, device: torch.device) -> FaceNet:
    """GFPGAN or CodeFormer from `path`, in eval mode, fp32 on `device` (faces are small; fp16 is not supported
    by either architecture)."""
    state = read_weights(path)
    net = build_codeformer(path, state) if name == CODEFORMER else build_gfpgan(path, state)
    net.model = net.model.eval().requires_grad_(False).to(device=device, dtype=torch.float32)
    return net
