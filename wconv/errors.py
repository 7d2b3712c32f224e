"""Exception types. Every failure a user can cause raises a WconvError subclass.

The message is one line and starts with the file it is about, so the CLI can
print it as-is and exit non-zero without a traceback.
"""
from __future__ import annotations

import os


class WconvError(Exception):
    """Base class: a problem with an input, an option or an output."""

    exit_code = 2

    def __init__(self, path, message: str):
        self.path = os.fspath(path) if path is not None else None
        self.message = " ".join(str(message).split())  # always one line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class FormatError(WconvError):
    """The file is malformed, truncated, or not in the format it claims."""


class UnsupportedError(WconvError):
    """Well-formed, but something wconv does not (or cannot) handle."""


class UnsafeFileError(WconvError):
    """A pickle references a global outside the allowlist; nothing was executed."""


class OutputError(WconvError):
    """Writing an output failed (exists, disk full, would overwrite an input...)."""


class UsageError(WconvError):
    """Options that do not fit the model (e.g. a group size that does not divide dim)."""


class ParityError(WconvError):
    """Two models disagree beyond tolerance."""

    exit_code = 1
