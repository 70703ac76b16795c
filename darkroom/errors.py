"""User-facing errors: one class the CLI and the server render without a traceback."""

from __future__ import annotations

import errno


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


class TooLarge(InvalidRequest):
    """An upload or an image over a size limit (bytes or pixels): HTTP 413 Content Too Large."""

    status = 413


class NonFiniteResult(DarkroomError):
    """Sampling gave NaN or infinite latents: decoding them would give a black image, so this is said instead."""

    status = 422


class StorageError(DarkroomError):
    """An output that cannot be written: a full disk, a read-only or forbidden folder (HTTP 507).

    507 Insufficient Storage for all of them: the request was fine, the server cannot store
    the result, and the user fixes it on the machine (free space, permissions, another folder).
    """

    status = 507

    _REASONS = {
        errno.ENOSPC: "no space left on the disk; free some space or choose another output folder",
        errno.EDQUOT: "the disk quota is used up; free some space or choose another output folder",
        errno.EROFS: "the file system is read-only; choose another output folder",
        errno.EACCES: "permission denied; choose a folder you can write to",
        errno.EPERM: "permission denied; choose a folder you can write to",
        errno.ENOTDIR: "a file is in the way of the folder; choose another output folder",
        errno.EEXIST: "a file is in the way of the folder; choose another output folder",
        errno.ENAMETOOLONG: "a folder name in the path is too long for the file system; choose a shorter one",
        errno.ELOOP: "the path goes round in a loop of symbolic links; choose another output folder",
    }

    @classmethod
    def wrap(cls, error: OSError, folder: object) -> Exception:
        """The StorageError for a failed write into `folder`, or `error` itself when it is not one we explain."""
        reason = cls._REASONS.get(error.errno)
        return error if reason is None else cls(f"cannot write images to {folder}: {reason}")


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
