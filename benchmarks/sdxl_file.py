"""A full-size SDXL single file with random weights, written tensor by tensor (~0.3 GB of memory).

The tensor names and shapes come from the real SDXL configs (below) with the modules built on
the meta device and exported by Darkroom's own `darkroom.testing.ldm_export.pipeline_to_ldm`
(still on meta: nothing is allocated); each tensor is then drawn (normal, std 1/sqrt(fan-in);
norm weights 1 + noise; biases small) in fp16 and appended to the file, so building never
holds the model (the usual build, modules initialised in fp32 then cast, needs about 15 GB).
Random weights do not change the work per step.

    .venv/bin/python benchmarks/sdxl_file.py [--out benchmarks/out]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import torch

import darkroom  # noqa: F401  (offline first)

HERE = Path(__file__).resolve().parent
CHECKPOINT_NAME = "sdxl-random-fp16.safetensors"
MARKER = {"darkroom_benchmark": "random-weight SDXL (benchmarks/sdxl_file.py)"}

# stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ config.json
UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L = {
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
CLIP_BIGG = {
    "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
    "num_hidden_layers": 32, "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# what one SDXL UNet call gets besides the latents: context width, pooled text + 6 time ids
CONTEXT = (77, 2048)
ADDED_COND = {"text_embeds": (1280,), "time_ids": (6,)}

_ST = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def ldm_layout() -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes), from the real configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from darkroom.testing.ldm_export import pipeline_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))
        return pipeline_to_ldm("sdxl", unet=unet.state_dict(), unet_config=dict(unet.config), vae=vae.state_dict(),
                               text_encoder=te1.state_dict(), text_encoder_2=te2.state_dict())


def _draw(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) >= 2:
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        return (torch.randn(shape, generator=generator) * fan_in**-0.5).half()
    if any(p in name for p in ("norm", "ln_", "gamma")) and name.endswith("weight"):
        return (1 + 0.02 * torch.randn(shape, generator=generator)).half()
    return (0.01 * torch.randn(shape, generator=generator)).half()


def write_checkpoint(path: Path, seed: int = 0) -> None:
    t0 = time.perf_counter()
    layout = ldm_layout()
    header: dict = {"__metadata__": MARKER}
    offset = 0
    dtypes = {}
    for key, t in layout.items():
        dtype = torch.float16 if t.is_floating_point() else t.dtype
        dtypes[key] = dtype
        n = t.numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _ST[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    generator = torch.Generator().manual_seed(seed)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for key, t in layout.items():
            if t.is_floating_point():
                value = _draw(key, tuple(t.shape), generator)
            else:  # position ids
                value = torch.arange(t.shape[-1], dtype=dtypes[key]).expand(t.shape).contiguous()
            fh.write(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    partial.replace(path)
    print(f"built {path} ({path.stat().st_size / 2**30:.2f} GiB, {len(layout)} tensors) in"
          f" {time.perf_counter() - t0:.1f} s", flush=True)


def checkpoint_ok(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("darkroom_benchmark") == MARKER["darkroom_benchmark"]
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.out / CHECKPOINT_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
