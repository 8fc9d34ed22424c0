"""What every realistic cohort returns: images on real anatomy with their known evidence.

A cohort generator (``make_brain``, ``make_retina``, ``make_chest``) follows the synthetic
benchmark's contract: aligned images, labels, and per-image boolean masks of where the class
evidence was put, deterministic for a seed. The anatomy comes from data that ships inside
PyPI packages (nilearn's MNI152 template, scikit-image's fundus photograph, the chest
annotations in the torchxrayvision wheel); nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..split import stratified_split
from ..synthetic.benchmark import BenchmarkDataset
from ..synthetic.subjects import as_index

__all__ = ["Cohort", "stratified_split"]


@dataclass
class Cohort:
    """An aligned labelled cohort with the ground truth of each image's evidence.

    ``images``: ``(N, C, *S)`` float32 (C = 1 for MRI and X-ray, 3 for colour fundus) in the
    source's intensity range (stated in ``config["value_range"]``); ``labels``: ``(N,)``
    long, ``0`` = healthy; ``evidence``: ``(N, 1, *S)`` bool, where each image's class
    evidence was applied (empty for healthy images); ``regions``: class name -> ``(1, *S)``
    bool, the template region a label-wise global map should match; ``affine``: the
    ``(4, 4)`` voxel-to-world matrix of every image (MNI space for the brain cohort, None
    for photographs); ``extra``: per-image ground truth beyond a mask (e.g. the atrophy's
    Jacobian determinant ``(N, 1, *S)``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    evidence: torch.Tensor
    class_names: tuple[str, ...]
    regions: dict[str, torch.Tensor] = field(default_factory=dict)
    affine: np.ndarray | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def has_marker(self) -> torch.Tensor:
        """``(N,)`` bool: which images carry the cohort's shortcut (``extra["shortcut"]``)."""
        shortcut = self.extra.get("shortcut")
        if shortcut is None:
            return torch.zeros(len(self), dtype=torch.bool)
        return shortcut.flatten(1).any(1)

    @property
    def marker(self) -> torch.Tensor:
        """``(1, *S)`` bool: every pixel the shortcut covers in some image (empty without
        a shortcut), where a shortcut class's global map must not look."""
        shortcut = self.extra.get("shortcut")
        if shortcut is None:
            return torch.zeros(self.evidence.shape[1:], dtype=torch.bool)
        return shortcut.any(0)

    def dataset(self) -> Dataset:
        """A torch Dataset of ``(image (C, *S), label int)``."""
        return BenchmarkDataset(self.images, self.labels)

    def mean_image(self) -> torch.Tensor:
        """Mean image ``(C, *S)`` (the natural perturbation fill for aligned images)."""
        return self.images.mean(dim=0)

    def subset(self, indices: Sequence[int] | torch.Tensor) -> Cohort:
        """The images at ``indices`` (ints, a tensor or a boolean mask ``(N,)``) with their
        truth (per-image ``extra`` entries too)."""
        n = len(self)
        index = as_index(indices, n)
        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            evidence=self.evidence[index],
            extra={k: v[index] if v.shape[0] == n else v for k, v in self.extra.items()},
            config=dict(self.config),
        )

    def split(
        self, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
    ) -> tuple[Cohort, ...]:
        """Deterministic split stratified by label (see :func:`stratified_split`)."""
        parts = stratified_split(self.labels, len(self.class_names), fractions, seed)
        return tuple(self.subset(part) for part in parts)
