"""XNN's global view as data and a figure (Qi, Khorram & Li, arXiv 1709.05360).

:func:`x_feature_global_maps` feeds each x-feature's maps to the label-wise global-map
accumulator (:class:`~medexplain.globalmaps.GlobalMaps`); :func:`plot_xnn` draws, from
:func:`~medexplain.explain.generative.xnn_global.global_view`'s document, each class's mean
contribution per x-feature (grouped bars), then one row per x-feature: its top-activating
images and its label-wise global maps. 3D images and maps show their middle slice along the
first spatial axis. Figures are bare matplotlib Figures (no pyplot, no backend chosen).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..globalmaps import GlobalMaps
from ..globalmaps.result import GlobalResult

__all__ = ["plot_xnn", "x_feature_global_maps"]


def x_feature_global_maps(
    explainer: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    *,
    batch_size: int = 32,
    normalise: str = "max",
    transform: str = "signed",
) -> list[GlobalResult]:
    """One label-wise :class:`GlobalResult` per x-feature, from ``explainer.feature_maps``
    of images ``(N, C, *S)`` with labels ``(N,)`` (normalisation and transform as for
    :class:`GlobalMaps`)."""
    spatial = tuple(images.shape[2:])
    accumulators = [
        GlobalMaps(spatial, class_names, normalise, transform, kinds=("label",))
        for _ in range(int(explainer.k))
    ]
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        maps = explainer.feature_maps(x).cpu()
        for j, accumulator in enumerate(accumulators):
            accumulator.update(maps[:, j : j + 1], labels=y)
    return [accumulator.result() for accumulator in accumulators]


def _plane(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """``(*S)`` -> a 2D plane (the middle slice of a volume)."""
    a = np.asarray(array.detach().cpu() if isinstance(array, torch.Tensor) else array)
    return a[a.shape[0] // 2] if a.ndim == 3 else a


def plot_xnn(
    view: dict[str, Any],
    images: torch.Tensor,
    global_maps: list[GlobalResult] | None = None,
    *,
    n_top: int = 4,
    path: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
):
    """The figure of XNN's global view (module docstring). ``view``: the document of
    ``global_view``; ``images`` ``(N, C, *S)`` the images its indices refer to;
    ``global_maps``: :func:`x_feature_global_maps`'s results (omitted when None); ``names``
    one title per image (default ``image <index>``). Saves a PNG when ``path`` is given;
    returns the Figure."""
    from matplotlib.figure import Figure

    k = int(view["k"])
    classes = list(view["contributions"])
    by = view.get("by", "label")
    label_keys = [] if global_maps is None else [(by, name) for name in classes]
    cols = max(n_top + len(label_keys), 2)
    fig = Figure(figsize=(2.0 * cols, 2.0 * (k + 1.5)), constrained_layout=True)
    grid = fig.add_gridspec(k + 1, cols, height_ratios=[1.5] + [1] * k)
    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / max(len(classes), 1)
    for c, name in enumerate(classes):
        values = view["contributions"][name]["mean_contribution"]
        bars.bar(np.arange(k) + c * width, values, width, label=name)
    bars.axhline(0, color="black", linewidth=0.5)
    bars.set_xticks(np.arange(k) + 0.4 - width / 2, [f"x-feature {j}" for j in range(k)])
    bars.set_ylabel("mean contribution to the class logit")
    bars.legend(fontsize="small")
    for j in range(k):
        top = view["top_activating"][j]["index"][:n_top]
        for col, index in enumerate(top):
            ax = fig.add_subplot(grid[j + 1, col])
            ax.imshow(_plane(images[index, 0]), cmap="gray")
            name = f"image {index}" if names is None else names[index]
            ax.set_title(f"x{j}: {name}", fontsize="small")
            ax.axis("off")
        for col, key in enumerate(label_keys):
            ax = fig.add_subplot(grid[j + 1, n_top + col])
            result = global_maps[j]
            if key in result.groups:
                mean = _plane(torch.as_tensor(result.groups[key].mean)[0])
                bound = float(np.abs(mean).max()) or 1.0
                ax.imshow(mean, cmap="RdBu_r", vmin=-bound, vmax=bound)
            ax.set_title(f"x{j}: {key[1]}", fontsize="small")
            ax.axis("off")
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig
