"""Seconds per control map of the heavier ControlNet preprocessors, at their released sizes (random weights).

    .venv/bin/python benchmarks/preprocessor_time.py            # 512 x 512, every net
    .venv/bin/python benchmarks/preprocessor_time.py --size 768 --only depth_zoe normal_dsine

Each net is built at the size of its released file with random weights (no files needed: the work per map
does not depend on the values), then one map is made twice through the same functions `detect` uses; the
second run is reported (the first builds oneDNN's kernels). It prints seconds per map and, as a ratio, how
many times slower than softedge_teed (the smallest net) each is, measured in the same process. Figures are
for the machine at hand; only the ratios carry over.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _random(net: torch.nn.Module) -> torch.nn.Module:
    """The freshly initialised net, ready for inference."""
    return net.eval().requires_grad_(False)


def cases(size: int) -> dict:
    from darkroom.control.annotators import anime_face, dsine, lama, leres, manga_line, teed, zoe
    from darkroom.testing.tiny_annotators import zoe_config

    img = np.random.RandomState(0).randint(0, 256, (size, size, 3)).astype(np.uint8)
    mask = np.zeros((size, size), np.float32)
    mask[size // 4: size // 2, size // 4: size // 2] = 1

    def make_zoe():
        from transformers import ZoeDepthForDepthEstimation

        return _random(ZoeDepthForDepthEstimation(zoe_config(tiny=False)))

    return {
        "softedge_teed": (lambda: _random(teed.TEED()), lambda net: teed.edges(net, img)),
        "lineart_anime_denoise": (lambda: _random(manga_line.MangaLineNet()), lambda net: manga_line.lines(net, img)),
        "seg_anime_face": (lambda: _random(anime_face.AnimeFaceUNet()), lambda net: anime_face.segment(net, img)),
        "inpaint_only+lama": (lambda: _random(lama.LamaGenerator()), lambda net: lama.fill(net, img, mask)),
        "depth_leres": (lambda: _random(leres.LeReS()), lambda net: leres.depth(net, img)),
        "normal_dsine": (lambda: _random(dsine.DSINE()), lambda net: dsine.normals(net, img, (size, size), 60.0)),
        "depth_zoe": (make_zoe, lambda net: zoe.depth(net, img)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="picture side in pixels (a multiple of 64)")
    parser.add_argument("--only", nargs="*", help="preprocessor names (default: all)")
    args = parser.parse_args()
    todo = cases(args.size)
    names = [n for n in todo if not args.only or n in args.only or n == "softedge_teed"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}")
    seconds = {}
    for name in names:
        build, run = todo[name]
        net = build()
        with torch.no_grad():
            run(net)
            t0 = time.perf_counter()
            run(net)
            seconds[name] = time.perf_counter() - t0
        params = sum(p.numel() for p in net.parameters()) / 1e6
        ratio = seconds[name] / seconds["softedge_teed"]
        print(f"{name:24s} {params:7.1f} M weights  {seconds[name]:7.2f} s  {ratio:7.1f}x softedge_teed")
        del net


if __name__ == "__main__":
    main()
