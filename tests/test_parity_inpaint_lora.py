"""Inpainting and LoRA against diffusers' own implementations, on the same tiny weights and seed.

Inpainting: diffusers' StableDiffusionInpaintPipeline loads the same single file
(`from_single_file(config=<weight-free folder>)`) and is handed our init latents as a
4-channel `image` (and, for a 9-channel model, our `masked_image_latents`), so it skips its
own VAE encoding: diffusers encodes with a *sample* of the latent distribution drawn from
the sampling generator (which would also shift the noise), where we take the distribution's
mode (deterministic, seed-independent). What is compared is everything after
encoding: the latent mask, the noise, the start point at `strength`, the per-step blend of
the noised source outside the mask (4-channel) or the mask + masked-image channels
(9-channel), CFG and the scheduler. The mask is a hard rectangle with its edges on 8-pixel
boundaries, so whole latent cells for the real VAEs' factor 8 and the tiny VAE's 2: we
downsample the (blurred) mask with PIL's bilinear filter and round, diffusers binarises it
at full size and takes the nearest pixel (the webui rounds after PIL's default, bicubic,
resize for the blend, and takes the nearest pixel of the rounded mask for a 9-channel
model's mask channel); only on cell-aligned hard edges are all of these exactly the same.
Strength stays below 1: there diffusers starts from pure noise x init_noise_sigma where we
(and the webui) use add_noise.

LoRA: diffusers (with peft) loads the same kohya / PEFT file with `load_lora_weights`, fuses
it with `fuse_lora(lora_scale=w)` and unloads the LoRA layers; every UNet and text-encoder
weight must equal what our `apply_loras` merged, and a whole generation with
`<lora:name:w>` in the prompt must land on diffusers' latents.
"""

from __future__ import annotations

import io
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw

from darkroom.engine import samplers
from darkroom.engine.generate import Engine
from darkroom.engine.lora import LoraFile, apply_loras, extract_lora_tags
from darkroom.home import Home
from darkroom.models.configs import scheduler_config
from darkroom.request import GenerationRequest
from darkroom.testing.tiny_lora import write_tiny_lora

SEED = 1234
GEN = dict(steps=6, cfg_scale=5.0, seed=SEED, sampler="Euler", negative_prompt="ugly")
MASK_BOX = (8, 16, 39, 47)  # x 8..39, y 16..47: whole 8-pixel cells (and whole cells of any smaller factor)
LORA_WEIGHT = 0.7
ATOL_LATENTS = 1e-4
ATOL_WEIGHTS = 1e-5


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _scene(size: int = 64) -> Image.Image:
    image = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(200, 30, 30))
    draw.rectangle((0, 0, size // 3, size // 5), fill=(20, 40, 200))
    return image


def _mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(MASK_BOX, fill=255)
    return mask


def _config_folder(root, family: str, inpainting: bool = False):
    """The tiny model as a diffusers folder with its configs and tokenizer only (no weights)."""
    from darkroom.testing.tiny import save_diffusers_folder

    folder = save_diffusers_folder(root, family, seed=1, inpainting=inpainting)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return folder


def _pipeline(pipe_cls, path, config):
    return pipe_cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32,
                                     safety_checker=None, requires_safety_checker=False)


def _scheduler():
    spec, schedule = samplers.resolve(GEN["sampler"], "Automatic")
    return samplers.make_scheduler(spec, schedule, scheduler_config(False), seed=SEED)


@pytest.fixture(scope="module")
def parity(tmp_path_factory, tiny_model, engine_factory):
    """An engine over a home with the tiny SD1 models, and their weight-free diffusers config folders."""
    root = tmp_path_factory.mktemp("parity")
    home = Home(root / "home").ensure()
    for variant in ("sd1", "sd1-inpainting"):
        shutil.copy(tiny_model(variant)["path"], home.checkpoints)
    return SimpleNamespace(
        home=home, engine=engine_factory(home), root=root,
        configs={"tiny-sd1": _config_folder(root / "cfg-sd1", "sd1"),
                 "tiny-sd1-inpainting": _config_folder(root / "cfg-sd1-inpainting", "sd1", inpainting=True)},
        paths={"tiny-sd1": tiny_model("sd1")["path"], "tiny-sd1-inpainting": tiny_model("sd1-inpainting")["path"]},
    )


def _ours(engine, req: GenerationRequest) -> torch.Tensor:
    """Final latents (for a 4-channel model with a mask, after the last step's blend)."""
    seen = []
    engine.generate(req, on_step=lambda e: seen.append(e.latents.clone()))
    assert len(seen) == (int(req.steps * req.denoising_strength) if req.init_image is not None else req.steps)
    return seen[-1]


# --------------------------------------------------------------------------- inpainting


def _inpaint_theirs(parity, model: str, init, prompt: str, strength: float) -> torch.Tensor:
    import diffusers

    pipe = _pipeline(diffusers.StableDiffusionInpaintPipeline, parity.paths[model], parity.configs[model])
    pipe.scheduler = _scheduler()
    # the pipeline would multiply the (latent) `image` by the pixel-sized mask to make the masked image,
    # so it always needs `masked_image_latents` with latent input; a 4-channel UNet never reads them
    masked = init.masked_image_latents if init.masked_image_latents is not None else init.latents * (1 - init.mask)
    return pipe(prompt=prompt, negative_prompt=GEN["negative_prompt"], image=init.latents, mask_image=_mask(),
                height=64, width=64, strength=strength, num_inference_steps=GEN["steps"],
                guidance_scale=GEN["cfg_scale"], generator=[torch.Generator("cpu").manual_seed(SEED)],
                output_type="latent", masked_image_latents=masked).images


@pytest.mark.parametrize("model", ["tiny-sd1", "tiny-sd1-inpainting"])
def test_inpainting_matches_diffusers(parity, model):
    """Hard cell-aligned mask, original content, strength 0.75: our final latents are diffusers'."""
    req = GenerationRequest(model=model, prompt="a small red circle", init_image=_png(_scene()), mask=_png(_mask()),
                            mask_blur=0, inpainting_fill=1, denoising_strength=0.75, **GEN)
    ours = _ours(parity.engine, req)

    # the init latents (and for 9 channels the masked-image latents) exactly as the engine builds them
    loaded = parity.engine.load(req)
    fitted, source = Engine._fit(loaded, req)
    init = Engine._init(loaded, fitted, source)
    f = loaded.vae_scale_factor  # 2 for the tiny VAE (8 for real ones): the box is on 8-pixel cells either way
    x1, y1, x2, y2 = MASK_BOX
    expected_mask = torch.zeros(64 // f, 64 // f)
    expected_mask[y1 // f:(y2 + 1) // f, x1 // f:(x2 + 1) // f] = 1
    assert torch.equal(init.mask[0, 0].cpu(), expected_mask)  # the rectangle, cell for cell
    assert (init.masked_image_latents is not None) == (loaded.unet.config.in_channels == 9)

    theirs = _inpaint_theirs(parity, model, init, req.prompt, 0.75)
    assert ours.shape == theirs.shape == (1, 4, 64 // f, 64 // f)
    diff = (ours - theirs).abs().max().item()
    assert diff < ATOL_LATENTS * max(1.0, theirs.abs().max().item()), f"{model}: latents differ by {diff}"
    outside = (1 - init.mask).bool().expand_as(ours)
    if loaded.unet.config.in_channels == 4:
        # the last blend puts back the un-noised source outside the mask, on both sides
        assert torch.equal(ours[outside], init.latents[outside])
    # inside the mask something was repainted (the comparison is not of two copies of the source)
    assert (ours - init.latents).abs()[~outside].mean() > 0.05


# --------------------------------------------------------------------------- LoRA


def _weights(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every UNet and text-encoder tensor, text-encoder names without transformers' `text_model.` level."""
    out = {f"unet.{k}": v.detach().clone() for k, v in unet.state_dict().items()}
    out |= {f"te.{k.removeprefix('text_model.')}": v.detach().clone() for k, v in text_encoder.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def base_pipeline(parity):
    import diffusers

    pytest.importorskip("peft", reason="diffusers loads LoRAs through peft (requirements-dev.txt pins it)")
    return _pipeline(diffusers.StableDiffusionPipeline, parity.paths["tiny-sd1"], parity.configs["tiny-sd1"])


def _with_full_adapter_config(written: dict) -> None:
    """Rewrite a PEFT file's `lora_adapter_metadata` as diffusers' `save_lora_weights` writes it.

    diffusers builds `LoraConfig(**metadata)` from that key when it is there, so it needs the
    whole config (target_modules included); write_tiny_lora stores only r and lora_alpha, which
    our loader needs and diffusers cannot use alone.
    """
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    path, alpha = written["path"], next(iter(written["modules"].values()))["alpha"]
    doc = {}
    for component, prefix in (("unet", "unet"), ("te1", "text_encoder")):
        targets = sorted(p for c, p in written["modules"] if c == component)
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=targets).to_dict()
        doc |= {f"{prefix}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={**written["metadata"], "lora_adapter_metadata": json.dumps(doc)})


# kohya with .alpha tensors; PEFT with alpha 2 in diffusers' full adapter metadata; PEFT without
# any metadata (both sides then use scale 1, i.e. alpha = rank)
LORA_CASES = [("kohya", 2.0), ("peft", 2.0), ("peft", None)]


@pytest.mark.parametrize("fmt,alpha", LORA_CASES, ids=["kohya", "peft", "peft-no-alpha"])
def test_lora_matches_diffusers(parity, tiny_model, base_pipeline, fmt, alpha):
    """A kohya / PEFT LoRA (rank 4; UNet incl. convolutions, and text encoder) at weight 0.7."""
    import copy

    name = f"tiny-{fmt}-{alpha}-lora"
    lora_path = parity.home.loras / f"{name}.safetensors"
    written = write_tiny_lora(lora_path, tiny_model("sd1"), fmt=fmt, alpha=alpha, seed=3, strength=0.2)
    if fmt == "peft" and alpha is not None:
        _with_full_adapter_config(written)
    components = {c for c, _ in written["modules"]}
    assert components == {"unet", "te1"}

    # (a) ours: merge, read every weight, restore
    model = parity.engine.load(GenerationRequest(model="tiny-sd1"))
    base = _weights(model.unet, model.text_encoders[0].model)
    with apply_loras(model, [(LoraFile(lora_path), LORA_WEIGHT)]):
        ours = _weights(model.unet, model.text_encoders[0].model)
    assert all(torch.equal(v, base[k]) for k, v in _weights(model.unet, model.text_encoders[0].model).items())

    # (b) diffusers: load, fuse at the same scale, drop the LoRA layers (the fused weights stay)
    pipe = copy.deepcopy(base_pipeline)
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name, adapter_name="tiny")
    pipe.fuse_lora(lora_scale=LORA_WEIGHT)
    pipe.unload_lora_weights()
    theirs = _weights(pipe.unet, pipe.text_encoder)

    assert theirs.keys() == ours.keys()
    changed_ours = {k for k in ours if not torch.equal(ours[k], base[k])}
    changed_theirs = {k for k in theirs if not torch.equal(theirs[k], base[k])}
    # one weight per LoRA module, nothing else (no bias, no norm)
    assert len(changed_ours) == len(written["modules"]) and changed_ours == changed_theirs
    assert any(k.startswith("te.") for k in changed_ours) and any(ours[k].dim() == 4 for k in changed_ours)
    bad = {k: (ours[k] - theirs[k]).abs().max().item() for k in ours
           if not torch.allclose(ours[k], theirs[k], rtol=0, atol=ATOL_WEIGHTS)}
    assert not bad, f"{len(bad)} weights differ, e.g. {sorted(bad.items(), key=lambda kv: -kv[1])[:3]}"
    # the LoRA does matter at this tolerance: merged minus base is well above it
    assert max((ours[k] - base[k]).abs().max().item() for k in changed_ours) > 100 * ATOL_WEIGHTS

    # a whole generation: <lora:name:0.7> in our prompt vs the pipeline with the fused LoRA
    prompt = f"a small red circle above a blue square <lora:{name}:{LORA_WEIGHT}>"
    req = GenerationRequest(model="tiny-sd1", prompt=prompt, width=64, height=64, **GEN)
    our_latents = _ours(parity.engine, req)
    pipe.scheduler = _scheduler()
    their_latents = pipe(prompt=extract_lora_tags(prompt)[0], negative_prompt=GEN["negative_prompt"], height=64,
                         width=64, num_inference_steps=GEN["steps"], guidance_scale=GEN["cfg_scale"],
                         generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="latent").images
    diff = (our_latents - their_latents).abs().max().item()
    assert diff < ATOL_LATENTS * max(1.0, their_latents.abs().max().item()), f"latents differ by {diff}"
    # and without the LoRA the latents are clearly elsewhere (the LoRA is in both runs, not in neither)
    plain = _ours(parity.engine, req.model_copy(update={"prompt": extract_lora_tags(prompt)[0]}))
    assert (plain - their_latents).abs().max().item() > 100 * ATOL_LATENTS
