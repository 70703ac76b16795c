"""The VAE decoder's full-resolution layers a band of rows at a time, so big activations exist once.

At 1024x1024 (SDXL's size) the decoder's last blocks hold 256-channel maps of 0.5 GiB in bf16.
diffusers' `ResnetBlock2D` makes a GroupNorm copy of its input, a first conv output, a second
norm copy and a second conv output; the 2x upsampler makes the nearest-neighbour copy and then
its conv output. Several full-size temporaries sit on top of the input at once, and the decode
becomes the peak of the whole generation (issue 17: 9.1 GiB for SDXL at 1024x1024, target 9).

Here, for inputs of at least `BIG_BYTES`:
- a resnet gathers each GroupNorm's statistics over the whole input first (one reduction, no
  copy), then normalises, activates and convolves one band of rows at a time (with the rows the
  3x3 kernel reads above and below), writing into one output tensor; the second conv writes its
  bands over the first conv's output in place (the next band's input is normalised before the
  current band is written, so no row is read after it is overwritten), with the residual added per
  band. Only the input, one output and a band's temporaries are alive;
- the 2x upsampler interpolates and convolves band by band, so the interpolated copy never exists
  whole (on the CPU in bf16/fp32 it makes no copy at all: darkroom.engine.upsample_conv's 2x2 phase
  convolutions, also on maps too small for bands);
- the decoder's final norm + SiLU + conv_out runs the same way.
The arithmetic is GroupNorm's (statistics in float32, normalisation rounded once to the input's
dtype), so a bf16 decode moves by a unit in the last place now and then (summation order) and an
fp32 decode by ~1e-6: tests/test_vae_bands.py compares with diffusers' own forward. Each band's
conv computes one row more at each end than it keeps (the halo rows' own outputs, at most 2
rows in `BAND_BYTES`), which is all the extra arithmetic; the output copy is the extra memory
traffic. Smaller inputs (SD1.5 at 512x512, the tiny test models) take the ordinary forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from darkroom.engine import conv_epilogue, upsample_conv

BIG_BYTES = 192 << 20
"""An input this big or bigger goes through bands: SDXL and SD1.5 at 1024x1024 do, 512x512 does not."""
BAND_BYTES = 24 << 20
"""About this much of a normalised band (input dtype) at a time. 24 MiB: SDXL's 1024x1024 decode peaks
0.19 GiB lower than with 48 MiB, at the same speed (benchmarks/README.md)."""


def big(x: torch.Tensor, growth: int = 1) -> bool:
    """Whether a layer whose largest activation is `growth` times `x` goes through bands."""
    return (x.dim() == 4 and x.numel() * x.element_size() * growth >= BIG_BYTES and not torch.is_grad_enabled()
            and x.device.type == "cpu")


def _rows_per_band(x: torch.Tensor) -> int:
    n, c, _, w = x.shape
    return max(8, BAND_BYTES // max(1, n * c * w * x.element_size()))


def _bands(height: int, rows: int) -> list[tuple[int, int]]:
    return [(top, min(height, top + rows)) for top in range(0, height, rows)]


def group_stats(x: torch.Tensor, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (image, channel): the mean and biased variance of the channel's group, float32, shape (n, c).

    torch's GroupNorm kernel gives each band's group mean and 1/std (float32, Welford; its normalised
    output, a band-sized temporary, is dropped at once: measured faster than any reduction op on a
    channels-last bf16 tensor here, which sum over the pixels 2-15x slower). The bands' statistics are
    combined exactly (Chan's formula, float64)."""
    n, c, h, w = x.shape
    groups = norm.num_groups
    count = 0
    mean = torch.zeros(n, groups, dtype=torch.float64)
    m2 = torch.zeros(n, groups, dtype=torch.float64)
    for top, bottom in _bands(h, _rows_per_band(x)):
        rows = (bottom - top) * w * (c // groups)
        parts = []
        for i in range(n):  # one image's rows of a channels-last tensor are one contiguous block
            band = x[i:i + 1, :, top:bottom]
            if not (band.is_contiguous() or band.is_contiguous(memory_format=torch.channels_last)):
                band = band.contiguous(memory_format=torch.channels_last)
            parts.append(torch.native_group_norm(band, None, None, 1, c, (bottom - top) * w, groups, 0.0)[1:])
        band_mean = torch.cat([m for m, _ in parts]).double().view(n, groups)
        band_var = torch.cat([r for _, r in parts]).double().view(n, groups).pow(-2)
        total = count + rows
        delta = band_mean - mean
        mean += delta * (rows / total)
        m2 += band_var * rows + delta.square() * (count * rows / total)
        count = total
    var = m2 / count
    return (mean.repeat_interleave(c // groups, dim=1).float(), var.repeat_interleave(c // groups, dim=1).float())


def _normalised(x: torch.Tensor, lo: int, hi: int, stats, norm: torch.nn.GroupNorm, act: bool) -> torch.Tensor:
    """Rows lo:hi of silu(GroupNorm(x)) with the whole tensor's statistics: batch_norm in inference form
    (float32 inside, rounded once to x's dtype, as GroupNorm is)."""
    mean, var = stats
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    band = x[:, :, lo:hi]
    parts = [F.batch_norm(band[i:i + 1], mean[i], var[i], weight, bias, False, 0.0, norm.eps)
             for i in range(band.shape[0])]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return F.silu(y, inplace=True) if act else y


def _conv_rows(band: torch.Tensor, conv: torch.nn.Conv2d, lo: int, top: int, bottom: int) -> torch.Tensor:
    """Output rows top:bottom of `conv` over the whole tensor, from its input rows lo:hi (the band plus
    the kernel's halo, zero-padded only at the image's own edges by the conv's padding)."""
    y = conv(band)
    return y[:, :, top - lo:top - lo + (bottom - top)]


def norm_act_conv(x: torch.Tensor, norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, *, act: bool = True,
                  residual=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """conv(silu(norm(x))) [+ residual(top, bottom)] band by band. `out` may be `x` itself (same shape):
    each band's input is normalised before the previous band's output is written over it."""
    n, _, h, w = x.shape
    stats = group_stats(x, norm)
    halo = conv.kernel_size[0] // 2
    if out is None:
        out = torch.empty((n, conv.out_channels, h, w), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                          else torch.contiguous_format)
    bands = _bands(h, _rows_per_band(x))

    def prepared(k: int) -> tuple[int, torch.Tensor]:
        top, bottom = bands[k]
        lo, hi = max(0, top - halo), min(h, bottom + halo)
        return lo, _normalised(x, lo, hi, stats, norm, act)

    lo, band = prepared(0)
    for k, (top, bottom) in enumerate(bands):
        if (residual is not None and lo == top - halo and lo + band.shape[2] == bottom + halo
                and conv_epilogue.fusible(conv, band, band)):
            # a band with real rows above and below: the conv, unpadded across them, gives exactly rows
            # top:bottom, and their residual is added in its epilogue (same-size blocks band after band)
            y = conv_epilogue.conv_add(conv, band, residual(top, bottom), padding=(0, conv.padding[1]))
        else:
            y = _conv_rows(band, conv, lo, top, bottom)
            if residual is not None:
                y += residual(top, bottom)
        if k + 1 < len(bands):
            lo, band = prepared(k + 1)  # before row bottom - 1 of x may be overwritten below
        out[:, :, top:bottom] = y
    return out


def conv_is_bandable(conv) -> bool:
    """A stride-1, odd square kernel with "same" zero padding: each output row depends on the rows the
    kernel covers, so a band's rows come out exactly as the whole conv's."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.stride == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1
            and conv.padding == (conv.kernel_size[0] // 2,) * 2 and conv.padding_mode == "zeros")


def resnet_is_bandable(block) -> bool:
    """A VAE resnet: SiLU after GroupNorms, same-size convs, no time embedding, no resampling, scale 1."""
    shortcut = block.conv_shortcut
    return (block.time_emb_proj is None and not block.up and not block.down and block.output_scale_factor == 1.0
            and type(block.nonlinearity) is torch.nn.SiLU and isinstance(block.norm1, torch.nn.GroupNorm)
            and isinstance(block.norm2, torch.nn.GroupNorm) and conv_is_bandable(block.conv1)
            and conv_is_bandable(block.conv2) and block.conv1.out_channels == block.conv2.in_channels
            and block.conv2.in_channels == block.conv2.out_channels
            and (shortcut is None or (isinstance(shortcut, torch.nn.Conv2d) and shortcut.kernel_size == (1, 1)
                                      and shortcut.stride == (1, 1) and shortcut.padding == (0, 0))))


def resnet_forward(block, x: torch.Tensor) -> torch.Tensor:
    """The resnet on a big input: conv1's output, then conv2's bands written over it with the residual."""
    hidden = norm_act_conv(x, block.norm1, block.conv1)
    shortcut = block.conv_shortcut

    def residual(top: int, bottom: int) -> torch.Tensor:
        rows = x[:, :, top:bottom]
        return shortcut(rows) if shortcut is not None else rows

    return norm_act_conv(hidden, block.norm2, block.conv2, residual=residual, out=hidden)


def _resnet_forward(self, input_tensor: torch.Tensor, temb=None, *args, **kwargs) -> torch.Tensor:
    if temb is not None or args or kwargs or not big(input_tensor):
        return self._whole_forward(input_tensor, temb, *args, **kwargs)
    return resnet_forward(self, input_tensor)


def upsampler_is_bandable(up) -> bool:
    return upsample_conv.is_plain(up) and conv_is_bandable(getattr(up, "conv", None))


def _upsample_forward(self, hidden_states: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
    """Nearest 2x then the conv; by bands of output rows on a big map, so that the interpolated copy
    never exists whole; as 2x2 phase convolutions (upsample_conv) where they pay."""
    if output_size is not None or args or kwargs:
        return self._whole_forward(hidden_states, output_size, *args, **kwargs)
    phased = upsample_conv.pays(self, hidden_states)
    if not big(hidden_states, growth=4):
        return upsample_conv.forward(self, hidden_states) if phased else self._whole_forward(hidden_states)
    n, _, h, w = hidden_states.shape
    out_h, halo = 2 * h, self.conv.kernel_size[0] // 2
    out = torch.empty((n, self.conv.out_channels, out_h, 2 * w), dtype=hidden_states.dtype,
                      device=hidden_states.device, memory_format=torch.channels_last)
    if phased:  # each phase's output is the size of the input rows it reads: a band of them at a time
        kernels = upsample_conv.kernel(self.conv)
        for first, last in _bands(h, _rows_per_band(hidden_states)):
            upsample_conv.rows(hidden_states, kernels, first, last, out[:, :, 2 * first:2 * last])
        return out
    for top, bottom in _bands(out_h, 2 * _rows_per_band(hidden_states) // 4 * 2 or 2):
        lo, hi = max(0, top - halo), min(out_h, bottom + halo)  # interpolated rows the band's conv reads
        src = hidden_states[:, :, lo // 2:(hi - 1) // 2 + 1]
        band = F.interpolate(src, scale_factor=2.0, mode="nearest")
        band = band[:, :, lo - (lo // 2) * 2:lo - (lo // 2) * 2 + (hi - lo)]
        out[:, :, top:bottom] = _conv_rows(band, self.conv, lo, top, bottom)
    return out


def _decoder_tail(self, sample: torch.Tensor) -> torch.Tensor:
    if big(sample) and isinstance(self.conv_norm_out, torch.nn.GroupNorm) and conv_is_bandable(self.conv_out) \
            and type(self.conv_act) is torch.nn.SiLU:
        return norm_act_conv(sample, self.conv_norm_out, self.conv_out)
    return self.conv_out(self.conv_act(self.conv_norm_out(sample)))


def _decoder_forward(self, sample: torch.Tensor, latent_embeds=None) -> torch.Tensor:
    """diffusers' `Decoder.forward` for inference with group norms, ending in the banded tail.

    The up-blocks' resnets and upsamplers are called from here rather than through each block's
    forward: a call's argument stays alive until the call returns, so diffusers' loop keeps every
    block's input (0.5 GiB before the last block at 1024x1024) until the whole block is done; here
    it is freed as soon as the block's first layer has used it."""
    if torch.is_grad_enabled() or latent_embeds is not None:
        return self._whole_forward(sample, latent_embeds)
    sample = self.conv_in(sample)
    sample = self.mid_block(sample, None)
    for up_block in self.up_blocks:
        for resnet in up_block.resnets:  # what UpDecoderBlock2D.forward does, with no time embedding
            sample = resnet(sample, None)
        for upsampler in up_block.upsamplers or ():
            sample = upsampler(sample)
    return _decoder_tail(self, sample)


def decoder_is_bandable(decoder) -> bool:
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    return (not getattr(decoder, "upsample", None) and all(type(b) is UpDecoderBlock2D for b in decoder.up_blocks)
            and type(decoder.conv_act) is torch.nn.SiLU and decoder.mid_block is not None)


def install(vae: torch.nn.Module) -> int:
    """Band the VAE's resnets, 2x upsamplers and decoder tail (per instance, over whatever forward each
    has, e.g. darkroom.engine.speed's; big inputs only). Returns how many modules were changed."""
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    count = 0
    for module in vae.modules():
        if "_whole_forward" in vars(module):
            continue
        if isinstance(module, ResnetBlock2D) and resnet_is_bandable(module):
            module._whole_forward = module.forward
            module.forward = types.MethodType(_resnet_forward, module)
            count += 1
        elif isinstance(module, Decoder) and decoder_is_bandable(module):
            module._whole_forward = module.forward
            module.forward = types.MethodType(_decoder_forward, module)
            count += 1
        elif isinstance(module, Upsample2D) and upsampler_is_bandable(module):
            module._whole_forward = module.forward
            module.forward = types.MethodType(_upsample_forward, module)
            count += 1
    return count
