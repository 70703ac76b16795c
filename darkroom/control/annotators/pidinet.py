"""PiDiNet soft edges (softedge_pidinet, softedge_pidisafe, scribble_pidinet) from table5_pidinet.pth.

PiDiNet (Su et al., "Pixel difference networks for efficient edge detection") in its "carv4" form, as the
extension runs it: 60 channels, four stages of four blocks (60, 120, 240, 240 channels; stages 2-4 start
with a 2x2 max-pool and a 1x1 shortcut), each block a depthwise 3x3 (5x5 for the radial kind), ReLU and a
1x1 back onto a residual. Every stage's output goes through a dilation module (1x1 to 24 channels, then
four 3x3 convolutions dilated 5, 7, 9 and 11, summed) and a spatial attention (ReLU, 1x1 to 4, 3x3 to 1,
sigmoid gate), a 1x1 to one edge map, bilinear back to full size; a 1x1 over the four maps and a sigmoid
give the edges.

The file stores the training-time weights of the pixel-difference convolutions: the init block and the
first block of each stage take differences with the centre ("cd"), the second between clockwise
neighbours ("ad"), the third between the outer and inner ring of a 5x5 ("rd"; its 3x3 weight's entries
1-8 are the eight directions, entry 0 unused), the fourth is a plain convolution. Each difference is linear
in the pixels, so `convert` folds it into a plain kernel once at load time, as the reference does for
inference. Input: BGR in [0, 1]. The widths are read from the file, so the tests' tiny file builds the
same network.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from darkroom.control.annotators import files, imageops
from darkroom.errors import ModelLoadError

FILE, KIND = "table5_pidinet.pth", "pidinet"
KINDS = ("cd", "ad", "rd", "cv")
"""The pixel difference of each block within a stage (the init block is "cd" too)."""
WIDTH, DIL = 60, 24
_CLOCKWISE = (3, 0, 1, 6, 4, 2, 7, 8, 5)  # flat 3x3 index j is paired with the neighbour _CLOCKWISE[j]
_RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)  # flat 5x5 positions two steps out in the eight directions
_RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)  # and one step out


def convert(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """A pixel-difference 3x3 weight [out, in, 3, 3] as the plain kernel giving the same output."""
    if kind == "cv":
        return weight
    out, cin = weight.shape[:2]
    flat = weight.reshape(out, cin, 9)
    if kind == "cd":  # sum_i w_i (x_i - x_centre): the centre tap loses the weights' sum
        plain = flat.clone()
        plain[:, :, 4] -= flat.sum(dim=2)
        return plain.reshape(weight.shape)
    if kind == "ad":  # sum_i w_i (x_i - x_next(i)), next clockwise round the ring
        return (flat - flat[:, :, list(_CLOCKWISE)]).reshape(weight.shape)
    if kind == "rd":  # sum_k w_(k+1) (x_outer(k) - x_inner(k)) on a 5x5
        plain = torch.zeros(out, cin, 25, dtype=weight.dtype)
        plain[:, :, list(_RD_OUTER)] = flat[:, :, 1:]
        plain[:, :, list(_RD_INNER)] = -flat[:, :, 1:]
        return plain.reshape(out, cin, 5, 5)
    raise ValueError(kind)


class _Block(nn.Module):
    def __init__(self, kind: str, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.shortcut = nn.Conv2d(cin, cout, 1)
        k = 5 if kind == "rd" else 3
        self.conv1 = nn.Conv2d(cin, cin, k, padding=k // 2, groups=cin, bias=False)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        if self.stride > 1:
            x = F.max_pool2d(x, 2, 2)
        y = self.conv2(F.relu(self.conv1(x)))
        return y + (self.shortcut(x) if self.stride > 1 else x)


class _Dilation(nn.Module):
    def __init__(self, cin: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1)
        for i, d in enumerate((5, 7, 9, 11), start=1):
            self.add_module(f"conv2_{i}", nn.Conv2d(width, width, 3, padding=d, dilation=d, bias=False))

    def forward(self, x):
        x = self.conv1(F.relu(x))
        return sum(getattr(self, f"conv2_{i}")(x) for i in range(1, 5))


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x):
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class _Reduce(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        return self.conv(x)


def blocks(width: int = WIDTH) -> list[tuple[str, str, int, int, int]]:
    """(name, pixel difference, stride, in, out) of the 15 blocks; layer n (the init block is 0) is "carv4"'s
    KINDS[n % 4]: stage 1 has three blocks after the init block, stages 2-4 four."""
    out, cin, layer = [], width, 1
    for stage, cout in enumerate((width, 2 * width, 4 * width, 4 * width), start=1):
        for i in range(1, 5 if stage > 1 else 4):
            out.append((f"block{stage}_{i}", KINDS[layer % 4], 2 if stage > 1 and i == 1 else 1, cin, cout))
            cin, layer = cout, layer + 1
    return out


def block_kinds() -> dict[str, str]:
    """The pixel difference of each weight the file stores untransformed."""
    return {"init_block.weight": KINDS[0], **{f"{name}.conv1.weight": kind for name, kind, *_ in blocks()}}


class PiDiNet(nn.Module):
    """Keys as in table5_pidinet.pth: init_block, block{1_1-4_4}.conv1/conv2(/shortcut), dilations.{0-3},
    attentions.{0-3}, conv_reduces.{0-3}.conv, classifier."""

    def __init__(self, width: int = WIDTH, dil: int = DIL):
        super().__init__()
        self.init_block = nn.Conv2d(3, width, 3, padding=1, bias=False)
        widths = (width, 2 * width, 4 * width, 4 * width)
        self._stages: list[list[str]] = [[], [], [], []]
        for name, kind, stride, cin, cout in blocks(width):
            self.add_module(name, _Block(kind, cin, cout, stride))
            self._stages[int(name[5]) - 1].append(name)
        self.dilations = nn.ModuleList(_Dilation(w, dil) for w in widths)
        self.attentions = nn.ModuleList(_Attention(dil) for _ in widths)
        self.conv_reduces = nn.ModuleList(_Reduce(dil) for _ in widths)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = self.init_block(x)
        maps = []
        for stage, names in enumerate(self._stages):
            for name in names:
                x = getattr(self, name)(x)
            edge = self.conv_reduces[stage](self.attentions[stage](self.dilations[stage](x)))
            maps.append(F.interpolate(edge, (h, w), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(maps, 1)))


def load(path: Path) -> PiDiNet:
    state = files.read_state_dict(path)
    try:
        width = int(state["init_block.weight"].shape[0])
        dil = int(state["dilations.0.conv1.weight"].shape[0])
        state = dict(state)
        for key, kind in block_kinds().items():
            state[key] = convert(state[key].float(), kind)
    except (KeyError, AttributeError, IndexError, TypeError, RuntimeError):
        raise ModelLoadError(f"{path.name}: not a PiDiNet weight file (no init_block, blocks or dilations)") from None
    return files.load_strict(PiDiNet(width, dil), state, path, "PiDiNet")


def edges(net: PiDiNet, img: np.ndarray) -> np.ndarray:
    """Soft edges in [0, 1] (float32 HxW) of a uint8 RGB picture, fed as BGR in [0, 1]."""
    device = next(net.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).to(device).float().permute(2, 0, 1)[None]
        return net(x / 255.0)[0, 0].float().cpu().numpy()


def detect(img: np.ndarray, res: int, dirs: Sequence[Path], *, safe: bool = False, scribble: bool = False,
           sketch: bool = False, device: str | None = None) -> np.ndarray:
    """softedge_pidinet (safe: softedge_pidisafe; scribble: scribble_pidinet's thick binary strokes; sketch:
    t2ia_sketch_pidi's edges above 0.5 made white, the rest black, for the T2I sketch adapter)."""
    net = load(files.find(FILE, KIND, dirs)).to(device or "cpu")

    def run(padded: np.ndarray) -> np.ndarray:
        edge = edges(net, padded)
        return (edge > 0.5).astype(np.float32) if sketch else edge
    return imageops.soft_edge_map(run, img, res, safe=safe, scribble=scribble)
