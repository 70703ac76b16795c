"""torchvision's `nms` and `roi_align` operators, written in plain torch and registered under its namespace.

TorchScript files exported from detectron2 (the extension's densepose_r50_fpn_dl.torchscript) call
`torchvision::nms` and `torchvision::roi_align`, and `torch.jit.load` refuses a file whose operators are not
registered ("Unknown builtin op"). torchvision cannot be installed beside Darkroom's torch build, so
`ensure_registered()` defines the two operators with torchvision's exact schemas and these implementations,
which follow its CPU kernels (the same float32 arithmetic, the same border rules), on any device. Where
torchvision's own operators are already registered, they are used instead.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

__all__ = ["SCHEMAS", "ensure_registered", "nms", "roi_align"]

NAMESPACE = "torchvision"
SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": "(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width,"
                 " int sampling_ratio, bool aligned) -> Tensor",
}
_LOCK = threading.Lock()
_READY = threading.Event()  # both operators defined and implemented (an op defined but not yet implemented is not)
_NMS_BLOCK = 1024  # rows of the IoU matrix computed at once (bounds the memory of a 5000-box RPN)
_GATHER_BUDGET = 1 << 24  # values gathered at once by roi_align (64 MB of float32)


def nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices (int64) of the boxes kept by greedy non-maximum suppression, highest score first: a box is
    dropped when its IoU with a kept, higher-scoring one exceeds `iou_threshold`. As torchvision's CPU kernel:
    a stable descending sort (ties keep input order) and IoU = inter / (area_i + area_j - inter) in the boxes'
    dtype, so the kept set is the same bit for bit."""
    if dets.dim() != 2 or dets.size(1) != 4:
        raise RuntimeError(f"boxes should be a 2d tensor of shape [N, 4], got {tuple(dets.shape)}")
    if scores.dim() != 1 or scores.size(0) != dets.size(0):
        raise RuntimeError(f"scores should be a 1d tensor of shape [N] for {dets.size(0)} boxes,"
                           f" got {tuple(scores.shape)}")
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    order = torch.sort(scores, stable=True, descending=True).indices
    boxes = dets[order]
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    n = boxes.size(0)
    over = torch.empty((n, n), dtype=torch.bool, device=dets.device)
    for start in range(0, n, _NMS_BLOCK):
        rows = slice(start, start + _NMS_BLOCK)
        w = (torch.minimum(x2[rows, None], x2) - torch.maximum(x1[rows, None], x1)).clamp(min=0)
        h = (torch.minimum(y2[rows, None], y2) - torch.maximum(y1[rows, None], y1)).clamp(min=0)
        inter = w * h
        over[rows] = (inter / (areas[rows, None] + areas - inter)).double() > iou_threshold  # as C++: in double
    # The greedy pass is sequential; on the host it is one cheap boolean OR per kept box.
    over_host = over.triu(diagonal=1).cpu().numpy()
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if not removed[i]:
            keep.append(i)
            removed |= over_host[i]
    return order[torch.tensor(keep, dtype=torch.long, device=dets.device)]


def _axis_samples(start: torch.Tensor, bin_size: torch.Tensor, grid: int, pooled: int, size: int):
    """Bilinear taps along one axis for each ROI's pooled * grid samples: (low, high, weight low, weight high),
    each [K, pooled * grid]; torchvision's rules: a sample beyond -1 or `size` weighs nothing, others are
    clamped to [0, size - 1]."""
    ph = torch.arange(pooled, device=start.device, dtype=start.dtype)
    sub = torch.arange(grid, device=start.device, dtype=start.dtype) + 0.5
    k, b = start[:, None, None], bin_size[:, None, None]
    pos = (k + ph[None, :, None] * b) + sub[None, None, :] * b / grid  # same order as the kernel, in its dtype
    pos = pos.reshape(start.size(0), pooled * grid)
    outside = (pos < -1.0) | (pos > size)
    pos = pos.clamp(min=0)
    low = pos.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    pos = torch.where(edge, low.to(pos.dtype), pos)
    high = torch.where(edge, low, low + 1)
    frac = pos - low.to(pos.dtype)
    zero = torch.zeros_like(frac)
    return low, high, torch.where(outside, zero, 1.0 - frac), torch.where(outside, zero, frac)


def _roi_group(feats: torch.Tensor, batch: torch.Tensor, start_y, start_x, bin_h, bin_w, grid_h: int,
               grid_w: int, ph: int, pw: int) -> torch.Tensor:
    """roi_align's output for ROIs that share one sampling grid (grid_h x grid_w samples per bin): [K, C, ph, pw]."""
    n_img, c, height, width = feats.shape
    k = batch.size(0)
    out = feats.new_zeros((k, c, ph, pw))
    if grid_h <= 0 or grid_w <= 0:
        return out
    y_lo, y_hi, wy_lo, wy_hi = _axis_samples(start_y, bin_h, grid_h, ph, height)
    x_lo, x_hi, wx_lo, wx_hi = _axis_samples(start_x, bin_w, grid_w, pw, width)
    flat = feats.permute(0, 2, 3, 1).reshape(n_img * height * width, c)  # channels last: each tap one row
    base = (batch * (height * width))[:, None, None]
    per_roi = c * ph * grid_h * pw * grid_w
    chunk = max(1, _GATHER_BUDGET // max(per_roi, 1))
    for s in range(0, k, chunk):
        r = slice(s, s + chunk)
        acc = None
        for yi, wy in ((y_lo, wy_lo), (y_hi, wy_hi)):
            for xi, wx in ((x_lo, wx_lo), (x_hi, wx_hi)):
                idx = base[r] + yi[r, :, None] * width + xi[r, None, :]
                term = (wy[r, :, None] * wx[r, None, :])[..., None] * flat[idx]  # [k, ph*grid_h, pw*grid_w, C]
                acc = term if acc is None else acc + term
        acc = acc.reshape(-1, ph, grid_h, pw, grid_w, c)
        total = acc[:, :, 0, :, 0]
        for iy in range(grid_h):  # the kernel's summation order: sample by sample, row-major
            for ix in range(grid_w):
                if iy or ix:
                    total = total + acc[:, :, iy, :, ix]
        out[r] = (total / (grid_h * grid_w)).permute(0, 3, 1, 2)
    return out


def roi_align(input: torch.Tensor, rois: torch.Tensor, spatial_scale: float, pooled_height: int,
              pooled_width: int, sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoIAlign as torchvision computes it: [K, C, pooled_height, pooled_width] from `input` [N, C, H, W] and
    `rois` [K, 5] (batch index, x1, y1, x2, y2 in input pixels before `spatial_scale`). Each bin averages a
    grid of bilinear samples, `sampling_ratio` per side or, when <= 0, ceil(roi size / pooled size) per ROI;
    `aligned` shifts the box by half a pixel (and lets it be smaller than one pixel)."""
    if input.dim() != 4:
        raise RuntimeError(f"roi_align: input must be [N, C, H, W], got {tuple(input.shape)}")
    if rois.dim() != 2 or rois.size(1) != 5:
        raise RuntimeError(f"roi_align: rois must be [K, 5], got {tuple(rois.shape)}")
    ph, pw = int(pooled_height), int(pooled_width)
    compute = input if input.dtype in (torch.float32, torch.float64) else input.float()
    k = rois.size(0)
    if k == 0 or compute.numel() == 0:
        return input.new_zeros((k, input.size(1), ph, pw))
    offset = 0.5 if aligned else 0.0
    # The kernel takes rois * scale - offset in double precision, then stores it in the input's type.
    box = (rois.double() * spatial_scale - offset).to(compute.dtype)
    start_x, start_y, end_x, end_y = box[:, 1], box[:, 2], box[:, 3], box[:, 4]
    roi_w, roi_h = end_x - start_x, end_y - start_y
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / ph, roi_w / pw
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.long)
    else:
        grid_h, grid_w = torch.ceil(roi_h / ph).long().cpu(), torch.ceil(roi_w / pw).long().cpu()
    batch = rois[:, 0].long()  # the kernel's int conversion truncates
    out = compute.new_zeros((k, compute.size(1), ph, pw))
    pairs = torch.stack([grid_h, grid_w], 1)
    for gh, gw in torch.unique(pairs, dim=0).tolist():
        sel = torch.nonzero((pairs[:, 0] == gh) & (pairs[:, 1] == gw)).flatten().to(rois.device)
        out[sel] = _roi_group(compute, batch[sel], start_y[sel], start_x[sel], bin_h[sel], bin_w[sel],
                              gh, gw, ph, pw)
    return out.to(input.dtype)


def _defined(name: str) -> bool:
    return hasattr(getattr(torch.ops, NAMESPACE), name)


def ensure_registered() -> None:
    """Make `torch.ops.torchvision.nms` and `.roi_align` exist (idempotent, thread-safe). Operators already there
    (torchvision imported in this process) are left as they are; Darkroom never imports torchvision itself
    (see darkroom.upscale.spandrel_import). Ours are registered for every device (CompositeExplicitAutograd)."""
    if _READY.is_set():
        return
    with _LOCK:
        for name, fn in (("nms", nms), ("roi_align", roi_align)):
            if not _defined(name):
                qualname = f"{NAMESPACE}::{name}"
                torch.library.define(qualname, SCHEMAS[name])
                torch.library.impl(qualname, "CompositeExplicitAutograd", fn)
        _READY.set()
