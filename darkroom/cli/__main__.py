"""`python -m darkroom.cli`: the same as the `darkroom` command."""

from darkroom.cli import main

main()
