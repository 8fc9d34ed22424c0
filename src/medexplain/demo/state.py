"""The state the demo's steps pass along: each step reads what earlier steps filled in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.cohorts import Cohort, save_cohort_nifti
from ..data.synthetic import SyntheticBenchmark
from ..explain.base import Explainer
from ..explain.batch import ExplainedSet
from ..globalmaps import GlobalResult
from ..models.train import TrainHistory
from ..report.nifti import save_nifti
from .settings import DemoSettings

#: What the demo explains: the geometric benchmark or a realistic cohort (the same interface:
#: images, labels, evidence, regions, marker, split, subset, dataset, mean_image).
DemoData = SyntheticBenchmark | Cohort


@dataclass
class MethodOutcome:
    """Everything the demo made and measured for one method.

    ``metrics`` is the method's entry of ``results.json``; ``seconds`` the time spent on it
    over all steps.
    """

    params: dict[str, Any]
    explained: ExplainedSet
    metrics: dict[str, Any]
    global_result: GlobalResult = field(init=False)
    seconds: float = 0.0


@dataclass
class DemoState:
    """The run so far. Fields without a default are set by the step named in the comment."""

    out: Path
    settings: DemoSettings
    progress: bool
    device: torch.device
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    # generate_data
    bench: DemoData = field(init=False)
    train: DemoData = field(init=False)
    val: DemoData = field(init=False)
    test: DemoData = field(init=False)
    # train_model
    model: nn.Module = field(init=False)
    history: TrainHistory = field(init=False)
    classifier_metrics: dict[str, Any] = field(init=False)
    # choose_images: images (N, C, *S) every method explains, their predicted classes (N,),
    # the held-out PEPPR images, the training mean image (C, *S), outlines per class (*S)
    explain_set: DemoData = field(init=False)
    preds: torch.Tensor = field(init=False)
    peppr_set: DemoData = field(init=False)
    mean_image: torch.Tensor = field(init=False)
    outlines: dict[str, torch.Tensor] = field(init=False)
    # fit_learned_explainers: method name -> fitted explainer, and its JSON entry
    learned: dict[str, Explainer] = field(default_factory=dict)
    learned_fits: dict[str, Any] = field(default_factory=dict)
    # explain_methods (then aggregate_global_maps, evaluate_methods, run_peppr)
    outcomes: dict[str, MethodOutcome] = field(default_factory=dict)
    # draw_examples: indices into explain_set
    examples: torch.Tensor = field(init=False)
    # run_sag, run_warp, collect_results
    sag: dict[str, Any] = field(default_factory=dict)
    warp: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray | None:
        """The images' ``(4, 4)`` voxel-to-world matrix (the brain cohort's MNI space), or
        None (the benchmark, photographs)."""
        return getattr(self.bench, "affine", None)

    @property
    def writes_nifti(self) -> bool:
        """True when maps are also written as NIfTI: volumes, and slices of a cohort in a
        world space (the brain cohort's MNI space)."""
        return self.settings.dims == 3 or self.affine is not None

    def save_nifti(self, volume: torch.Tensor, path: Path) -> Path:
        """Write a map ``(*S)`` (leading singleton axes allowed) as NIfTI: in the cohort's
        world space (sform/qform code MNI) when it has an affine, else with the identity."""
        if self.affine is not None:
            return save_cohort_nifti(volume, path, self.bench)
        return save_nifti(volume, path)

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the wall-clock seconds of the block to ``timings[key]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0

    @contextmanager
    def timed_method(self, name: str) -> Iterator[MethodOutcome]:
        """Yield the outcome of ``name`` and add the block's seconds to it."""
        outcome = self.outcomes[name]
        t0 = time.perf_counter()
        try:
            yield outcome
        finally:
            outcome.seconds += time.perf_counter() - t0
