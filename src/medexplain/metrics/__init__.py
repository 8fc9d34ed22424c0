"""How good an explanation is: faithfulness, localization, sanity.

>>> from medexplain.metrics import deletion_insertion, peppr, localization_scores
>>> result = deletion_insertion(model, x, y, maps)

Argument order, for every metric: the arguments it uses from ``(model, x, y, maps,
masks)``, in that order (Quantus' ``model, x_batch, y_batch, a_batch, s_batch``): ``x``
the inputs ``(N, C, *S)``, ``y`` the targets (class per image; None where the predicted
class is meant), ``maps`` the attributions (``(N, 1, *S)``, or one global map ranking every
image for PEPPR), ``masks`` ground-truth regions. The localization scores run no model and
read neither images nor labels, so they take ``(maps, masks)``; options are keywords.

:data:`DIRECTIONS` says, for each score a metric reports, whether ``"lower"`` or
``"higher"`` is better; :func:`better` looks one up (the report tables take their arrows
from there).

This package imports neither the explainers nor matplotlib: figures of metric results
are in :mod:`medexplain.report`.
"""

from __future__ import annotations

from . import deletion, localization, sanity, warp
from . import peppr as _peppr
from .deletion import DeletionInsertionResult, deletion_insertion, step_counts
from .localization import (
    auroc,
    energy_inside,
    iou_curve,
    iou_percentile,
    iou_top,
    localization_scores,
    ncc,
    pointing_game,
)
from .peppr import peppr, peppr_many
from .peppr_result import PepprCurves, PepprResult
from .sanity import (
    ExplainerFactory,
    SanityResult,
    cascading_randomization,
    parameterised_layers,
)
from .warp import evaluate_warp_simulator

DIRECTIONS: dict[str, str] = {
    **deletion.DIRECTIONS,
    **localization.DIRECTIONS,
    **_peppr.DIRECTIONS,
    **sanity.DIRECTIONS,
    **warp.DIRECTIONS,
}
"""Score name -> ``"lower"`` or ``"higher"``: which way is better."""


def better(key: str) -> str | None:
    """``"lower"`` or ``"higher"`` for a score name, also as the last part of a dotted key
    (``"peppr.erase_area"``, ``"localization.auroc"``); None for a name that is not a
    score (counts, random baselines, timings)."""
    return DIRECTIONS.get(key.rsplit(".", 1)[-1])


__all__ = [
    "DIRECTIONS",
    "DeletionInsertionResult",
    "ExplainerFactory",
    "PepprCurves",
    "PepprResult",
    "SanityResult",
    "auroc",
    "better",
    "cascading_randomization",
    "deletion_insertion",
    "energy_inside",
    "evaluate_warp_simulator",
    "iou_curve",
    "iou_percentile",
    "iou_top",
    "localization_scores",
    "ncc",
    "parameterised_layers",
    "peppr",
    "peppr_many",
    "pointing_game",
    "step_counts",
]
