"""Short error messages for the command line and for per-file error reports."""

from __future__ import annotations


def one_line(error: BaseException) -> str:
    """The first line of ``str(error)``, or the exception's class name when it has no text."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
