"""darkroom/engine/upsample_conv.py: nearest 2x + 3x3 conv as four 2x2 phase convolutions, same pixels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.upsampling import Upsample2D

from darkroom.engine import speed, upsample_conv, vae_bands


def _upsampler(channels: int, out_channels: int | None = None, dtype=torch.float32, bias: bool = True) -> Upsample2D:
    torch.manual_seed(0)
    up = Upsample2D(channels, use_conv=True, out_channels=out_channels)
    if not bias:
        up.conv.bias = None
    for p in up.parameters():
        p.data.normal_(0, 0.2)
    return up.to(dtype, memory_format=torch.channels_last).eval()


def _upsampled_conv(up: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    """What diffusers computes: the 2x nearest copy, then the 3x3 conv."""
    return up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@pytest.mark.parametrize(("channels", "out_channels", "height", "width", "bias"),
                         [(8, None, 33, 32, True), (6, 10, 32, 37, False), (4, 4, 1, 40, True)])
def test_phases_are_the_upsampled_conv_in_float32(channels, out_channels, height, width, bias):
    up = _upsampler(channels, out_channels, bias=bias)
    x = torch.randn(2, channels, height, width).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = _upsampled_conv(up, x)
        got = upsample_conv.forward(up, x)
    assert got.shape == expected.shape
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("rows_per_band", [1, 2, 3, 7])
@pytest.mark.parametrize("channels_last", [True, False])
def test_bands_of_rows_give_the_whole_map(rows_per_band, channels_last):
    """vae_bands calls `rows` on bands of input rows: first band, inner bands and last band, each with its
    halo row, give exactly the rows of the whole map (batch 2: a band is a strided view)."""
    up = _upsampler(8, 12)
    x = torch.randn(2, 8, 17, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    kernels = upsample_conv.kernel(up.conv)
    with torch.no_grad():
        whole = upsample_conv.rows(x, kernels, 0, 17, torch.empty(2, 12, 34, 22))
        banded = torch.full((2, 12, 34, 22), float("nan"))
        for first in range(0, 17, rows_per_band):
            last = min(17, first + rows_per_band)
            upsample_conv.rows(x, kernels, first, last, banded[:, :, 2 * first:2 * last])
        expected = _upsampled_conv(up, x)
    assert (whole - expected).abs().max() < 1e-5
    assert torch.equal(banded, whole)


def test_bf16_stays_within_rounding_of_the_upsampled_conv():
    """The summed taps are rounded to bf16 once more: a little further from float32 than diffusers' bf16
    layer, far from a wrong answer."""
    up32 = _upsampler(64)
    up16 = copy.deepcopy(up32).to(torch.bfloat16)
    x = torch.randn(1, 64, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        exact = _upsampled_conv(up32, x)
        assert upsample_conv.pays(up16, x.bfloat16())
        ours = (upsample_conv.forward(up16, x.bfloat16()).float() - exact).norm() / exact.norm()
        theirs = (_upsampled_conv(up16, x.bfloat16()).float() - exact).norm() / exact.norm()
    assert 0 < theirs < 4e-3
    assert ours < 2 * theirs


def test_weights_are_read_at_each_call():
    """A LoRA merged into the conv in place after the first call is followed."""
    up = _upsampler(4)
    x = torch.randn(1, 4, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = upsample_conv.forward(up, x)
        up.conv.weight.add_(0.1)
        after = upsample_conv.forward(up, x)
        assert (after - _upsampled_conv(up, x)).abs().max() < 1e-5
    assert (after - before).abs().max() > 0.1


def test_pays_only_where_measured_and_nothing_is_bypassed(monkeypatch):
    up = _upsampler(4)
    big = torch.randn(1, 4, 32, 32)
    with torch.no_grad():
        assert upsample_conv.pays(up, big)
        assert not upsample_conv.pays(up, torch.randn(1, 4, 16, 32))  # float32 pays from 32x32
        assert not upsample_conv.pays(copy.deepcopy(up).bfloat16(), big.bfloat16())  # bf16 from 96x96
        assert not upsample_conv.pays(copy.deepcopy(up).half(), big.half())
        hooked = copy.deepcopy(up)
        hooked.conv.register_forward_hook(lambda *a: None)
        assert not upsample_conv.pays(hooked, big)
        replaced = copy.deepcopy(up)
        replaced.conv.forward = lambda t: t  # an offload or an extension's forward
        assert not upsample_conv.pays(replaced, big)
        assert not upsample_conv.pays(Upsample2D(4, use_conv=False), big)
        assert not upsample_conv.pays(Upsample2D(4, use_conv_transpose=True), big)
    assert not upsample_conv.pays(up, big)  # autograd on: diffusers' forward


def _vae() -> AutoencoderKL:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                        norm_num_groups=8)
    for p in vae.parameters():
        p.data.normal_(0, 0.2)
    return vae.eval()


@pytest.mark.parametrize("banded", [False, True])
def test_a_decode_runs_its_upsamplers_as_phases(monkeypatch, banded):
    """Through vae_bands' upsampler forward (whole maps, and big maps in bands): no nearest-neighbour copy
    is made, and the pixels are diffusers' own."""
    vae, z = _vae(), torch.randn(1, 4, 16, 20)
    with torch.inference_mode():
        expected = vae.decode(z).sample
    fast = copy.deepcopy(vae).to(memory_format=torch.channels_last)
    speed.optimize_module(fast, channels_last=True)
    assert vae_bands.install(fast) > 0
    monkeypatch.setattr(vae_bands, "BIG_BYTES", 1 if banded else 1 << 60)
    monkeypatch.setattr(vae_bands, "BAND_BYTES", 3000)
    monkeypatch.setattr(upsample_conv, "MIN_PIXELS", {torch.float32: 1})
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = fast.decode(z).sample
    ops = {e.key for e in prof.key_averages()}
    assert "aten::upsample_nearest2d" not in ops
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < 1e-4
