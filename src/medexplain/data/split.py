"""The one stratified split of a labelled image set (the benchmark's and the cohorts')."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["stratified_split"]


def stratified_split(
    labels: torch.Tensor, num_classes: int, fractions: Sequence[float], seed: int = 0
) -> list[torch.Tensor]:
    """Index tensors, one per fraction (they sum to 1): within each class ``0 ..
    num_classes - 1`` the images are shuffled with ``seed`` and cut at the rounded
    cumulative fractions; each part's indices are sorted, so images keep their order."""
    fractions = [float(f) for f in fractions]
    if not fractions or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    g = torch.Generator().manual_seed(int(seed))
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    cumulative = torch.tensor(fractions, dtype=torch.float64).cumsum(0)
    for label in range(num_classes):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        cuts = [0, *torch.round(cumulative * len(members)).long().tolist()]
        cuts[-1] = len(members)
        for p in range(len(fractions)):
            parts[p].append(members[cuts[p] : cuts[p + 1]])
    return [torch.cat(p).sort().values for p in parts]
