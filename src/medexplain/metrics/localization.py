"""How well maps localise a ground-truth region, batched over ``(B, 1, *S)`` maps and masks.

Every score is computed per image on the maps' device and returned as a float64 ``(B,)``
tensor. Conventions where the literature leaves a choice:

- ``auroc``: the map as a pixel classifier of the mask (rank-based, ties averaged, equal
  to ``U / (n1 n0)`` of the Mann-Whitney test). NaN when the mask is empty or covers the
  whole image: there is no ROC curve then.
- ``pointing_game`` (Zhang et al. 2016): 1 when the map's maximum lies inside the mask,
  optionally dilated by ``tolerance`` pixels (Chebyshev distance; Zhang et al. used 15 px
  at 224 px). When several pixels share the maximum the score is the fraction of them
  inside the mask (the expected hit under random tie breaking), so a flat map does not
  score a hit for free. NaN when the mask is empty.
- ``energy_inside`` (Wang et al. 2020, "energy-based pointing game"): positive map mass
  inside the mask over the positive mass in the image. NaN when the map has no positive
  value.
- ``iou_top``: IoU between the mask and the map's top-k pixels, k = the mask's area (ties
  broken at random, seeded, by :func:`medexplain.core.perturb.rank_pixels`); Charachon et
  al.'s "IoU with E thresholded to the ground-truth area". NaN when the mask is empty.
- ``iou_percentile`` (Charachon et al. 2020, "IoU between the mask and E thresholded at every
  percentile"): the mean over ``q = 1..99`` of the IoU between the mask and the map's top
  ``100 - q`` % pixels (:func:`iou_curve` gives the curve; ties as for ``iou_top``). NaN when
  the mask is empty.
- ``ncc`` (Charachon et al. 2020, "normalised cross correlation"): the Pearson correlation
  over pixels between the map and the 0/1 mask. NaN when the map is constant or the mask is
  empty or full (no variance to correlate).

Higher is better for every score (:data:`DIRECTIONS`).

Argument order: every metric of :mod:`medexplain.metrics` takes the arguments it uses
from ``(model, x, y, maps, masks)``, in that order (Quantus' ``model, x_batch, y_batch,
a_batch, s_batch``). These scores compare maps with ground-truth masks only: they run no
model and read neither images nor labels, so they take ``(maps, masks)``.
"""

from __future__ import annotations

import math

import torch

from ..core.perturb import rank_pixels
from ..core.ranks import rank_auroc
from ..core.spatial import max_pool, spatial_dims_of

SCORES = ("auroc", "pointing_game", "energy_inside", "iou_top", "iou_percentile", "ncc")
#: Thresholds of :func:`iou_curve`: every percentile of the map from 1 to 99.
PERCENTILES = tuple(range(1, 100))
DIRECTIONS = dict.fromkeys(SCORES, "higher")


def _check(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate maps ``(B, 1, *S)`` and masks ``(B or 1, 1, *S)``; masks become bool (B, 1, *S)."""
    spatial_dims_of(maps, "maps")
    if maps.shape[1] != 1:
        raise ValueError(f"maps must have one channel (B, 1, *S); got {tuple(maps.shape)}")
    if not isinstance(masks, torch.Tensor):
        raise TypeError("masks must be a boolean torch.Tensor of shape (B, 1, *S)")
    if (
        masks.dim() != maps.dim()
        or masks.shape[1] != 1
        or masks.shape[2:] != maps.shape[2:]
        or (masks.shape[0] not in (1, maps.shape[0]))
    ):
        raise ValueError(
            f"masks must have shape (B, 1, *S) or (1, 1, *S) matching maps {tuple(maps.shape)}; "
            f"got {tuple(masks.shape)}"
        )
    if masks.dtype != torch.bool:
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be boolean or hold only 0/1 values")
        masks = masks != 0
    if not torch.isfinite(maps).all():
        raise ValueError("maps contain NaN or infinite values")
    return maps, masks.to(maps.device).expand(maps.shape[0], *masks.shape[1:])


def auroc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-image AUROC of the map's values for the mask's pixels; ``(B,)``, NaN for an empty
    or full mask."""
    maps, masks = _check(maps, masks)
    return rank_auroc(maps.flatten(1), masks.flatten(1))


def dilate(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Grow boolean masks ``(B, 1, *S)`` by ``tolerance`` pixels (square/cube neighbourhood)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    if tolerance == 0:
        return masks
    pool = max_pool(spatial_dims_of(masks, "masks"))(2 * tolerance + 1, stride=1, padding=tolerance)
    return pool(masks.float()) > 0


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    """Hit (1) / miss (0) of the map's maximum in the mask dilated by ``tolerance`` pixels;
    ties share the credit. ``(B,)``, NaN for an empty mask."""
    maps, masks = _check(maps, masks)
    flat = maps.flatten(1)
    is_max = flat == flat.amax(dim=1, keepdim=True)
    region = dilate(masks, int(tolerance)).flatten(1)
    hits = (is_max & region).sum(dim=1).double() / is_max.sum(dim=1).double()
    empty = masks.flatten(1).sum(dim=1) == 0
    return torch.where(empty, torch.full_like(hits, float("nan")), hits)


def energy_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Fraction of the positive map mass that lies inside the mask; ``(B,)``, NaN when the map
    has no positive value."""
    maps, masks = _check(maps, masks)
    positive = maps.flatten(1).double().clamp_min(0)
    total = positive.sum(dim=1)
    inside = (positive * masks.flatten(1)).sum(dim=1)
    return torch.where(
        total > 0, inside / total.clamp_min(1e-300), torch.full_like(total, float("nan"))
    )


def _top_iou(ranks: torch.Tensor, flat_mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """IoU of each mask ``(B, n)`` with the ``k`` ``(B, 1)`` best-ranked pixels; NaN where
    the mask is empty."""
    top = ranks < k
    inter = (top & flat_mask).sum(dim=1).double()
    union = (top | flat_mask).sum(dim=1).double()
    empty = flat_mask.sum(dim=1) == 0
    return torch.where(empty, torch.full_like(inter, float("nan")), inter / union.clamp_min(1))


def _ranks(maps: torch.Tensor, tie_seed: int) -> torch.Tensor:
    return rank_pixels(maps, torch.Generator().manual_seed(int(tie_seed))).flatten(1)


def iou_top(maps: torch.Tensor, masks: torch.Tensor, tie_seed: int = 0) -> torch.Tensor:
    """IoU of the mask with the map's top-k pixels, k = mask area; ``(B,)``, NaN if empty.
    Ties are broken at random (seeded by ``tie_seed``)."""
    maps, masks = _check(maps, masks)
    flat_mask = masks.flatten(1)
    area = flat_mask.sum(dim=1, keepdim=True)
    return _top_iou(_ranks(maps, tie_seed), flat_mask, area)


def iou_curve(
    maps: torch.Tensor,
    masks: torch.Tensor,
    percentiles: tuple[int, ...] = PERCENTILES,
    tie_seed: int = 0,
) -> torch.Tensor:
    """IoU of the mask with the map thresholded at each percentile ``q``: the map's top
    ``ceil((100 - q) / 100 * n)`` pixels of ``n``; ``(B, len(percentiles))`` float64, NaN
    rows for empty masks. Ties are broken at random (seeded by ``tie_seed``). One pass: the
    mask's pixels counted in rank order give the intersection at every ``k`` at once."""
    maps, masks = _check(maps, masks)
    if not percentiles or not all(0 <= float(q) <= 100 for q in percentiles):
        raise ValueError(f"percentiles must lie in [0, 100], got {percentiles}")
    flat_mask = masks.flatten(1)
    n = flat_mask.shape[1]
    by_rank = flat_mask.gather(1, _ranks(maps, tie_seed).argsort(dim=1)).double()
    inside = torch.cat([torch.zeros_like(by_rank[:, :1]), by_rank.cumsum(dim=1)], dim=1)
    k = torch.tensor(
        [math.ceil((100 - float(q)) / 100 * n - 1e-9) for q in percentiles], device=maps.device
    )
    inter = inside[:, k]  # (B, P): mask pixels among the top k
    area = inside[:, -1:]
    iou = inter / (k.double() + area - inter).clamp_min(1)
    return torch.where(area > 0, iou, torch.full_like(iou, float("nan")))


def iou_percentile(maps: torch.Tensor, masks: torch.Tensor, tie_seed: int = 0) -> torch.Tensor:
    """Mean of :func:`iou_curve` over the percentiles 1..99; ``(B,)``, NaN for empty masks."""
    return iou_curve(maps, masks, tie_seed=tie_seed).mean(dim=1)


def ncc(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Normalised cross correlation (Pearson) of the map with the 0/1 mask over pixels;
    ``(B,)``, NaN when the map is constant or the mask empty or full."""
    maps, masks = _check(maps, masks)
    e = maps.flatten(1).double()
    m = masks.flatten(1).double()
    e = e - e.mean(dim=1, keepdim=True)
    m = m - m.mean(dim=1, keepdim=True)
    norm = e.norm(dim=1) * m.norm(dim=1)
    scale = maps.flatten(1).double().abs().amax(dim=1).clamp_min(1e-300)
    flat = e.norm(dim=1) <= 1e-12 * scale * math.sqrt(e.shape[1])
    degenerate = flat | (m.norm(dim=1) == 0)
    value = (e * m).sum(dim=1) / norm.clamp_min(1e-300)
    return torch.where(degenerate, torch.full_like(value, float("nan")), value)


def localization_scores(
    maps: torch.Tensor, masks: torch.Tensor, tolerance: int = 0
) -> dict[str, torch.Tensor]:
    """All localization scores (:data:`SCORES`), each a float64 ``(B,)`` tensor on the
    maps' device (see the module docstring for the conventions and when a score is NaN).
    ``tolerance`` applies to the pointing game."""
    return {
        "auroc": auroc(maps, masks),
        "pointing_game": pointing_game(maps, masks, tolerance),
        "energy_inside": energy_inside(maps, masks),
        "iou_top": iou_top(maps, masks),
        "iou_percentile": iou_percentile(maps, masks),
        "ncc": ncc(maps, masks),
    }
