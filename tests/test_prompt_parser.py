"""Webui prompt syntax: attention parsing and 77-token chunking."""

import pytest

import darkroom  # noqa: F401  (offline setup first)
from darkroom.text import (
    BOS,
    EOS,
    PromptChunk,
    chunk_pieces,
    load_clip_tokenizer,
    parse_prompt_attention,
    tokenize_weighted,
)
from darkroom.text.prompt_parser import COMMA

CAT, DOG, A = 2368, 1929, 320
DOWN = 1 / 1.1

# The examples in the docstring of the webui's modules/prompt_parser.py::parse_prompt_attention.
WEBUI_VECTORS = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), WEBUI_VECTORS)
def test_webui_docstring_vectors(prompt, expected):
    assert parse_prompt_attention(prompt) == expected  # exact floats, as the webui prints


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("(word)", [("word", 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", DOWN)]),
        ("[[word]]", [("word", DOWN * DOWN)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(word: 1.3 )", [("word", 1.3)]),
        ("(word:0.5) x", [("word", 0.5), (" x", 1.0)]),
        ("((word:1.5))", [("word", 1.5 * 1.1)]),
        ("[(word:1.5)]", [("word", 1.5 * DOWN)]),
        ("(a [b])", [("a ", 1.1), ("b", DOWN * 1.1)]),
    ],
)
def test_weights(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("\\(a\\) \\[b\\] c\\\\d", [("(a) [b] c\\d", 1.0)]),
        ("(\\(a\\))", [("(a)", 1.1)]),
        ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
        ("a\\:b", [("a:b", 1.0)]),
    ],
)
def test_escapes(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("[unbalanced", [("unbalanced", DOWN)]),
        ("a ]b) c", [("a ]b) c", 1.0)]),  # closers with nothing open are text
        ("a:1.3) b", [("a:1.3) b", 1.0)]),
        ("[a:1.3)]", [("a:1.3)", DOWN)]),
        ("(a [b", [("a ", 1.1), ("b", 1.1 * DOWN)]),  # round closes first, then square
        ("x (a:1.2.3) y", [("x ", 1.0), ("a:1.2.3", 1.1), (" y", 1.0)]),  # webui raises
        ("(a:1e3)", [("a:1e3", 1.1)]),
    ],
)
def test_unbalanced_and_odd(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("a, BREAK, b", [("a,", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
        ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("a BREAKfast", [("a BREAKfast", 1.0)]),
        ("(a) BREAK b", [("a", 1.1), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),  # webui: "BREAK" x1.1
    ],
)
def test_break(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize("prompt", ["", "()", "[]", "(:1.5)"])
def test_empty(prompt):
    assert parse_prompt_attention(prompt) == [("", 1.0)]


# --- chunking -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return load_clip_tokenizer()


def body(chunk: PromptChunk) -> list[int]:
    """The prompt tokens of a chunk: between BOS and the first EOS."""
    assert len(chunk.tokens) == len(chunk.multipliers) == 77
    assert chunk.tokens[0] == BOS
    return chunk.tokens[1 : chunk.tokens.index(EOS)]


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_short_prompt_padding(tok, pad_id):
    (chunk,) = tokenize_weighted(tok, "a photo of a cat", pad_id=pad_id)
    assert chunk.tokens == [BOS, 320, 1125, 539, 320, 2368, EOS] + [pad_id] * 70
    assert chunk.multipliers == [1.0] * 77


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_empty_prompt(tok, pad_id):
    (chunk,) = tokenize_weighted(tok, "", pad_id=pad_id)
    assert chunk.tokens == [BOS, EOS] + [pad_id] * 75
    assert chunk.multipliers == [1.0] * 77


def test_weights_per_token(tok):
    (chunk,) = tokenize_weighted(tok, "a (astronaut riding:1.5) [horse]", pad_id=EOS)
    words = tok(["astronaut riding", "horse"], add_special_tokens=False).input_ids
    assert body(chunk) == [A, *words[0], *words[1]]
    n = len(words[0]) + len(words[1])
    assert chunk.multipliers[: n + 3] == [1.0, 1.0] + [1.5] * len(words[0]) + [DOWN] * len(
        words[1]
    ) + [1.0]
    assert chunk.multipliers[n + 3 :] == [1.0] * (77 - n - 3)


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_200_tokens_make_3_chunks(tok, pad_id):
    chunks = tokenize_weighted(tok, "cat " * 200, pad_id=pad_id)
    assert len(chunks) == 3
    assert [len(body(c)) for c in chunks] == [75, 75, 50]
    for full in chunks[:2]:
        assert full.tokens == [BOS] + [CAT] * 75 + [EOS]
    assert chunks[2].tokens == [BOS] + [CAT] * 50 + [EOS] + [pad_id] * 25


def test_exactly_75_tokens_is_one_chunk(tok):
    assert len(tokenize_weighted(tok, "cat " * 75, pad_id=EOS)) == 1
    assert len(tokenize_weighted(tok, "cat " * 76, pad_id=EOS)) == 2


def test_break_chunks(tok):
    chunks = tokenize_weighted(tok, "cat BREAK (dog)", pad_id=0)
    assert [body(c) for c in chunks] == [[CAT], [DOG]]
    assert chunks[1].multipliers[:3] == [1.0, 1.1, 1.0]
    assert chunks[1].tokens[3:] == [0] * 74
    # BREAK closes even an empty chunk; a trailing BREAK adds nothing.
    assert [body(c) for c in tokenize_weighted(tok, "BREAK dog", pad_id=EOS)] == [[], [DOG]]
    assert [body(c) for c in tokenize_weighted(tok, "cat BREAK", pad_id=EOS)] == [[CAT]]
    both = tokenize_weighted(tok, "cat BREAK BREAK dog", pad_id=EOS)
    assert [body(c) for c in both] == [[CAT], [], [DOG]]
    # A chunk that is exactly full is closed once, not followed by an empty one.
    full = tokenize_weighted(tok, "cat " * 75 + "BREAK dog", pad_id=EOS)
    assert [len(body(c)) for c in full] == [75, 1]


def test_comma_backtrack(tok):
    # 60 cats, a comma at index 60, then 30 weighted dogs: when the chunk is full the
    # comma is 15 tokens back, so the chunk ends after it and the 14 dogs move on.
    chunks = tokenize_weighted(tok, "cat " * 60 + ", " + "(dog) " * 30, pad_id=0)
    assert [body(c) for c in chunks] == [[CAT] * 60 + [COMMA], [DOG] * 30]
    assert chunks[0].tokens[63:] == [0] * 14
    assert chunks[1].multipliers == [1.0] + [1.1] * 30 + [1.0] * 46


def test_comma_too_far_back(tok):
    chunks = tokenize_weighted(tok, "cat " * 50 + ", " + "dog " * 40, pad_id=EOS)
    assert [body(c) for c in chunks] == [[CAT] * 50 + [COMMA] + [DOG] * 24, [DOG] * 16]


def test_comma_backtrack_off(tok):
    chunks = tokenize_weighted(tok, "cat " * 60 + ", " + "dog " * 30, pad_id=EOS, comma_backtrack=0)
    assert [len(body(c)) for c in chunks] == [75, 16]


@pytest.mark.parametrize(("comma_at", "cut"), [(55, True), (54, False), (74, True)])
def test_comma_window_edges(comma_at, cut):
    ids = [CAT] * comma_at + [COMMA] + [DOG] * (100 - comma_at)
    chunks = chunk_pieces([(ids, 1.0)], pad_id=EOS)
    first = comma_at + 1 if cut else 75
    assert [len(body(c)) for c in chunks] == [first, 101 - first]
    assert body(chunks[0]) + body(chunks[1]) == ids


def test_comma_starting_a_chunk_is_not_a_cut_point():
    # Webui quirk: a comma that arrives when the chunk is full opens the next chunk but
    # is not remembered, so that chunk is not cut after it.
    ids = [CAT] * 75 + [COMMA] + [DOG] * 80
    chunks = chunk_pieces([(ids, 1.0)], pad_id=EOS)
    assert [body(c) for c in chunks] == [[CAT] * 75, [COMMA] + [DOG] * 74, [DOG] * 6]


def test_comma_backtrack_keeps_weights():
    pieces = [([CAT] * 60, 0.5), ([COMMA], 1.0), ([DOG] * 20, 1.3)]
    chunks = chunk_pieces(pieces, pad_id=0)
    assert chunks[0].multipliers[:63] == [1.0] + [0.5] * 60 + [1.0, 1.0]
    assert chunks[1].multipliers[:22] == [1.0] + [1.3] * 20 + [1.0]


def test_chunk_pieces_no_pieces():
    assert chunk_pieces([], pad_id=0) == [PromptChunk([BOS, EOS] + [0] * 75, [1.0] * 77)]
