"""Where big tensors' memory comes from (darkroom.engine.memory.keep_large_allocations): glibc's heap,
kept for reuse, on every thread, unless a phase without room to spare asks for glibc's own thresholds.

Each check runs in a fresh Python process (the allocator's settings are process-wide) and reads
glibc's own counters (mallinfo2: `arena` = heap bytes, `hblkhd` = bytes in mmapped blocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from darkroom.engine import memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                                reason="glibc only")

CHILD = textwrap.dedent("""
    import ctypes, json, sys, threading
    import torch
    from darkroom.engine import memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    MIB = 1 << 20

    def mmapped_mib(make):
        before = libc.mallinfo2().hblkhd
        box = []
        make(box)
        return (libc.mallinfo2().hblkhd - before) / MIB

    def big(box, mib=96):
        box.append(torch.empty(mib * MIB, dtype=torch.uint8).fill_(1))

    def big_on_a_thread(box):
        t = threading.Thread(target=big, args=(box,))
        t.start()
        t.join()

    out = {"applied": memory.keep_large_allocations() if sys.argv[1] == "keep" else None}
    out["main"] = mmapped_mib(big)
    out["thread"] = mmapped_mib(big_on_a_thread)
    with memory.lean_allocations():  # larger than the freed blocks the heap holds now
        out["lean"] = mmapped_mib(lambda box: big(box, 160))
    out["after_lean"] = mmapped_mib(big)
    print(json.dumps(out))
""")


def _child(mode: str, **env: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_big_blocks_come_from_the_heap_on_every_thread_except_in_a_lean_phase():
    kept = _child("keep")
    assert kept["applied"] is True
    assert kept["main"] < 1 and kept["thread"] < 1  # from the (one, shared) heap: reused after a free
    assert kept["lean"] >= 160  # glibc's thresholds inside lean_allocations: its own mmap, unmapped on free
    assert kept["after_lean"] < 1  # and the heap again afterwards


def test_glibc_defaults_without_the_setting_or_when_the_user_asks_for_them():
    plain = _child("plain")
    assert plain["applied"] is None and plain["main"] >= 96 and plain["thread"] >= 96
    refused = _child("keep", DARKROOM_MALLOC="default")
    assert refused["applied"] is False and refused["main"] >= 96 and refused["lean"] >= 160


def test_the_vae_returns_freed_memory_where_its_maps_change_size(tiny_model, monkeypatch):
    """The encode and decode keep freed blocks (faster) but trim the heap first, then before each down- or
    upsampler and each resnet with a big input, so the holes they keep do not add to the peak."""
    import torch

    from darkroom.engine import vae_bands, vae_tiling
    from darkroom.models.loader import LoadOptions, load_checkpoint

    seen = []
    monkeypatch.setattr(memory, "lean_allocations", lambda *a: pytest.fail("the VAE no longer runs lean"))
    monkeypatch.setattr(memory, "return_freed_memory", lambda: seen.append("trim"))
    model = load_checkpoint(tiny_model("sd1")["path"], LoadOptions(device=torch.device("cpu"), dtype=torch.float32))
    vae = model.vae
    upsamplers = sum(len(b.upsamplers or ()) for b in vae.decoder.up_blocks)
    downsamplers = sum(len(b.downsamplers or ()) for b in vae.encoder.down_blocks)
    resnets = sum(len(b.resnets) for b in vae.decoder.up_blocks)
    assert upsamplers >= 1 and downsamplers >= 1
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae_tiling.encode(model, pixels)
        assert seen == ["trim"] * (1 + downsamplers)  # the previous phase's heap, then before each downsampler
        torch.testing.assert_close(latents / vae.config.scaling_factor, vae.encode(pixels).latent_dist.mode())
        seen.clear()
        plain = vae.decode(latents / vae.config.scaling_factor).sample
        assert seen == []
        out = vae_tiling.decode(model, latents)
        assert seen == ["trim"] * (1 + upsamplers)  # the sampling's heap, then before each upsampler
        torch.testing.assert_close(out, plain.float(), rtol=0, atol=0)
        seen.clear()
        monkeypatch.setattr(vae_bands, "BIG_BYTES", 1)  # every resnet's input counts as big now
        vae_tiling.decode(model, latents)
        assert seen == ["trim"] * (1 + upsamplers + resnets)
        seen.clear()
        vae.decode(latents)  # the hooks are gone after the call
        vae.encode(pixels)
        assert seen == []
