"""How well a fitted warping simulator does its job (issue 7's measures; METHODS.md section 5).

:func:`evaluate_warp_simulator` scores a fitted
:class:`~.warp_simulator.WarpSimulatorExplainer` on held-out images the classifier gets
right, for one class ``cls``:

- ``reached_removal`` / ``reached_injection``: fraction of images whose log-odds ``f`` moves
  by at least the requested shift ``b`` (the simulator's margin) in the requested direction,
  and the median shift;
- ``folding_fraction``: fraction of pixels/voxels with ``J <= 0`` over every warp;
- ``auroc_removal`` / ``auroc_injection``: per-image localization AUROC of ``|map|`` (the
  explainer's map, ``log J``) against a ground-truth region, averaged over images;
- ``cycle_relative_mse``: ``MSE(x, warp(x~, S(x~, -c)))`` over the mean per-image variance
  of ``x`` (remove then inject, or inject then remove, should give the image back).

Used by the demo and by ``benchmarks/warp_simulator.py``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ...metrics.localization import auroc
from .jacobian import jacobian_determinant

DIRECTIONS = {"removal": -1, "injection": 1}


def evaluate_warp_simulator(
    explainer,
    cls: int,
    removal: torch.Tensor,
    injection: torch.Tensor,
    *,
    removal_truth: torch.Tensor | None = None,
    injection_truth: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Scores of a fitted simulator for class ``cls``.

    ``removal`` ``(N, C, *S)``: images of class ``cls`` (the pattern is removed);
    ``injection`` ``(M, C, *S)``: images of other classes (the pattern is injected); either
    may be empty. ``removal_truth`` / ``injection_truth``: boolean ``(N or M or 1, 1, *S)``
    regions the map should point at (None: no AUROC). Returns plain floats (module
    docstring); ``folding_fraction`` and ``cycle_relative_mse`` pool both directions.
    """
    margin = float(explainer.margin)
    out: dict[str, Any] = {"margin": margin}
    folds, voxels = 0, 0
    cycle_errors, variances = [], []
    truths = {"removal": removal_truth, "injection": injection_truth}
    for name, images in (("removal", removal), ("injection", injection)):
        out[f"n_{name}"] = int(images.shape[0])
        if images.shape[0] == 0:
            continue
        direction = DIRECTIONS[name]
        simulated, displacement = explainer.simulate(images, direction, cls)
        f0, f1 = explainer.score_shift(images, direction, cls, simulated=simulated)
        shift = (direction * (f1 - f0)).cpu()
        # a count over a count in Python floats: 27 of 30 is 0.9, not float32's 0.8999...
        out[f"reached_{name}"] = int((shift >= margin).sum()) / shift.numel()
        out[f"median_shift_{name}"] = float(shift.median())
        det = jacobian_determinant(displacement)
        folds += int((det <= 0).sum())
        voxels += det.numel()
        back, _ = explainer.simulate(simulated, -direction, cls)
        x = images.to(back.device, back.dtype)
        cycle_errors.append(((back - x) ** 2).flatten(1).mean(1).cpu())
        variances.append(x.flatten(1).var(1).cpu())
        started = time.perf_counter()
        maps = explainer(images, cls).abs().cpu()
        out[f"map_seconds_per_image_{name}"] = (time.perf_counter() - started) / len(images)
        truth = truths[name]
        if truth is not None:
            truth = truth.bool().cpu().expand_as(maps)
            out[f"auroc_{name}"] = float(auroc(maps, truth).nanmean())
    if voxels:
        out["folding_fraction"] = folds / voxels
        errors, variance = torch.cat(cycle_errors), torch.cat(variances)
        out["cycle_mse"] = float(errors.mean())
        out["cycle_relative_mse"] = float(errors.mean() / variance.mean())
    return out
