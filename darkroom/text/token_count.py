"""The prompt token counter of the web UI: tokens and 75-token chunks as the webui counts them.

The webui's counter (`modules/ui.py` `update_token_counter`) splits `AND` parts, expands the
prompt schedule (`[from:to:when]`, `[a|b]`) at the form's steps and shows the longest text's
count; a text's count is 75 per chunk before the last plus the last chunk's tokens
(`tokenize_line`), so `BREAK` and the comma backtrack show in it.
"""

from __future__ import annotations

from darkroom.text.prompt_parser import CHUNK_LENGTH, EOS, tokenize_weighted
from darkroom.text.schedule import prompt_schedules, split_and
from darkroom.text.tokenizer import load_clip_tokenizer


def _count(tokenizer, text: str) -> tuple[int, int]:
    chunks = tokenize_weighted(tokenizer, text, pad_id=EOS)
    last = chunks[-1].tokens.index(EOS, 1) - 1  # the last chunk's tokens between BOS and EOS
    return CHUNK_LENGTH * (len(chunks) - 1) + last, len(chunks)


def count_tokens(text: str, steps: int = 20) -> dict:
    """{"tokens", "chunks", "limit"} for the longest text `text` stands for at `steps` steps."""
    tokenizer = load_clip_tokenizer()
    texts = [t for part, _ in split_and(text) for _, t in prompt_schedules(part, max(1, steps))]
    tokens, chunks = max((_count(tokenizer, t) for t in texts), default=(0, 1))
    return {"tokens": tokens, "chunks": chunks, "limit": chunks * CHUNK_LENGTH}
