"""User-facing errors: one class the CLI and the server render without a traceback."""

from __future__ import annotations


class DarkroomError(Exception):
    """A problem the user can fix. `str()` is a one-line message that says what and how.

    `status` is the HTTP status the server will answer with (422 for bad input, 404 for
    something missing), so every interface renders the same error the same way.
    """

    status = 400

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidRequest(DarkroomError):
    """A generation request with a value out of range or unknown (a 513-pixel width)."""

    status = 422


class ModelNotFound(DarkroomError):
    status = 404


class ModelLoadError(DarkroomError):
    """A file that is not a loadable checkpoint: truncated, corrupt, a LoRA, a pickle."""

    status = 422


class UnsupportedModel(ModelLoadError):
    """A recognised family that Darkroom cannot run yet (SD3, Flux)."""


class Interrupted(DarkroomError):
    """Raised inside sampling when the user interrupts; finished images are kept."""

    status = 409


class BundleError(DarkroomError):
    """A bundle that cannot be made or used; the message names the file or option."""
