"""The frozen Darkroom's entry point (PyInstaller runs this; see darkroom/carry/portable.py).

`import darkroom` comes before anything but the standard library: it sets the Hugging Face stack offline
and installs the network guard before any of that stack is imported, as the `darkroom` command does.
"""

import runpy
import sys

import darkroom  # noqa: F401  (the offline environment and the network guard, first)


def _main() -> None:
    # `darkroom doctor --prove-offline` starts `sys.executable -m darkroom.offline.proof ...`; frozen,
    # sys.executable is this program, so run such a module the way `python -m` would
    if len(sys.argv) > 2 and sys.argv[1] == "-m" and sys.argv[2].startswith("darkroom."):
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
        return
    from darkroom.cli import main

    main()


if __name__ == "__main__":
    _main()
