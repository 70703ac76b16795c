"""The bundled CLIP tokenizer: offline, correct vocabulary, clear errors."""

import json
import subprocess
import sys

import pytest

import darkroom  # noqa: F401  (offline setup first)
from darkroom.errors import DarkroomError
from darkroom.text import BOS, EOS, load_clip_tokenizer
from darkroom.text.prompt_parser import COMMA
from darkroom.text.tokenizer import _load_from


def test_known_ids():
    ids = load_clip_tokenizer()("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_special_tokens_and_size():
    tok = load_clip_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.convert_tokens_to_ids(",</w>") == COMMA


def test_cached():
    assert load_clip_tokenizer() is load_clip_tokenizer()


def test_missing_asset_names_the_file(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(DarkroomError, match=r"merges\.txt"):
        _load_from(tmp_path)


def test_wrong_vocabulary_is_rejected(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(DarkroomError, match="not the CLIP vocabulary"):
        _load_from(tmp_path)


def test_import_is_cheap():
    code = "import sys, darkroom.text; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
