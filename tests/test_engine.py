"""Generation contracts on tiny models of every family: loads, determinism, batches, samplers."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from darkroom.engine.samplers import SAMPLERS
from darkroom.request import GenerationRequest
from tests.conftest import VARIANTS


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB")).astype(np.int16)


def small(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle", negative_prompt="blurry", steps=3, width=64, height=64, seed=7,
                sampler="Euler", cfg_scale=5.0)
    base.update(kw)
    return GenerationRequest(**base)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_family_loads_and_generates(engine, tiny_model, variant):
    path = tiny_model(variant)["path"]
    result = engine.generate(small(model=str(path)))
    model = engine.cache.current
    family, opts = VARIANTS[variant]
    assert model.family.id == family
    assert model.detection.inpainting == bool(opts.get("inpainting"))
    assert model.v_prediction == bool(opts.get("v_prediction"))
    [image] = result.images
    px = pixels(image)
    assert px.shape == (64, 64, 3)
    assert px.std() > 1.0, "image is constant"
    assert "Steps: 3, Sampler: Euler, Schedule type: Uniform, CFG scale: 5, Seed: 7, Size: 64x64" in image.infotext


def test_weights_load_exactly(engine, tiny_model):
    """Every tensor our loader produced equals the model the file was written from."""
    for variant in ("sd1-old-te-ema", "sd2", "sdxl", "sdxl-refiner"):
        info = tiny_model(variant)
        engine.generate(small(model=str(info["path"]), steps=1))
        m = engine.cache.current
        names = ["text_encoder_2"] if variant == "sdxl-refiner" else ["text_encoder", "text_encoder_2"]
        names = names[: len(m.text_encoders)]
        modules = {"unet": m.unet, "vae": m.vae} | {n: s.model for n, s in zip(names, m.text_encoders, strict=True)}
        for name, module in modules.items():
            got = module.state_dict()
            for key, want in info["state_dicts"][name].items():
                assert torch.equal(got[key], want), f"{variant} {name} {key}"


def test_same_seed_is_bit_identical(engine, tiny_model):
    req = small(model=str(tiny_model("sd1")["path"]), sampler="Euler a")
    a, b = engine.generate(req), engine.generate(req)
    assert a.images[0].png == b.images[0].png
    c = engine.generate(req.model_copy(update={"seed": 8}))
    assert a.images[0].png != c.images[0].png


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_batch_equals_single_runs(engine, tiny_model, sampler):
    """A batch of N equals N single runs with seeds s, s+1, ... (within float reordering noise)."""
    model = str(tiny_model("sd1")["path"])
    batch = engine.generate(small(model=model, sampler=sampler, batch_size=3, seed=100))
    assert batch.seeds == [100, 101, 102]
    for i, seed in enumerate(batch.seeds):
        single = engine.generate(small(model=model, sampler=sampler, seed=seed))
        assert np.abs(pixels(single.images[0]) - pixels(batch.images[i])).max() <= 1
    counted = engine.generate(small(model=model, sampler=sampler, n_iter=2, seed=100))
    assert counted.seeds == [100, 101]
    assert np.abs(pixels(counted.images[1]) - pixels(batch.images[1])).max() <= 1


def test_random_seed_is_recorded(engine, tiny_model):
    result = engine.generate(small(model=str(tiny_model("sd1")["path"]), seed=-1))
    seed = result.seeds[0]
    assert 0 <= seed < 2**32 and f"Seed: {seed}," in result.images[0].infotext
    again = engine.generate(small(model=str(tiny_model("sd1")["path"]), seed=seed))
    assert again.images[0].png == result.images[0].png


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_every_sampler_makes_an_image(engine, tiny_model, spec, recwarn):
    result = engine.generate(small(model=str(tiny_model("sd1")["path"]), sampler=spec.name, steps=4))
    assert not [str(w.message) for w in recwarn if "ta>=t0" in str(w.message)]  # torchsde rounding noise
    px = pixels(result.images[0])
    assert np.isfinite(px).all() and px.std() > 1.0
    assert f"Sampler: {spec.name}," in result.images[0].infotext


def test_prompt_syntax_changes_conditioning(engine, tiny_model):
    from darkroom.text.conditioning import PromptEncoder

    engine.generate(small(model=str(tiny_model("sd1")["path"]), steps=1))
    enc = PromptEncoder(engine.cache.current)
    plain = enc.encode("a red circle").context
    weighted = enc.encode("a (red:1.5) circle").context
    assert plain.shape == weighted.shape == (1, 77, plain.shape[-1])
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(enc.encode(r"a \(red\) circle").context, enc.encode("a (red) circle").context) is False
    long = enc.encode(", ".join(["a red circle on a blue square"] * 20)).context
    assert long.shape[1] == 77 * 3
    broken = enc.encode("a red circle BREAK a blue square").context
    assert broken.shape[1] == 77 * 2
    skip2 = PromptEncoder(engine.cache.current, clip_skip=2).encode("a red circle").context
    assert not torch.allclose(plain, skip2)


def test_long_prompt_and_short_negative_generate(engine, tiny_model):
    for variant in ("sd1", "sd2", "sdxl"):
        req = small(model=str(tiny_model(variant)["path"]), prompt=", ".join(["a small red circle"] * 30),
                    negative_prompt="")
        assert pixels(engine.generate(req).images[0]).std() > 1.0


def test_interrupt_keeps_finished_images(engine, tiny_model):
    cancel = threading.Event()
    steps_seen = []

    def on_step(event):
        steps_seen.append((event.batch_index, event.step))
        if event.batch_index == 1 and event.step == 1:
            cancel.set()

    result = engine.generate(small(model=str(tiny_model("sd1")["path"]), n_iter=3), on_step=on_step, cancel=cancel)
    assert result.interrupted
    assert len(result.images) == 1
    assert steps_seen[:3] == [(0, 1), (0, 2), (0, 3)]


def test_model_cache_reuses_and_switches(engine, tiny_model):
    a = str(tiny_model("sd1")["path"])
    b = str(tiny_model("sd2")["path"])
    engine.generate(small(model=a, steps=1))
    first = engine.cache.current
    engine.generate(small(model=a, steps=1))
    assert engine.cache.current is first
    engine.generate(small(model=b, steps=1))
    assert engine.cache.current is not first and engine.cache.current.family.id == "sd2"


def test_diffusers_folder_loads(engine, tmp_path_factory):
    from darkroom.testing.tiny import save_diffusers_folder

    for family in ("sd1", "sdxl"):
        folder = save_diffusers_folder(tmp_path_factory.mktemp("diffusers") / f"tiny-{family}", family, seed=1)
        result = engine.generate(small(model=str(folder)))
        assert engine.cache.current.family.id == family
        assert pixels(result.images[0]).std() > 1.0


def test_infotext_round_trip_through_png(engine, tiny_model):
    """request -> PNG -> parsed parameters -> the same request."""
    from darkroom.metadata.images import read_image_metadata
    from darkroom.metadata.infotext import request_from_infotext

    req = small(model="tiny-x", prompt="a (red:1.2) circle,\nsecond line: detail", negative_prompt="blurry, dark",
                sampler="DPM++ 2M SDE", schedule="Karras", cfg_scale=6.5, seed=123, clip_skip=2, width=64, height=96)
    result = engine.generate(req.model_copy(update={"model": str(tiny_model("sd1")["path"])}))
    back = request_from_infotext(read_image_metadata(result.images[0].png).parameters)
    assert back.model_dump(exclude={"model"}) == req.model_dump(exclude={"model"})
    assert back.model == tiny_model("sd1")["path"].stem
