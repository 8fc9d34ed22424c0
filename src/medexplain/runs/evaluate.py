"""``evaluate``: proof for a run (PEPPR, deletion/insertion, localization, sanity)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.serialise import json_safe
from ..data.files import ImageDataset
from ..explain.base import forward_only
from ..globalmaps import GlobalResult
from .aggregate import global_run
from .atomic import atomic_write_text
from .errors import RunError
from .settings import (
    ExplainSettings,
    check_counts,
    make_explainer,
    open_data,
    open_model,
    open_run,
    settings_of,
)
from .store import RunStore

__all__ = ["evaluate_run"]


def _done_batches(
    store: RunStore,
    dataset: ImageDataset,
    batch_size: int,
    limit: int | None,
    multilabel: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of the run's explained images, re-read from the data; an image
    without a label is scored against the model's own prediction of it."""
    xs, ys, seen = [], [], 0
    for chunk in store.iter_chunks(maps=False):
        for j, index in enumerate(chunk.index.tolist()):
            if limit is not None and seen >= limit:
                break
            label = chunk.label[j]
            if not multilabel and int(label) < 0:
                label = chunk.pred[j]
            item, _ = dataset.try_get(index)
            if item is None:
                continue
            xs.append(item["image"])
            ys.append(torch.as_tensor(label))
            seen += 1
            if len(xs) == batch_size:
                yield torch.stack(xs), torch.stack(ys)
                xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


def _first_done(store: RunStore, dataset: ImageDataset, n: int):
    """Images, stored maps, targets and items of the first ``n`` explained images."""
    images, maps, targets, items = [], [], [], []
    for chunk in store.iter_chunks():
        for j, index in enumerate(chunk.index.tolist()):
            if len(images) >= n:
                break
            item, _ = dataset.try_get(index)
            if item is None:
                continue
            images.append(item["image"])
            maps.append(torch.from_numpy(chunk.maps[j]))
            targets.append(int(chunk.target[j]))
            items.append(item)
        if len(images) >= n:
            break
    if not images:
        raise RunError(f"{store.root} holds no explained image that can be read again")
    return torch.stack(images), torch.stack(maps), torch.tensor(targets), items


@dataclass
class _Run:
    """An opened run: its store and record, settings, model and dataset."""

    store: RunStore
    record: dict[str, Any]
    settings: ExplainSettings
    model: Any
    dataset: ImageDataset

    @classmethod
    def open(cls, run: str | Path, device: str | None) -> _Run:
        store, record = open_run(run)
        settings = settings_of(record, device)
        model = open_model(settings)
        dataset = open_data(settings, model)
        expected = record["identity"]["model"].get("sha256")
        if expected != model.source.get("sha256"):
            raise RunError(f"the model file {settings.model} changed since the run was explained")
        return cls(store, record, settings, model, dataset)


def _peppr_section(
    run: _Run,
    labelwise: bool,
    limit: int | None,
    steps: int,
    seeds: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """PEPPR of the run's global map (or each label's map) against random orders; writes
    ``peppr.json`` and ``figures/peppr.png``."""
    from ..metrics.peppr import peppr_many
    from ..report.peppr_plot import plot_peppr

    store, record = run.store, run.record
    directory = store.root / "global"
    if (directory / "index.json").is_file():
        result = GlobalResult.load(directory)
    else:
        result = global_run(store.root, log=lambda *_: None)
    if labelwise:
        kind = result.settings.get("by", "label")
        ranking: Any = {
            key[1]: g.mean.float()
            for key, g in result.groups.items()
            if key[0] == kind and len(key) == 2
        }
        if not ranking:
            raise RunError("--labelwise needs global maps by label or prediction")
    else:
        ranking = result.overall.mean.float()
    mean = store.mean_image()
    multilabel = record["multilabel"]
    names = record["class_names"]
    if len(record["model"].get("labels") or names) == 1:
        names = names[-1:]  # one logit: its groups are 'not <label>' and '<label>'

    peppr_result = peppr_many(
        run.model,
        _done_batches(store, run.dataset, batch_size, limit, multilabel),
        None,
        {"global": ranking},
        fill="mean",
        mean_image=torch.from_numpy(mean).float(),
        n_steps=steps,
        random_seeds=seeds,
        batch_size=batch_size,
        activation="sigmoid" if multilabel else "auto",
        class_names=names,
        progress=progress,
    )["global"]
    section = peppr_result.summary()
    section["n_images"] = peppr_result.n_images
    section["labelwise"] = labelwise
    section["reference"] = "labels" if record["data"].get("class_names") else "predictions"
    atomic_write_text(store.root / "peppr.json", json.dumps(peppr_result.to_dict(), indent=2))
    title = f"PEPPR — {run.settings.method}"
    plot_peppr(peppr_result, store.root / "figures" / "peppr.png", title=title)
    return section


def _deletion_section(run: _Run, n: int) -> dict[str, Any]:
    """Deletion/insertion AUCs (blurred baseline) of the first ``n`` explained images, with
    their mean curves; the figure goes to ``figures/deletion.png``."""
    from ..metrics.deletion import deletion_insertion
    from ..report.deletion_plot import plot_deletion_curves

    x, maps, targets, _ = _first_done(run.store, run.dataset, n)
    outcome = deletion_insertion(run.model, x, targets, maps, baseline="blur")
    curves = {
        "fractions": outcome.fractions.tolist(),
        "deletion_curve": outcome.deletion.mean(0).tolist(),
        "insertion_curve": outcome.insertion.mean(0).tolist(),
    }
    plot_deletion_curves(
        curves["fractions"],
        curves["deletion_curve"],
        curves["insertion_curve"],
        run.store.root / "figures" / "deletion.png",
        title=f"deletion / insertion — {run.settings.method} ({x.shape[0]} images)",
    )
    return {
        "n_images": int(x.shape[0]),
        "deletion_auc": float(outcome.deletion_auc.mean()),
        "insertion_auc": float(outcome.insertion_auc.mean()),
        **curves,
    }


def _sanity_section(run: _Run, n: int) -> dict[str, Any]:
    """Cascading model randomisation on the first ``n`` explained images."""
    from ..metrics.sanity import cascading_randomization

    reason = forward_only(run.model)
    if reason is not None:  # an ONNX model: no weights to randomise, no gradients
        return {"skipped": f"{reason} runs forward only: its weights cannot be randomised"}
    x, _, targets, _ = _first_done(run.store, run.dataset, n)
    try:
        check = cascading_randomization(
            run.model,
            x,
            targets,
            make_explainer=lambda m: make_explainer(run.settings, m),
            seed=0,
        )
    except Exception as error:  # e.g. TorchScript models cannot be deep-copied
        return {"skipped": f"{type(error).__name__}: {error}"}
    return {
        "n_images": int(x.shape[0]),
        "rank_correlation_fully_randomized": check.rank_correlation_fully_randomized,
        "degenerate_fraction": check.degenerate_fraction,
        "mean_per_step": check.mean.tolist(),
        "steps": check.step_names,
    }


def evaluate_run(
    run: str | Path,
    *,
    peppr: bool = True,
    deletion: bool = True,
    localization: bool = True,
    sanity: bool = True,
    labelwise: bool = False,
    limit: int | None = None,
    n_deletion: int = 16,
    n_sanity: int = 4,
    peppr_steps: int = 20,
    peppr_seeds: int = 5,
    device: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
    forward=None,
) -> dict[str, Any]:
    """Proof for a run: PEPPR with its global map(s), deletion/insertion, localization
    against the manifest's masks, cascading-randomisation sanity; writes
    ``RUN/evaluation.json`` and ``RUN/figures/peppr.png``.

    Evaluations accumulate: each call adds or replaces only the sections it computed, the
    others already in ``evaluation.json`` stay. Returns the whole evaluation dict.
    ``forward``: None, or ``(model, settings) -> model`` giving the model PEPPR and
    deletion/insertion run (e.g. :func:`medexplain.runs.ray_engine.ray_forward`: the passes
    spread over Ray workers)."""
    from ..metrics.localization import localization_scores

    check_counts(
        limit=limit,
        n_deletion=n_deletion,
        n_sanity=n_sanity,
        steps=peppr_steps,
        seeds=peppr_seeds,
        batch_size=batch_size,
    )
    opened = _Run.open(run, device)
    store = opened.store
    evaluation = _read_evaluation(store)
    evaluation.update(run=str(store.root), n_explained=store.count())
    fast = opened  # the forward-only metrics' model: local, or spread over workers
    if forward is not None:
        fast = replace(opened, model=forward(opened.model, opened.settings))
    if peppr:
        evaluation["peppr"] = _peppr_section(
            fast, labelwise, limit, peppr_steps, peppr_seeds, batch_size, progress
        )
    if deletion:
        evaluation["deletion"] = _deletion_section(fast, n_deletion)
    if localization:
        evaluation["localization"] = _localization(store, opened.dataset, localization_scores)
    if sanity:
        evaluation["sanity"] = _sanity_section(opened, n_sanity)
    atomic_write_text(store.root / "evaluation.json", json.dumps(json_safe(evaluation), indent=2))
    return evaluation


def _read_evaluation(store: RunStore) -> dict[str, Any]:
    """The sections already in ``RUN/evaluation.json`` (empty when there is none)."""
    path = store.root / "evaluation.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read {path}: {error}") from error
    return data if isinstance(data, dict) else {}


def _localization(store: RunStore, dataset: ImageDataset, scores_fn) -> dict[str, Any]:
    with_mask = {i for i, r in enumerate(dataset.records) if r.mask is not None}
    if not with_mask:
        return {"skipped": "the dataset has no masks (add a 'mask' column to the CSV)"}
    values: dict[str, list[float]] = {}
    for chunk in store.iter_chunks():
        rows = [j for j, i in enumerate(chunk.index.tolist()) if i in with_mask]
        maps, masks = [], []
        for j in rows:
            item, _ = dataset.try_get(int(chunk.index[j]))
            if item is None or "mask" not in item or not bool(item["mask"].any()):
                continue
            maps.append(torch.from_numpy(chunk.maps[j]))
            masks.append(item["mask"])
        if not maps:
            continue
        scores = scores_fn(torch.stack(maps), torch.stack(masks))
        for name, tensor in scores.items():
            values.setdefault(name, []).extend(tensor.tolist())
    if not values:
        return {"skipped": "no explained image has a non-empty mask"}
    out: dict[str, Any] = {"n_images": len(next(iter(values.values())))}
    for name, v in values.items():
        array = np.asarray(v, dtype=np.float64)
        out[name] = float(np.nanmean(array)) if np.isfinite(array).any() else None
    return out
