"""darkroom/engine/gemm_conv.py: 3x3 convs on small maps as matrix products give the conv's values."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from darkroom.engine import conv_epilogue, gemm_conv, speed

pytestmark = pytest.mark.skipif(not speed._fused_linear_available(),
                                reason="this torch build has no oneDNN matmul epilogues")


def test_the_self_check_passes_where_onednn_has_the_epilogues():
    """gemm_conv checks its own arithmetic against the conv once per process and stays off if it is wrong."""
    assert gemm_conv._available()


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _conv(cin: int, cout: int) -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(cin, cout, 3, padding=1).eval()


def _relative(t: torch.Tensor, exact: torch.Tensor) -> float:
    return ((t.float() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize(("batch", "cin", "cout", "h", "w"), [(2, 32, 48, 8, 8), (1, 16, 16, 5, 9), (2, 8, 24, 1, 12)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_the_product_is_the_conv_within_bf16_rounding(batch, cin, cout, h, w, with_residual):
    conv32 = _conv(cin, cout)
    conv = copy.deepcopy(conv32).to(torch.bfloat16, memory_format=torch.channels_last)
    x = _cl(torch.randn(batch, cin, h, w).bfloat16())
    residual = _cl(torch.randn(batch, cout, h, w).bfloat16()) if with_residual else None
    with torch.no_grad():
        exact = conv32(x.float()) + (residual.float() if with_residual else 0)
        assert gemm_conv.pays(conv, x)
        ours = gemm_conv.forward(conv, x, residual)
        theirs = conv(x) + (residual if with_residual else 0)
    assert ours.shape == exact.shape and ours.dtype is torch.bfloat16
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert exact.abs().mean() > 0.1
    assert _relative(ours, exact) <= 1.5 * _relative(theirs, exact) + 1e-4
    assert _relative(ours, exact) < 1e-2


def test_a_changed_weight_is_followed():
    """The weight is read as a view at each call: a LoRA merged in place counts."""
    conv = _conv(16, 16).to(torch.bfloat16, memory_format=torch.channels_last)
    x = _cl(torch.randn(1, 16, 6, 6).bfloat16())
    with torch.no_grad():
        before = gemm_conv.forward(conv, x)
        conv.weight.add_(0.05)
        after = gemm_conv.forward(conv, x)
        assert _relative(after, conv(x).float()) < 1e-2
    assert (after.float() - before.float()).abs().max() > 0.1


def test_pays_on_small_maps_only_and_bypasses_nothing():
    conv = _conv(16, 16).to(torch.bfloat16, memory_format=torch.channels_last)
    small = _cl(torch.randn(2, 16, 8, 8).bfloat16())  # 128 pixels over the batch
    with torch.no_grad():
        assert gemm_conv.pays(conv, small)
        assert not gemm_conv.pays(conv, _cl(torch.randn(2, 16, 12, 12).bfloat16()))  # 288 pixels, 16 channels
        wide = _conv(1280, 8).to(torch.bfloat16, memory_format=torch.channels_last)
        assert gemm_conv.pays(wide, _cl(torch.randn(2, 1280, 16, 16).bfloat16()))  # 512 pixels, 1280 channels
        assert not gemm_conv.pays(wide, _cl(torch.randn(2, 1280, 24, 16).bfloat16()))
        assert not gemm_conv.pays(copy.deepcopy(conv).float(), small.float())  # bf16 only
        assert not gemm_conv.pays(conv, small.contiguous())  # a channels-first input
        assert not gemm_conv.pays(copy.deepcopy(conv).to(memory_format=torch.contiguous_format), small)
        hooked = copy.deepcopy(conv)
        hooked.register_forward_pre_hook(lambda *a: None)
        assert not gemm_conv.pays(hooked, small)
        assert not gemm_conv.pays(torch.nn.Conv2d(16, 16, 3, padding=1, stride=2).bfloat16(), small)
    assert not gemm_conv.pays(conv, small)  # autograd on


@pytest.mark.skipif(not conv_epilogue.available(), reason="this torch build has no oneDNN conv epilogues")
@pytest.mark.parametrize("out_channels", [32, 48])  # 48: with a 1x1 shortcut
def test_a_resnet_on_a_small_map_runs_its_3x3_convs_as_products(out_channels):
    torch.manual_seed(0)
    plain = ResnetBlock2D(in_channels=32, out_channels=out_channels, temb_channels=64, groups=8).eval()
    for p in plain.parameters():
        p.data.normal_(0, 0.2)
    fast = copy.deepcopy(plain).to(torch.bfloat16, memory_format=torch.channels_last)
    speed.optimize_module(fast, channels_last=True)
    assert vars(fast)["forward"].__func__ is speed._resnet_forward
    x = _cl(torch.randn(2, 32, 8, 8))
    temb = torch.randn(2, 64)
    with torch.no_grad():
        exact = plain(x, temb)
        fast(x.bfloat16(), temb.bfloat16())  # once first: the availability probes run their own ops
        with torch.profiler.profile() as prof:
            got = fast(x.bfloat16(), temb.bfloat16())
        bf16 = copy.deepcopy(plain).to(torch.bfloat16, memory_format=torch.channels_last)(x.bfloat16(), temb.bfloat16())
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("mkldnn::_linear_pointwise", 0) == 3  # the time embedding's linear, conv1, conv2
    assert calls.get("aten::mkldnn_convolution", 0) == (1 if out_channels != 32 else 0)  # only the 1x1 shortcut
    assert "mkldnn::_convolution_pointwise" not in calls  # the residual went into the product's epilogue
    assert calls.get("aten::add_", 0) == 1  # the time embedding, as before
    assert _relative(got, exact) <= 1.5 * _relative(bf16, exact) + 1e-4
