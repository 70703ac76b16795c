"""Scheduled prompts through the engine: which conditioning the UNet sees at each step, and AND."""

from __future__ import annotations

import shutil

import pytest
import torch

from darkroom.home import Home
from darkroom.request import GenerationRequest
from darkroom.text.conditioning import PromptEncoder

BASE = dict(steps=10, width=32, height=32, seed=3, sampler="Euler", cfg_scale=5.0, negative_prompt="ugly")


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_model, engine_factory):
    home = Home(tmp_path_factory.mktemp("schedule-home")).ensure()
    shutil.copy(tiny_model("sd1")["path"], home.checkpoints / "tiny.safetensors")
    return engine_factory(home)


def contexts_seen(engine, prompt: str, **kw) -> tuple[list[torch.Tensor], object]:
    """Every encoder_hidden_states the UNet was called with, and the result."""
    model = engine.load(GenerationRequest())
    seen: list[torch.Tensor] = []
    hook = model.unet.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        result = engine.generate(GenerationRequest(prompt=prompt, **{**BASE, **kw}))
    finally:
        hook.remove()
    return seen, result


def encode(engine, text: str) -> torch.Tensor:
    return PromptEncoder(engine.load(GenerationRequest())).encode(text).context


def test_prompt_editing_switches_at_the_webuis_step(sd1):
    seen, result = contexts_seen(sd1, "[a red circle:a blue square:0.5]")
    a, b, neg = encode(sd1, "a red circle"), encode(sd1, "a blue square"), encode(sd1, "ugly")
    assert len(seen) == 10
    for step, ctx in enumerate(seen):
        assert torch.equal(ctx[0:1], neg)
        expected = a if step <= 5 else b  # int(0.5 * 10) = 5: steps 0..5 take "from", as in the webui
        assert torch.equal(ctx[1:2], expected), step
    assert "[a red circle:a blue square:0.5]" in result.images[0].infotext  # recorded as typed


def test_alternation_and_scheduled_negative(sd1):
    seen, _ = contexts_seen(sd1, "a [red|blue] circle", negative_prompt="[ugly::3]")
    red, blue = encode(sd1, "a red circle"), encode(sd1, "a blue circle")
    ugly, empty = encode(sd1, "ugly"), encode(sd1, "")
    for step, ctx in enumerate(seen):
        # the webui's alternation entries end at steps 1, 2, 3, ... and its 0-based step counter
        # compares with <=, so steps 0 and 1 both take the first: red, red, blue, red, blue, ...
        assert torch.equal(ctx[1:2], red if step == 0 or step % 2 == 1 else blue), step
        assert torch.equal(ctx[0:1], ugly if step <= 3 else empty), step


def test_and_composes_with_weights(sd1):
    seen, composed = contexts_seen(sd1, "a red circle :1.2 AND a blue square :0.8")
    assert all(ctx.shape[0] == 3 for ctx in seen)  # uncond + two parts in one UNet batch
    assert torch.equal(seen[0][1:2], encode(sd1, "a red circle"))
    assert torch.equal(seen[0][2:3], encode(sd1, "a blue square"))
    _, plain = contexts_seen(sd1, "a red circle")
    _, zero = contexts_seen(sd1, "a red circle :1 AND a blue square :0")
    assert composed.images[0].png != plain.images[0].png
    # a part of weight 0 adds nothing: the picture is the plain prompt's (up to batching arithmetic)
    import io

    import numpy as np
    from PIL import Image

    def px(r):
        return np.asarray(Image.open(io.BytesIO(r.images[0].png))).astype(int)

    assert np.abs(px(zero) - px(plain)).max() <= 1


def test_plain_prompts_encode_once(sd1, monkeypatch):
    calls: list[str] = []
    original = PromptEncoder.encode

    def counting(self, prompt, **kw):
        calls.append(prompt)
        return original(self, prompt, **kw)

    monkeypatch.setattr(PromptEncoder, "encode", counting)
    sd1.generate(GenerationRequest(prompt="a red circle", **BASE))
    assert sorted(calls) == ["a red circle", "ugly"]
