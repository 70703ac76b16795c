"""Our loader + sampling loop against diffusers' own pipelines on the same weights and seed.

diffusers loads the same single file with `from_single_file(..., config=<folder>,
local_files_only=True)`, where the folder holds configs and the tokenizer only (no
weights): if our key conversion, inferred configs, prompt encoding, noise or CFG loop were
wrong, the images would differ.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from darkroom.engine import samplers
from darkroom.request import GenerationRequest


def _config_folder(tmp_path, family: str, v_prediction: bool = False):
    from darkroom.testing.tiny import save_diffusers_folder

    folder = save_diffusers_folder(tmp_path / f"cfg-{family}", family, seed=1, v_prediction=v_prediction)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    assert not list(folder.rglob("*.safetensors"))
    return folder


def _ours(engine, path, req_kw):
    """(final latents, pixels) from our engine; latents via the per-step callback."""
    seen = []
    result = engine.generate(GenerationRequest(model=str(path), **req_kw), on_step=lambda e: seen.append(e.latents))
    pixels = np.asarray(Image.open(io.BytesIO(result.images[0].png)).convert("RGB")).astype(np.float64)
    return seen[-1], pixels


def _theirs(pipe_cls, path, config, req_kw, v_prediction=False, prepare=None, **extra):
    """(final latents, pixels) from diffusers' pipeline on the same file, scheduler and seed; `prepare(pipe)`
    may patch the pipeline first (tests/test_token_merging.py: tomesd, as the webui applies it)."""
    import torch

    from darkroom.models.configs import scheduler_config

    pipe = pipe_cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32)
    if prepare is not None:
        prepare(pipe)
    spec, schedule = samplers.resolve(req_kw["sampler"], "Automatic")
    tok = pipe.tokenizer or pipe.tokenizer_2
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    results = []
    for output_type in ("latent", "np"):
        pipe.scheduler = samplers.make_scheduler(spec, schedule, scheduler_config(v_prediction), seed=req_kw["seed"])
        results.append(pipe(
            prompt=req_kw["prompt"], negative_prompt=req_kw["negative_prompt"] or None, height=req_kw["height"],
            width=req_kw["width"], num_inference_steps=req_kw["steps"], guidance_scale=req_kw["cfg_scale"],
            generator=[torch.Generator("cpu").manual_seed(req_kw["seed"])], output_type=output_type, **extra,
        ).images)
    return results[0], results[1][0].astype(np.float64) * 255.0


CASES = [
    ("sd1", "StableDiffusionPipeline", "Euler a", False),
    ("sd1", "StableDiffusionPipeline", "DPM++ 2M", False),
    ("sd2", "StableDiffusionPipeline", "DDIM", False),
    ("sd2-v", "StableDiffusionPipeline", "Euler", True),
    ("sdxl", "StableDiffusionXLPipeline", "Euler a", False),
]


@pytest.mark.parametrize("variant,pipeline,sampler,v_pred", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_matches_diffusers(engine, tiny_model, tmp_path, variant, pipeline, sampler, v_pred):
    import diffusers

    info = tiny_model(variant)
    family = info["family"]
    config = _config_folder(tmp_path, family, v_prediction=v_pred)
    req_kw = dict(prompt="a small red circle above a blue square", negative_prompt="" if family == "sdxl" else "ugly",
                  steps=6, cfg_scale=6.0, seed=1234, width=64, height=64, sampler=sampler)
    our_latents, ours = _ours(engine, info["path"], req_kw)
    their_latents, theirs = _theirs(getattr(diffusers, pipeline), info["path"], config, req_kw, v_prediction=v_pred)
    assert our_latents.shape == their_latents.shape
    latent_diff = (our_latents - their_latents).abs().max().item()
    assert latent_diff < 1e-4 * max(1.0, their_latents.abs().max().item()), f"latents differ by {latent_diff}"
    diff = np.abs(ours - theirs)
    assert ours.std() > 2.0
    # ours is rounded to uint8 and theirs is float: 0.5 plus float noise
    assert diff.max() <= 1.5, f"max pixel difference {diff.max():.2f}, mean {diff.mean():.3f}"
    shutil.rmtree(config)
