"""The CLIP BPE tokenizer, loaded from the files shipped in the package.

Every SD1/SD2/SDXL text encoder uses the same 49408-token CLIP vocabulary, so one bundled
copy serves all of them and no model folder or hub download is ever needed to tokenize.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING

from darkroom.errors import DarkroomError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BOS = 49406
"""`<|startoftext|>`, first token of every 77-token CLIP sequence."""
EOS = 49407
"""`<|endoftext|>`; SD1's CLIP also pads with it (OpenCLIP pads with 0 instead)."""
VOCAB_SIZE = 49408
MAX_LENGTH = 77
"""CLIP's context: BOS + 75 prompt tokens + EOS."""

_ASSET_NAMES = ("vocab.json", "merges.txt")


def _asset_dir() -> Traversable:
    return files("darkroom") / "assets" / "tokenizer"


@functools.cache
def load_clip_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer from `darkroom/assets/tokenizer/` (offline, ~50 ms, cached)."""
    return _load_from(_asset_dir())


def _load_from(directory: Traversable) -> CLIPTokenizer:
    """Build the tokenizer from `directory`; split out so tests can point at a broken copy."""
    from transformers import CLIPTokenizer  # heavy import, only when a tokenizer is needed

    for name in _ASSET_NAMES:
        if not (directory / name).is_file():
            raise DarkroomError(
                f"CLIP tokenizer file {name} is missing from {directory}",
                hint="reinstall Darkroom or run scripts/make_tokenizer_assets.py",
            )
    with ExitStack() as stack:
        # as_file gives real paths even from a zipped install; the files are read here.
        vocab, merges = (stack.enter_context(as_file(directory / n)) for n in _ASSET_NAMES)
        # `vocab=`/`merges=` are the transformers 5 names; `vocab_file=` would be ignored
        # and silently give a useless 3-entry tokenizer, hence the size check below.
        tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=MAX_LENGTH)
    if (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id) != (VOCAB_SIZE, BOS, EOS):
        raise DarkroomError(
            f"CLIP tokenizer files in {directory} are not the CLIP vocabulary "
            f"({len(tokenizer)} tokens, expected {VOCAB_SIZE})",
            hint="reinstall Darkroom or run scripts/make_tokenizer_assets.py",
        )
    return tokenizer
