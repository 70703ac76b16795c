"""The prompt token counter (POST /api/tokens): tokens and 75-token chunks as the webui counts them."""

from __future__ import annotations

import pytest

from darkroom.text.token_count import count_tokens


@pytest.mark.parametrize(("text", "tokens", "chunks"), [
    ("", 0, 1),
    ("a cat", 2, 1),
    ("(a cat:1.3)", 2, 1),  # weights are not tokens
    ("a BREAK b", 76, 2),  # BREAK closes the first chunk: the webui counts it as 75
    ("a, " * 40, 80, 2),  # comma backtrack: the first chunk is cut after a comma, counted as 75
    ("word " * 75, 75, 1),
    ("word " * 76, 76, 2),
    ("[a cat:a very big dog with hat:5]", 6, 1),  # the longest text of the schedule
    ("a AND b c d", 3, 1),  # the longest AND part
])
def test_counts_as_the_webui(text, tokens, chunks):
    assert count_tokens(text) == {"tokens": tokens, "chunks": chunks, "limit": 75 * chunks}


def test_tokens_route(api):
    r = api.post("/api/tokens", json={"text": "word " * 80})
    assert r.status_code == 200, r.text
    assert r.json() == {"tokens": 80, "chunks": 2, "limit": 150}
    assert api.post("/api/tokens", json={"text": "a", "bogus": 1}).status_code == 422
