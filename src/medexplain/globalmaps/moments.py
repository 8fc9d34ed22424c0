"""Running per-pixel moments of a group of maps and the group's global map.

Per group only ``count``, ``mean`` and ``M2`` (sum of squared deviations) are kept, float64
on the CPU, updated and merged with the parallel algorithm of Chan, Golub and LeVeque
(1979), so memory does not grow with the number of images and merging is order-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """count, mean and M2 = sum of squared deviations, float64 ``(1, *S)`` on the CPU."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def of(x: torch.Tensor, owned: bool = False) -> Moments:
        """Moments of a batch ``(n, 1, *S)`` (two passes within the batch). ``owned``: ``x``
        is a scratch copy that may be overwritten."""
        mean = x.mean(dim=0)
        if x.shape[0] == 1:
            return Moments(1, mean, torch.zeros_like(mean))
        deviations = x.sub_(mean) if owned else x - mean
        return Moments(int(x.shape[0]), mean, deviations.pow_(2).sum(dim=0))

    def clone(self) -> Moments:
        return Moments(self.count, self.mean.clone(), self.m2.clone())

    def merge_(self, other: Moments) -> Moments:
        """Chan et al. (1979) pairwise combination, in place; exact up to rounding and
        independent of the order of combination."""
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean.add_(delta, alpha=other.count / n)
        self.m2.add_(other.m2).addcmul_(delta, delta, value=self.count * other.count / n)
        self.count = n
        return self


@dataclass(frozen=True)
class GroupMap:
    """A group's global map: ``count`` images, per-pixel ``mean`` and sample ``std``.

    ``mean`` and ``std`` are float64 ``(1, *S)`` CPU tensors; ``mean`` can be passed as the
    ``maps`` (the ranking) of :func:`medexplain.metrics.peppr.peppr`. ``std`` uses ``ddof=1`` (the
    estimate the Welch test needs) and is zero for a group of one image.
    """

    count: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        return self.std**2

    @staticmethod
    def from_moments(moments: Moments) -> GroupMap:
        if moments.count > 1:
            var = (moments.m2 / (moments.count - 1)).clamp_min(0)
        else:
            var = torch.zeros_like(moments.m2)
        return GroupMap(moments.count, moments.mean.clone(), var.sqrt())
