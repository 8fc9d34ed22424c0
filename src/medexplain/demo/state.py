"""The state the demo's steps pass along: each step reads what earlier steps filled in."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.synthetic import SyntheticBenchmark
from ..explain.batch import ExplainedSet
from ..globalmaps import GlobalResult
from ..models.train import TrainHistory
from .settings import DemoSettings


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
    bench: SyntheticBenchmark = field(init=False)
    train: SyntheticBenchmark = field(init=False)
    val: SyntheticBenchmark = field(init=False)
    test: SyntheticBenchmark = field(init=False)
    # train_model
    model: nn.Module = field(init=False)
    history: TrainHistory = field(init=False)
    classifier_metrics: dict[str, Any] = field(init=False)
    # choose_images: images (N, C, *S) every method explains, their predicted classes (N,),
    # the held-out PEPPR images, the training mean image (C, *S), outlines per class (*S)
    explain_set: SyntheticBenchmark = field(init=False)
    preds: torch.Tensor = field(init=False)
    peppr_set: SyntheticBenchmark = field(init=False)
    mean_image: torch.Tensor = field(init=False)
    outlines: dict[str, torch.Tensor] = field(init=False)
    # explain_methods (then aggregate_global_maps, evaluate_methods, run_peppr)
    outcomes: dict[str, MethodOutcome] = field(default_factory=dict)
    # draw_examples: indices into explain_set
    examples: torch.Tensor = field(init=False)
    # run_sag, run_warp, collect_results
    sag: dict[str, Any] = field(default_factory=dict)
    warp: dict[str, Any] | None = None
    results: dict[str, Any] = field(default_factory=dict)

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
