"""Train the judge's shape classifier and save it to darkroom/starter_training/shape_classifier.safetensors.

The judge classifies the mask of the component it found, so the classifier is trained on exactly such masks:
  * drawn scenes, degraded like generated images (blur, JPEG, noise, colour shift, down/up-scaling), run
    through the judge's own segmentation (`find_object`, `mask_to_input`);
  * shapes drawn directly as masks with wider variation than the renderer (rotation, stretch, shear, thicker or
    thinner stars/rings/crosses, rounding by blur-and-threshold, erosion/dilation) so near-misses from a
    generator are still recognised;
  * on the fly: elastic warps, 1-pixel erosion/dilation and bites taken out (partial fills).
Accuracy is measured on drawn scenes the training never saw (a different seed), both clean and degraded, and
stored in the file's metadata. Seeded: the same run gives the same weights on the same torch build.

Usage: .venv/bin/python scripts/train_shape_classifier.py [--seed 0] [--epochs 6] [--out PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from darkroom.starter_training.judge import (  # noqa: E402
    INPUT_SIZE,
    WEIGHTS,
    ShapeNet,
    find_object,
    mask_to_input,
    palette_labels,
    to_array,
)
from darkroom.starter_training.scenes import SHAPES, render, sample_scene, unit_shape  # noqa: E402

# Wider than the renderer's own proportions (star 0.45, ring 0.5, cross 1/3), so generated variants pass.
PARAM_RANGES = {"star": (0.33, 0.6), "ring": (0.35, 0.68), "cross": (0.24, 0.45)}
ROTATION = {"circle": 0, "ring": 0, "square": 45, "cross": 45, "star": 36, "triangle": 25, "heart": 25}


def degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Generation-like damage: blur, down/up-scaling, colour shift, noise, JPEG (each sometimes)."""
    size = image.size
    if rng.random() < 0.4:
        small = rng.randint(48, 100)
        image = image.resize((small, small), Image.Resampling.BILINEAR).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 2.5)))
    arr = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.6:
        arr = arr + np.array([rng.uniform(-30, 30) for _ in range(3)], dtype=np.float32)
    if rng.random() < 0.5:
        arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(2, 15), arr.shape)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=rng.randint(20, 90))
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return image


def scene_masks(n: int, seed: int, degraded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks found by the judge's segmentation in drawn (optionally degraded) scenes, with their true shapes."""
    rng = random.Random(seed)
    xs, ys = [], []
    while len(xs) < n:
        scene = sample_scene(rng, "any")
        image = render(scene, 128, jitter_seed=rng.getrandbits(32))
        if degraded:
            image = degrade(image, rng)
        arr = to_array(image)
        labels = palette_labels(arr)
        for obj in scene.objects:
            blob = find_object(labels, obj.colour, arr)
            if blob is not None and blob.plausible:
                xs.append(mask_to_input(blob.mask))
                ys.append(SHAPES.index(obj.shape))
    return torch.stack(xs[:n]), torch.tensor(ys[:n])


def drawn_masks(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes drawn straight into masks with random proportions, pose, resolution and rounding."""
    rng = random.Random(seed)
    xs, ys = [], []
    for i in range(n):
        shape = SHAPES[i % len(SHAPES)]
        lo_hi = PARAM_RANGES.get(shape)
        outer, holes = unit_shape(shape, round(rng.uniform(*lo_hi), 3) if lo_hi else None)
        rot = math.radians(rng.uniform(-ROTATION[shape], ROTATION[shape]))
        sx, shear = rng.uniform(0.8, 1.25), rng.uniform(-0.15, 0.15)
        extent_px = rng.uniform(14, 64)
        side = int(extent_px * 1.6 + 8)
        # stretch x, shear, rotate, then scale to pixels at 4x (anti-aliased by the box filter below)
        c, s = math.cos(rot), math.sin(rot)
        m = np.array([[c * sx, c * shear - s], [s * sx, s * shear + c]]) * extent_px * 4
        mask = Image.new("L", (side * 4, side * 4), 0)
        draw = ImageDraw.Draw(mask)
        for poly, fill in [(p, 255) for p in outer] + [(p, 0) for p in holes]:
            pts = np.asarray(poly) @ m.T + side * 2
            draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
        mask = mask.resize((side, side), Image.Resampling.BOX)
        if rng.random() < 0.5:
            mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
        binary = np.asarray(mask, dtype=np.float32) / 255.0 > rng.uniform(0.3, 0.7)
        if not binary.any():
            binary = np.asarray(mask) > 0
        xs.append(mask_to_input(binary))
        ys.append(SHAPES.index(shape))
    return torch.stack(xs), torch.tensor(ys)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """On-the-fly damage to a batch of (B, 1, 32, 32) soft masks: elastic warp, erode/dilate, bites."""
    b = x.shape[0]

    def pick(p: float) -> torch.Tensor:
        return (torch.rand(b, 1, 1, 1, generator=gen) < p).float()

    grid = F.affine_grid(torch.eye(2, 3).expand(b, 2, 3), list(x.shape), align_corners=False)
    field = torch.randn(b, 2, 4, 4, generator=gen) * 0.04
    field = F.interpolate(field, size=x.shape[-2:], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid + field * pick(0.7).view(b, 1, 1, 1), align_corners=False)
    dil = F.max_pool2d(x, 3, 1, 1)
    ero = -F.max_pool2d(-x, 3, 1, 1)
    which = torch.rand(b, 1, 1, 1, generator=gen)
    x = torch.where(which < 0.2, dil, torch.where(which < 0.4, ero, x))
    # a rectangular bite of 3..8 px somewhere in the middle (a partly filled object)
    bite = pick(0.25)
    yy = torch.arange(INPUT_SIZE).view(1, 1, -1, 1)
    xx = torch.arange(INPUT_SIZE).view(1, 1, 1, -1)
    y0 = torch.randint(4, INPUT_SIZE - 12, (b, 1, 1, 1), generator=gen)
    x0 = torch.randint(4, INPUT_SIZE - 12, (b, 1, 1, 1), generator=gen)
    hh = torch.randint(3, 9, (b, 1, 1, 1), generator=gen)
    ww = torch.randint(3, 9, (b, 1, 1, 1), generator=gen)
    hole = ((yy >= y0) & (yy < y0 + hh) & (xx >= x0) & (xx < x0 + ww)).float() * bite
    return x * (1 - hole)


def accuracy(model: ShapeNet, x: torch.Tensor, y: torch.Tensor) -> tuple[float, np.ndarray]:
    with torch.no_grad():
        pred = torch.cat([model(x[i: i + 512]).argmax(1) for i in range(0, len(x), 512)])
    confusion = np.zeros((len(SHAPES), len(SHAPES)), dtype=int)
    np.add.at(confusion, (y.numpy(), pred.numpy()), 1)
    return float((pred == y).float().mean()), confusion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--drawn", type=int, default=21000, help="directly drawn masks")
    ap.add_argument("--scenes", type=int, default=4000, help="masks segmented from degraded scenes")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.time()
    x1, y1 = drawn_masks(args.drawn, args.seed * 10 + 1)
    x2, y2 = scene_masks(args.scenes, args.seed * 10 + 2, degraded=True)
    x3, y3 = scene_masks(args.scenes // 6, args.seed * 10 + 3, degraded=False)
    xv, yv = scene_masks(1500, 10_000 + args.seed, degraded=True)  # held-out drawn scenes, other seed
    xc, yc = scene_masks(600, 20_000 + args.seed, degraded=False)
    x, y = torch.cat([x1, x2, x3]), torch.cat([y1, y2, y3])
    print(f"data: {len(x)} train masks, {len(xv)} + {len(xc)} validation masks in {time.time() - t0:.0f}s")

    model = ShapeNet()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 128
    steps = args.epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(args.seed)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i: i + batch]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        acc, _ = accuracy(model, xv, yv)
        elapsed = time.time() - t0
        print(f"epoch {epoch + 1}: loss {total / len(x):.4f}  held-out degraded acc {acc:.4f}  ({elapsed:.0f}s)")

    acc_deg, conf = accuracy(model, xv, yv)
    acc_clean, _ = accuracy(model, xc, yc)
    print(f"held-out drawn scenes: clean {acc_clean:.4f}, degraded {acc_deg:.4f}")
    print("confusion (rows true, cols predicted) on degraded:", " ".join(s[:4] for s in SHAPES))
    for name, row in zip(SHAPES, conf, strict=True):
        print(f"  {name:9s}", " ".join(f"{v:4d}" for v in row))
    meta = {
        "shapes": json.dumps(list(SHAPES)),
        "input_size": str(INPUT_SIZE),
        "seed": str(args.seed),
        "epochs": str(args.epochs),
        "heldout_accuracy_clean": f"{acc_clean:.4f}",
        "heldout_accuracy_degraded": f"{acc_deg:.4f}",
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata=meta)
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
