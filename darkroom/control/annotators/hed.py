"""HED soft edges (softedge_hed, softedge_hedsafe, scribble_hed) from lllyasviel's ControlNetHED.pth.

The network is lllyasviel's Apache-2.0 re-training of HED for ControlNet: five VGG-style blocks of 3x3
convolutions (2, 2, 3, 3, 3 layers; 64 to 512 channels; 2x2 max-pool before blocks 2-5), each with a
1x1 projection to one edge channel. The five projections are scaled back to the input size, averaged and
put through a sigmoid. It takes RGB in 0-255 minus a learned per-channel `norm`. The widths are read
from the file, so the tests' tiny file (darkroom/testing/tiny_annotators.py) builds the same network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control.annotators import files, imageops

FILE, KIND = "ControlNetHED.pth", "hed"
LAYERS = (2, 2, 3, 3, 3)
WIDTHS = (64, 128, 256, 512, 512)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int):
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1) for i in range(layers)])
        self.projection = nn.Conv2d(cout, 1, 1)

    def forward(self, h: torch.Tensor, pool: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if pool:
            h = F.max_pool2d(h, 2, 2)
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HED(nn.Module):
    """Keys as in ControlNetHED.pth: norm, block{1-5}.convs.{i}.weight/bias, block{1-5}.projection.*"""

    def __init__(self, widths: Sequence[int] = WIDTHS):
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        cin = 3
        for i, (width, layers) in enumerate(zip(widths, LAYERS, strict=True), start=1):
            setattr(self, f"block{i}", _Block(cin, width, layers))
            cin = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = x - self.norm
        out = []
        for i in range(1, 6):
            h, p = getattr(self, f"block{i}")(h, pool=i > 1)
            out.append(p)
        return out


def load(path: Path) -> HED:
    state = files.read_state_dict(path)
    try:
        widths = [int(state[f"block{i}.projection.weight"].shape[1]) for i in range(1, 6)]
    except (KeyError, AttributeError, IndexError):
        from darkroom.errors import ModelLoadError

        raise ModelLoadError(f"{path.name}: not a ControlNetHED weight file (no block projections)") from None
    return files.load_strict(HED(widths), state, path, "ControlNetHED")


def edges(net: HED, img: np.ndarray) -> np.ndarray:
    """Soft edges in [0, 1] (float64 HxW) of a uint8 HxWx3 picture, on the net's device."""
    h, w = img.shape[:2]
    device = net.norm.device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img)).to(device).float().permute(2, 0, 1)[None]
        maps = [F.interpolate(p.float(), size=(h, w), mode="bilinear", align_corners=False) for p in net(x)]
        mean = torch.cat(maps, dim=1).mean(dim=1)[0].double()
    return torch.sigmoid(mean).cpu().numpy()


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], *, safe: bool = False,
           scribble: bool = False, device: str | None = None) -> np.ndarray:
    """softedge_hed (safe: softedge_hedsafe; scribble: scribble_hed's thick binary strokes)."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")
    return imageops.soft_edge_map(lambda padded: edges(net, padded), img, res, safe=safe, scribble=scribble)
