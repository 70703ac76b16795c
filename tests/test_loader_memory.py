"""Loading a checkpoint keeps one copy of the weights: the peak resident memory a load adds
stays under 1.3x the loaded weights' size (issue 17).

A moderately large synthetic SD1-layout file (about 330 MB of fp16 on disk, EMA weights
included, which must be skipped) is loaded at bf16 with NHWC conv weights, as the model cache
does on a CPU, in a fresh child process. Reading the whole file into a dict before converting
(or converting a second time to channels_last, or reading the EMA weights, or keeping the
file's pages mapped) takes the ratio to 2x or more. A ratio of memory, not a time: machine
load does not change it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

CHILD = r"""
import json, sys
import torch
import darkroom
from darkroom.models.loader import LoadOptions, load_checkpoint

torch.set_num_threads(1)
def status(field):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(field + ":"))

opts = LoadOptions(dtype=torch.bfloat16, vae_dtype=torch.bfloat16, channels_last=True)
load_checkpoint(sys.argv[1], opts)  # warm-up on a tiny file: lazy imports, first-use allocations
import gc; gc.collect()
base = status("VmRSS")
# Restart the kernel's peak-RSS counter (VmHWM) here. ru_maxrss is not used: it also keeps the
# peak recorded whenever a thread exited, which clear_refs does not reset.
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
model = load_checkpoint(sys.argv[2], opts)
peak = status("VmHWM")
modules = [model.unet, model.vae, *[s.model for s in model.text_encoders]]
tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
convs = [m.weight for m in model.unet.modules() if isinstance(m, torch.nn.Conv2d)]
print("RESULT " + json.dumps({
    "base": base, "peak": peak, "weights": sum(t.numel() * t.element_size() for t in tensors),
    "dtypes": sorted({str(t.dtype) for t in tensors if t.is_floating_point()}),
    "nhwc": all(w.is_contiguous(memory_format=torch.channels_last) for w in convs if w.shape[-1] > 1),
}))
"""


def _write_checkpoint(path) -> int:
    """An SD1-layout file: 2-level UNet at SD1 widths, 4-layer CLIP-L, tiny VAE, with EMA; fp16."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from darkroom.testing.ldm_export import pipeline_to_ldm, save_ldm_checkpoint
    from darkroom.testing.tiny import _clip_config, tiny_configs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            in_channels=4, out_channels=4, sample_size=32, block_out_channels=(320, 640), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768, attention_head_dim=8,
        ).half()
        vae = AutoencoderKL(**tiny_configs("sd1")["vae"]).half()
        te = CLIPTextModel(CLIPTextConfig(**_clip_config(768, 4, 12, "quick_gelu", 768))).half()
        unet_sd = unet.state_dict()
        ldm = pipeline_to_ldm("sd1", unet=unet_sd, unet_config=dict(unet.config), vae=vae.state_dict(),
                              text_encoder=te.state_dict(), unet_ema={k: v * 0.5 for k, v in unet_sd.items()})
    save_ldm_checkpoint(path, ldm, dtype=torch.float16)
    return sum(v.numel() * v.element_size() for v in ldm.values())


@pytest.mark.slow
def test_load_keeps_one_copy_of_the_weights(tmp_path, tiny_model):
    big = tmp_path / "medium-sd1.safetensors"
    file_bytes = _write_checkpoint(big)
    assert file_bytes > 250 * 2**20
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tiny_model("sd1-fp16")["path"]), str(big)],
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    r = json.loads(line[len("RESULT "):])
    assert r["dtypes"] == ["torch.bfloat16"] and r["nhwc"], r
    assert r["weights"] > 180 * 2**20, r  # the EMA half of the file is not loaded
    growth = r["peak"] - r["base"]
    ratio = growth / r["weights"]
    print(f"load growth {growth / 2**20:.0f} MiB, weights {r['weights'] / 2**20:.0f} MiB, ratio {ratio:.3f}")
    assert ratio < 1.3, (
        f"loading added {growth / 2**20:.0f} MiB at its peak for {r['weights'] / 2**20:.0f} MiB of weights"
        f" ({ratio:.2f}x; one copy plus a tensor in flight is about 1.0-1.1x)"
    )
