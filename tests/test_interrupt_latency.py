"""Interrupt and Skip answer inside a model call: at most one more block runs after they are set.

A tiny model is made deliberately slow: a forward hook on one block (the UNet's mid block, or a
whole VAE decoder call = one tile) waits, 10 ms at a time, until the test's cancel or skip event
is set, as a block that takes very long would; a global pre-hook counts the blocks (checkpointed
units) entered while the event is set. No timing is asserted; waits end on events, with a
multi-minute guard only against hangs.
"""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from darkroom.engine.interrupt import UNIT_TYPES
from darkroom.home import Home
from darkroom.request import GenerationRequest
from darkroom.testing.ldm_export import vae_to_ldm
from darkroom.testing.tiny_lora import write_tiny_lora

HANG_GUARD = 300.0  # seconds; only stops a hung test
REQ = GenerationRequest(prompt="a red circle <lora:style:1>", steps=2, width=64, height=64, seed=10, sampler="Euler",
                        cfg_scale=5.0, n_iter=3, vae="alt")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model, engine_factory):
    """An engine over the tiny SD1 model with a LoRA and a separate VAE in its folders."""
    home = Home(tmp_path_factory.mktemp("interrupt-home")).ensure()
    info = tiny_model("sd1")
    shutil.copy(info["path"], home.checkpoints / "tiny.safetensors")
    write_tiny_lora(home.loras / "style.safetensors", info)
    g = torch.Generator().manual_seed(5)
    alt = {k: (v + torch.randn(v.shape, generator=g) * 0.05 if k.startswith("decoder.") else v)
           for k, v in info["state_dicts"]["vae"].items()}
    save_file({k: v.contiguous() for k, v in vae_to_ldm(alt, "").items()}, str(home.vae / "alt.safetensors"))
    engine = engine_factory(home)
    model = engine.load(REQ)
    return SimpleNamespace(engine=engine, model=model)


def snapshot(model) -> dict[str, torch.Tensor]:
    parts = {"unet": model.unet, "vae": model.vae, **{f"te{i}": s.model for i, s in enumerate(model.text_encoders)}}
    return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}


def assert_restored(model, saved: dict[str, torch.Tensor], vae) -> None:
    assert model.vae is vae  # the separate VAE swapped back out
    now = snapshot(model)
    assert now.keys() == saved.keys()
    changed = [k for k, v in now.items() if not torch.equal(v, saved[k])]
    assert not changed, f"{len(changed)} tensors differ (LoRA not unmerged?), e.g. {changed[:3]}"


@contextmanager
def slow_block(module_type: str, stall_at: int, until: threading.Event):
    """The `stall_at`-th call (1-based) of any module of class `module_type` waits until `until` is set;
    yields (stalled event, counter of units entered while `until` is set)."""
    stalled = threading.Event()
    seen = {"calls": 0, "after": 0}

    def slow(module, args, output):
        if type(module).__name__ != module_type:
            return
        seen["calls"] += 1
        if seen["calls"] == stall_at:
            stalled.set()
            deadline = time.monotonic() + HANG_GUARD
            while not until.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)

    def count(module, args):
        if until.is_set() and type(module).__name__ in UNIT_TYPES:
            seen["after"] += 1

    handles = [torch.nn.modules.module.register_module_forward_hook(slow),
               torch.nn.modules.module.register_module_forward_pre_hook(count)]
    try:
        yield stalled, seen
    finally:
        for h in handles:
            h.remove()


def run_in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed to the test thread)
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def finish(thread, box):
    thread.join(HANG_GUARD)
    assert not thread.is_alive(), "generate did not return"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_interrupt_mid_step_keeps_earlier_batches_and_restores_weights(setup):
    engine, model = setup.engine, setup.model
    saved, vae = snapshot(model), model.vae
    cancel = threading.Event()
    # batch 0: mid-block calls 1, 2 (two steps, cond and uncond batched); batch 1 stalls in its first step
    with slow_block("UNetMidBlock2DCrossAttn", 3, cancel) as (stalled, seen):
        thread, box = run_in_thread(lambda: engine.generate(REQ, cancel=cancel))
        assert stalled.wait(HANG_GUARD)
        t0 = time.perf_counter()
        cancel.set()
        result = finish(thread, box)
        print(f"interrupt answered in {time.perf_counter() - t0:.3f}s (not asserted)")
    assert seen["after"] <= 1, f"{seen['after']} blocks ran after Interrupt"
    assert result.interrupted
    assert [im.seed for im in result.images] == [10]  # batch 0 kept, batch 1 dropped mid-step
    assert_restored(model, saved, vae)


def test_skip_mid_step_abandons_only_the_current_batch(setup):
    engine, model = setup.engine, setup.model
    saved, vae = snapshot(model), model.vae
    skip = threading.Event()
    with slow_block("UNetMidBlock2DCrossAttn", 3, skip) as (stalled, seen):
        thread, box = run_in_thread(lambda: engine.generate(REQ, skip=skip))
        assert stalled.wait(HANG_GUARD)
        skip.set()
        result = finish(thread, box)
    assert seen["after"] <= 1, f"{seen['after']} blocks ran after Skip"
    assert not result.interrupted and not skip.is_set()
    assert [im.seed for im in result.images] == [10, 12]  # batch 1 abandoned, batch 2 ran
    assert_restored(model, saved, vae)


def test_interrupt_between_tiles_of_a_tiled_decode(setup):
    engine, model = setup.engine, setup.model
    saved, vae = snapshot(model), model.vae
    req = REQ.model_copy(update={"width": 128, "height": 128, "n_iter": 2, "steps": 1})
    cancel = threading.Event()
    engine.vae_tiling, engine.vae_tile_pixels = "always", 64  # 3x3 tiles of 32 latent cells
    try:
        # batch 0's decode: Decoder calls 1-9; batch 1's second tile stalls
        with slow_block("Decoder", 11, cancel) as (stalled, seen):
            thread, box = run_in_thread(lambda: engine.generate(req, cancel=cancel))
            assert stalled.wait(HANG_GUARD)
            cancel.set()
            result = finish(thread, box)
    finally:
        engine.vae_tiling, engine.vae_tile_pixels = "auto", 512
    assert seen["calls"] == 11  # no tile decoded after the interrupt
    assert seen["after"] <= 1
    assert result.interrupted and [im.seed for im in result.images] == [10]
    assert_restored(model, saved, vae)
    assert not vae.use_tiling


def test_server_job_ends_interrupted_mid_step(studio, api):
    from tests.server_util import FAST, wait_job

    model = studio.engine.load(GenerationRequest(**FAST))
    assert model is studio.engine.load(GenerationRequest(**FAST))  # the cached model the job will run
    release = threading.Event()  # set by the hook once the job's cancel is seen, or by the guard
    state = {"job": None}

    def until_cancelled():
        deadline = time.monotonic() + HANG_GUARD
        while time.monotonic() < deadline:
            job = state["job"]
            if job is not None and job.cancel.is_set():
                break
            time.sleep(0.01)
        release.set()

    stalled = threading.Event()

    def slow(module, args, output):
        if not stalled.is_set():
            stalled.set()
            until_cancelled()

    handle = model.unet.mid_block.register_forward_hook(slow)
    try:
        r = api.post("/api/jobs", json={"prompt": "a red circle", **FAST, "steps": 5})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        state["job"] = studio.queue.get(job_id)
        assert stalled.wait(HANG_GUARD)
        assert api.post(f"/api/jobs/{job_id}/interrupt").status_code == 200
        done = wait_job(api, job_id)
    finally:
        handle.remove()
    assert done["state"] == "interrupted" and done["images"] == []
    assert state["job"].steps_done == 0  # stopped inside its first step
