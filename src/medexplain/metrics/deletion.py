"""Deletion and insertion curves of a saliency map (Petsiuk et al. 2018; I-GOS, iGOS++).

METHODS.md section 2: order the pixels by the map, most important first; in steps of about
2 % of the pixels

- deletion: start from the image ``x`` and replace the next pixels by the baseline;
- insertion: start from the baseline and put the next pixels of the image back;

record ``f_c`` after every step. The score is the area under each curve (trapezoid rule,
x-axis = fraction of pixels changed). Lower deletion and higher insertion are better
(:data:`DIRECTIONS`).

A pixel is a spatial position: all channels change together. The last step may be smaller
than the others (``n`` pixels are rarely a multiple of the step); it is weighted by its true
fraction, so the x-axis always ends exactly at 1 (the authors' public code weighs it like a
full step, which is a defect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..core.model import model_device, model_guard
from ..core.perturb import apply_mask, make_baseline, rank_pixels
from ..core.scores import as_targets, check_activation, check_targets, chunked, probabilities
from ..core.spatial import spatial_dims_of

DIRECTIONS = {"deletion_auc": "lower", "insertion_auc": "higher"}
#: Above this share of tied pixels in a map, the curves average several random tie orders.
TIED_FRACTION = 0.05


def tied_fraction(maps: torch.Tensor) -> torch.Tensor:
    """Share of each map's pixels whose value equals another pixel's, ``(B,)`` for maps
    ``(B, 1, *S)`` (0 when all values differ; near 1 for a map that is mostly one value)."""
    flat = maps.flatten(1).sort(dim=1).values
    equal = flat[:, 1:] == flat[:, :-1]
    tied = torch.zeros_like(flat, dtype=torch.bool)
    tied[:, 1:] |= equal
    tied[:, :-1] |= equal
    return tied.double().mean(dim=1)


@dataclass
class DeletionInsertionResult:
    """Curves and areas for B images (CPU tensors, float32).

    - ``fractions`` ``(n_steps + 1,)``: fraction of pixels changed, 0 .. 1;
    - ``deletion`` / ``insertion`` ``(B, n_steps + 1)``: ``f_c`` along each curve;
    - ``deletion_auc`` / ``insertion_auc`` ``(B,)``: trapezoid areas over ``fractions``.
    """

    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor


def step_counts(n_pixels: int, step_fraction: float) -> torch.Tensor:
    """Number of pixels changed after each step: ``0, k, 2k, ..., n`` with
    ``k = max(1, round(step_fraction * n))``; the last step holds the remainder."""
    if not 0 < float(step_fraction) <= 1:
        raise ValueError(f"step_fraction must be in (0, 1], got {step_fraction!r}")
    k = max(1, round(float(step_fraction) * n_pixels))
    n_steps = math.ceil(n_pixels / k)
    counts = torch.arange(n_steps + 1, dtype=torch.long) * k
    counts[-1] = n_pixels
    return counts


def _tie_broken_orders(maps: torch.Tensor, tie_seed: int, tie_seeds: int) -> torch.Tensor:
    """Ranks ``(R, B, 1, *S)`` of the maps (0 = most important), equal values in a random
    order seeded ``tie_seed + r``; ``R`` is ``tie_seeds`` when some map has more than
    ``TIED_FRACTION`` tied pixels, else 1."""
    repeats = tie_seeds if bool((tied_fraction(maps) > TIED_FRACTION).any()) else 1
    generators = [torch.Generator().manual_seed(tie_seed + r) for r in range(repeats)]
    return torch.stack([rank_pixels(maps, generator) for generator in generators])


def _check_arguments(
    x: torch.Tensor, maps: torch.Tensor, batch_size: int, tie_seeds: int, activation: str
) -> torch.Tensor:
    """Refuse bad arguments of :func:`deletion_insertion`; returns the maps ``(B, 1, *S)``."""
    spatial_dims_of(x, "x")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tie_seeds < 1:
        raise ValueError(f"tie_seeds must be >= 1, got {tie_seeds}")
    check_activation(activation)
    return _as_maps(maps, x)


def _as_maps(maps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
    expected = (x.shape[0], 1, *x.shape[2:])
    if maps.dim() == x.dim() - 1:
        maps = maps.unsqueeze(1)
    if tuple(maps.shape) != expected:
        raise ValueError(
            f"maps must have shape {expected} (B, 1, *spatial) matching x; got {tuple(maps.shape)}"
        )
    if torch.isnan(maps).any():
        raise ValueError("maps contain NaN; pixels cannot be ranked")
    return maps


def deletion_insertion(
    model: nn.Module,
    x: torch.Tensor,
    y: int | torch.Tensor | None,
    maps: torch.Tensor,
    *,
    baseline: str | torch.Tensor = "blur",
    mean_image: torch.Tensor | None = None,
    step_fraction: float = 0.02,
    batch_size: int = 64,
    activation: str = "auto",
    tie_seed: int = 0,
    tie_seeds: int = 3,
) -> DeletionInsertionResult:
    """Deletion and insertion curves of ``maps`` ``(B, 1, *spatial)`` for images ``x``
    ``(B, C, *spatial)`` (2D or 3D) and the classes ``y`` they explain (int, ``(B,)`` ints
    or None for the predicted class).

    ``baseline``: "blur" (I-GOS default), "mean" (with ``mean_image`` ``(C, *spatial)``),
    "zero" or a tensor (see :func:`medexplain.core.perturb.make_baseline`). ``step_fraction``:
    share of the pixels changed per step (2 %, as in the iGOS++ evaluation). Scores are
    ``f_c`` from :func:`medexplain.core.scores.probabilities` with ``activation``. All
    ``2 * B * (n_steps + 1)`` perturbed images go through the model in chunks of
    ``batch_size``, without gradients; the model is left as found.

    Pixels of equal value are ordered at random (seeded by ``tie_seed``), not in raster
    order: an I-GOS map that is exactly 0 wherever its mask stayed 1, or a piecewise constant
    SAG map, would otherwise end its curves with a top-to-bottom sweep. When more than
    ``TIED_FRACTION`` of some map's pixels tie, the curves are the mean over ``tie_seeds``
    random orders (seeds ``tie_seed, tie_seed + 1, ...``), which multiplies the model calls
    by ``tie_seeds``.
    """
    maps = _check_arguments(x, maps, batch_size, tie_seeds, activation)
    device = model_device(model)
    x = x.to(device, torch.float32)
    n_images = x.shape[0]
    n_pixels = math.prod(x.shape[2:])
    counts = step_counts(n_pixels, step_fraction)
    n_points = counts.numel()

    with model_guard(model), torch.no_grad():

        def logits() -> torch.Tensor:
            return chunked(model, x, batch_size)

        targets = as_targets(y, n_images, device=device, logits=logits)
        fill = make_baseline(x, baseline, mean_image)
        ranks = _tie_broken_orders(maps.to(device), tie_seed, tie_seeds)
        repeats = ranks.shape[0]
        counts_dev = counts.to(device)
        per_order = 2 * n_images * n_points  # items: (order, curve, image, point)
        total = repeats * per_order
        scores = torch.empty(total, device=device)
        shape = (-1, *([1] * (x.dim() - 1)))
        for start in range(0, total, batch_size):
            item = torch.arange(start, min(start + batch_size, total), device=device)
            order = item // per_order
            curve = (item // (n_images * n_points)) % 2  # 0 deletion, 1 insertion
            image = (item // n_points) % n_images
            point = item % n_points
            changed = (ranks[order, image] < counts_dev[point].view(shape)).to(x.dtype)
            # deletion keeps the image where nothing changed yet; insertion shows the image
            # only where pixels were changed (restored).
            keep = torch.where(curve.view(shape) == 0, 1 - changed, changed)
            perturbed = apply_mask(x[image], fill[image], keep)
            probs = probabilities(model(perturbed), activation)
            if start == 0:
                check_targets(targets, probs.shape[1])
            scores[item] = probs.gather(1, targets[image].view(-1, 1)).squeeze(1)

    curves = scores.view(repeats, 2, n_images, n_points).float().mean(0).cpu()
    fractions = counts.to(torch.float32) / n_pixels
    deletion, insertion = curves[0], curves[1]
    return DeletionInsertionResult(
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        deletion_auc=torch.trapezoid(deletion, fractions, dim=1),
        insertion_auc=torch.trapezoid(insertion, fractions, dim=1),
    )
