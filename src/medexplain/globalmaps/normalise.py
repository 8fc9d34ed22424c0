"""Per-image value transform and normalisation of image-wise maps before averaging."""

from __future__ import annotations

import torch

NORMALISATIONS = ("max", "mass", "none")
TRANSFORMS = ("signed", "abs", "positive")


def check_options(normalise: str, transform: str) -> None:
    """ValueError unless ``normalise`` is in :data:`NORMALISATIONS` and ``transform`` in
    :data:`TRANSFORMS`."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def normalise_maps(
    maps: torch.Tensor, normalise: str = "max", transform: str = "signed"
) -> torch.Tensor:
    """Per-image value transform followed by per-image normalisation of ``(B, 1, *S)`` maps.

    Order: the transform (``signed``/``abs``/``positive``) first, then the normalisation
    (``none``; ``max``: divide by the image's max ``|value|``; ``mass``: divide by its sum of
    ``|value|``), so that ``positive`` + ``mass`` yields maps that sum to one. Computed in
    the input's dtype and device; an all-zero map (after the transform) stays all zero.
    """
    check_options(normalise, transform)
    if transform == "abs":
        maps = maps.abs()
    elif transform == "positive":
        maps = maps.clamp_min(0)
    if normalise == "none":
        return maps
    flat = maps.flatten(1).abs()
    scale = flat.amax(dim=1) if normalise == "max" else flat.sum(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return maps / scale.view(-1, *([1] * (maps.dim() - 1)))
