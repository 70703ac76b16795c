"""The fuzz tests' fixtures: a served studio and a CLI home (defined in support.py)."""

from tests.fuzz.support import cli_env, served  # noqa: F401
