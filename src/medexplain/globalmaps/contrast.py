"""Per-pixel Welch t contrast between two groups, with two-sided p and BH-FDR q-values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .groups import GroupKey
from .moments import GroupMap

# Relative size below which a contrast treats a pixel's variance / mean difference as zero:
# float64 means of identical values can differ from them in the last bit.
_ZERO_TOL = 1e-12


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values) of any-shaped ``p``, float64.

    ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the ``m`` p-values sorted ascending
    (Benjamini & Hochberg 1995), computed by
    ``scipy.stats.false_discovery_control(p, method="bh")`` over all entries at once (not
    per axis). Tied p-values get equal q-values; NaN or values outside [0, 1] raise a
    ValueError. Returned on ``p``'s device with ``p``'s shape.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    flat = p.flatten()
    if flat.numel() == 0:
        return p.clone()
    if torch.isnan(flat).any() or (flat < 0).any() or (flat > 1).any():
        raise ValueError("p must hold p-values in [0, 1] without NaN")
    q = stats.false_discovery_control(flat.cpu().numpy(), method="bh")
    return torch.from_numpy(np.asarray(q, dtype=np.float64)).to(p.device).view(p.shape)


@dataclass(frozen=True)
class ContrastResult:
    """Per-pixel Welch t-test of group ``a`` against group ``b``; float64 ``(1, *S)`` maps.

    ``t > 0`` where group a's mean map is higher. ``p`` is two-sided, ``q`` the
    Benjamini-Hochberg adjusted p-value over the pixels tested (inside ``mask``).
    """

    t: torch.Tensor
    df: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    group_a: GroupKey
    group_b: GroupKey
    count_a: int
    count_b: int

    def significant(self, alpha: float = 0.05) -> torch.Tensor:
        """Boolean ``(1, *S)`` map of pixels with FDR-adjusted ``q < alpha``."""
        return self.q < alpha

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"t", "df", "p", "q"}`` as numpy arrays of shape ``S`` (channel dim dropped)."""
        return {name: getattr(self, name)[0].numpy() for name in ("t", "df", "p", "q")}


def _check_groups(a: GroupMap, b: GroupMap) -> None:
    if a.count < 2 or b.count < 2:
        raise ValueError(
            f"a contrast needs at least 2 images per group; got {a.count} and {b.count}"
        )
    if a.mean.shape != b.mean.shape:
        raise ValueError(
            f"group maps differ in shape: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}"
        )


def _welch_t_df(a: GroupMap, b: GroupMap) -> tuple[torch.Tensor, torch.Tensor]:
    """Welch t and Welch-Satterthwaite df per pixel; zero-variance pixels as documented in
    :func:`welch_contrast`."""
    na, nb = float(a.count), float(b.count)
    sa, sb = a.var / na, b.var / nb
    se2 = sa + sb
    diff = a.mean - b.mean
    scale = torch.maximum(a.mean.abs(), b.mean.abs())
    zero_var = se2.sqrt() <= _ZERO_TOL * scale
    zero_diff = diff.abs() <= _ZERO_TOL * scale
    safe_se = torch.where(zero_var, torch.ones_like(se2), se2.sqrt())
    t = torch.where(
        zero_var,
        torch.where(zero_diff, torch.zeros_like(diff), torch.sign(diff) * float("inf")),
        diff / safe_se,
    )
    denom = sa**2 / (na - 1) + sb**2 / (nb - 1)
    df = torch.where(
        zero_var,
        torch.full_like(se2, na + nb - 2),
        se2**2 / torch.where(zero_var, torch.ones_like(denom), denom),
    )
    return t, df


def welch_contrast(
    a: GroupMap,
    b: GroupMap,
    mask: torch.Tensor | None = None,
    *,
    keys: tuple[GroupKey, GroupKey] = ((), ()),
) -> ContrastResult:
    """Welch's unequal-variance t-test per pixel between two :class:`GroupMap` s.

    ``t = (mean_a - mean_b) / sqrt(var_a/n_a + var_b/n_b)`` with Welch-Satterthwaite degrees
    of freedom; equals ``scipy.stats.ttest_ind(equal_var=False)`` on the raw maps. Pixels
    whose variance is zero in both groups (e.g. an always-zero background) get ``t = 0``,
    ``p = 1`` when the means agree, ``t = +-inf``, ``p = 0`` when they differ (perfect
    separation), and ``df = n_a + n_b - 2``; never NaN. ``mask`` (bool, broadcastable to
    ``(1, *S)``) restricts the test: pixels outside get ``t = 0``, ``p = q = 1`` and do not
    count in the FDR correction. Each group needs at least two images.
    """
    _check_groups(a, b)
    t, df = _welch_t_df(a, b)
    if mask is None:
        inside = torch.ones_like(t, dtype=torch.bool)
    else:
        inside = torch.as_tensor(mask).to(torch.bool).expand_as(t)
    t = torch.where(inside, t, torch.zeros_like(t))
    p = torch.from_numpy(2.0 * stats.t.sf(np.abs(t.numpy()), df.numpy())).to(torch.float64)
    p = torch.where(inside, p.clamp(0.0, 1.0), torch.ones_like(p))
    q = torch.ones_like(p)
    if inside.any():
        q[inside] = benjamini_hochberg(p[inside])
    return ContrastResult(t, df, p, q, keys[0], keys[1], a.count, b.count)
