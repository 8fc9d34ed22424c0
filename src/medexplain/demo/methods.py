"""The demo's explanation steps: each method explains the chosen images, then label-wise
global maps are aggregated from its maps."""

from __future__ import annotations

import time

from ..explain import create
from ..explain.batch import explain_all
from ..globalmaps import GlobalMaps
from ..report.figures import plot_global_maps
from ..report.ortho_plot import plot_global_maps_ortho
from .state import DemoState, MethodOutcome


def explain_methods(state: DemoState) -> DemoState:
    """Explain the first images of the explained set with every method (fewer images for the
    costly ones, see :data:`~medexplain.demo.settings.DEMO_IMAGES`)."""
    settings, images = state.settings, state.explain_set.images
    labels = state.explain_set.labels
    for name in settings.methods:
        t0 = time.perf_counter()
        if name in state.learned:
            explainer = state.learned[name]
            params = dict(state.learned_fits[name]["parameters"])
        else:
            params = {"seed": settings.seed, **settings.method_params(name)}
            explainer = create(name, state.model, **params)
        n_method, _ = settings.method_images(name)
        explained = explain_all(
            explainer,
            images[:n_method].to(state.device),
            labels[:n_method].to(state.device),
            batch_size=16,
            progress=state.progress,
            description=f"{name:>22}",
        )
        metrics = {
            "seconds_per_image": explained.seconds_per_image,
            "n_explained": n_method,
            "parameters": dict(params),
            "signed": bool(explainer.signed),
        }
        outcome = MethodOutcome(params, explained, metrics)
        outcome.seconds = time.perf_counter() - t0
        state.outcomes[name] = outcome
    return state


def aggregate_global_maps(state: DemoState) -> DemoState:
    """Label-wise global maps per method: saved under ``maps/<method>/`` (with NIfTI files
    for volumes and MNI-space slices) and drawn over the mean image with the true regions
    outlined (nilearn's orthogonal views for volumes in a world space)."""
    settings, bench = state.settings, state.bench
    for name in state.outcomes:
        with state.timed_method(name) as outcome:
            maps = outcome.explained.maps
            n_method = len(maps)
            accumulator = GlobalMaps(
                maps.shape[2:],
                bench.class_names,
                normalise=settings.normalise,
                transform=settings.transform,
            )
            accumulator.update(
                maps, labels=state.explain_set.labels[:n_method], preds=state.preds[:n_method]
            )
            result = outcome.global_result = accumulator.result()
            method_dir = state.out / "maps" / name
            result.save(method_dir)
            if state.writes_nifti:
                for key, group in result.groups.items():
                    state.save_nifti(group.mean, method_dir / f"{'_'.join(key)}.nii.gz")
            label_maps = {
                c: result.groups[("label", c)].mean
                for c in bench.class_names
                if ("label", c) in result.groups
            }
            path = state.out / "figures" / f"global_{name}.png"
            title = f"label-wise global maps — {name}"
            if settings.dims == 3 and state.affine is not None:
                state.figures[f"global_{name}"] = plot_global_maps_ortho(
                    state.mean_image,
                    label_maps,
                    path,
                    affine=state.affine,
                    regions=state.outlines,
                    title=title,
                )
            else:
                state.figures[f"global_{name}"] = plot_global_maps(
                    state.mean_image, label_maps, path, regions=state.outlines, title=title
                )
    return state
