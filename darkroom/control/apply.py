"""Running ControlNet units inside the sampling loop: the residuals the UNet adds to its skip connections.

At every UNet call, each unit whose window covers the step runs its ControlNet on the same
latent input (the 4 latent channels of a 9-channel inpainting UNet's input), timestep, text
context and SDXL micro-conditioning as the UNet, with its control map as the hint; the units'
outputs, scaled, are summed and passed as `down_block_additional_residuals` /
`mid_block_additional_residual`. The rules follow the sd-webui-controlnet extension:

- Window: a unit acts at step i of a pass of T steps unless i / T is below `guidance_start` or
  above `guidance_end` (both ends included), so (0, 1) covers every step.
- Weight: every residual is multiplied by the unit's weight ("Balanced").
- "My prompt is more important": soft injection. Residual k of n gets weight x 0.825^(top - k),
  the middle block's (last) the largest, the shallow blocks' much smaller (0.825^12 ~ 0.1), so
  the prompt keeps the fine detail. top = n - 1 for SD1/SD2 (13 residuals: the middle block gets
  the full weight); for SDXL the extension keeps the first n of SD1's 13 factors, so its middle
  block gets 0.825^3. We reproduce that on purpose: results then match the extension's.
- "ControlNet is more important": soft injection, and the control is given to the prompt half of
  the CFG batch only (none to the negative), so CFG's difference amplifies it.
- Shuffle-type models (global pooling, from their .yaml): residuals averaged over the image and
  given to the prompt half only, as the extension and diffusers both do.
- Hires fix: the second pass uses the unit's map made at the hires size; `hr_option` "Low res only"
  / "High res only" switch the unit off in one of the passes; canny and mlsd units use soft
  injection in the second pass whatever their mode (the extension's rule against artifacts).
- guess_mode (a diffusers option, not the extension's): the ControlNet runs on the prompt half
  only, residual k of n scaled by logspace(-1, 0, n)[k] x weight, replacing the per-mode scales.
- T2I-Adapter units (darkroom.control.adapter): features made from the map once per pass, passed as
  `down_intrablock_additional_residuals` (summed over adapter units); the same window, weight,
  prompt-only and hires rules, soft injection with the extension's adapter factors (0.25 ... 1.0);
  guess_mode only makes them prompt-only.
- tile_colorfix(+sharp) units also fix the colours of the UNet's prediction after every call, in and out of
  their window (`Control.fix_prediction`, darkroom.control.annotators.tile).
- IP-Adapter units (darkroom.control.ipadapter) add nothing here either: hooks on the cross-attentions read
  `at` and `rows` (which CFG rows are the negative's, which get the unconditional image tokens).
- ControlNet-LLLite units (darkroom.control.lllite) add nothing here: their hooks on the UNet's attention
  projections read the step `residuals` records (`at`) and act in the unit's window, first pass only.
- InstantID's ControlNet (a ControlNet whose file name says instant_id, as the extension tells it) reads its
  IP-Adapter unit's face tokens as its context instead of the prompt's (the negative's on the negative rows).
- T2I-Adapter style and ReVision units (darkroom.control.vision_prompt) add nothing here: `condition`, called
  first, appends the style tokens to the context and puts ReVision's embedding in SDXL's pooled text embedding,
  and the ControlNets of the call get that context too, as in the extension.
- reference_only / reference_adain(+attn) units have no ControlNet (`controlnet` None): while the sampler
  has them hooked (darkroom.control.reference), `residuals` also runs their UNet pass on the picture.

Every rule acts per CFG half: the batch is [negative x n, prompt part 1 x n, ...] (see
darkroom.engine.sampling.StepConditioning), so the rows from n on are the prompt's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from darkroom.control.adapter import LoadedAdapter
from darkroom.control.adapter import residuals as adapter_residuals
from darkroom.control.load import LoadedControlNet

SOFT_BASE = 0.825
SOFT_LAYERS = 13  # the extension's factor table length (SD1/SD2 ControlNets have 12 + 1 residuals)
HIRES_SOFT_MODULES = ("canny", "mlsd")
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601: RGB maps for greyscale ControlNets


@dataclass
class ControlUnitRun:
    """One unit ready to run: its ControlNet, its control map(s) and how it steers."""

    controlnet: LoadedControlNet | None  # None: a model-free reference unit (darkroom.control.reference)
    hint: torch.Tensor  # [1, 3, H, W] at the first pass's pixel size, in [0, 1] (-1: masked pixels)
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "Balanced"
    guess_mode: bool = False
    module: str = "none"
    hr_option: str = "Both"
    hr_hint: torch.Tensor | None = None  # the map at the hires size (None: no hires pass)
    union_type: int | None = None  # a ControlNet Union model's control type index (darkroom.control.union)
    # tile_colorfix(+sharp) (annotators.tile): the map's scaled VAE latent per pass and the resolved sliders
    colour_latent: torch.Tensor | None = None  # [1, 4, h, w] at the first pass's latent size (None: no fix)
    hr_colour_latent: torch.Tensor | None = None
    variation: float = 0.0  # threshold_a, the blur radius in latent pixels
    sharpness: float | None = None  # threshold_b of tile_colorfix+sharp (None: plain tile_colorfix)
    fidelity: float = 0.5  # a reference unit's Style Fidelity (threshold_a)
    # inpaint_only(+lama) (darkroom.control.inpaint_only): the picture's latent and the latent mask per pass
    inpaint_latent: torch.Tensor | None = None  # [1, 4, h, w] (None: not an inpaint_only unit)
    hr_inpaint_latent: torch.Tensor | None = None
    inpaint_mask: torch.Tensor | None = None  # [1, 1, h, w], 1: repaint
    hr_inpaint_mask: torch.Tensor | None = None
    ip_tokens: tuple[torch.Tensor, torch.Tensor] | None = None  # an IP-Adapter unit's (prompt, negative) tokens
    vision: torch.Tensor | None = None  # a style unit's tokens [1, T, C] or a ReVision unit's embedding (vision_prompt)
    # an InstantID ControlNet's context: its IP-Adapter unit's (prompt, negative) tokens, read instead of the prompt
    context_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
    advanced: list[float] | None = None  # advanced_weighting: per-residual factors in place of weight and mode
    region: torch.Tensor | None = None  # effective_region_mask [1, 1, H, W] in [0, 1]: where the unit acts

    def in_region(self, out: torch.Tensor) -> torch.Tensor:
        """A residual (or feature) [B, C, h, w] times the region mask brought to h x w (bilinear), as the
        extension restricts a unit; itself when the unit has no region."""
        if self.region is None:
            return out
        mask = F.interpolate(self.region.to(device=out.device, dtype=torch.float32), size=out.shape[-2:],
                             mode="bilinear")
        return out * mask.to(out.dtype)

    def ready_hint(self, device: torch.device) -> torch.Tensor:
        """The hint on `device` in the ControlNet's dtype, moved once per pass rather than at every step."""
        ready = getattr(self, "_ready", None)
        if ready is None or ready.device != device:
            ready = self.hint.to(device=device, dtype=self.controlnet.dtype)
            if self.controlnet.hint_channels == 1 and ready.shape[1] == 3:
                # a greyscale model gets the luminance; the weights sum to 1, so masked pixels (-1) stay -1
                ready = (ready * LUMA.to(ready).view(1, 3, 1, 1)).sum(1, keepdim=True)
            self._ready = ready
        return ready

    def covers(self, step: int, total: int) -> bool:
        """Whether the unit acts at 0-based `step` of a pass of `total` steps (the extension's window)."""
        fraction = step / max(total, 1)
        return not (fraction < self.start or fraction > self.end)

    def soft(self, hires: bool) -> bool:
        """Soft injection: a mode other than Balanced, or canny/mlsd in the hires pass (ControlNets and adapters)."""
        return self.mode != "Balanced" or (hires and any(m in self.module for m in HIRES_SOFT_MODULES))

    def soft_scales(self, count: int, hires: bool) -> list[float] | None:
        """Per-residual factors of soft injection (None: every residual gets the plain weight)."""
        if not self.soft(hires):
            return None
        top = SOFT_LAYERS - 1 if self.controlnet.family.startswith("sdxl") else count - 1
        return [self.weight * SOFT_BASE ** float(top - k) for k in range(count)]

    @property
    def prompt_only(self) -> bool:
        """Control on the prompt half of the CFG batch only (none for the negative)."""
        return self.mode == "ControlNet is more important" or self.controlnet.global_pooling or self.guess_mode


class Control:
    """The ControlNet units of one sampling pass; `denoise` asks it for residuals at each UNet call."""

    def __init__(self, units: list[ControlUnitRun], *, hires: bool = False, noise_latent: torch.Tensor | None = None,
                 ignore_prompt: bool = False):
        self.units = units
        self.hires = hires
        self.noise_latent = noise_latent  # inpaint_only+lama's fill, VAE-encoded: the first pass's noise leans to it
        self.ignore_prompt = ignore_prompt  # ReVision units zero the text context while they act (vision_prompt)
        self.calls = 0  # ControlNet forward passes run in this pass
        self.reference = None  # reference.ReferenceSession while its hooks are on the UNet (reference.hooked)
        self.at = (0, 1)  # (step, total) of the UNet call `residuals` was last asked for: LLLite's hooks read it
        self.rows = (1, False)  # (n, uncond) of that call's CFG batch: IP-Adapter's hooks read it
        self.latent_size = (0, 0)  # (h, w) of that call's latents: IP-Adapter's region masks read it

    def for_hires(self) -> Control | None:
        """The same units for the hires fix's second pass: their hires maps, hr_option applied."""
        units = [replace(u, hint=u.hr_hint if u.hr_hint is not None else u.hint,
                         colour_latent=u.hr_colour_latent if u.hr_colour_latent is not None else u.colour_latent,
                         inpaint_latent=u.hr_inpaint_latent if u.hr_inpaint_latent is not None else u.inpaint_latent,
                         inpaint_mask=u.hr_inpaint_mask if u.hr_inpaint_mask is not None else u.inpaint_mask)
                 for u in self.units if u.hr_option != "Low res only"]
        return Control(units, hires=True, ignore_prompt=self.ignore_prompt) if units else None

    def for_first_pass(self, hires_enabled: bool) -> Control | None:
        """The units of the first pass: with the hires fix on, "High res only" units wait for the second."""
        units = [u for u in self.units if not (hires_enabled and u.hr_option == "High res only")]
        return Control(units, noise_latent=self.noise_latent, ignore_prompt=self.ignore_prompt) if units else None

    def modules(self) -> list[torch.nn.Module]:
        """The ControlNets (for the interrupt checkpoints)."""
        return [u.controlnet.model for u in self.units if u.controlnet is not None]

    @property
    def fixes_colours(self) -> bool:
        """Whether a tile_colorfix or inpaint_only unit runs in this pass: the sampler then calls
        `fix_prediction` every step."""
        return any(u.colour_latent is not None or u.inpaint_latent is not None for u in self.units)

    def start_noise(self, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """The pass's starting noise, moved towards inpaint_only+lama's fill when a unit has one (inpaint_only);
        `alphas_cumprod`: the model's training schedule."""
        if self.noise_latent is None:
            return noise
        from darkroom.control.inpaint_only import lama_noise

        return lama_noise(noise, self.noise_latent, alphas_cumprod)

    def fix_prediction(self, pred: torch.Tensor, x: torch.Tensor, sigma, *, v_prediction: bool, n: int,
                       uncond: bool) -> torch.Tensor:
        """The UNet's output `pred` (eps or v, whole CFG batch) after the colour-fix units' step on its x0
        (annotators.tile.fix_colours), at every step whatever the units' windows, as the extension does.

        Before CFG combines the rows, because +sharp treats the negative's rows apart; for plain colorfix that
        equals fixing the combined x0 (CFG is an affine combination, weights summing to 1). `x` is the UNet's
        input (its first 4 channels: the latents, variance-preserving), `sigma` the step's k-diffusion noise
        level, x = (x0 + sigma eps) / sqrt(sigma^2 + 1). The change goes back through the same sigma, so the
        sampler's own x0 is exactly the fixed one (the extension's rounded-timestep table is not)."""
        from darkroom.control.annotators.tile import fix_colours
        from darkroom.control.inpaint_only import restore_x0

        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=pred.device)
        a = 1 / torch.sqrt(sigma ** 2 + 1)
        s = sigma * a
        x = x[:, :4].to(pred.dtype)
        x0 = a * x - s * pred if v_prediction else (x - s * pred) / a
        rows = torch.arange(pred.shape[0], device=pred.device) >= n if uncond else None
        fixed = x0
        for unit in self.units:
            if unit.colour_latent is not None:
                fixed = fix_colours(fixed, unit.colour_latent, unit.variation, sharpness=unit.sharpness,
                                    prompt_rows=rows, weight=unit.weight, hires=self.hires)
        for unit in self.units:  # after every colour fix, as the extension's hook orders them
            if unit.inpaint_latent is not None:
                fixed = restore_x0(fixed, unit.inpaint_latent, unit.inpaint_mask, unit.weight)
        # x0 = a x - s v, or x0 = (x - s eps) / a: x0 moves by -s dv, or by -sigma d eps
        return pred - (fixed - x0) / (s if v_prediction else sigma)

    def condition(self, context: torch.Tensor, added: dict | None, *, n: int, uncond: bool, step: int,
                  total: int) -> tuple[torch.Tensor, dict | None]:
        """The UNet call's (context, added_cond_kwargs) with the style and ReVision units acting at `step` applied
        (darkroom.control.vision_prompt); asked before `residuals`, which then gets them too."""
        if not any(u.vision is not None for u in self.units):
            return context, added
        from darkroom.control.vision_prompt import condition

        return condition(self, context, added, n=n, uncond=uncond, step=step, total=total)

    def residuals(self, x: torch.Tensor, t, context: torch.Tensor, added: dict | None, *, n: int, uncond: bool,
                  step: int, total: int) -> dict:
        """kwargs for the UNet call: the summed residuals of the units acting at `step`, or {} when none does.

        `x` is the UNet's input (its first 4 channels are the latents), `n` the images per CFG part,
        `uncond` whether the first n rows are the negative prompt's.
        """
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        intra: list[torch.Tensor] | None = None  # T2I-Adapters' features (darkroom.control.adapter)
        self.at, self.rows, self.latent_size = (step, total), (n, uncond), tuple(x.shape[-2:])
        for unit in self.units:
            if unit.controlnet is None or not unit.covers(step, total):  # reference units: below
                continue
            if unit.vision is not None or getattr(unit.controlnet, "is_lllite", False) \
                    or getattr(unit.controlnet, "is_ipadapter", False):
                continue  # their hooks act inside the UNet (control.lllite, control.ipadapter), or `condition` did
            if isinstance(unit.controlnet, LoadedAdapter):
                feats = adapter_residuals(unit, x, n=n, uncond=uncond, soft=unit.soft(self.hires))
                intra = feats if intra is None else [a + b for a, b in zip(intra, feats, strict=True)]
                continue
            unit_down, unit_mid = self._run(unit, x, t, context, added, n=n, uncond=uncond)
            if down is None:
                down, mid = unit_down, unit_mid
            else:
                down = [a + b for a, b in zip(down, unit_down, strict=True)]
                mid = mid + unit_mid
        if self.reference is not None:  # after the ControlNets: their forward passes must not read its records
            self.reference.write(x, t, context, added, n=n, uncond=uncond, step=step, total=total)
        kwargs: dict = {}
        if down is not None:
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if intra is not None:  # a new list each call: the UNet pops from it
            kwargs["down_intrablock_additional_residuals"] = intra
        return kwargs

    def _run(self, unit: ControlUnitRun, x, t, context, added, *, n: int, uncond: bool):
        cn = unit.controlnet
        # prompt-only units skip the negative rows (their output there would be multiplied by 0)
        first = n if (unit.prompt_only and uncond) else 0
        sample = x[first:, :4].to(cn.dtype)
        hint = unit.ready_hint(sample.device).expand(sample.shape[0], -1, -1, -1)
        if unit.context_tokens is not None:  # InstantID: the face tokens, the negative's on its rows
            cond, negative = (t.to(device=x.device, dtype=context.dtype) for t in unit.context_tokens)
            context = torch.cat([negative.expand(n, -1, -1), cond.expand(x.shape[0] - n, -1, -1)]) if uncond \
                else cond.expand(x.shape[0], -1, -1)
        extra = None if added is None else {k: v[first:].to(cn.dtype) for k, v in added.items()}
        if isinstance(t, torch.Tensor) and t.ndim == 1 and t.shape[0] == x.shape[0]:
            t = t[first:]
        self.calls += 1
        if unit.union_type is not None:
            from darkroom.control.union import run_union

            down, mid = run_union(cn.model, unit.union_type, sample, t, context=context[first:].to(cn.dtype),
                                  hint=hint, guess_mode=unit.guess_mode, added=extra)
        else:
            down, mid = cn.model(sample, t, encoder_hidden_states=context[first:].to(cn.dtype),
                                 controlnet_cond=hint, conditioning_scale=1.0, guess_mode=unit.guess_mode,
                                 added_cond_kwargs=extra, return_dict=False)
        outputs = [*down, mid]
        if unit.advanced is not None:  # the extension: these factors replace weight and the mode's
            scales = unit.advanced[:len(outputs)]
        elif unit.guess_mode:  # diffusers' forward already applied logspace(-1, 0) scales
            scales = [unit.weight] * len(outputs)
        else:
            scales = unit.soft_scales(len(outputs), self.hires) or [unit.weight] * len(outputs)
        outputs = [unit.in_region(o * s) for o, s in zip(outputs, scales, strict=True)]
        if first:
            outputs = [torch.cat([torch.zeros((first, *o.shape[1:]), dtype=o.dtype, device=o.device), o])
                       for o in outputs]
        outputs = [o.to(x.dtype) for o in outputs]
        return outputs[:-1], outputs[-1]
