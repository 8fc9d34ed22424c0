"""PEPPR: Progressive Erasing Plus Progressive Restoration (Engelmann et al., METHODS.md §1).

A global map ranks pixel positions, most important first (for aligned images a position
means the same anatomy in every image). For fractions ``f = 0, 1/n_steps, ..., 1``:

- erase: the top-``f`` pixels of every evaluation image are replaced by the fill, the
  model is run and dataset metrics are computed (AUC-ROC one-vs-rest per label, macro mean
  as the headline, and accuracy);
- restore: every image starts as the fill and its top-``f`` pixels are restored.

The same curves with random pixel orders (one order per seed, shared by all images) are
the control. A faithful map makes erase fall faster and restore rise faster than random,
so ``erase_area - random_erase_area < 0`` and ``restore_area - random_restore_area > 0``
(:data:`DIRECTIONS`).
The paper fixes neither the fill, the grid nor the summary number: fill defaults to the
dataset mean image (natural for aligned data; "zero", "blur" or a tensor also work), the
grid has ``n_steps + 1 = 21`` points, and the summary is the trapezoid area over ``f``.

Pixel ``k``-counts follow :func:`medexplain.core.perturb.top_fraction_mask`
(``k = ceil(f * n)``), ranks follow :func:`medexplain.core.perturb.rank_pixels` (equal
values of the map in a random order with the fixed seed ``TIE_SEED``, not in raster order).

Arguments follow the metrics' order ``(model, x, y, maps)``: ``maps`` is the global ranking
(one map for every image, not one map per image). The result classes are in
:mod:`medexplain.metrics.peppr_result`; the figure is drawn by
:func:`medexplain.report.peppr_plot.plot_peppr`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.model import model_device, model_guard
from ..core.perturb import apply_mask, make_baseline, rank_pixels, top_fraction_mask
from ..core.progress import progress_bar
from ..core.scores import probabilities
from .peppr_result import PepprResult, assemble, curve_metrics

FILLS = ("mean", "zero", "blur")
DIRECTIONS = {
    "erase_area": "lower",
    "restore_area": "higher",
    "erase_minus_random": "lower",
    "restore_minus_random": "higher",
}


# --------------------------------------------------------------------------- inputs


def _check_ranking_map(
    ranking_map: torch.Tensor, spatial: tuple[int, ...], name: str
) -> torch.Tensor:
    if not isinstance(ranking_map, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (1, *S) or a dict label -> tensor")
    shape = tuple(ranking_map.shape)
    extra = len(shape) - len(spatial)
    if extra not in (0, 1, 2) or shape[extra:] != spatial or any(s != 1 for s in shape[:extra]):
        raise ValueError(
            f"{name} must be one global map of shape (1, {', '.join(map(str, spatial))}) "
            f"matching the images; got {shape}"
        )
    if not torch.isfinite(ranking_map).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return ranking_map.reshape(1, 1, *spatial)


def _batches(
    x: torch.Tensor | Iterable, y: torch.Tensor | None, batch_size: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        if y is None:
            raise ValueError("y (labels) is required when x is a tensor")
        y = torch.as_tensor(y)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"y has {y.shape[0]} labels for {x.shape[0]} images")
        for start in range(0, x.shape[0], batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
    else:
        if y is not None:
            raise ValueError("pass y=None when x is an iterable of (x, y) batches")
        for item in x:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("an iterable x must yield (x, y) batches")
            yield torch.as_tensor(item[0]), torch.as_tensor(item[1])


def _fill_for(
    x: torch.Tensor, fill: str | torch.Tensor, mean_image: torch.Tensor | None
) -> torch.Tensor:
    if isinstance(fill, torch.Tensor):
        return make_baseline(x, fill)
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS} or a tensor, got {fill!r}")
    return make_baseline(x, fill, mean_image=mean_image)


# --------------------------------------------------------------------------- main


def _fraction_counts(fractions: np.ndarray, n: int) -> torch.Tensor:
    """Pixels in the top-f set for each fraction, exactly as top_fraction_mask counts them."""
    ranks = torch.arange(n).view(1, n)
    return torch.tensor([int(top_fraction_mask(ranks, float(f)).sum()) for f in fractions])


@torch.no_grad()
def _curve_probs(
    model: nn.Module,
    x: torch.Tensor,
    fill: torch.Tensor,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    erase: bool,
    batch_size: int,
    activation: str,
) -> torch.Tensor:
    """Scores ``(F, b, K)`` of the b images at every step of one curve, forward passes
    chunked to ``batch_size`` images (memory: one chunk of images and masks)."""
    b = x.shape[0]
    total = counts.numel() * b
    spatial = x.shape[2:]
    flat_ranks = ranks.view(1, -1)
    counts = counts.to(x.device)
    out = []
    for start in range(0, total, batch_size):
        idx = torch.arange(start, min(start + batch_size, total), device=x.device)
        step, image = idx // b, idx % b
        top = flat_ranks < counts[step].view(-1, 1)  # (chunk, n) top-f pixels
        keep = ~top if erase else top
        mask = keep.view(-1, 1, *spatial).to(x.dtype)
        perturbed = apply_mask(x[image], fill[image], mask)
        out.append(probabilities(model(perturbed), activation).double().cpu())
    probs = torch.cat(out)
    return probs.view(counts.numel(), b, -1)


def peppr(
    model: nn.Module,
    x: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    y: torch.Tensor | None,
    maps: torch.Tensor | Mapping[str | int, torch.Tensor],
    **options: Any,
) -> PepprResult:
    """Erase and restore curves of a model's dataset metrics along a global pixel ranking.

    Args:
        model: classifier returning logits ``(B, K)``; left as found (eval mode inside).
        x: ``(N, C, *S)`` evaluation images (2D or 3D), or an iterable of ``(x, y)``
            batches (then ``y=None``), e.g. a DataLoader for data that does not fit.
        y: ``(N,)`` class indices (multi-class; 0/1 for a single-logit model) or
            ``(N, K)`` 0/1 (multi-label, sigmoid heads).
        maps: the ranking: one global map ``(1, *S)`` (e.g. ``GlobalResult.overall.mean``), higher
            = more important, used for every image; or a dict label -> map (names from
            ``class_names`` or indices) for label-wise ranking: label ``k``'s AUC is then
            measured along label ``k``'s map, and accuracy is the mean over the mapped labels
            of the one-vs-rest accuracy along each label's own map.
        **options: ``fill``, ``mean_image``, ``n_steps``, ``random_seeds``, ``batch_size``,
            ``activation``, ``progress``, ``class_names``, as in :func:`peppr_many`.

    Returns a :class:`PepprResult`. Cost: ``2 (n_steps + 1) (maps + random_seeds)`` forward
    passes per image.
    """
    return peppr_many(model, x, y, {"map": maps}, **options)["map"]


def peppr_many(
    model: nn.Module,
    x: torch.Tensor | Iterable[tuple[torch.Tensor, torch.Tensor]],
    y: torch.Tensor | None,
    maps: Mapping[str, torch.Tensor | Mapping[str | int, torch.Tensor]],
    *,
    fill: str | torch.Tensor = "mean",
    mean_image: torch.Tensor | None = None,
    n_steps: int = 20,
    random_seeds: int = 5,
    batch_size: int = 64,
    activation: str = "auto",
    progress: bool = False,
    class_names: Sequence[str] | None = None,
) -> dict[str, PepprResult]:
    """PEPPR for several rankings (e.g. one global map per method) in one pass over the data.

    The random-order control does not depend on the ranking, so it is computed once and
    shared by every result: ``2 (n_steps + 1) (maps + random_seeds)`` forward passes per
    image in total instead of ``2 (n_steps + 1) maps (1 + random_seeds)``.

    Args:
        x, y: as in :func:`peppr`.
        maps: name -> a ranking as :func:`peppr` takes it (one map, or a dict
            label -> map for label-wise ranking).
        fill: ``"mean"`` (dataset mean image: ``mean_image`` ``(C, *S)``, or the mean of
            ``x`` when it is a tensor), ``"zero"``, ``"blur"``
            (:func:`medexplain.core.perturb.blur_baseline` of each image) or a tensor.
        n_steps: grid of ``n_steps + 1`` fractions from 0 to 1.
        random_seeds: number of random pixel orders (seeds ``0..R-1``) for the control.
        batch_size: images per forward pass and per data chunk.
        activation: ``auto`` = softmax for multi-class, sigmoid for one logit or multi-label;
            see :func:`medexplain.core.scores.probabilities`. Sigmoid-style accuracy thresholds
            scores at 0.5 (at 0 with ``"logit"``).
        progress: show a Rich progress bar.
        class_names: names of the K labels (default ``"0"..."K-1"``).

    Returns name -> :class:`PepprResult`, identical to calling :func:`peppr` per name.
    """
    _check_options(model, maps, n_steps, random_seeds, batch_size)
    if isinstance(fill, str) and fill == "mean" and mean_image is None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                "fill='mean' needs mean_image (C, *S) when x is an iterable of batches"
            )
        mean_image = x.mean(dim=0, dtype=torch.float64).to(x.dtype)
    fractions = np.linspace(0.0, 1.0, n_steps + 1)
    with progress_bar(progress) as bar:
        task = bar.add_task("PEPPR", total=len(x) if isinstance(x, torch.Tensor) else None)
        with model_guard(model):
            passes = _Passes(model, maps, fractions, random_seeds, batch_size, activation)
            for xb, yb in _batches(x, y, batch_size):
                passes.add(xb, yb, fill, mean_image, class_names)
                bar.advance(task, xb.shape[0])
    if passes.n_images == 0:
        raise ValueError("x is empty")

    results = passes.metrics()
    random_runs = [i for i, run in enumerate(passes.runs) if run[0] == "random"]
    out = {}
    for key, ranking in maps.items():
        own = passes.owners[key] + random_runs
        labelwise = isinstance(ranking, Mapping)
        out[key] = assemble(
            [passes.runs[i] for i in own],
            {(j, erase): results[(i, erase)] for j, i in enumerate(own) for erase in (True, False)},
            fractions,
            passes.names,
            passes.n_images,
            labelwise,
            dict(
                fill=fill if isinstance(fill, str) else "tensor",
                n_steps=n_steps,
                random_seeds=random_seeds,
                activation=passes.activation,
                mode=passes.mode,
                labelwise=labelwise,
            ),
        )
    return out


def _check_options(model, maps, n_steps: int, random_seeds: int, batch_size: int) -> None:
    if not maps:
        raise ValueError("maps is empty")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if random_seeds < 1:
        raise ValueError(
            f"random_seeds must be >= 1 (METHODS.md asks for several), got {random_seeds}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


class _Passes:
    """The forward passes of every curve, collected batch by batch.

    ``runs``: (kind, label index, ranks) per pixel order, the rankings' own orders first,
    then the random ones; ``owners``: ranking name -> indices of its runs; ``store[i][erase]``:
    the scores ``(F, b, K)`` of each batch along run ``i``.
    """

    def __init__(self, model, maps, fractions, random_seeds, batch_size, activation) -> None:
        self.model, self.maps, self.fractions = model, maps, fractions
        self.random_seeds, self.batch_size, self.activation = random_seeds, batch_size, activation
        self.device = model_device(model)
        self.runs: list[tuple[str, int | None, torch.Tensor]] = []
        self.owners: dict[str, list[int]] = {}
        self.store: dict[int, dict[bool, list[torch.Tensor]]] = {}
        self.labels: list[torch.Tensor] = []
        self.spatial: tuple[int, ...] | None = None
        self.counts: torch.Tensor | None = None
        self.mode = ""
        self.names: tuple[str, ...] = ()
        self.threshold = 0.5
        self.n_images = 0

    def _start(self, x: torch.Tensor, y: torch.Tensor, class_names) -> None:
        """Set up the pixel orders from the first batch (spatial size, labels mode)."""
        self.spatial = spatial = tuple(x.shape[2:])
        if len(spatial) not in (2, 3):
            raise ValueError(
                f"images must be (N, C, H, W) or (N, C, D, H, W); got {tuple(x.shape)}"
            )
        n_out = self.model(x[:1]).shape[1]
        self.mode, self.names, self.activation, self.threshold = _resolve_mode(
            y, n_out, self.activation, class_names
        )
        for key, ranking in self.maps.items():
            label_maps = ranking if isinstance(ranking, Mapping) else None
            own = _make_runs(ranking, label_maps, self.names, spatial, 0, self.device)
            self.owners[key] = list(range(len(self.runs), len(self.runs) + len(own)))
            self.runs += own
        self.runs += _make_runs(None, {}, self.names, spatial, self.random_seeds, self.device)
        self.counts = _fraction_counts(self.fractions, math.prod(spatial))
        self.store = {i: {True: [], False: []} for i in range(len(self.runs))}

    def add(self, x, y, fill, mean_image, class_names) -> None:
        if not x.dtype.is_floating_point:
            raise TypeError(f"images must be floating point, got {x.dtype}")
        x = x.to(self.device)
        if self.spatial is None:
            self._start(x, y, class_names)
        elif tuple(x.shape[2:]) != self.spatial:
            raise ValueError(
                f"all images must share spatial size {self.spatial}, got {tuple(x.shape[2:])}"
            )
        _check_labels(y, self.mode, len(self.names))
        base = _fill_for(x, fill, mean_image)
        for i, (_, _, ranks) in enumerate(self.runs):
            for erase in (True, False):
                self.store[i][erase].append(
                    _curve_probs(
                        self.model,
                        x,
                        base,
                        ranks,
                        self.counts,
                        erase,
                        self.batch_size,
                        self.activation,
                    )
                )
        self.labels.append(y.cpu())
        self.n_images += x.shape[0]

    def metrics(self) -> dict[tuple[int, bool], tuple[torch.Tensor, ...]]:
        """(run, erase) -> :func:`curve_metrics` of that curve over every image."""
        y_all = torch.cat(self.labels)
        results = {}
        for i in range(len(self.runs)):
            for erase in (True, False):
                probs = torch.cat(self.store[i][erase], dim=1)  # (F, N, K)
                results[(i, erase)] = curve_metrics(probs, y_all, self.mode, self.threshold)
        return results


def _resolve_mode(
    y: torch.Tensor, n_out: int, activation: str, class_names: Sequence[str] | None
) -> tuple[str, tuple[str, ...], str, float]:
    if y.dim() == 2:
        mode = "multilabel"
        if y.shape[1] != n_out:
            raise ValueError(f"labels have {y.shape[1]} columns for a model with {n_out} outputs")
    elif y.dim() == 1:
        mode = "binary" if n_out == 1 else "multiclass"
    else:
        raise ValueError(f"labels must be (N,) or (N, K); got {tuple(y.shape)}")
    if activation == "auto":
        activation = "softmax" if mode == "multiclass" else "sigmoid"
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(n_out))
    if len(names) != n_out:
        raise ValueError(f"class_names has {len(names)} names for a model with {n_out} outputs")
    threshold = 0.0 if activation == "logit" else 0.5
    return mode, names, activation, threshold


def _check_labels(y: torch.Tensor, mode: str, k: int) -> None:
    if y.dtype.is_floating_point and mode != "multilabel":
        raise TypeError(f"labels must hold integer class indices, got {y.dtype}")
    if mode == "multilabel" and (
        y.dim() != 2 or y.shape[1] != k or not bool(((y == 0) | (y == 1)).all())
    ):
        raise ValueError(f"multi-label labels must be (N, {k}) 0/1 values")
    if mode == "binary" and not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels of a single-logit model must be 0/1")
    if mode == "multiclass" and (y.dim() != 1 or int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"labels must be (N,) class indices in [0, {k})")


#: Seed of the random order among equal values of a ranking map; apart from the random
#: controls' seeds ``0..R-1`` so that ties are not ordered like one of the controls.
TIE_SEED = 2**31 - 1


def _tie_broken_ranks(ranking: torch.Tensor) -> torch.Tensor:
    """Ranks ``(n,)`` of a ranking map, equal values in a seeded random order (not raster
    order, which would sweep a constant region top to bottom)."""
    return rank_pixels(ranking, torch.Generator().manual_seed(TIE_SEED)).view(-1)


def _make_runs(
    ranking_map, label_maps, names, spatial, random_seeds, device
) -> list[tuple[str, int | None, torch.Tensor]]:
    runs: list[tuple[str, int | None, torch.Tensor]] = []
    if ranking_map is None:
        pass  # random runs only
    elif label_maps is None:
        ranking = _check_ranking_map(ranking_map, spatial, "maps")
        runs.append(("map", None, _tie_broken_ranks(ranking.to(device))))
    else:
        if not label_maps:
            raise ValueError("maps dict is empty")
        for key, value in label_maps.items():
            if isinstance(key, int) and not isinstance(key, bool):
                if not 0 <= key < len(names):
                    raise ValueError(f"maps label index {key} is outside [0, {len(names)})")
                index = key
            elif key in names:
                index = names.index(key)
            else:
                raise ValueError(f"maps key {key!r} is not a label index nor one of {names}")
            ranking = _check_ranking_map(value, spatial, f"maps[{key!r}]")
            runs.append(("map", index, _tie_broken_ranks(ranking.to(device))))
    n = math.prod(spatial)
    for seed in range(random_seeds):
        generator = torch.Generator().manual_seed(seed)
        runs.append(("random", None, torch.randperm(n, generator=generator).to(device)))
    return runs
