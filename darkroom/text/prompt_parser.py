"""AUTOMATIC1111 prompt weighting: `(word)`, `[word]`, `(word:1.3)`, `BREAK`, long prompts.

Prompts are shared between tools, so a prompt copied from the webui must give the same
tokens, weights and 77-token chunks here. The semantics follow the webui's
`modules/prompt_parser.py::parse_prompt_attention` and
`modules/sd_hijack_clip.py::tokenize_line`, including their float rounding (weights are
multiplied in the same order, so merging of equal weights agrees too).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from darkroom.text.tokenizer import BOS, EOS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_LENGTH = 75
"""Prompt tokens per chunk; BOS and EOS make it CLIP's 77."""
COMMA = 267
"""`,</w>` in the CLIP vocabulary: chunks are preferably cut after a comma."""
COMMA_BACKTRACK = 20
"""The webui's default `comma_padding_backtrack`: how far back a comma may be to cut there."""
BREAK = ("BREAK", -1.0)
"""How `parse_prompt_attention` reports a `BREAK` (the webui's marker)."""

_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]?                       # \( \) \[ \] \\ are literal; a lone \ is dropped
    | [(\[]
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # `:1.3)` closes a round group with that weight
    | [)\]]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(slots=True)
class _Span:
    text: str
    weight: float


def _parse(text: str) -> list[_Span | None]:
    """Weighted spans, `None` for each BREAK (kept out of weighting and merging)."""
    spans: list[_Span | None] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for span in spans[start:]:
            if span is not None:
                span.weight *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token[0] == "\\":
            spans.append(_Span(token[1:], 1.0))
        elif token == "(":
            open_round.append(len(spans))
        elif token == "[":
            open_square.append(len(spans))
        elif weight is not None and open_round:
            try:
                scale(open_round[-1], float(weight))
            except ValueError:  # "(a:1.2.3)": the webui crashes; keep the text, close as ")"
                spans.append(_Span(token[:-1], 1.0))
                scale(open_round[-1], ROUND_MULTIPLIER)
            open_round.pop()
        elif token == ")" and open_round:
            scale(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # plain text, or a bracket with nothing to close
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    spans.append(None)
                spans.append(_Span(part, 1.0))

    # Unclosed groups still apply, to the end of the prompt.
    for start in open_round:
        scale(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale(start, SQUARE_MULTIPLIER)

    merged: list[_Span | None] = []
    for span in spans or [_Span("", 1.0)]:
        prev = merged[-1] if merged else None
        if span is not None and prev is not None and prev.weight == span.weight:
            prev.text += span.text
        else:
            merged.append(span)
    return merged


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs, as the webui does; BREAK is `("BREAK", -1.0)`.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    return [BREAK if s is None else (s.text, s.weight) for s in _parse(text)]


@dataclass
class PromptChunk:
    """One CLIP pass: `tokens` is BOS + 75 prompt/pad tokens + EOS (77), `multipliers` the
    emphasis weight of each position (1.0 at BOS, EOS and padding)."""

    tokens: list[int]
    multipliers: list[float]
    # Textual inversion will add `fixes: list[(offset, embedding)]` here, as in the webui.


Piece = tuple[Sequence[int], float] | None
"""Token ids of one weighted run and its weight, or `None` for BREAK."""


def encode_pieces(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without BOS/EOS and untruncated.

    Seam for textual-inversion embeddings: they will be found here (an embedding name
    becomes placeholder ids of its vector count) and `chunk_pieces` will keep each
    embedding inside one chunk, as the webui's `find_embedding_at_position` does.
    """
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def chunk_pieces(
    pieces: Sequence[Piece], *, pad_id: int, comma_backtrack: int = COMMA_BACKTRACK
) -> list[PromptChunk]:
    """Pack weighted token runs into 77-token chunks (the webui's `tokenize_line`).

    A chunk holds 75 tokens. BREAK closes the current chunk, even an empty one. When a
    chunk is full and its last comma is at most `comma_backtrack` tokens from the end,
    the chunk is cut after that comma and the tokens after it start the next chunk, so
    a phrase is not split across two encoder passes (0 turns this off).
    """
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    mults: list[float] = []
    last_comma = -1

    def cut(at: int) -> None:
        nonlocal tokens, mults, last_comma
        chunks.append(_padded(tokens[:at], mults[:at], pad_id))
        tokens, mults, last_comma = tokens[at:], mults[at:], -1

    for piece in pieces:
        if piece is None:
            cut(len(tokens))
            continue
        ids, weight = piece
        for token in ids:
            if token == COMMA:
                last_comma = len(tokens)
            elif (
                comma_backtrack > 0
                and len(tokens) == CHUNK_LENGTH
                and last_comma != -1
                and CHUNK_LENGTH - last_comma <= comma_backtrack
            ):
                cut(last_comma + 1)
            if len(tokens) == CHUNK_LENGTH:
                cut(CHUNK_LENGTH)
            tokens.append(token)
            mults.append(weight)

    if tokens or not chunks:
        cut(len(tokens))
    return chunks


def _padded(tokens: list[int], mults: list[float], pad_id: int) -> PromptChunk:
    """BOS + tokens + EOS, then `pad_id` to 77 (the webui pads with EOS, and for OpenCLIP
    then overwrites everything after the first EOS with its pad id 0)."""
    fill = CHUNK_LENGTH - len(tokens)
    return PromptChunk(
        tokens=[BOS, *tokens, EOS] + [pad_id] * fill,
        multipliers=[1.0, *mults, 1.0] + [1.0] * fill,
    )


def tokenize_weighted(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    pad_id: int,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[PromptChunk]:
    """A webui-syntax prompt as 77-token chunks with per-token weights, at least one chunk.

    `pad_id` is what follows EOS: EOS (49407) for SD1's CLIP, 0 for OpenCLIP encoders
    (SD2, SDXL's second encoder), as the webui pads them.
    """
    spans = _parse(prompt)
    encoded = iter(encode_pieces(tokenizer, [s.text for s in spans if s is not None]))
    pieces = [None if s is None else (next(encoded), s.weight) for s in spans]
    return chunk_pieces(pieces, pad_id=pad_id, comma_backtrack=comma_backtrack)
