"""Prompt text: the bundled CLIP tokenizer and the webui prompt-weighting syntax.

Importing this package is cheap; transformers is imported only when a tokenizer is loaded.
"""

from darkroom.text.prompt_parser import (
    PromptChunk,
    chunk_pieces,
    encode_pieces,
    parse_prompt_attention,
    tokenize_weighted,
)
from darkroom.text.tokenizer import BOS, EOS, load_clip_tokenizer

__all__ = [
    "BOS",
    "EOS",
    "PromptChunk",
    "chunk_pieces",
    "encode_pieces",
    "load_clip_tokenizer",
    "parse_prompt_attention",
    "tokenize_weighted",
]
