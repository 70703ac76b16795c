"""Faster CPU inference of the loaded UNet and VAE: exact changes, and oneDNN epilogues in bf16.

`optimize(model)` is called by the model cache after each load (darkroom/engine/cache.py).
What it does, on a model whose UNet runs on the CPU (issue 17; measured in
benchmarks/speed_ab.py; the numbers are below):

* **channels-last through the transformer blocks.** diffusers' `Transformer2DModel` turns its
  NHWC tokens back into a contiguous NCHW tensor (`.permute(0, 3, 1, 2).contiguous()`), and
  the `proj_out` 1x1 convolution right after converts it to channels-last again for oneDNN:
  two full copies of the activation per transformer block. The permuted view *is* a
  channels-last tensor, so we drop the `.contiguous()` (per instance: the method is
  replaced on each block, nothing global is patched).
* **bias inside the GEMM.** bf16 `nn.Linear` layers call oneDNN's linear with the bias
  fused (`torch.ops.mkldnn._linear_pointwise` on the ordinary weight) instead of `addmm`,
  which first copies the broadcast bias into the output (the 88 `copy_` inside `addmm`).
  Not installed when the module will be compiled (inductor cannot lower it on parameters).
  (Until December 2026 a local variable shadowed the switch and it was never installed.)
* **GEGLU in two GEMM epilogues.** The feed-forward's `proj`, `chunk`, `value * gelu(gate)` becomes
  the gate half with GELU fused, then the value half with the product fused (`_geglu_fused`). Not
  the same bits: the product is rounded to bf16 once instead of three times, and is as close to
  an fp32 run as diffusers' own bf16 (tests/test_speed.py); bf16 only.
* **no divisions by 1.0.** `ResnetBlock2D` divides its output by `output_scale_factor` and
  the attention processor by `rescale_output_factor`, both 1.0 in every SD family: one pass
  over the activation each (57 per SD1.5 UNet call). Blocks with those factors at 1.0 get a
  forward without the division (and with the residual added in place, or in conv2's epilogue:
  below); attention modules
  with the default SDPA processor get `LeanAttnProcessor`, which falls back to diffusers'
  processor for anything but plain self/cross attention on tokens. The VAE's resnets ("group"
  time-embedding norm, no time embedding) get the same forward: its 14 divisions per decode go,
  and its SiLUs run in place.

* **the small maps' 3x3 convs as matrix products** (`gemm_conv`: 8x8 and 16x16 at 512x512, where oneDNN's
  per-call weight reorder costs as much as the arithmetic; an SD1.5 UNet call 1.05x faster);
* **the resnets' residual in conv2's epilogue** (`conv_epilogue.conv_add`, a oneDNN binary post-op; into the
  1x1 shortcut's fresh output in place where there is one): no separate pass over the output to add
  it. bf16 only, rounded once instead of twice (a VAE decode is as close to fp32 as before: 1.47e-2
  against 1.54e-2). A VAE decode 1.036x faster; a UNet call unchanged within noise.

The other changes are exact (x / 1.0 == x; a copy changes no value; the fused bias gave the same
bits as addmm on every SD1.5 shape on this AVX512-BF16/AMX CPU), and weights stay ordinary parameters
that LoRA merging (engine/lora.py, in place) keeps changing.

The VAE also gets darkroom.engine.vae_bands (its big layers a band of rows at a time: less memory,
the same arithmetic) and, through it, darkroom.engine.upsample_conv (its upsamplers as 2x2 phase
convolutions: the same sums with the kernel's taps added first, so fp32 images can move by one level
of 255; tests/test_speed.py), installed here with the rest.

Measured (bf16, 2 threads, quiet machine; benchmarks/speed_ab.py and fusions_ab.py): all the eager
changes make an SD1.5 512x512 UNet call 1.095x faster; the two linear epilogue fusions alone 1.068x for
SD1.5 and about 1.1x for SDXL at 1024x1024 (70 transformer blocks); the residual epilogue, a VAE decode
1.03-1.04x.

`compile_mode="unet"` (opt-in) adds `torch.compile` (inductor, static shapes) of the UNet:
1.09x over the eager changes, but the first call compiles for 70 s (2 cores), and each new
batch size or resolution compiles again (60 s); with the FX-graph cache kept in
`<home>/cache/torch-compile` a new process pays about 7 s more on its first call per shape
(measured at 1 thread). inductor's
`freezing` (1.27x) is never turned on: it constant-folds the weights into the graph, so a
LoRA merged later (in place, engine/lora.py) would be silently ignored.
"""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from darkroom.engine import conv_epilogue, gemm_conv, vae_bands
from darkroom.engine.conv_epilogue import global_hooks as _global_hooks

if TYPE_CHECKING:
    from darkroom.home import Home
    from darkroom.models.loader import LoadedModel

log = logging.getLogger("darkroom.speed")

# "off": eager only (default); "unet": torch.compile the UNet. The VAE decoder is not compiled:
# without freezing, inductor's decode measured 0.83x eager's speed (slower).
COMPILE_MODES = ("off", "unet")
COMPILE_CACHE_FOLDER = ("cache", "torch-compile")  # under the home folder


# --------------------------------------------------------------------------- eager, exact changes

def _transformer_output_channels_last(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """diffusers' `Transformer2DModel._get_output_for_continuous_inputs` without `.contiguous()`:
    the NHWC tokens viewed as NCHW are already the channels-last tensor proj_out/oneDNN wants."""
    if not self.use_linear_projection:
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = self.proj_out(hidden_states)
    else:
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def _resnet_forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
    """diffusers' `ResnetBlock2D.forward` for output_scale_factor == 1, "default" time embedding norm
    (or the VAE's "group" without a time embedding) and no up/downsampling (checked before it is
    installed): no division by 1.0, the additions and the activations after the norms land in tensors
    this function just made (one full-size tensor less alive at a time), and the residual is added in
    conv2's epilogue (`conv_epilogue.conv_add`). On small maps both convs run as matrix products over
    gathered patches (`gemm_conv`), the residual in the product's epilogue."""
    hidden_states = _act(self, self.norm1(input_tensor))
    hidden_states = gemm_conv.forward(self.conv1, hidden_states)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None and self.time_embedding_norm == "default":  # diffusers ignores it otherwise
        hidden_states = _add(hidden_states, temb)
    hidden_states = _act(self, self.norm2(hidden_states))
    hidden_states = self.dropout(hidden_states)
    if self.conv_shortcut is None:
        return gemm_conv.forward(self.conv2, hidden_states, input_tensor)
    if not conv_epilogue.fusible(self.conv2, hidden_states, input_tensor):
        hidden_states = self.conv2(hidden_states)
        return _add(hidden_states, self.conv_shortcut(input_tensor))
    shortcut = self.conv_shortcut(input_tensor)  # fresh: conv2's output is summed into it, in place
    return gemm_conv.forward(self.conv2, hidden_states, shortcut, into_residual=True)


def _act(block, fresh: torch.Tensor) -> torch.Tensor:
    """The block's nonlinearity on a tensor nothing else holds: SiLU in place (same values), others as they are."""
    if type(block.nonlinearity) is torch.nn.SiLU and not (torch.is_grad_enabled() and fresh.requires_grad):
        return F.silu(fresh, inplace=True)
    return block.nonlinearity(fresh)


def _add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, in place when nothing needs `fresh` afterwards (no autograd recording)."""
    if torch.is_grad_enabled() and (fresh.requires_grad or other.requires_grad):
        return fresh + other
    return fresh.add_(other)


def _linear_fused_bias(self, input: torch.Tensor) -> torch.Tensor:
    """nn.Linear through oneDNN with the bias added inside the GEMM. CPU `F.linear` with a bias
    (addmm) first copies the broadcast bias into the output and then accumulates the product
    onto it: a full extra pass over the output (the 88 `copy_` inside `addmm` of an SD1.5 step).
    Same values (measured equal to the bit on every SD1.5 shape); anything unusual goes to F.linear."""
    if (input.dtype is not torch.bfloat16 or self.weight.dtype is not torch.bfloat16 or input.device.type != "cpu"
            or not input.is_contiguous() or torch.is_grad_enabled()):
        return F.linear(input, self.weight, self.bias)
    return torch.ops.mkldnn._linear_pointwise(input, self.weight, self.bias, "none", [], "")


def _geglu_fused(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """diffusers' `GEGLU.forward` (proj, chunk, value * gelu(gate)) as two oneDNN GEMMs whose
    epilogues do the rest: the gate half with GELU fused, then the value half multiplied by it.
    diffusers' way writes the 2x-wide projection, then reads both strided halves for the gelu
    and the product (an SD1.5 64x64 feed-forward: 28 ms -> 10 ms, near its FLOP time). Not the
    same bits: the product is rounded to bf16 once instead of three times (mean error against an
    fp32 reference 0.0011 vs 0.0016 for diffusers' bf16). The weight halves are views of the
    parameter, so LoRA merges in place still count. Anything else goes to diffusers' forward."""
    proj = self.proj
    own = vars(proj).get("forward")  # none, or ours: anything else (an extension's) keeps diffusers' path
    if (hidden_states.dtype is not torch.bfloat16 or proj.weight.dtype is not torch.bfloat16
            or proj.bias is None or hidden_states.device.type != "cpu" or not hidden_states.is_contiguous()
            or torch.is_grad_enabled() or proj._forward_hooks or proj._forward_pre_hooks
            or (own is not None and getattr(own, "__func__", None) is not _linear_fused_bias)
            or _global_hooks()):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    half = proj.weight.shape[0] // 2
    weight, bias = proj.weight, proj.bias
    gate = torch.ops.mkldnn._linear_pointwise(hidden_states, weight[half:], bias[half:], "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, gate, weight[:half], bias[:half], "mul")


def _geglu_is_plain(mod) -> bool:
    """diffusers' GEGLU with an nn.Linear projection and the exact (erf) GELU, on the CPU path."""
    from diffusers.models.activations import GEGLU

    proj = getattr(mod, "proj", None)
    return (type(mod) is GEGLU and "forward" not in vars(mod) and "gelu" not in vars(mod)
            and type(proj) is torch.nn.Linear and proj.bias is not None and proj.out_features % 2 == 0
            and type(mod).gelu is GEGLU.gelu)


def _fused_linear_available() -> bool:
    try:
        x = torch.ones(2, 8, dtype=torch.bfloat16)
        w = torch.ones(4, 8, dtype=torch.bfloat16)
        b = torch.ones(4, dtype=torch.bfloat16)
        if not torch.equal(torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], ""), F.linear(x, w, b)):
            return False
        gate = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none")  # the GEGLU's epilogues too
        both = torch.ops.mkldnn._linear_pointwise.binary(x, gate, w, b, "mul")
        return torch.allclose(both.float(), (F.linear(x, w, b) * F.gelu(F.linear(x, w, b))).float(), rtol=0.02)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _resnet_is_plain(block) -> bool:
    # "group" is the VAE's setting: with no time embedding diffusers' forward does what "default" does
    norm = getattr(block, "time_embedding_norm", None)
    return (float(getattr(block, "output_scale_factor", 0.0)) == 1.0
            and (norm == "default" or (norm == "group" and getattr(block, "time_emb_proj", 0) is None))
            and getattr(block, "upsample", None) is None and getattr(block, "downsample", None) is None
            and all(hasattr(block, a) for a in ("norm1", "norm2", "conv1", "conv2", "nonlinearity", "dropout",
                                                "time_emb_proj", "skip_time_act", "conv_shortcut")))


def _lean_processor_class():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class LeanAttnProcessor(AttnProcessor2_0):
        """AttnProcessor2_0 for plain attention on tokens (every UNet transformer block): the same
        calls without the division by rescale_output_factor (1.0) and the per-call checks; any
        other case (masks, 4-D input, group/spatial norms, residual, a factor != 1) goes to diffusers'."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            if (args or kwargs or attention_mask is not None or hidden_states.ndim != 3
                    or attn.spatial_norm is not None or attn.group_norm is not None
                    or attn.norm_q is not None or attn.norm_k is not None or attn.residual_connection
                    or attn.rescale_output_factor != 1.0
                    or (encoder_hidden_states is not None and attn.norm_cross)):
                return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        *args, **kwargs)
            batch = hidden_states.shape[0]
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            query = attn.to_q(hidden_states)
            key = attn.to_k(context)
            value = attn.to_v(context)
            inner_dim = key.shape[-1]
            head_dim = inner_dim // attn.heads
            query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
            out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
            out = attn.to_out[0](out)
            return attn.to_out[1](out)

    return LeanAttnProcessor


_LEAN: type | None = None


def lean_processor():
    global _LEAN
    if _LEAN is None:
        _LEAN = _lean_processor_class()
    return _LEAN()


def optimize_module(root: torch.nn.Module, *, channels_last: bool, fused_linear: bool = True) -> dict[str, int]:
    """Install the exact eager changes on every matching submodule of `root`; returns counts.
    Idempotent (an instance already changed is recognised and skipped). `fused_linear=False`
    for a module torch.compile will trace: inductor lowers `mkldnn._linear_pointwise` only for
    frozen (constant) weights and fails on parameters."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    counts = {"transformer_layout": 0, "resnet_no_div": 0, "attention_lean": 0, "linear_fused_bias": 0,
              "geglu_fused": 0}
    processor = None
    if fused_linear and any(p.dtype is torch.bfloat16 for p in root.parameters()):
        fused_linear = _fused_linear_available()  # the oneDNN op of this torch build, checked once
    for mod in root.modules():
        if (fused_linear and type(mod) is torch.nn.Linear and mod.bias is not None
                and mod.weight.dtype is torch.bfloat16 and "forward" not in vars(mod)):
            mod.forward = types.MethodType(_linear_fused_bias, mod)
            counts["linear_fused_bias"] += 1
            continue
        if fused_linear and _geglu_is_plain(mod) and mod.proj.weight.dtype is torch.bfloat16:
            mod.forward = types.MethodType(_geglu_fused, mod)
            counts["geglu_fused"] += 1
            continue
        if (channels_last and isinstance(mod, Transformer2DModel) and getattr(mod, "is_input_continuous", False)
                and "_get_output_for_continuous_inputs" not in vars(mod)):
            mod._get_output_for_continuous_inputs = types.MethodType(_transformer_output_channels_last, mod)
            counts["transformer_layout"] += 1
        elif isinstance(mod, ResnetBlock2D) and "forward" not in vars(mod) and _resnet_is_plain(mod):
            mod.forward = types.MethodType(_resnet_forward, mod)
            counts["resnet_no_div"] += 1
        elif isinstance(mod, Attention) and type(mod.processor) is AttnProcessor2_0:
            processor = processor or lean_processor()  # stateless: one instance serves all
            mod.set_processor(processor)
            counts["attention_lean"] += 1
    return counts


# --------------------------------------------------------------------------- torch.compile (opt-in)

def compile_cache_dir(home: Home | Path | None) -> Path | None:
    if home is None:
        return None
    root = Path(getattr(home, "root", home))
    return root.joinpath(*COMPILE_CACHE_FOLDER)


def _compile(model: LoadedModel, mode: str, home: Home | Path | None) -> list[str]:
    import torch._inductor.config as inductor_config

    folder = compile_cache_dir(home)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        # inductor reads the variable whenever it looks for its cache (FX graph + C++ kernels)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    inductor_config.fx_graph_cache = True
    inductor_config.freezing = False  # freezing constant-folds weights: LoRAs merged later would be ignored
    done = []
    # static shapes: one graph per (batch, size), recompiled for a new one; past dynamo's
    # recompile limit (8 by default) a new shape runs eagerly
    model.unet.compile(dynamic=False)
    done.append("unet")
    return done


# --------------------------------------------------------------------------- entry point

def optimize(model: LoadedModel, home: Home | Path | None = None, compile_mode: str = "off") -> dict[str, Any]:
    """Make `model` faster in place (see the module doc); returns what was done (for logs/tests)."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, not {compile_mode!r}")
    report: dict[str, Any] = {"eager": {}, "compiled": []}
    if model.device.type != "cpu":
        return report  # measured on the CPU only; GPUs keep diffusers' code paths
    eager_linear = compile_mode == "off"
    report["eager"]["unet"] = optimize_module(model.unet, channels_last=_is_channels_last(model.unet),
                                              fused_linear=eager_linear)
    report["eager"]["vae"] = optimize_module(model.vae, channels_last=_is_channels_last(model.vae),
                                             fused_linear=eager_linear)
    report["eager"]["vae"]["banded"] = vae_bands.install(model.vae)
    if compile_mode != "off":
        report["compiled"] = _compile(model, compile_mode, home)
    log.debug("speed: %s", report)
    return report


def _is_channels_last(module: torch.nn.Module) -> bool:
    """Whether the module's convolution weights are stored NHWC (a kernel larger than 1x1 decides)."""
    for p in module.parameters():
        if p.ndim == 4 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def optimize_cached(cache, model: LoadedModel) -> dict[str, Any] | None:
    """What ModelCache.get calls after a load. The switch lives on the cache (attributes read with
    defaults, so a cache made anywhere works): `cache.speedups` (True; False leaves the model as
    loaded), `cache.compile_mode` ("off", see COMPILE_MODES), `cache.compile_home` (a Home or a
    folder whose cache/torch-compile keeps inductor's compiled graphs; None: torch's default)."""
    if not getattr(cache, "speedups", True):
        return None
    return optimize(model, home=getattr(cache, "compile_home", None),
                    compile_mode=getattr(cache, "compile_mode", "off"))
