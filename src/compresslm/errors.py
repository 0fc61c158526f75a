"""Errors that reach the user as one clear line.

Every failure the user can fix (a wrong name, a missing file, a corrupt checkpoint, an architecture
we cannot map) raises a subclass of :class:`CompressLMError`. The CLI prints its message on one
line and exits with a non-zero status; Python callers can catch the specific class.
"""

from __future__ import annotations


class CompressLMError(Exception):
    """Base class: the message is meant for the user, on one line."""


class ModelNotFoundError(CompressLMError):
    """A model name, path or hub id that does not resolve to a model."""


class MissingPackageError(CompressLMError):
    """A registered model or feature that needs a package that is not installed."""


class CorruptFileError(CompressLMError):
    """A file exists but is not what it claims to be (bad magic, truncated, unreadable)."""


class UnsupportedArchitectureError(CompressLMError):
    """A model whose structure (blocks, linears, attention, head) could not be discovered."""


class DataError(CompressLMError):
    """A dataset or corpus that is missing, empty or malformed."""


class ProtocolError(CompressLMError):
    """Evaluation options that cannot produce a measurement (e.g. text shorter than one window)."""


def reason_of(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when the message is empty): how the
    libraries' own errors are quoted inside a one-line compresslm error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
