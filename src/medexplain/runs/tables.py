"""The text views of a run: a CSV document and one cell of it."""

from __future__ import annotations

import csv
import io

import numpy as np

__all__ = ["cell", "csv_text"]


def cell(value: np.ndarray) -> str:
    """A stored value as CSV text: a scalar as is, a vector as numbers separated by spaces."""
    array = np.asarray(value)
    if array.ndim == 0:
        return str(array.item())
    return " ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in array.tolist())


def csv_text(rows: list[list[str]]) -> str:
    """Rows as CSV text with ``\\n`` line ends."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()
