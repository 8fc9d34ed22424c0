"""The benchmark a user asks for: subjects drawn, rendered, and the template regions as the
ground truth of where each class's evidence is."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import Dataset

from ..split import stratified_split
from ..template import marker_mask, region_masks
from .rendering import render
from .subjects import BENCHMARK_CLASSES, as_index, sample_subjects


class BenchmarkDataset(Dataset):
    """Items ``(image (1, *S) float32, label int)`` of a :class:`SyntheticBenchmark`."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


@dataclass
class SyntheticBenchmark:
    """An aligned labelled image set with the ground truth of where each class's evidence is.

    ``regions`` and ``region_parts`` are the template regions (what a label-wise global map
    should match); ``evidence`` is per image, in the image's own (slightly deformed) space.
    """

    images: torch.Tensor  # (N, 1, *S) float32 in [0, 1]
    labels: torch.Tensor  # (N,) long
    evidence: torch.Tensor  # (N, 1, *S) bool
    regions: dict[str, torch.Tensor]  # disease class -> (1, *S) bool
    region_parts: dict[str, list[torch.Tensor]]  # disease class -> [(1, *S) bool, ...]
    evidence_parts: torch.Tensor | None  # (N, P, *S) bool when redundant, else None
    marker: torch.Tensor  # (1, *S) bool
    has_marker: torch.Tensor  # (N,) bool
    class_names: tuple[str, ...]
    config: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices) -> SyntheticBenchmark:
        """The images at ``indices`` (ints, a tensor or a boolean mask), with their truth."""
        index = as_index(indices, len(self))
        return replace(
            self,
            images=self.images[index],
            labels=self.labels[index],
            evidence=self.evidence[index],
            evidence_parts=None if self.evidence_parts is None else self.evidence_parts[index],
            has_marker=self.has_marker[index],
            config=dict(self.config),
        )

    def split(
        self, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
    ) -> tuple[SyntheticBenchmark, ...]:
        """Deterministic split stratified by label; one part per fraction (they sum to 1).

        Within each class the images are shuffled with ``seed`` and cut at the rounded
        cumulative fractions; each part keeps its images in their original order.
        """
        parts = stratified_split(self.labels, len(self.class_names), fractions, seed)
        return tuple(self.subset(part) for part in parts)

    def dataset(self) -> Dataset:
        """A torch Dataset of ``(image (1, *S), label int)``."""
        return BenchmarkDataset(self.images, self.labels)

    def mean_image(self) -> torch.Tensor:
        """Mean image ``(1, *S)`` (the natural PEPPR/perturbation fill for aligned data)."""
        return self.images.mean(dim=0)


def make_benchmark(
    n: int = 2000,
    dims: int = 2,
    size: int | None = None,
    *,
    classes: Sequence[str] = BENCHMARK_CLASSES,
    strength: float = 1.0,
    shortcut: float = 0.0,
    shortcut_class: int = 1,
    redundant: bool = False,
    noise: float = 0.05,
    seed: int = 0,
) -> SyntheticBenchmark:
    """Generate the aligned synthetic benchmark (see the module docstring for the classes).

    Args:
        n: number of images, classes balanced (counts differ by at most one).
        dims: 2 or 3 spatial dims; ``size`` pixels per axis (default 64 in 2D, 32 in 3D).
        classes: ordered class names from ``("healthy", "lesion", "atrophy")``; label ``i``
            is ``classes[i]``.
        strength: effect size multiplier (lesion contrast ``0.35 * strength``, nucleus radius
            loss ``35% * strength``); 0 makes all classes identically distributed.
        shortcut: probability that an image of class ``shortcut_class`` carries the bright
            corner marker (a spurious cue like printed text on chest X-rays).
        redundant: two far-apart lesion regions A1, A2, each sufficient: a lesion image has
            a blob in both with probability 1/2, otherwise in one chosen at random.
        noise: standard deviation of the additive Gaussian noise.
        seed: the same seed gives identical tensors.

    Returns:
        :class:`SyntheticBenchmark` with images ``(n, 1, *S)`` float32 in [0, 1].
    """
    subjects = sample_subjects(
        n,
        dims,
        size,
        classes=classes,
        strength=strength,
        shortcut=shortcut,
        shortcut_class=shortcut_class,
        redundant=redundant,
        noise=noise,
        seed=seed,
    )
    out = render(subjects)
    n, dims, size = len(subjects), subjects.dims, subjects.size
    lesion_parts, atrophy_region = region_masks(dims, size, redundant)
    region_parts: dict[str, list[torch.Tensor]] = {}
    if "lesion" in subjects.class_names:
        region_parts["lesion"] = lesion_parts
    if "atrophy" in subjects.class_names:
        region_parts["atrophy"] = [atrophy_region]
    regions = {name: torch.stack(parts).any(dim=0) for name, parts in region_parts.items()}
    config = dict(
        n=n,
        dims=dims,
        size=size,
        classes=list(subjects.class_names),
        strength=float(strength),
        shortcut=float(shortcut),
        shortcut_class=operator.index(shortcut_class),
        redundant=bool(redundant),
        noise=float(noise),
        seed=operator.index(seed),
    )
    return SyntheticBenchmark(
        images=out.images,
        labels=subjects.labels.clone(),
        evidence=out.evidence,
        regions=regions,
        region_parts=region_parts,
        evidence_parts=out.evidence_parts if redundant else None,
        marker=marker_mask(dims, size),
        has_marker=subjects.has_marker.clone(),
        class_names=subjects.class_names,
        config=config,
    )
