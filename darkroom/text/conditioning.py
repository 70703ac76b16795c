"""Prompt -> text-encoder conditioning, the AUTOMATIC1111 way.

Each 75-token chunk is encoded on its own, per-token emphasis multiplies the hidden states
and the chunk's mean is restored (the webui's "Original" emphasis), and chunks are joined
along the sequence. SDXL concatenates its two encoders' penultimate layers and takes the
pooled embedding of the second encoder's first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darkroom.models.loader import LoadedModel, TextEncoderSlot
from darkroom.text.prompt_parser import PromptChunk, tokenize_weighted
from darkroom.text.tokenizer import load_clip_tokenizer


@dataclass
class Conditioning:
    context: torch.Tensor  # [1, 77 * chunks, dim]
    pooled: torch.Tensor | None = None  # [1, proj_dim] for SDXL


def _encode_chunk(slot: TextEncoderSlot, chunk: PromptChunk, *, family: str, clip_skip: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.tensor([chunk.tokens], device=device)
    out = slot.model(input_ids=ids, output_hidden_states=True)
    text_model = getattr(slot.model, "text_model", slot.model)  # transformers >= 5.6 flattened CLIPTextModel
    if family.startswith("sdxl"):
        z = out.hidden_states[-(1 + clip_skip)]  # penultimate layer, no final norm, as SDXL was trained
    elif clip_skip > 1:
        z = text_model.final_layer_norm(out.hidden_states[-clip_skip])
    else:
        z = out.last_hidden_state
    pooled = getattr(out, "text_embeds", None)
    weights = torch.tensor(chunk.multipliers, device=device, dtype=z.dtype)
    if any(m != 1.0 for m in chunk.multipliers):
        original_mean = z.float().mean()
        z = z * weights[None, :, None]
        z = z * (original_mean / z.float().mean()).to(z.dtype)
    return z, pooled


class PromptEncoder:
    """Encodes prompts for one loaded model; caches nothing between requests on purpose."""

    def __init__(self, model: LoadedModel, clip_skip: int = 1):
        self.model = model
        self.clip_skip = max(1, clip_skip)
        self.tokenizer = load_clip_tokenizer()

    def chunks(self, prompt: str, slot: TextEncoderSlot) -> list[PromptChunk]:
        return tokenize_weighted(self.tokenizer, prompt, pad_id=slot.pad_id)

    @torch.no_grad()
    def encode(self, prompt: str, *, zero_if_empty: bool = False) -> Conditioning:
        family = self.model.family.id
        if zero_if_empty and prompt == "" and family == "sdxl":
            # the webui (like diffusers) feeds zeros for an empty SDXL negative prompt
            cond = self.encode("a")
            return Conditioning(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
        per_encoder, pooled = [], None
        for slot in self.model.text_encoders:
            parts = []
            for i, chunk in enumerate(self.chunks(prompt, slot)):
                z, p = _encode_chunk(slot, chunk, family=family, clip_skip=self.clip_skip, device=self.model.device)
                parts.append(z)
                if i == 0 and p is not None:
                    pooled = p
            per_encoder.append(torch.cat(parts, dim=1))
        context = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
        return Conditioning(context, pooled)


def pad_to_same_length(a: Conditioning, b: Conditioning, empty: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Prompt and negative prompt of different chunk counts: append empty-prompt chunks."""
    def grow(c: Conditioning, length: int) -> Conditioning:
        missing = (length - c.context.shape[1]) // empty.context.shape[1]
        if missing <= 0:
            return c
        return Conditioning(torch.cat([c.context] + [empty.context] * missing, dim=1), c.pooled)

    length = max(a.context.shape[1], b.context.shape[1])
    return grow(a, length), grow(b, length)
