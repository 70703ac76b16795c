"""Where annotator weight files are, and reading them: local files only, never a download.

Each install keeps them in its own place, under the names the extension downloads them as:
the sd-webui-controlnet extension in `annotator/downloads/<kind>/` (hed/ControlNetHED.pth,
lineart/sk_model.pth), Forge in `models/ControlNetPreprocessor` (flat or in the same kind folders),
and ComfyUI's controlnet_aux in `ckpts/lllyasviel/Annotators/` (the Hugging Face repository path).
Darkroom's own `models/annotators` accepts any of these shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from darkroom.errors import ModelLoadError
from darkroom.fsutil import open_regular

INSTALL_DIRS = (
    "extensions/sd-webui-controlnet/annotator/downloads",  # A1111 with the extension
    "models/ControlNetPreprocessor",                       # Forge
    "custom_nodes/comfyui_controlnet_aux/ckpts",           # ComfyUI with controlnet_aux
)
_HUB_PATH = ("lllyasviel", "Annotators")

# Files that other installs keep under other names, tried in this order after the extension's own:
# Depth Anything V2 is a .safetensors in the extension and Forge, the authors' .pth in ComfyUI; the
# smaller encoders (ViT-B, ViT-S) serve where the large one is not there.
ALSO_AS: dict[str, tuple[str, ...]] = {
    "depth_anything_v2_vitl.safetensors": (
        "depth_anything_v2_vitl.pth", "depth_anything_v2_vitb.safetensors", "depth_anything_v2_vitb.pth",
        "depth_anything_v2_vits.safetensors", "depth_anything_v2_vits.pth"),
}
# The CLIP vision towers IP-Adapters, the T2I-Adapter style model and ReVision take: the extension's names, then
# ComfyUI's and Forge's (models/clip_vision).
ALSO_AS |= {
    "clip_h.pth": ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision_h.safetensors",
                   "CLIP-ViT-H-14.safetensors"),
    "clip_g.pth": ("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "clip_vision_g.safetensors",
                   "CLIP-ViT-bigG-14.safetensors"),
    "clip_vitl.pth": ("clip_vision_l.safetensors", "CLIP-ViT-L-14.safetensors", "clip-vit-large-patch14.safetensors"),
}
# Hub repositories ComfyUI's controlnet_aux downloads a file from, when not lllyasviel/Annotators.
_HUB_PATHS: dict[str, tuple[str, ...]] = {
    **{f"depth_anything_v2_{size}.pth": ("depth-anything", f"Depth-Anything-V2-{name}")
       for size, name in (("vitl", "Large"), ("vitb", "Base"), ("vits", "Small"))},
    "7_model.pth": ("bdsqlsz", "qinglong_controlnet-lllite", "Annotators"),  # TEED
    "MTEED.pth": ("TheMistoAI", "MistoLine", "Anyline"),  # Anyline
    "UNet.pth": ("bdsqlsz", "qinglong_controlnet-lllite", "Annotators"),  # anime face segmentation
    "dsine.pt": ("bdsqlsz", "qinglong_controlnet-lllite", "Annotators"),
    "densepose_r50_fpn_dl.torchscript": ("LayerNorm", "DensePose-TorchScript-with-hint-image"),
    "yolox_l.onnx": ("yzd-v", "DWPose"), "dw-ll_ucoco_384.onnx": ("yzd-v", "DWPose"),
    "rtmpose-m_simcc-ap10k_pt-aic-coco_210e-256x256-7a041aa1_20230206.onnx": (
        "bdsqlsz", "qinglong_controlnet-lllite", "Annotators"),
}


def candidates(folder: Path, file: str, kind: str) -> list[Path]:
    """The places one folder may hold `file`: directly, in its kind folder, or in the hub repository path."""
    return [folder / file, folder / kind / file, folder.joinpath(*_HUB_PATHS.get(file, _HUB_PATH), file)]


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def find(file: str, kind: str, dirs) -> Path | None:
    """The first `file` in `dirs` (in their order), then the first of its other names (ALSO_AS), or None."""
    for name in (file, *ALSO_AS.get(file, ())):
        for folder in dirs:
            for path in candidates(Path(folder), name, kind):
                if _is_file(path):
                    return path
    return None


def read_state_dict(path: Path, nested: str | None = None) -> dict[str, Any]:
    """The tensors of an annotator .pth, read with weights_only=True (a pickle with code is refused), or of
    a .safetensors file; `nested`: the key a training checkpoint keeps them under ({"model": ...}), when
    present. DataParallel's `module.` prefixes are dropped."""
    import torch

    if path.suffix.lower() == ".safetensors":
        from darkroom.models.tensor_file import read_tensors

        return {k.removeprefix("module."): v for k, v in read_tensors(path).items()}
    try:
        with open_regular(path, what="an annotator weight file") as fh:
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{path.name}: not a loadable weight file, or one holding more than tensors"
                             f" ({type(e).__name__}: {first[:200]})") from None
    for key in ("state_dict", nested):
        if key and isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path.name}: holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(net, state: dict[str, Any], path: Path, what: str, assign: bool = False):
    """`net` with `state` loaded key for key (`assign`: the tensors themselves, for a net built on the meta
    device); a file of another network is a clear ModelLoadError."""
    try:
        net.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError:
        raise ModelLoadError(f"{path.name}: not a {what} weight file ({state_mismatch(net, state)})") from None
    return net.eval().requires_grad_(False)


def state_mismatch(net, state: dict[str, Any]) -> str:
    """How a state dict differs from a network's, in one line with an example of each kind (torch's own
    message starts with a line that says nothing and lists every key)."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape, e.g. {k} is {tuple(state[k].shape)}, not"
                     f" {tuple(expected[k].shape)}")
    return "; ".join(parts) or "its tensors do not fit"
