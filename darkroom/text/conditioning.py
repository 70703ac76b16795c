"""Prompt -> text-encoder conditioning, the AUTOMATIC1111 way.

Each 75-token chunk is encoded on its own, per-token emphasis multiplies the hidden states
and the chunk's mean is restored (the webui's "Original" emphasis), and chunks are joined
along the sequence. SDXL concatenates its two encoders' penultimate layers and takes the
pooled embedding of the second encoder's first chunk.

Textual-inversion embeddings (darkroom.text.embeddings) are spliced in as the webui's
`EmbeddingsWithFixes` does: their positions hold placeholder ids, and a forward hook on
the encoder's token-embedding layer replaces those rows with the embedding's vectors for
that one call (transformers' CLIPTextModel takes no `inputs_embeds`; pooling still finds
EOS in the real ids).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from darkroom.errors import Interrupted, InvalidRequest
from darkroom.models.loader import LoadedModel, TextEncoderSlot
from darkroom.text.prompt_parser import EmbeddingVocab, PromptChunk, tokenize_weighted
from darkroom.text.tokenizer import load_clip_tokenizer

if TYPE_CHECKING:
    from darkroom.text.embeddings import Embedding


@dataclass
class Conditioning:
    context: torch.Tensor  # [1, 77 * chunks, dim]
    pooled: torch.Tensor | None = None  # [1, proj_dim] for SDXL


@contextmanager
def _spliced(encoder: torch.nn.Module, ids: torch.Tensor,
             vectors: Sequence[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """While active, `encoder`'s token embeddings of `ids` (batch 1) get `vectors[i][1]`
    written from position `vectors[i][0]` on. Other inputs pass untouched."""
    if not vectors:
        yield
        return
    layer = encoder.get_input_embeddings()
    applied = []

    def hook(_module, args, output):
        if not args or not torch.is_tensor(args[0]) or args[0].data_ptr() != ids.data_ptr():
            return None
        output = output.clone()
        for pos, vec in vectors:
            output[:, pos:pos + vec.shape[0]] = vec.to(output.device, output.dtype)
        applied.append(True)
        return output

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if not applied:
        raise RuntimeError("textual inversion: the text encoder did not embed the prompt ids through its token"
                           " embedding layer (unsupported transformers version?)")


def _encode_chunk(slot: TextEncoderSlot, chunk: PromptChunk, *, family: str, clip_skip: int,
                  device: torch.device, vectors: Sequence[tuple[int, torch.Tensor]] = ()
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk through one encoder; `vectors`: (position in `chunk.tokens`, [n, width]) to splice in."""
    ids = torch.tensor([chunk.tokens], device=device)
    with _spliced(slot.model, ids, vectors):
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
    """Encodes prompts for one loaded model; caches nothing between requests on purpose.

    `embeddings`: textual-inversion embeddings usable with this model, by trigger word
    (`EmbeddingLibrary(home).for_model(model)`); each has one tensor per text encoder.
    `used_embeddings` collects {name: short hash} of those found by every `encode` call
    (prompt and negative alike), for the infotext's `TI hashes`. `cancel`, when set, stops
    encoding between chunks (a long prompt is many text-encoder passes) with `Interrupted`.
    """

    def __init__(self, model: LoadedModel, clip_skip: int = 1, embeddings: Mapping[str, Embedding] | None = None,
                 cancel: threading.Event | None = None):
        self.model = model
        self.cancel = cancel
        self.clip_skip = max(1, clip_skip)
        layers = min((n for n in map(_layers, model.text_encoders) if n is not None), default=None)
        if layers is not None and self.clip_skip > layers:
            # clip skip N reads the output of the N-th layer from the end: there must be that many
            raise InvalidRequest(f"clip skip {self.clip_skip} is more than the {layers} layers of this model's text"
                                 f" encoder; use 1 to {layers}")
        self.tokenizer = load_clip_tokenizer()
        self.embeddings: dict[str, Embedding] = dict(embeddings or {})
        widths = [_width(slot) for slot in model.text_encoders] if self.embeddings else []
        for name, emb in self.embeddings.items():
            got = [int(t.shape[-1]) for t in emb.tensors]
            if got != widths:
                raise ValueError(f"embedding {name!r} has vector widths {got}; the model's text encoders take {widths}")
        vocab = EmbeddingVocab(self.tokenizer, {n: e.count for n, e in self.embeddings.items()})
        self.vocab = vocab if vocab else None
        self.used_embeddings: dict[str, str] = {}

    def chunks(self, prompt: str, slot: TextEncoderSlot) -> list[PromptChunk]:
        return tokenize_weighted(self.tokenizer, prompt, pad_id=slot.pad_id, embeddings=self.vocab)

    @torch.no_grad()
    def encode(self, prompt: str, *, zero_if_empty: bool = False) -> Conditioning:
        family = self.model.family.id
        if zero_if_empty and prompt == "" and family == "sdxl":
            # the webui (like diffusers) feeds zeros for an empty SDXL negative prompt
            cond = self._encode("a", record=False)
            return Conditioning(torch.zeros_like(cond.context), torch.zeros_like(cond.pooled))
        return self._encode(prompt, record=True)

    def _encode(self, prompt: str, *, record: bool) -> Conditioning:
        family = self.model.family.id
        per_encoder, pooled = [], None
        for index, slot in enumerate(self.model.text_encoders):
            parts = []
            for i, chunk in enumerate(self.chunks(prompt, slot)):
                if self.cancel is not None and self.cancel.is_set():
                    raise Interrupted("interrupted while encoding the prompt")
                vectors = [(pos, self.embeddings[name].tensors[index]) for pos, name in chunk.fixes]
                z, p = _encode_chunk(slot, chunk, family=family, clip_skip=self.clip_skip, device=self.model.device,
                                     vectors=vectors)
                parts.append(z)
                if i == 0 and p is not None:
                    pooled = p
                if record:
                    for _, name in chunk.fixes:
                        if name not in self.used_embeddings:
                            self.used_embeddings[name] = self.embeddings[name].shorthash
            per_encoder.append(torch.cat(parts, dim=1))
        context = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
        return Conditioning(context, pooled)


def _layers(slot: TextEncoderSlot) -> int | None:
    """How many transformer layers a text encoder has (12 for SD1's CLIP, fewer in small models)."""
    layers = getattr(getattr(slot.model, "config", None), "num_hidden_layers", None)
    return layers if isinstance(layers, int) and layers > 0 else None


def _width(slot: TextEncoderSlot) -> int:
    return int(slot.model.get_input_embeddings().weight.shape[1])


def pad_to_same_length(a: Conditioning, b: Conditioning, empty: Conditioning) -> tuple[Conditioning, Conditioning]:
    """Prompt and negative prompt of different chunk counts: append empty-prompt chunks."""
    def grow(c: Conditioning, length: int) -> Conditioning:
        missing = (length - c.context.shape[1]) // empty.context.shape[1]
        if missing <= 0:
            return c
        return Conditioning(torch.cat([c.context] + [empty.context] * missing, dim=1), c.pooled)

    length = max(a.context.shape[1], b.context.shape[1])
    return grow(a, length), grow(b, length)
