"""Tiny random face restoration files in the real key layouts (tests only).

- RetinaFace-ResNet50 as facexlib saves `detection_Resnet50_Final.pth`: every key of the real file,
  with narrow widths (a stem of 4 channels instead of 64, an FPN of 8 instead of 256). Its heads are
  set so that it "finds" faces deterministically: only the largest priors (512 px at stride 32) score as faces,
  boxes are the priors, and the landmarks sit where eyes, nose and mouth would.
- GFPGANv1Clean (GFPGANv1.4.pth's layout) at 64 px with narrow channels: about 60k weights.
- CodeFormer: its encoder and generator widths are fixed by the architecture (about 68M weights even
  with the smallest transformer), so it is built only by the one test that runs it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from darkroom.faces.detect import RetinaFace
from darkroom.upscale.spandrel_import import import_spandrel

# Landmark offsets (x, y per point) in units of 0.1 x the prior's size: eyes apart, nose below, mouth lower.
_LANDMARK_BIAS = (-1.5, -1.0, 1.5, -1.0, 0.0, 0.5, -1.2, 1.8, 1.2, 1.8)


def retinaface_state(*, seed: int = 0, finds_faces: bool = True, width: int = 4, channels: int = 8) -> dict:
    """A RetinaFace state dict in facexlib's layout (keys as in detection_Resnet50_Final.pth)."""
    torch.manual_seed(seed)
    net = RetinaFace(width, channels)
    with torch.no_grad():
        for level in range(3):
            net.ClassHead[level].conv1x1.weight.zero_()
            face = finds_faces and level == 2
            net.ClassHead[level].conv1x1.bias.copy_(torch.tensor([8.0, -8.0, -8.0, 8.0] if face else [8.0, -8.0] * 2))
            net.BboxHead[level].conv1x1.weight.zero_()
            net.BboxHead[level].conv1x1.bias.zero_()
            net.LandmarkHead[level].conv1x1.weight.zero_()
            net.LandmarkHead[level].conv1x1.bias.copy_(torch.tensor(_LANDMARK_BIAS * 2))
    return net.state_dict()


def gfpgan_state(*, seed: int = 0, out_size: int = 64) -> dict:
    """{"params_ema": weights} of a narrow GFPGANv1Clean, as GFPGANv1.4.pth is saved."""
    import_spandrel()
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(seed)
    net = GFPGAN(out_size=out_size, num_style_feat=16, channel_multiplier=1, decoder_load_path=None,
                 fix_decoder=False, num_mlp=2, input_is_latent=True, different_w=True, narrow=1 / 32, sft_half=True)
    return {"params_ema": net.state_dict()}


def codeformer_state(*, seed: int = 0) -> dict:
    """{"params_ema": weights} of the smallest CodeFormer the architecture allows (one transformer layer,
    16-wide embeddings, 8 codes; the fixed-width autoencoder makes it ~270 MB in fp32)."""
    import_spandrel()
    from spandrel_extra_arches.architectures.CodeFormer import CodeFormer

    torch.manual_seed(seed)
    net = CodeFormer(dim_embd=16, n_head=8, n_layers=1, codebook_size=8, latent_size=256, connect_list=["32"])
    return {"params_ema": net.state_dict()}


def write_a1111_faces(root: Path, *, gfpgan: bool = True, codeformer: bool = False, detector: bool = True,
                      finds_faces: bool = True) -> dict[str, Path]:
    """Put tiny files where an A1111/Forge install keeps them: models/GFPGAN/GFPGANv1.4.pth and
    detection_Resnet50_Final.pth, models/Codeformer/codeformer-v0.1.0.pth. Returns {what: path}."""
    out: dict[str, Path] = {}
    jobs = [("gfpgan", gfpgan, "models/GFPGAN/GFPGANv1.4.pth", gfpgan_state),
            ("detector", detector, "models/GFPGAN/detection_Resnet50_Final.pth",
             lambda: retinaface_state(finds_faces=finds_faces)),
            ("codeformer", codeformer, "models/Codeformer/codeformer-v0.1.0.pth", codeformer_state)]
    for what, wanted, rel, build in jobs:
        if not wanted:
            continue
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build(), path)
        out[what] = path
    return out
