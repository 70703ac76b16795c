"""Property-based fuzz over every HTTP request model and CLI command (issue 16).

The property, for anything a client or a user can send: a 2xx answer, or a 4xx whose message is
one non-empty line saying what is wrong; never a 5xx, never a Python traceback, never a hang.
Requests are random JSON shapes, the models' own fields with wrong types and edge values
(0, -1, 2**63, 2**64, 1e308, NaN, "", 70k characters, emoji, RTL, NUL, lone surrogates),
unknown fields, non-JSON bodies, wrong content types, and random bytes as images (with magic
numbers of many formats, a tiny PNG declaring a huge size, text chunks of every webui).

Generation stays cheap: the tiny SD1 model at 64-128 pixels and 1-3 steps; a request that is
valid but would take long (the A1111 default of 50 steps at 512x512, a 4096-pixel hires pass)
is answered as if interrupted before its first step (`Budget`): memory and time limits of huge
but legitimate requests are another issue. Examples are derandomized, so CI runs the same
inputs every time; each request runs under a hang guard (minutes, never a speed assertion).
To hunt for more, run N times as many examples from fresh random seeds:

    DARKROOM_FUZZ_EXPLORE=5 .venv/bin/python -m pytest tests/fuzz

What the fuzz found is kept at the end of the file as plain examples.
"""
