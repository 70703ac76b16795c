"""darkroom/engine/vae_bands.py: the decoder's big layers a band of rows at a time give the same pixels."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKL

from darkroom.engine import conv_epilogue, speed, vae_bands


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        norm_num_groups=16)
    for p in vae.parameters():  # far from the init's near-identity, so a wrong row or statistic shows
        p.data.normal_(0, 0.2)
    return vae.eval()


def _decode(vae: AutoencoderKL, z: torch.Tensor, dtype: torch.dtype, *, banded: bool, channels_last: bool = True,
            monkeypatch=None) -> torch.Tensor:
    vae = copy.deepcopy(vae).to(dtype)
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    speed.optimize_module(vae, channels_last=channels_last)
    assert vae_bands.install(vae) > 0
    monkeypatch.setattr(vae_bands, "BIG_BYTES", 1 if banded else 1 << 60)
    monkeypatch.setattr(vae_bands, "BAND_BYTES", 3000)  # a few rows a band: many band edges
    with torch.inference_mode():
        return vae.decode(z.to(dtype)).sample.float()


@pytest.mark.parametrize("channels_last", [True, False])
def test_banded_decode_equals_the_whole_decode(monkeypatch, channels_last):
    vae, z = _vae(), torch.randn(2, 4, 13, 10)  # batch 2, odd sizes: bands of unequal heights
    calls = []
    real = vae_bands.norm_act_conv
    monkeypatch.setattr(vae_bands, "norm_act_conv", lambda *a, **k: calls.append(1) or real(*a, **k))
    whole = _decode(vae, z, torch.float32, banded=False, channels_last=channels_last, monkeypatch=monkeypatch)
    assert calls == []
    banded = _decode(vae, z, torch.float32, banded=True, channels_last=channels_last, monkeypatch=monkeypatch)
    assert len(calls) > 20  # every resnet (two norms each) and the tail went through bands
    assert whole.abs().mean() > 0.1
    assert (banded - whole).abs().max() < 1e-4


def test_banded_bf16_is_as_close_to_fp32_as_the_whole_bf16_decode(monkeypatch):
    vae, z = _vae(), torch.randn(1, 4, 12, 12)
    reference = _decode(vae, z, torch.float32, banded=False, monkeypatch=monkeypatch)
    whole = (_decode(vae, z, torch.bfloat16, banded=False, monkeypatch=monkeypatch) - reference).abs().mean()
    banded = (_decode(vae, z, torch.bfloat16, banded=True, monkeypatch=monkeypatch) - reference).abs().mean()
    assert banded < whole * 1.1


@pytest.mark.skipif(not conv_epilogue.available(), reason="this torch build has no oneDNN conv epilogues")
@pytest.mark.parametrize("batch", [1, 2])  # 2: a band of the input is a strided view, not a block
def test_banded_bf16_adds_the_residual_in_the_conv_epilogue(monkeypatch, batch):
    """Each inner band's conv2 runs unpadded across its halo rows and takes its rows' residual in its
    epilogue: the fused op runs, and the decode stays within bf16 rounding of the whole bf16 decode (a
    misaligned residual would not)."""
    vae, z = _vae(), torch.randn(batch, 4, 12, 12)
    whole = _decode(vae, z, torch.bfloat16, banded=False, monkeypatch=monkeypatch)
    with torch.profiler.profile() as prof:
        banded = _decode(vae, z, torch.bfloat16, banded=True, monkeypatch=monkeypatch)
    assert "mkldnn::_convolution_pointwise" in {e.key for e in prof.key_averages()}
    assert (banded - whole).abs().mean() < 0.02 * whole.abs().mean()


def test_a_wrong_band_edge_would_show(monkeypatch):
    """The comparison above can fail: a conv that loses its halo row changes the picture."""
    vae, z = _vae(), torch.randn(1, 4, 12, 12)
    whole = _decode(vae, z, torch.float32, banded=False, monkeypatch=monkeypatch)
    real = vae_bands._conv_rows
    monkeypatch.setattr(vae_bands, "_conv_rows", lambda band, conv, lo, top, bottom:
                        real(band, conv, top, top, bottom))  # as if the band started at its first kept row
    broken = _decode(vae, z, torch.float32, banded=True, monkeypatch=monkeypatch)
    assert (broken - whole).abs().max() > 1e-2


def test_small_inputs_and_training_take_diffusers_forward(monkeypatch):
    x = torch.randn(1, 8, 16, 16)
    with torch.no_grad():
        assert not vae_bands.big(x)
        assert not vae_bands.big(x, growth=4)
        monkeypatch.setattr(vae_bands, "BIG_BYTES", 8 * 16 * 16 * 4 * 4)
        assert not vae_bands.big(x) and vae_bands.big(x, growth=4)
    assert not vae_bands.big(x, growth=4)  # with autograd on (training), diffusers' own forward
