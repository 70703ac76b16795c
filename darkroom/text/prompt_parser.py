"""AUTOMATIC1111 prompt weighting: `(word)`, `[word]`, `(word:1.3)`, `BREAK`, long prompts.

Prompts are shared between tools, so a prompt copied from the webui must give the same
tokens, weights and 77-token chunks here. The semantics follow the webui's
`modules/prompt_parser.py::parse_prompt_attention` and
`modules/sd_hijack_clip.py::tokenize_line`, including their float rounding (weights are
multiplied in the same order, so merging of equal weights agrees too).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from darkroom.errors import InvalidRequest
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
MAX_WEIGHT = 1000.0
"""The largest emphasis (either sign) a prompt may ask for. The webui has no limit, but past a few
units the picture is noise already, and a weight like `(word:1000...0)` (inf) or 80 nested
brackets overflows the text encoder's numbers into a silent black image: refused instead."""

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
                value = float(weight)
            except ValueError:  # "(a:1.2.3)": the webui crashes; keep the text, close as ")"
                spans.append(_Span(token[:-1], 1.0))
                value = ROUND_MULTIPLIER
            else:
                check_weight(value, f"prompt weight {shown(weight)}")
            scale(open_round.pop(), value)
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

    for span in spans:
        if span is not None and span.text.strip():
            check_weight(span.weight, f"the emphasis on {shown(span.text.strip())!r} ({span.weight:g}, from"
                                       " nested brackets)")
    merged: list[_Span | None] = []
    for span in spans or [_Span("", 1.0)]:
        prev = merged[-1] if merged else None
        if span is not None and prev is not None and prev.weight == span.weight:
            prev.text += span.text
        else:
            merged.append(span)
    return merged


def check_weight(value: float, what: str) -> None:
    """Refuse a weight that is not finite or beyond MAX_WEIGHT (InvalidRequest naming it)."""
    if not math.isfinite(value):
        raise InvalidRequest(f"{what} is not a finite number; write a weight such as (word:1.2)")
    if abs(value) > MAX_WEIGHT:
        raise InvalidRequest(f"{what} is outside -{MAX_WEIGHT:g} to {MAX_WEIGHT:g}; write a weight such as (word:1.2)")


def shown(text: str, limit: int = 24) -> str:
    """`text` cut for an error message (a weight may be 400 digits long)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs, as the webui does; BREAK is `("BREAK", -1.0)`.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    return [BREAK if s is None else (s.text, s.weight) for s in _parse(text)]


PLACEHOLDER = 0
"""The token id under each embedding vector (the webui's): never EOS, so pooling is unaffected."""


@dataclass
class PromptChunk:
    """One CLIP pass: `tokens` is BOS + 75 prompt/pad tokens + EOS (77), `multipliers` the
    emphasis weight of each position (1.0 at BOS, EOS and padding).

    `fixes` are the textual-inversion embeddings in this chunk, as (index in `tokens` of
    the embedding's first vector, embedding name); its vectors replace the token
    embeddings of the `PLACEHOLDER` ids there. (The webui's offsets exclude BOS; these
    include it, so they index `tokens` directly.)
    """

    tokens: list[int]
    multipliers: list[float]
    fixes: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class EmbeddingRef:
    """An embedding found in a prompt: stands for `vectors` token positions."""

    name: str
    vectors: int


class EmbeddingVocab:
    """Embedding names by their token ids (the webui's `EmbeddingDatabase.ids_lookup`).

    A name matches where its token sequence occurs in a weighted run's tokens, as in the
    webui: the CLIP tokenizer lowercases, so matching ignores case; the name's last token
    ends a word (`</w>`), so "names" does not trigger "name", but BPE may split a longer
    word so that it ends with the name's tokens ("xname" can trigger "name"). Longer names
    win over their prefixes.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vectors: Mapping[str, int]):
        self._lookup: dict[int, list[tuple[list[int], EmbeddingRef]]] = {}
        names = sorted(vectors)
        for name, ids in zip(names, encode_pieces(tokenizer, names), strict=True):
            count = int(vectors[name])
            if not ids or not 0 < count <= CHUNK_LENGTH:
                continue
            entries = self._lookup.setdefault(ids[0], [])
            if any(known == ids for known, _ in entries):
                continue  # two names, same tokens ("Style", "style"): the first one (sorted) wins
            entries.append((ids, EmbeddingRef(name, count)))
            entries.sort(key=lambda e: len(e[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self._lookup)

    def find(self, tokens: Sequence[int], offset: int) -> tuple[EmbeddingRef, int] | None:
        """The embedding whose name starts at `tokens[offset]`, and how many tokens the name has."""
        for ids, ref in self._lookup.get(tokens[offset], ()):
            if list(tokens[offset:offset + len(ids)]) == ids:
                return ref, len(ids)
        return None

    def replace(self, tokens: Sequence[int]) -> list[int | EmbeddingRef]:
        """`tokens` with each embedding name replaced by one `EmbeddingRef`."""
        out: list[int | EmbeddingRef] = []
        i = 0
        while i < len(tokens):
            found = self.find(tokens, i) if self._lookup else None
            if found is None:
                out.append(tokens[i])
                i += 1
            else:
                out.append(found[0])
                i += found[1]
        return out


Piece = tuple[Sequence[int | EmbeddingRef], float] | None
"""Token ids (or embeddings) of one weighted run and its weight, or `None` for BREAK."""


def encode_pieces(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], embeddings: EmbeddingVocab | None = None
) -> list[list[int | EmbeddingRef]]:
    """Token ids of each text, without BOS/EOS and untruncated.

    With `embeddings`, each embedding name found in a text's tokens (as the webui's
    `find_embedding_at_position`) becomes one `EmbeddingRef`; `chunk_pieces` then gives it
    as many positions as it has vectors, all inside one chunk.
    """
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)
    pieces = [list(ids) for ids in encoded["input_ids"]]
    if embeddings:
        return [embeddings.replace(ids) for ids in pieces]
    return pieces


def chunk_pieces(
    pieces: Sequence[Piece], *, pad_id: int, comma_backtrack: int = COMMA_BACKTRACK
) -> list[PromptChunk]:
    """Pack weighted token runs into 77-token chunks (the webui's `tokenize_line`).

    A chunk holds 75 tokens. BREAK closes the current chunk, even an empty one. When a
    chunk is full and its last comma is at most `comma_backtrack` tokens from the end,
    the chunk is cut after that comma and the tokens after it start the next chunk, so
    a phrase is not split across two encoder passes (0 turns this off).

    An `EmbeddingRef` takes `vectors` positions (`PLACEHOLDER` ids, the run's weight) and
    is never split: when it does not fit, the chunk is closed first. Embeddings moved by a
    comma cut move with their placeholders (the webui's `tokenize_line` moves only the
    tokens and weights, leaving the vectors at padding positions of the previous chunk).
    """
    chunks: list[PromptChunk] = []
    tokens: list[int] = []
    mults: list[float] = []
    fixes: list[tuple[int, str]] = []
    last_comma = -1

    def cut(at: int) -> None:
        nonlocal tokens, mults, fixes, last_comma
        chunks.append(_padded(tokens[:at], mults[:at], pad_id, [(i, n) for i, n in fixes if i < at]))
        tokens, mults, last_comma = tokens[at:], mults[at:], -1
        fixes = [(i - at, n) for i, n in fixes if i >= at]

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
            if isinstance(token, EmbeddingRef):
                if not 0 < token.vectors <= CHUNK_LENGTH:
                    raise ValueError(f"embedding {token.name!r} has {token.vectors} vectors; at most 75 fit a chunk")
                if len(tokens) + token.vectors > CHUNK_LENGTH:
                    cut(len(tokens))
                fixes.append((len(tokens), token.name))
                tokens.extend([PLACEHOLDER] * token.vectors)
                mults.extend([weight] * token.vectors)
                continue
            tokens.append(token)
            mults.append(weight)

    if tokens or not chunks:
        cut(len(tokens))
    return chunks


def _padded(tokens: list[int], mults: list[float], pad_id: int,
            fixes: list[tuple[int, str]] | None = None) -> PromptChunk:
    """BOS + tokens + EOS, then `pad_id` to 77 (the webui pads with EOS, and for OpenCLIP
    then overwrites everything after the first EOS with its pad id 0)."""
    fill = CHUNK_LENGTH - len(tokens)
    return PromptChunk(
        tokens=[BOS, *tokens, EOS] + [pad_id] * fill,
        multipliers=[1.0, *mults, 1.0] + [1.0] * fill,
        fixes=[(i + 1, name) for i, name in fixes or ()],
    )


def tokenize_weighted(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    pad_id: int,
    comma_backtrack: int = COMMA_BACKTRACK,
    embeddings: EmbeddingVocab | None = None,
) -> list[PromptChunk]:
    """A webui-syntax prompt as 77-token chunks with per-token weights, at least one chunk.

    `pad_id` is what follows EOS: EOS (49407) for SD1's CLIP, 0 for OpenCLIP encoders
    (SD2, SDXL's second encoder), as the webui pads them. `embeddings`: the textual-
    inversion names to look for (see `EmbeddingVocab`); found ones are in `PromptChunk.fixes`.
    """
    spans = _parse(prompt)
    encoded = iter(encode_pieces(tokenizer, [s.text for s in spans if s is not None], embeddings))
    pieces = [None if s is None else (next(encoded), s.weight) for s in spans]
    return chunk_pieces(pieces, pad_id=pad_id, comma_backtrack=comma_backtrack)
