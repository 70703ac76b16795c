"""Darkroom: private, offline Stable Diffusion.

Importing the package makes the Hugging Face stack offline and installs the network
guard before anything from that stack is imported (see `darkroom.offline.guard`).
"""

from darkroom.offline import guard as _offline

_offline.configure_environment()
_offline.process_guard()

__version__ = "0.1.0"
