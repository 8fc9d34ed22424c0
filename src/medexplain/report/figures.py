"""PNG figures: global maps over the mean image, image-wise example grids.

Every function takes tensors or arrays ``(1, *spatial)`` / ``(*spatial)``; 3D volumes
are shown as their middle slice along each axis (three panels) or, where one panel
is wanted, the middle axial slice.

matplotlib is imported inside the functions and figures are bare
:class:`matplotlib.figure.Figure` objects saved with ``savefig``: no pyplot state and no
backend chosen, so importing this module costs nothing and plotting in a notebook keeps
its backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch


def to_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """Float64 numpy copy with leading singleton (batch/channel) axes removed."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    return array


def display_slice(array: torch.Tensor | np.ndarray) -> np.ndarray:
    """A 2D view: the image itself in 2D, the middle slice along the first axis in 3D."""
    array = to_numpy(array)
    if array.ndim == 3:
        return array[array.shape[0] // 2]
    if array.ndim != 2:
        raise ValueError(f"expected a 2D image or 3D volume, got shape {array.shape}")
    return array


def _overlay(ax, background: np.ndarray, heat: np.ndarray, signed: bool, title: str) -> None:
    """Image in grey, the map on top with opacity growing with |value| (scaled per panel), so
    weak attributions leave the anatomy visible. Signed maps: red positive, blue negative."""
    from matplotlib import colormaps

    ax.imshow(background, cmap="gray", interpolation="nearest")
    limit = float(np.abs(heat).max())
    if limit > 0:
        if signed and heat.min() < 0:
            scaled = heat / limit
            colours = colormaps["RdBu_r"](0.5 + 0.5 * scaled)
            colours[..., 3] = np.clip(np.abs(scaled), 0, 1) * 0.85
        else:
            scaled = np.clip(heat, 0, None) / limit
            colours = colormaps["inferno"](scaled)
            colours[..., 3] = np.clip(scaled, 0, 1) * 0.85
        ax.imshow(colours, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_global_maps(
    mean_image: torch.Tensor | np.ndarray,
    maps: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    *,
    regions: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    title: str = "",
    signed: bool = False,
) -> Path:
    """One panel per label: its global map over the dataset mean image; ground-truth region
    outlined in cyan when ``regions`` has an entry for the label."""
    background = display_slice(mean_image)
    names = list(maps)
    fig = _figure(figsize=(2.6 * len(names), 2.9))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        _overlay(ax, background, display_slice(maps[name]), signed, name)
        if regions is not None and name in regions:
            ax.contour(display_slice(regions[name]), levels=[0.5], colors="cyan", linewidths=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_examples(
    images: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray | None,
    maps_by_method: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    signed_methods: Sequence[str] = (),
) -> Path:
    """Grid: one row per image; columns = image, ground truth, each method's map.

    images, masks: ``(N, 1, *spatial)``; maps_by_method: name -> ``(N, 1, *spatial)``.
    """
    n = len(images)
    columns = 2 + len(maps_by_method)
    fig = _figure(figsize=(1.7 * columns, 1.8 * n))
    axes = fig.subplots(n, columns, squeeze=False)
    for row in range(n):
        image = display_slice(images[row])
        axes[row, 0].imshow(image, cmap="gray", interpolation="nearest")
        axes[row, 0].set_title(titles[row] if titles else "image", fontsize=7)
        axes[row, 1].imshow(image, cmap="gray", interpolation="nearest")
        if masks is not None and display_slice(masks[row]).any():
            axes[row, 1].contour(display_slice(masks[row]), levels=[0.5], colors="lime")
        axes[row, 1].set_title("ground truth", fontsize=7)
        for col, (name, maps) in enumerate(maps_by_method.items(), start=2):
            heat = display_slice(maps[row])
            _overlay(axes[row, col], image, heat, name in signed_methods, name)
        for ax in axes[row, :2]:
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
