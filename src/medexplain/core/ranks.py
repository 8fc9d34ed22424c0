"""Rank statistics shared by the metrics: average ranks, rank-based AUROC, Spearman's rho.

All functions work row-wise on ``(B, N)`` tensors on any device and compute in float64, so
that rank sums stay exact for 3D volumes with millions of voxels. Ties get the average of
the ranks they span (the Mann-Whitney / Spearman convention), which makes

    AUROC = (sum of positive ranks - n1 (n1 + 1) / 2) / (n1 n0)

equal to ``U / (n1 n0)`` of the Mann-Whitney U test (``scipy.stats.mannwhitneyu``) and to
the probability that a random positive scores above a random negative (ties count 1/2).
"""

from __future__ import annotations

import torch


def _as_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N,) or (B, N); got {tuple(x.shape)}")
    return x


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row of ``x`` ``(B, N)`` (or ``(N,)``), ties averaged; float64.

    Same values as ``scipy.stats.rankdata(row, method="average")`` for every row.
    """
    squeeze = x.dim() == 1
    rows = _as_rows(x, "x").to(torch.float64)
    if torch.isnan(rows).any():
        raise ValueError("x contains NaN; ranks are undefined")
    ordered = torch.sort(rows, dim=1).values.contiguous()
    below = torch.searchsorted(ordered, rows.contiguous(), side="left")  # strictly smaller
    up_to = torch.searchsorted(ordered, rows.contiguous(), side="right")  # smaller or equal
    ranks = (below + up_to + 1).to(torch.float64) / 2.0
    return ranks[0] if squeeze else ranks


def rank_auroc(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` for the binary truth ``positives``, per row.

    scores: ``(B, N)`` or ``(N,)`` floats; positives: same shape, bool or 0/1.
    Returns float64 ``(B,)`` (a 0-dim tensor for 1D input). A row without positives or
    without negatives has no ROC curve: its AUROC is NaN.
    """
    squeeze = scores.dim() == 1
    rows = _as_rows(scores, "scores")
    truth = _as_rows(positives, "positives")
    if truth.shape != rows.shape:
        raise ValueError(
            f"positives must match scores: got {tuple(positives.shape)} for scores "
            f"{tuple(scores.shape)}"
        )
    truth = truth.to(device=rows.device, dtype=torch.bool)
    ranks = average_ranks(rows)
    n1 = truth.sum(dim=1).to(torch.float64)
    n0 = truth.shape[1] - n1
    rank_sum = (ranks * truth).sum(dim=1)
    u = rank_sum - n1 * (n1 + 1) / 2.0
    denom = n1 * n0
    auc = torch.where(denom > 0, u / denom.clamp_min(1.0), torch.full_like(u, float("nan")))
    return auc[0] if squeeze else auc


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation between rows of ``a`` and ``b`` ``(B, N)``; float64 ``(B,)``.

    Pearson correlation of the average ranks (as ``scipy.stats.spearmanr``). A row where either
    side is constant has no rank information; medexplain returns 0 there (scipy gives NaN),
    so a map that became flat after model randomisation counts as "uncorrelated".
    """
    squeeze = a.dim() == 1
    ra = average_ranks(_as_rows(a, "a"))
    rb = average_ranks(_as_rows(b, "b").to(a.device))
    if ra.shape != rb.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    num = (ra * rb).sum(dim=1)
    den = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    rho = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    rho = rho.clamp(-1.0, 1.0)
    return rho[0] if squeeze else rho
