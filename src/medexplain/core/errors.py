"""Short error messages for the command line and for per-file error reports."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The first line of ``str(error)``, or the exception's class name when it has no text."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def typed_line(error: BaseException) -> str:
    """``"ValueError: first line"``: for wrapping an error a library raised, where the type
    says what went wrong; the class name alone when the error has no text."""
    text = str(error).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
