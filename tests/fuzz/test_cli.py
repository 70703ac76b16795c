"""The fuzz over the CLI: generate, png-info, models, samplers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import (
    MODEL_NAMES,
    texts,
)
from tests.fuzz.support import (
    check_cli,
    cli_paths,
    fuzz,
    generate_args,
    run_cli,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning"),  # Pillow, reading the fuzz's images
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),  # hypothesis, printing 70k-character examples
]


@fuzz(60)
@given(data=st.data())
def test_cli_generate(cli_env, data):
    home, files, budgets = cli_env
    args = data.draw(generate_args(files))
    budgets.clear()
    r = run_cli(home, *args)
    capped = any(b.capped for b in budgets)
    check_cli(r, args, interrupted_ok=capped)


@fuzz(80)
@given(data=st.data())
def test_cli_png_info(cli_env, data):
    home, files, _ = cli_env
    paths = data.draw(st.lists(st.one_of(cli_paths(files, "params"), cli_paths(files, "image")), min_size=1,
                               max_size=3))
    r = run_cli(home, "png-info", *paths)
    check_cli(r, paths, no_parameters_ok=True)


model_names = st.one_of(st.sampled_from(MODEL_NAMES), texts)
kinds = st.sampled_from(("checkpoint", "lora", "vae", "embedding", "bogus", ""))


@fuzz(60)
@given(args=st.one_of(
    st.tuples(st.lists(kinds.map(lambda k: ["--kind", k]), max_size=2), st.lists(st.just(["--json"]), max_size=1)).map(
        lambda t: ["models", "list", *sum(t[0], []), *sum(t[1], [])]),
    st.tuples(model_names, st.lists(kinds.map(lambda k: ["--kind", k]), max_size=1),
              st.lists(st.just(["--json"]), max_size=1)).map(
        lambda t: ["models", "info", *sum(t[1], []), *sum(t[2], []), t[0]]),
    st.lists(texts, max_size=1).map(lambda rest: ["samplers", *rest]),
    st.lists(st.one_of(st.sampled_from(("--help", "-h", "--version", "models", "bogus")), texts), max_size=2),
))
def test_cli_models_and_samplers(cli_env, args):
    home, _, _ = cli_env
    r = run_cli(home, *args)
    check_cli(r, args)
