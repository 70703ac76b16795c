"""User-facing errors: one class the CLI and the server render without a traceback."""

from __future__ import annotations

import errno


class DarkroomError(Exception):
    """A problem the user can fix. `str()` is a one-line message that says what and how.

    `status` is the HTTP status the server will answer with (422 for bad input, 404 for
    something missing), so every interface renders the same error the same way. `code` is a
    short stable name (DR-...) with a troubleshooting page that ships with Darkroom
    (darkroom/help/pages, `darkroom help CODE`, /docs/errors/CODE); a raise site may pass a
    more precise one.
    """

    status = 400
    code = "DR-ERROR"

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidRequest(DarkroomError):
    """A generation request with a value out of range or unknown (a 513-pixel width)."""

    status = 422
    code = "DR-INVALID-REQUEST"


class TooLarge(InvalidRequest):
    """An upload or an image over a size limit (bytes or pixels): HTTP 413 Content Too Large."""

    status = 413
    code = "DR-TOO-BIG"


class NonFiniteResult(DarkroomError):
    """Sampling gave NaN or infinite latents: decoding them would give a black image, so this is said instead."""

    status = 422
    code = "DR-NON-FINITE"


class StorageError(DarkroomError):
    """An output that cannot be written: a full disk, a read-only or forbidden folder (HTTP 507).

    507 Insufficient Storage for all of them: the request was fine, the server cannot store
    the result, and the user fixes it on the machine (free space, permissions, another folder).
    """

    status = 507
    code = "DR-STORAGE"

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

    _FULL, _READ_ONLY, _DENIED, _PATH, _GONE = ("DR-STORAGE-FULL", "DR-STORAGE-READ-ONLY", "DR-STORAGE-DENIED",
                                                "DR-STORAGE-PATH", "DR-STORAGE-GONE")
    KINDS = {
        errno.ENOSPC: _FULL, errno.EDQUOT: _FULL,
        errno.EROFS: _READ_ONLY,
        errno.EACCES: _DENIED, errno.EPERM: _DENIED,
        errno.ENOTDIR: _PATH, errno.EEXIST: _PATH, errno.ENAMETOOLONG: _PATH, errno.ELOOP: _PATH,
        errno.ENOENT: _GONE, errno.EIO: _GONE, errno.ENODEV: _GONE, errno.ENXIO: _GONE, errno.ESTALE: _GONE,
        errno.ENOTCONN: _GONE,
    }
    """errno -> code: what kind of storage trouble it is (each code has its own help page)."""

    @classmethod
    def code_for(cls, error_number: int | None) -> str:
        """The code for an OSError's errno: DR-STORAGE-FULL, -READ-ONLY, ...; DR-STORAGE for the rest."""
        return cls.KINDS.get(error_number, cls.code)

    @classmethod
    def wrap(cls, error: OSError, folder: object) -> Exception:
        """The StorageError for a failed write into `folder`, or `error` itself when it is not one we explain."""
        reason = cls._REASONS.get(error.errno)
        if reason is None:
            return error
        return cls(f"cannot write images to {folder}: {reason}", code=cls.code_for(error.errno))


class ModelNotFound(DarkroomError):
    """No checkpoint (or LoRA, VAE, ...) of that name in the models folders."""

    status = 404
    code = "DR-MODEL-NOT-FOUND"


class ModelLoadError(DarkroomError):
    """A file that is not a loadable checkpoint: truncated, corrupt, a LoRA, a pickle."""

    status = 422
    code = "DR-MODEL-LOAD"


class UnsupportedModel(ModelLoadError):
    """A recognised family that Darkroom cannot run yet (SD3, Flux)."""

    code = "DR-MODEL-UNSUPPORTED"


class Interrupted(DarkroomError):
    """Raised inside sampling when the user interrupts; finished images are kept."""

    status = 409
    code = "DR-INTERRUPTED"


class BundleError(DarkroomError):
    """A bundle that cannot be made or used; the message names the file or option."""

    code = "DR-BUNDLE"
