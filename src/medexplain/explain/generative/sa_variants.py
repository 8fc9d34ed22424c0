"""Settings of the similar/adversarial generator that differ between ``variant``\\ s.

:mod:`.similar_adversarial` trains the generator; this module holds its training-input
augmentation (Charachon et al. regularise with random geometric transforms) and the
classification-term weights of ``variant="default"`` and ``variant="paper"`` (the successor
code of Charachon et al.: rotation +-5 degrees, zoom 0.8-1, vertical flips only, similar /
adversarial classification weights 0.01 / 0.2; the default shares its weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..augment import RandomAffine, as_random_affine
from .adversarial_losses import CE_WEIGHTS


def variant_augment(variant: str) -> RandomAffine:
    """The augmentation ``augment=True`` means for ``variant``.

    - ``"default"``: rotation +-5 degrees, zoom 0.8-1, no flips. Aligned images (registered
      volumes, fundus photographs mirrored to one eye) keep the meaning of every position:
      a left-right flip moves the left hemisphere's evidence to the right one;
    - ``"paper"``: the successor code's rotation +-5 degrees, zoom 0.8-1 and random flips of
      the first spatial axis (its "vertical flip": rows of a 2D image), no left-right flip.
    """
    if variant == "paper":
        return RandomAffine(rotation=5.0, zoom=(0.8, 1.0), flip=(0,))
    return RandomAffine(rotation=5.0, zoom=(0.8, 1.0), flip=False)


def resolve_augment(
    augment: bool | RandomAffine | Mapping[str, Any] | str | None, variant: str
) -> RandomAffine | None:
    """``True``: the variant's augmentation; ``False``/None: none; otherwise a
    :class:`RandomAffine`, a dict of its fields or a preset name (``"default"`` is
    :class:`RandomAffine`'s own defaults: ``variant="default"``'s without its zoom;
    ``"all_flips"`` flips every axis)."""
    if augment is True:
        return variant_augment(variant)
    if augment is False or augment is None:
        return None
    return as_random_affine(augment)


def resolve_ce_weights(
    variant: str, similar: float | None, adversarial: float | None
) -> tuple[float, float]:
    """Classification-term weights: the given values, else the variant's (the successor
    code's 0.01 / 0.2 for both)."""
    default_similar, default_adversarial = CE_WEIGHTS.get(variant, CE_WEIGHTS["default"])
    return (
        float(default_similar if similar is None else similar),
        float(default_adversarial if adversarial is None else adversarial),
    )


def augment_record(augment: RandomAffine | None) -> dict[str, Any] | None:
    """The augmentation as plain values (stored in checkpoints)."""
    if augment is None:
        return None
    return {
        "rotation": augment.rotation,
        "zoom": list(augment.zoom),
        "flip": augment.flip if isinstance(augment.flip, bool) else list(augment.flip),
        "translate": augment.translate,
        "padding_mode": augment.padding_mode,
    }
