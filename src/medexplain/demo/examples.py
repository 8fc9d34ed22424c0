"""The demo's image-wise steps: example explanations of every method side by side, and
Structured Attention Graphs (several minimal sufficient patch sets) for the first examples."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..explain.sag import StructuredAttentionGraph
from ..explain.sag_graph import SAGResult
from ..report.figures import plot_examples
from ..report.sag_plot import plot_sag
from .state import DemoData, DemoState


def draw_examples(state: DemoState) -> DemoState:
    """``figures/examples.png``: the chosen images (among those every method explained),
    their evidence and each method's map."""
    shared = min(len(outcome.explained.maps) for outcome in state.outcomes.values())
    explain_set, names = state.explain_set, state.bench.class_names
    examples = state.examples = example_indices(
        explain_set.subset(torch.arange(shared)), state.settings.n_examples
    )
    state.figures["examples"] = plot_examples(
        explain_set.images[examples],
        explain_set.evidence[examples],
        {name: outcome.explained.maps[examples] for name, outcome in state.outcomes.items()},
        state.out / "figures" / "examples.png",
        cut=_axial_cut(state.bench.regions) if state.settings.dims == 3 else None,
        titles=[
            f"{names[int(explain_set.labels[i])]}"
            + (" + marker" if bool(explain_set.has_marker[i]) else "")
            for i in examples.tolist()
        ],
    )
    return state


def _axial_cut(regions: dict[str, torch.Tensor]) -> tuple[int, int, int] | None:
    """A voxel ``(i, j, k)`` whose axial slice ``k`` holds the most voxels of the classes'
    regions ``(1, X, Y, Z)``, so the example volumes are cut through their evidence."""
    if not regions:
        return None
    union = torch.stack([r.reshape(r.shape[-3:]).bool() for r in regions.values()]).any(0)
    k = int(union.flatten(0, 1).sum(0).argmax())
    return (0, 0, k)


def run_sag(state: DemoState) -> DemoState:
    """SAGs of the first ``sag_images`` examples. Hidden patches show the training mean image
    (the natural absence on aligned data; the paper's black is far outside it); 4 cubes per
    axis in 3D (7^3 = 343 cubes would make the search far longer)."""
    settings, images = state.settings, state.explain_set.images
    grid = 7 if settings.dims == 2 else 4
    entries = []
    with state.timed("sag"):
        for rank, i in enumerate(state.examples.tolist()[: settings.sag_images]):
            sag = StructuredAttentionGraph(
                state.model,
                grid=grid,
                baseline="mean",
                mean_image=state.mean_image,
                seed=settings.seed,
            )
            started = time.perf_counter()
            result = sag.explain_image(images[i : i + 1].to(state.device))
            figure = state.out / "figures" / f"sag_{rank}.png"
            state.figures[f"sag_{rank}"] = plot_sag(result, figure)
            result.to_json(state.out / "maps" / f"sag_{rank}.json")
            entries.append(_sag_entry(state, i, result, time.perf_counter() - started))
    state.sag = {"grid": grid, "baseline": "mean", "images": entries}
    return state


def _sag_entry(state: DemoState, i: int, result: SAGResult, seconds: float) -> dict[str, Any]:
    names = state.bench.class_names
    return {
        "image": i,
        "label": names[int(state.explain_set.labels[i])],
        "explained_class": names[result.target],
        "probability": result.probability,
        "roots": [list(r.patches) for r in result.roots],
        "diverse": result.diverse,
        "forward_passes": result.forward_passes,
        "seconds": seconds,
    }


def example_indices(explain_set: DemoData, n_examples: int) -> torch.Tensor:
    """One image per class, then one carrying the shortcut marker, up to ``n_examples``."""
    chosen: list[int] = []
    for cls in range(len(explain_set.class_names)):
        hits = (explain_set.labels == cls).nonzero().flatten().tolist()
        if hits:
            chosen.append(hits[0])
    marked = [i for i in explain_set.has_marker.nonzero().flatten().tolist() if i not in chosen]
    chosen += marked[:1]
    return torch.tensor(chosen[:n_examples])
