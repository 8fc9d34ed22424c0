"""How well a fitted warping simulator does its job (METHODS.md section 5).

:func:`evaluate_warp_simulator` scores a fitted warping simulator (the
``warp_simulator`` explainer) on held-out images the classifier gets right, for one class
``target_class``: images of that class have the pattern removed, the others have it
injected.

- ``reached_removal`` / ``reached_injection``: fraction of images whose log-odds ``f`` moves
  by at least the requested shift ``b`` (the simulator's margin) in the requested direction,
  and the median shift;
- ``folding_fraction``: fraction of pixels/voxels with ``J <= 0`` over every warp;
- ``auroc_removal`` / ``auroc_injection``: per-image localization AUROC of ``|map|`` (the
  explainer's map, ``log J``) against a ground-truth region, averaged over images;
- ``cycle_relative_mse``: ``MSE(x, warp(x~, S(x~, -c)))`` over the mean per-image variance
  of ``x`` (remove then inject, or inject then remove, should give the image back).

Which way is better for each score: :data:`DIRECTIONS`. Arguments follow the metrics'
order ``(model, x, y, maps, masks)``; the model is the fitted simulator, used through its
``margin``, ``simulate``, ``score_shift`` and ``__call__`` (the map), so this module needs
no explainer class.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch

from ..core.jacobian import jacobian_determinant
from .localization import auroc

SHIFTS = {"removal": -1, "injection": 1}
"""Direction of the requested log-odds shift per kind of simulation."""

DIRECTIONS = {
    "reached_removal": "higher",
    "reached_injection": "higher",
    "median_shift_removal": "higher",
    "median_shift_injection": "higher",
    "folding_fraction": "lower",
    "auroc_removal": "higher",
    "auroc_injection": "higher",
    "cycle_mse": "lower",
    "cycle_relative_mse": "lower",
}


class WarpSimulator(Protocol):
    """What the evaluation uses of a fitted warping simulator."""

    margin: float

    def simulate(
        self, x: torch.Tensor, direction: int, cls: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def score_shift(
        self, x: torch.Tensor, direction: int, cls: int, simulated: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(self, x: torch.Tensor, cls: int) -> torch.Tensor: ...


def _rows(value: torch.Tensor | None, keep: torch.Tensor, n: int) -> torch.Tensor | None:
    """The rows of a per-image tensor ``(n, ...)`` selected by ``keep``; a ``(1, ...)``
    tensor (one for every image) is returned as is."""
    if value is None or (value.shape[0] == 1 and n != 1):
        return value
    if value.shape[0] != n:
        raise ValueError(f"expected {n} or 1 rows, got shape {tuple(value.shape)}")
    return value[keep.to(value.device)]


def evaluate_warp_simulator(
    model: WarpSimulator,
    x: torch.Tensor,
    y: torch.Tensor,
    maps: torch.Tensor | None = None,
    *,
    target_class: int,
    masks: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Scores of a fitted simulator for class ``target_class``.

    Args:
        model: the fitted warping simulator (:class:`WarpSimulator`).
        x: ``(N, C, *S)`` images; those with ``y == target_class`` have the pattern
            removed, the others have it injected (either group may be empty).
        y: ``(N,)`` class labels of ``x``.
        maps: ``(N, 1, *S)`` the simulator's maps of ``x`` for ``target_class``, if already
            computed; None = computed here (and timed: ``map_seconds_per_image_*``).
        target_class: the class whose pattern is removed or injected.
        masks: boolean ``(N or 1, 1, *S)`` regions the maps should point at (for injected
            images: where the pattern would be); None = no AUROC.

    Returns plain floats (module docstring); ``folding_fraction`` and
    ``cycle_relative_mse`` pool both directions.
    """
    y = torch.as_tensor(y).cpu()
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be (N,) labels for {x.shape[0]} images, got {tuple(y.shape)}")
    cls = int(target_class)
    margin = float(model.margin)
    out: dict[str, Any] = {"margin": margin}
    folds, voxels = 0, 0
    cycle_errors, variances = [], []
    for name, keep in (("removal", y == cls), ("injection", y != cls)):
        images = x[keep.to(x.device)]
        out[f"n_{name}"] = int(images.shape[0])
        if images.shape[0] == 0:
            continue
        direction = SHIFTS[name]
        simulated, displacement = model.simulate(images, direction, cls)
        f0, f1 = model.score_shift(images, direction, cls, simulated=simulated)
        shift = (direction * (f1 - f0)).cpu()
        # a count over a count in Python floats: 27 of 30 is 0.9, not float32's 0.8999...
        out[f"reached_{name}"] = int((shift >= margin).sum()) / shift.numel()
        out[f"median_shift_{name}"] = float(shift.median())
        det = jacobian_determinant(displacement)
        folds += int((det <= 0).sum())
        voxels += det.numel()
        back, _ = model.simulate(simulated, -direction, cls)
        xs = images.to(back.device, back.dtype)
        cycle_errors.append(((back - xs) ** 2).flatten(1).mean(1).cpu())
        variances.append(xs.flatten(1).var(1).cpu())
        if maps is None:
            started = time.perf_counter()
            part = model(images, cls).abs().cpu()
            out[f"map_seconds_per_image_{name}"] = (time.perf_counter() - started) / len(images)
        else:
            part = _rows(maps, keep, len(y)).abs().cpu()
        truth = _rows(masks, keep, len(y))
        if truth is not None:
            truth = truth.bool().cpu().expand_as(part)
            out[f"auroc_{name}"] = float(auroc(part, truth).nanmean())
    if voxels:
        out["folding_fraction"] = folds / voxels
        errors, variance = torch.cat(cycle_errors), torch.cat(variances)
        out["cycle_mse"] = float(errors.mean())
        out["cycle_relative_mse"] = float(errors.mean() / variance.mean())
    return out
