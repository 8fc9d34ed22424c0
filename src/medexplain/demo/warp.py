"""The demo's warping-simulator step (the warping simulator of the method specifications).

A conditional warping simulator is fitted for the benchmark's ``atrophy`` class against the
demo classifier (removal on atrophy images, injection on the others), then scored on held-out
test images the classifier gets right
(:func:`~medexplain.metrics.warp.evaluate_warp_simulator`): removal on
atrophy images, injection into healthy ones. Writes ``warp_simulator.pt`` (loads with
``weights_only=True``), ``figures/warp_removal.png`` and ``figures/warp_injection.png``
(original, simulated, ``|u|``, Jacobian centred at 1) and, for volumes, NIfTI files in
``maps/warp_simulator/``: the Jacobian and the simulated image of the first example of each
direction, and the mean ``log J`` of the removal warps over the atrophy images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..explain.batch import predicted_classes
from ..explain.generative.warp_simulator import WarpSimulatorExplainer, fit_warp_simulator
from ..metrics.warp import SHIFTS, evaluate_warp_simulator
from ..report.nifti import save_nifti
from ..report.warp_plot import plot_simulation
from .state import DemoData, DemoState

WARP_CLASS = "atrophy"
HEALTHY_CLASS = "healthy"


def _slice_through(region: torch.Tensor) -> int | None:
    """For a volume region ``(*S)`` (3D), the index along the first axis with the most
    region voxels (so the figures cut through the evidence); None for 2D."""
    if region.dim() != 3:
        return None
    return int(region.flatten(1).sum(1).argmax())


def scored_indices(model: nn.Module, test: DemoData, n_images: int) -> dict[str, torch.Tensor]:
    """Indices into ``test`` of the images a fitted simulator is scored on: the first
    ``n_images`` correctly classified atrophy images (``"removal"``) and healthy images
    (``"injection"``)."""
    names = list(test.class_names)
    correct = predicted_classes(model, test.images) == test.labels
    return {
        name: (correct & (test.labels == names.index(label))).nonzero().flatten()[:n_images]
        for name, label in (("removal", WARP_CLASS), ("injection", HEALTHY_CLASS))
    }


def run_warp_section(
    model: nn.Module,
    train: DemoData,
    val: DemoData,
    test: DemoData,
    out: Path,
    *,
    max_seconds: float,
    n_images: int,
    seed: int = 0,
    progress: bool = True,
    save_map: Callable[[torch.Tensor, Path], Path] | None = None,
    **params: Any,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Fit, score and draw the simulator; returns its JSON entry and the figure paths.

    ``model`` is the demo's frozen classifier; ``train``/``val`` fit the simulator,
    ``n_images`` correctly classified ``test`` images per direction score it.
    ``save_map(map (*S), path)`` writes the NIfTI files (default: volumes only, identity
    affine). ``params`` go to the simulator (e.g. ``diffeomorphic=True``).
    """
    if save_map is None and test.images.dim() == 5:
        save_map = save_nifti
    names = list(test.class_names)
    if WARP_CLASS not in names or HEALTHY_CLASS not in names:
        return {"skipped": f"the benchmark has no {WARP_CLASS!r} and {HEALTHY_CLASS!r} classes"}, {}
    cls = names.index(WARP_CLASS)
    started = time.perf_counter()
    explainer = fit_warp_simulator(
        model,
        train.dataset(),
        val.dataset(),
        target_class=cls,
        out=out / "warp_simulator.pt",
        max_seconds=max_seconds,
        seed=seed,
        progress=progress,
        **params,
    )
    history = explainer.history
    entry: dict[str, Any] = {
        "class": WARP_CLASS,
        "checkpoint": "warp_simulator.pt",
        "parameters": {**explainer.network_params, **params, "max_seconds": max_seconds},
        "fit": {
            "seconds": history.seconds,
            "steps": history.steps,
            "epochs": len(history.train_loss),
            "stop_reason": history.stop_reason,
        },
    }

    scored = scored_indices(model, test, n_images)
    parts = {name: test.subset(index) for name, index in scored.items()}
    region = test.regions[WARP_CLASS]
    removal, injection = parts["removal"], parts["injection"]
    entry["scores"] = evaluate_warp_simulator(
        explainer,
        torch.cat([removal.images, injection.images]),
        torch.cat([removal.labels, injection.labels]),
        target_class=cls,
        masks=torch.cat([removal.evidence, region[None].expand(len(injection), *region.shape)]),
    )

    figures = _draw(explainer, parts, cls, region, names, out, save_map)
    entry["seconds_total"] = time.perf_counter() - started
    return entry, figures


def _draw(
    explainer: WarpSimulatorExplainer,
    parts: dict[str, DemoData],
    cls: int,
    region: torch.Tensor,
    names: list[str],
    out: Path,
    save_map: Callable[[torch.Tensor, Path], Path] | None,
) -> dict[str, Path]:
    """The figures of the first two images per direction (cut through ``region`` ``(1, *S)``
    for volumes); for volumes also their Jacobian and simulated image as NIfTI, and the mean
    log J of the removals."""
    figures: dict[str, Path] = {}
    slice_index = _slice_through(region[0])
    maps_dir = out / "maps" / "warp_simulator"
    for name, part in parts.items():
        if len(part) == 0:
            continue
        figures[f"warp_{name}"] = out / "figures" / f"warp_{name}.png"
        simulated, det = plot_simulation(
            explainer,
            part.images[:2],
            SHIFTS[name],
            cls,
            path=figures[f"warp_{name}"],
            slice_index=slice_index,
            titles=[f"{name} ({names[int(label)]})" for label in part.labels[:2]],
        )
        if save_map is not None:
            save_map(det[0, 0], maps_dir / f"{name}_jacobian.nii.gz")
            save_map(simulated[0, 0], maps_dir / f"{name}_simulated.nii.gz")
    if save_map is not None and len(parts["removal"]):
        mean_map = explainer(parts["removal"].images, cls).mean(0)[0]
        save_map(mean_map, maps_dir / "removal_mean_log_jacobian.nii.gz")
    return figures


def run_warp(state: DemoState) -> DemoState:
    """What would have to change in the anatomy: the warping simulator for the atrophy
    class, when ``warp_seconds > 0`` (:func:`run_warp_section`)."""
    settings = state.settings
    if settings.warp_seconds <= 0:
        return state
    with state.timed("warp_simulator"):
        state.warp, figures = run_warp_section(
            state.model,
            state.train,
            state.val,
            state.test,
            state.out,
            max_seconds=settings.warp_seconds,
            n_images=settings.warp_images,
            seed=settings.seed,
            progress=state.progress,
            save_map=state.save_nifti if state.writes_nifti else None,
            **settings.warp_params,
        )
        state.figures.update(figures)
    return state
