"""The demo's evaluation steps: localization (image-wise and of the global maps), the
shortcut's share, deletion/insertion, the sanity check, and one PEPPR pass for all methods."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..explain import create
from ..globalmaps import GlobalResult
from ..metrics.deletion import deletion_insertion
from ..metrics.localization import localization_scores
from ..metrics.peppr import peppr_many
from ..metrics.sanity import cascading_randomization
from ..report.peppr_plot import plot_peppr
from .state import DemoData, DemoState, MethodOutcome


def evaluate_methods(state: DemoState) -> DemoState:
    """Localization, deletion/insertion and the sanity check of every method."""
    settings = state.settings
    for name in state.outcomes:
        with state.timed_method(name) as outcome:
            maps, metrics = outcome.explained.maps, outcome.metrics
            evidence = state.explain_set.evidence[: len(maps)]
            scores = _imagewise_localization(maps, evidence)
            metrics["localization_auroc"] = scores.get("auroc")
            metrics["localization"] = scores
            metrics["global"] = _global_metrics(
                outcome.global_result, state.bench, settings.shortcut_class
            )
            metrics.update(_deletion(state, outcome))
            metrics.update(_sanity(state, name, outcome))
        metrics["seconds_total"] = outcome.seconds
        state.timings[f"method:{name}"] = outcome.seconds
    return state


def run_peppr(state: DemoState) -> DemoState:
    """PEPPR of every method's overall global map on the held-out images, in one pass so
    the random-order control is shared; a figure per method."""
    rankings = {
        name: outcome.global_result.overall.mean.float() for name, outcome in state.outcomes.items()
    }
    with state.timed("peppr"):
        peppr_results = peppr_many(
            state.model,
            state.peppr_set.images.to(state.device),
            state.peppr_set.labels.to(state.device),
            rankings,
            fill="mean",
            mean_image=state.mean_image,
            n_steps=state.settings.peppr_steps,
            random_seeds=state.settings.peppr_seeds,
            class_names=state.bench.class_names,
            progress=state.progress,
        )
        for name, result in peppr_results.items():
            state.outcomes[name].metrics["peppr"] = result.summary()
            path = state.out / "figures" / f"peppr_{name}.png"
            state.figures[f"peppr_{name}"] = plot_peppr(result, path, title=f"PEPPR — {name}")
    return state


def _deletion(state: DemoState, outcome: MethodOutcome) -> dict[str, float]:
    """Mean deletion and insertion AUC over the first ``n_deletion`` images (blur baseline)."""
    n_del = min(state.settings.n_deletion, outcome.metrics["n_explained"])
    images, labels = state.explain_set.images, state.explain_set.labels
    deletion = deletion_insertion(
        state.model,
        images[:n_del].to(state.device),
        labels[:n_del].to(state.device),
        outcome.explained.maps[:n_del].to(state.device),
        baseline="blur",
        batch_size=64,
    )
    return {
        "deletion_auc": float(deletion.deletion_auc.mean()),
        "insertion_auc": float(deletion.insertion_auc.mean()),
    }


def _sanity(state: DemoState, name: str, outcome: MethodOutcome) -> dict[str, Any]:
    """Cascading randomisation on the method's sanity images (None if it has none)."""
    images, labels = state.explain_set.images, state.explain_set.labels
    n_sanity = min(state.settings.method_images(name)[1], len(images))
    entry: dict[str, Any] = {"sanity_images": n_sanity, "sanity": None}
    if name in state.learned:
        # A learned explainer's maps come from its own network, fitted against the original
        # model: the check would need one fit per randomised model.
        entry.update(sanity_images=0, sanity_note="learned explainer: needs a refit per model")
        return entry
    if n_sanity == 0:
        return entry
    params = outcome.params
    sanity = cascading_randomization(
        state.model,
        images[:n_sanity].to(state.device),
        labels[:n_sanity].to(state.device),
        make_explainer=lambda m: create(name, m, **params),
        seed=state.settings.seed,
    )
    entry["sanity"] = {
        "rank_correlation_fully_randomized": sanity.rank_correlation_fully_randomized,
        "degenerate_fraction": sanity.degenerate_fraction,
        "mean_per_step": sanity.mean.tolist(),
        "steps": sanity.step_names,
    }
    return entry


def _imagewise_localization(maps: torch.Tensor, evidence: torch.Tensor) -> dict[str, float | None]:
    """Each localization score (AUROC, pointing game, energy, IoU at the evidence area and
    at every percentile, NCC) of the maps ``(N, 1, *S)`` against the evidence masks, as the
    mean over the images that have evidence and a finite score; empty without evidence."""
    has_evidence = evidence.flatten(1).any(1)
    if not has_evidence.any():
        return {}
    scores = localization_scores(maps[has_evidence], evidence[has_evidence])
    means: dict[str, float | None] = {}
    for name, values in scores.items():
        values = values[torch.isfinite(values)]
        means[name] = float(values.mean()) if len(values) else None
    return means


def _global_metrics(result: GlobalResult, bench: DemoData, shortcut_class: int) -> dict[str, Any]:
    """AUROC of each disease label's global map against its true region (and their mean),
    and the share of the shortcut class's positive map that falls on the marker."""
    per_label = {}
    for name in bench.class_names:
        key = ("label", name)
        if name in bench.regions and key in result.groups:
            region = bench.regions[name][None].bool()
            scores = localization_scores(result.groups[key].mean[None].float(), region)
            per_label[name] = float(scores["auroc"][0])
    metrics: dict[str, Any] = {
        "localization_auroc": float(np.mean(list(per_label.values()))) if per_label else None,
        "localization_auroc_per_label": per_label,
    }
    key = ("label", bench.class_names[shortcut_class])
    if key in result.groups and bench.marker.any():
        positive = result.groups[key].mean.clamp(min=0)
        total = float(positive.sum())
        on_marker = float(positive[bench.marker.expand_as(positive)].sum())
        metrics["shortcut_fraction"] = on_marker / total if total > 0 else 0.0
        metrics["marker_share_of_image"] = float(bench.marker.float().mean())
    return metrics
