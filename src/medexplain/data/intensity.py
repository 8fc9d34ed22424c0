"""Per-image intensity normalisation: the ``normalise`` option of
:class:`~medexplain.data.files.ImageDataset`."""

from __future__ import annotations

import numpy as np

from .readers import DataError

__all__ = ["NORMALISATIONS", "normalise_intensity", "range_text"]

#: ``"none"``: file units; ``"minmax"``: per image to [0, 1]; ``"zscore"``: per image mean 0,
#: std 1; ``"percentile"``: clip to the image's 1st-99th percentiles, then to [0, 1] (robust
#: to a few hot pixels, as in nnU-Net-style preprocessing); ``"range"``: divide by the stored
#: type's range (x/255 for 8 bit, x/65535 for 16 bit, DICOM's rescaled BitsStored range),
#: which keeps brightness comparable across images, as most training pipelines do.
#: Statistics are taken over all channels together (colour balance is kept); a constant
#: image becomes all zeros.
NORMALISATIONS = ("none", "minmax", "zscore", "percentile", "range")


def normalise_intensity(
    array: np.ndarray,
    method: str,
    value_range: tuple[float, float] | None = None,
    where: str = "image",
) -> np.ndarray:
    """Normalise one image ``(C, *S)`` with ``method`` from :data:`NORMALISATIONS`.

    ``value_range`` is needed by ``"range"`` (the reader's ``ImageMeta.value_range``).
    """
    array = np.asarray(array, dtype=np.float32)
    if method == "none":
        return array
    if method == "range":
        if value_range is None:
            raise DataError(
                f"normalise='range' needs integer pixels with a known range, but {where} holds "
                "float data; use 'minmax', 'percentile' or 'zscore'"
            )
        lo, hi = value_range
        return ((array - lo) / max(hi - lo, 1e-12)).astype(np.float32)
    if method == "minmax":
        lo, hi = float(array.min()), float(array.max())
    elif method == "percentile":
        lo, hi = (float(v) for v in np.percentile(array, [1.0, 99.0]))
        array = np.clip(array, lo, hi)
    elif method == "zscore":
        mean, std = float(array.mean(dtype=np.float64)), float(array.std(dtype=np.float64))
        out = array - mean
        return (out / std if std > 0 else out).astype(np.float32)
    else:
        raise DataError(f"normalise must be one of {NORMALISATIONS}, got {method!r}")
    if hi <= lo:
        return np.zeros_like(array)
    return ((array - lo) / (hi - lo)).astype(np.float32)


def range_text(value_range: tuple[float, float] | None) -> str:
    """``"integers 0..255"`` for a stored integer range, ``"floating-point values"`` for None."""
    if value_range is None:
        return "floating-point values"
    return f"integers {value_range[0]:g}..{value_range[1]:g}"
