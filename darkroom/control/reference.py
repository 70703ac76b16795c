"""Reference units: the sd-webui-controlnet extension's model-free reference_only, reference_adain and
reference_adain+attn preprocessors.

There is no ControlNet. The unit's picture (its map: the picture fitted to the pass's size), VAE-encoded
and noised to the step's timestep, goes through the checkpoint's own UNet just before every UNet call
of the pass, with the call's timestep, text context and SDXL micro-conditioning. That "write" pass
leaves behind what the real call then "reads":

- attention (reference_only): the input tokens of every self-attention (attn1 of a BasicTransformerBlock)
  are recorded; in the real call each self-attention attends to its own tokens and the reference's,
  concatenated along the token axis, so the image borrows the picture's look where its features match.
- AdaIN (reference_adain): the per-channel mean and variance of the outputs of some UNet layers (the
  middle block, the encoder's layers below its first level, the first two thirds of the decoder's layers:
  the webui UNet's input blocks 4, 5, 7, 8 (10, 11) and output blocks 0-7 (0-5 for SDXL)) are recorded,
  and the real call's outputs there are renormalised to them.
- reference_adain+attn: both.

The extension's rules, kept so results match it:
- The weight picks how many layers take part, not how strongly: attention blocks sorted widest first
  (stable), block i of N when weight > i / N; AdaIN layers when weight > their level (the middle 0, the
  encoder's from 2 down to 2/k, the decoder's from 0 up), so weight 1 uses every attention block and a few
  deep AdaIN layers, and weight 2 all of them.
- Style fidelity (threshold_a, 0-1, 0.5): the prompt's rows always use the reference; the negative's rows
  mix `fidelity` of the plain result with `1 - fidelity` of the referenced one, so a higher fidelity leaves
  CFG more room to push towards the picture. "ControlNet is more important" makes it 1, "My prompt is more
  important" and the hires fix's second pass 0; SDXL cubes it (the extension's damping for SDXL).
- The window, hr_option and weight 0 (no unit) as for every unit; several reference units each run their
  write pass, their tokens all concatenated, their statistics and fidelities averaged.

One difference on purpose: the extension noises the picture with unseeded noise; here each image's noise
comes from its own seed (offset), shared by its negative and prompt rows, so a request is reproducible
and a batch of N equals N single runs.

The hooks (attn1's processor wrapped, whatever it is, and forward hooks on the AdaIN layers) are on the
UNet only while a sampling pass with reference units runs (`hooked`), removed however it ends: the UNet is
cached and shared, with its LoRA merges, speed-ups and interrupt checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from darkroom.control_unit import CONTROL_MODES

MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
ATTENTION = ("reference_only", "reference_adain+attn")
ADAIN = ("reference_adain", "reference_adain+attn")
EPS = 1e-6  # the extension's floor on variances
_NOISE_SEED_OFFSET = 0x5EED_4EF  # the write pass's noise must not repeat the image's starting noise


def is_reference(module: str) -> bool:
    """Whether `module` (a canonical preprocessor name) is a model-free reference module."""
    return module in MODULES


def fidelity(unit, *, hires: bool, sdxl: bool) -> float:
    """The unit's effective style fidelity (see the module doc) from its slider, control mode and pass."""
    if unit.mode == CONTROL_MODES[2]:
        return 1.0
    if unit.mode == CONTROL_MODES[1] or hires:
        return 0.0
    value = min(max(float(unit.fidelity), 0.0), 1.0)
    return value ** 3 if sdxl else value


class _Attention:
    """attn1's processor while reference units are hooked: it wraps the one installed (diffusers' or
    Darkroom's), records its input in the write pass and attends to the recorded tokens in the next call."""

    def __init__(self, session: ReferenceSession, inner, level: float):
        self.session, self.inner, self.level = session, inner, level
        self.bank: list[torch.Tensor] = []
        self.fidelities: list[float] = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        s = self.session
        if s.writing:
            if s.attention and s.weight > self.level and encoder_hidden_states is None:
                self.bank.append(hidden_states.detach().clone())
                self.fidelities.append(s.fidelity)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        bank, fidelities = self.bank, self.fidelities
        self.bank, self.fidelities = [], []
        if not bank or encoder_hidden_states is not None or attention_mask is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        context = torch.cat([hidden_states, *(b.to(hidden_states.dtype) for b in bank)], dim=1)
        out = self.inner(attn, hidden_states, context, None, **kwargs)
        style = sum(fidelities) / len(fidelities)
        rows = s.uncond_rows
        if rows and style > 1e-5:  # the negative's rows: partly without the reference
            plain = self.inner(attn, hidden_states[:rows], None, None, **kwargs)
            out = torch.cat([style * plain + (1.0 - style) * out[:rows], out[rows:]])
        return out


class _AdaIN:
    """Forward hook on one AdaIN layer: records its output's statistics in the write pass and renormalises
    the next call's output to them."""

    def __init__(self, session: ReferenceSession, level: float):
        self.session, self.level = session, level
        self.means: list[torch.Tensor] = []
        self.variances: list[torch.Tensor] = []
        self.fidelities: list[float] = []

    def __call__(self, module, args, output):
        s = self.session
        x = _sample(output)
        if s.writing:
            if s.adain and s.weight > self.level:
                var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
                self.means.append(mean)
                self.variances.append(var)
                self.fidelities.append(s.fidelity)
            return None
        means, variances, fidelities = self.means, self.variances, self.fidelities
        self.means, self.variances, self.fidelities = [], [], []
        if not means:
            return None
        return _with_sample(output, adain(x, sum(means) / len(means), sum(variances) / len(variances),
                                          fidelity=sum(fidelities) / len(fidelities), uncond_rows=s.uncond_rows))


def adain(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, *, fidelity: float = 0.0,
          uncond_rows: int = 0) -> torch.Tensor:
    """x [B, C, H, W] with each row's per-channel mean and std matched to the reference's (`mean`, `var`:
    [B, C, 1, 1]); the first `uncond_rows` rows (the negative's) keep `fidelity` of the original."""
    xf = x.float()
    var_x, mean_x = torch.var_mean(xf, dim=(2, 3), keepdim=True, correction=0)
    std_x = var_x.clamp_min(EPS).sqrt()
    y = (xf - mean_x) / std_x * var.float().clamp_min(EPS).sqrt() + mean.float()
    if uncond_rows and fidelity > 1e-5:
        y = torch.cat([fidelity * xf[:uncond_rows] + (1.0 - fidelity) * y[:uncond_rows], y[uncond_rows:]])
    return y.to(x.dtype)


def _sample(output) -> torch.Tensor:
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def _with_sample(output, sample: torch.Tensor):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if isinstance(output, torch.Tensor):
        return sample
    output.sample = sample  # a diffusers output dataclass
    return output


def _layers(blocks) -> list[torch.nn.Module]:
    """Per layer (a ResNet, its transformer, the block's upsampler after its last layer) the module whose
    output is the layer's: how the webui's UNet numbers its input and output blocks."""
    out = []
    for block in blocks:
        resnets = list(getattr(block, "resnets", None) or [])
        attentions = list(getattr(block, "attentions", None) or [])
        upsamplers = getattr(block, "upsamplers", None)
        for j, resnet in enumerate(resnets):
            layer = attentions[j] if j < len(attentions) else resnet
            if upsamplers and j == len(resnets) - 1:
                layer = upsamplers[0]
            out.append(layer)
    return out


def attention_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attending BasicTransformerBlocks in the webui UNet's order (encoder, middle, decoder), then
    sorted widest first (stably), the extension's order for the weight's cut."""
    parts = [unet.down_blocks, getattr(unet, "mid_block", None), unet.up_blocks]
    blocks = [m for part in parts if part is not None for m in part.modules()
              if type(m).__name__ == "BasicTransformerBlock" and not getattr(m, "only_cross_attention", False)]
    return sorted(blocks, key=lambda b: -b.attn1.to_q.in_features)


def adain_layers(unet: torch.nn.Module) -> list[tuple[torch.nn.Module, float]]:
    """(module, level) of the AdaIN layers (see the module doc); a unit uses a layer when weight > level."""
    out: list[tuple[torch.nn.Module, float]] = []
    if getattr(unet, "mid_block", None) is not None:
        out.append((unet.mid_block, 0.0))
    down = _layers(unet.down_blocks[1:])
    out += [(m, 2.0 * (1.0 - w / len(down))) for w, m in enumerate(down)]
    decoder = _layers(unet.up_blocks)
    up = decoder[:2 * len(decoder) // 3]
    out += [(m, 2.0 * w / len(up)) for w, m in enumerate(up)]
    return out


class ReferenceSession:
    """The reference units of one sampling pass, hooked into the UNet: `write` runs their passes before
    each UNet call (Control.residuals calls it), the call itself then reads what they recorded."""

    def __init__(self, units: Sequence, unet: torch.nn.Module, latents: Sequence[torch.Tensor],
                 seeds: Sequence[int], abar: torch.Tensor, *, hires: bool = False, sdxl: bool = False):
        self.units, self.unet, self.latents, self.abar = list(units), unet, list(latents), abar.float().cpu()
        self.hires, self.sdxl = hires, sdxl
        self.generators = [torch.Generator("cpu").manual_seed((int(s) + _NOISE_SEED_OFFSET) % 2 ** 63)
                           for s in seeds]
        self.writing = False
        self.attention = self.adain = False
        self.weight = self.fidelity = 0.0
        self.uncond_rows = 0
        self.calls = 0  # write passes run
        self._attention: list[tuple[torch.nn.Module, object]] = []  # (attn1, the processor it had)
        self._hooks: list = []
        self._adain: list[_AdaIN] = []

    def install(self) -> None:
        modules = {u.module for u in self.units}
        if modules & set(ATTENTION):
            blocks = attention_blocks(self.unet)
            for i, block in enumerate(blocks):
                attn = block.attn1
                inner = attn.processor
                self._attention.append((attn, inner))
                attn.set_processor(_Attention(self, inner, i / len(blocks)))
        if modules & set(ADAIN):
            for module, level in adain_layers(self.unet):
                hook = _AdaIN(self, level)
                self._hooks.append(module.register_forward_hook(hook))
                self._adain.append(hook)

    def remove(self) -> None:
        """Put back every processor and drop every hook (also after a partial install)."""
        while self._attention:
            attn, inner = self._attention.pop()
            attn.set_processor(inner)
        while self._hooks:
            self._hooks.pop().remove()
        self._adain.clear()

    def _clear(self) -> None:
        for attn, _ in self._attention:
            attn.processor.bank, attn.processor.fidelities = [], []
        for hook in self._adain:
            hook.means, hook.variances, hook.fidelities = [], [], []

    def write(self, x: torch.Tensor, t, context: torch.Tensor, added: dict | None, *, n: int, uncond: bool,
              step: int, total: int) -> None:
        """Run the write pass of each unit acting at `step` for the UNet call about to be made with `x`
        (rows: [negative x n,] prompt parts x n), timestep `t`, `context` and `added`."""
        self._clear()
        self.uncond_rows = n if uncond else 0
        acting = [(u, latent) for u, latent in zip(self.units, self.latents, strict=True) if u.covers(step, total)]
        if not acting:
            return
        index = int(torch.as_tensor(t).detach().float().reshape(-1)[0].round().clamp(0, len(self.abar) - 1))
        a = self.abar[index]
        rows, (height, width) = x.shape[0], x.shape[-2:]
        for unit, latent in acting:
            latent = latent.to(x.device, torch.float32)
            if latent.shape[-2:] != (height, width):
                latent = torch.nn.functional.interpolate(latent, size=(height, width), mode="bilinear")
            noise = torch.cat([torch.randn((1, *latent.shape[1:]), generator=g) for g in self.generators])
            ref = a.sqrt() * latent + (1 - a).sqrt() * noise.to(latent.device)
            ref = ref.repeat(rows // ref.shape[0], 1, 1, 1)
            if x.shape[1] == 9:  # an inpainting UNet: no mask, the picture as the masked image (the extension's)
                ref = torch.cat([ref, torch.zeros_like(ref[:, :1]), latent.expand(rows, -1, -1, -1)], dim=1)
            self.attention, self.adain = unit.module in ATTENTION, unit.module in ADAIN
            self.weight = float(unit.weight)
            self.fidelity = fidelity(unit, hires=self.hires, sdxl=self.sdxl)
            self.writing = True
            try:
                with torch.no_grad():
                    self.unet(ref.to(x.dtype), t, encoder_hidden_states=context, added_cond_kwargs=added)
            finally:
                self.writing = False
            self.calls += 1


@contextmanager
def hooked(control, unet: torch.nn.Module, seeds: Sequence[int], *, encode: Callable[[torch.Tensor], torch.Tensor],
           abar: torch.Tensor, sdxl: bool = False) -> Iterator[ReferenceSession | None]:
    """For the block, `control`'s reference units (if any) hooked into `unet` and answered at each of its
    residuals() calls; everything removed on exit, however the block ends. `encode`: pixels [1, 3, H, W] in
    -1..1 -> scaled latents; `abar`: the model's cumulative alphas (its training schedule)."""
    units = [u for u in control.units if u.controlnet is None and is_reference(u.module)] if control else []
    if not units:
        yield None
        return
    latents = []
    for unit in units:
        cached = getattr(unit, "_reference_latent", None)  # one encoding per map (the run objects are per pass)
        if cached is None:
            cached = encode(unit.hint.clamp(0, 1) * 2 - 1).float()
            unit._reference_latent = cached
        latents.append(cached)
    session = ReferenceSession(units, unet, latents, seeds, abar, hires=control.hires, sdxl=sdxl)
    try:
        session.install()
        control.reference = session
        yield session
    finally:
        control.reference = None
        session.remove()
