"""One 3x3 conv on a small map: oneDNN's convolution against darkroom's matrix product over patches.

    .venv/bin/python benchmarks/gemm_conv_layers.py [--rounds 10]

For the UNet's low-resolution shapes (SD1.5 at 512x512: 8x8 and 16x16 with 1280-2560 channels; 12x12
and 24x24 at 768x768; 32x32 for comparison), batch 1 (CFG 1) and 2 (a CFG batch), bf16 channels-last:
the conv as a module and `darkroom.engine.gemm_conv`'s product, alternating in one process, median of
`--rounds`; prints the ratio and each side's distance to a float32 conv. This is what
`gemm_conv.MAX_PIXELS` was set from.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import darkroom  # noqa: F401  (offline first)
from darkroom.engine import gemm_conv, memory

SIZES = (8, 12, 16, 24, 32)
CHANNELS = ((640, 640), (640, 1280), (1280, 1280), (2560, 1280))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        print("this CPU has no native bf16: gemm_conv is not used here")
        return 1
    memory.keep_large_allocations()  # as Darkroom runs its UNet
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; ratio = conv time / product time")
    print("batch  map    pixels  " + "  ".join(f"{i:>4}->{o:<4} ratio (err conv, product)" for i, o in CHANNELS))
    with torch.no_grad():
        for batch in (1, 2):
            for size in SIZES:
                cells = []
                for cin, cout in CHANNELS:
                    torch.manual_seed(0)
                    conv32 = torch.nn.Conv2d(cin, cout, 3, padding=1).eval()
                    conv = torch.nn.Conv2d(cin, cout, 3, padding=1).eval()
                    conv.load_state_dict(conv32.state_dict())
                    conv = conv.to(torch.bfloat16, memory_format=torch.channels_last)
                    x32 = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
                    x = x32.bfloat16()
                    sides = {"conv": lambda conv=conv, x=x: conv(x),
                             "product": lambda conv=conv, x=x: gemm_conv._product(conv, x, None)}
                    times: dict[str, list[float]] = {name: [] for name in sides}
                    out = {name: f().float() for name, f in sides.items()}  # warm-up
                    for _ in range(args.rounds):
                        for name, f in sides.items():
                            t0 = time.perf_counter()
                            f()
                            times[name].append(time.perf_counter() - t0)
                    exact = conv32(x32)
                    err = {name: ((y - exact).norm() / exact.norm()).item() for name, y in out.items()}
                    ratio = statistics.median(times["conv"]) / statistics.median(times["product"])
                    cells.append(f"{ratio:14.2f} ({err['conv']:.1e}, {err['product']:.1e})")
                print(f"{batch:5}  {size:2}x{size:<2} {batch * size * size:7}  " + "  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
