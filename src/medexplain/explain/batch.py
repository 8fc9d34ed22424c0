"""Explain a set of images held in memory, in bounded batches, with progress and timing.

The demo and the benchmarks use these on tensors; :mod:`medexplain.runs` explains files into
a resumable store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..core.model import model_device, model_guard
from ..core.progress import progress_bar
from ..core.scores import chunked, default_targets, predict_classes
from .base import Explainer


@dataclass
class ExplainedSet:
    """Maps ``(N, 1, *spatial)`` (CPU float32) for N images and the seconds it took."""

    maps: torch.Tensor
    targets: torch.Tensor
    seconds: float

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(1, len(self.maps))


@torch.no_grad()
def model_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """Logits ``(N, K)`` on the CPU, in chunks of ``batch_size``, with the model in eval
    mode (and left as it was found)."""
    device = model_device(model)
    with model_guard(model):
        return chunked(lambda part: model(part.to(device)).cpu(), images, batch_size)


def predicted_classes(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 64
) -> torch.Tensor:
    """The model's decision ``(N,)`` long (:func:`medexplain.core.scores.predict_classes`:
    the argmax, or ``logit > 0`` for a one-logit model)."""
    return predict_classes(model_logits(model, images, batch_size))


def iter_batches(
    explainer: Explainer,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    batch_size: int = 16,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(slice, maps)`` for consecutive batches of ``images`` ``(N, C, *spatial)``.

    ``targets`` ``(N,)`` or None (each image's predicted class). Maps come back on the CPU.
    """
    for start in range(0, len(images), batch_size):
        part = slice(start, min(start + batch_size, len(images)))
        target = None if targets is None else targets[part]
        yield part, explainer(images[part], target).cpu()


def explain_all(
    explainer: Explainer,
    images: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    batch_size: int = 16,
    progress: bool = False,
    description: str = "explaining",
) -> ExplainedSet:
    """Explain every image; returns the stacked maps, the targets used and the wall time."""
    maps = torch.empty((len(images), 1, *images.shape[2:]), dtype=torch.float32)
    used = torch.empty(len(images), dtype=torch.long)
    if targets is None:
        targets = default_targets(model_logits(explainer.model, images, batch_size))
    start = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(images))
        for part, batch_maps in iter_batches(explainer, images, targets, batch_size):
            maps[part] = batch_maps
            used[part] = targets[part]
            bar.advance(task, part.stop - part.start)
    return ExplainedSet(maps=maps, targets=used, seconds=time.perf_counter() - start)
