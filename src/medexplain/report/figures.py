"""PNG figures: global maps over the mean image, image-wise example grids.

Every function takes tensors or arrays ``(C, *spatial)`` / ``(1, *spatial)`` /
``(*spatial)``. Each modality is drawn in its own convention: a three-channel image
``(3, H, W)`` (colour fundus photograph) is shown in RGB, clipped to [0, 1]; a one-channel
image (radiograph, MRI) in grey. A 3D volume ``(X, Y, Z)`` is shown as the middle slice of
its first axis or, given a voxel ``cut = (i, j, k)``, as the axial slice ``[:, :, k]`` of a
volume in RAS voxel order, transposed and flipped so anterior is up. Orthogonal views of 3D
global maps in world coordinates are in :mod:`medexplain.report.ortho_plot`.

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


def upright(view: np.ndarray) -> np.ndarray:
    """A slice ``(A, B)`` of a RAS-ordered volume as radiologists view it: transposed
    (rows = the second axis) and flipped so that anterior (or superior) is up."""
    return np.flipud(view.T)


def spatial_view(
    array: torch.Tensor | np.ndarray,
    spatial_ndim: int,
    *,
    cut: Sequence[int] | None = None,
) -> np.ndarray:
    """A 2D view ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB, clipped to [0, 1]) of one image.

    array: ``(C, *spatial)`` or ``(*spatial)`` with ``len(spatial) == spatial_ndim`` (leading
    singleton axes beyond that are dropped). Three channels are shown as RGB; any other
    channel count as the channel mean in grey. In 3D, the middle slice of the first axis, or
    with ``cut = (i, j, k)`` the axial slice ``[:, :, k]`` of a RAS-ordered volume,
    transposed (rows = y) and flipped so anterior is up.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    while array.ndim > spatial_ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == spatial_ndim:
        array = array[None]
    if array.ndim != spatial_ndim + 1 or spatial_ndim not in (2, 3):
        raise ValueError(
            f"expected (C, *spatial) with {spatial_ndim} spatial axes, got {array.shape}"
        )
    if array.shape[0] != 3:
        array = array.mean(axis=0, keepdims=True)
    if spatial_ndim == 3:
        if cut is None:
            array = array[:, array.shape[1] // 2]
        else:
            array = np.stack([upright(channel) for channel in array[:, :, :, int(cut[2])]])
    if array.shape[0] == 3:
        return np.clip(np.moveaxis(array, 0, -1), 0.0, 1.0)
    return array[0]


def _show(ax, background: np.ndarray) -> None:
    """A grey ``(H, W)`` or RGB ``(H, W, 3)`` background."""
    if background.ndim == 3:
        ax.imshow(background, interpolation="nearest")
    else:
        ax.imshow(background, cmap="gray", interpolation="nearest")


def _overlay(
    ax,
    background: np.ndarray,
    heat: np.ndarray,
    signed: bool,
    title: str,
    limit: float | None = None,
):
    """Image (grey or RGB), the map on top with opacity growing with |value| (scaled to
    ``limit``, default the panel's largest |value|), so weak attributions leave the anatomy
    visible. Signed maps: red positive, blue negative. Returns a ``ScalarMappable`` of the
    map's colour scale (for a colour bar)."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    _show(ax, background)
    shared = limit is not None  # one scale for a figure: its maps' sign decides
    limit = float(np.abs(heat).max()) if limit is None else float(limit)
    two_sided = signed and (shared or heat.min() < 0)
    if limit > 0:
        if two_sided:
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
    top = limit if limit > 0 else 1.0
    norm = Normalize(-top, top) if two_sided else Normalize(0.0, top)
    return ScalarMappable(norm=norm, cmap="RdBu_r" if two_sided else "inferno")


def plot_global_maps(
    mean_image: torch.Tensor | np.ndarray,
    maps: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    *,
    regions: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    title: str = "",
    signed: bool = False,
) -> Path:
    """One panel per label: its global map over the dataset mean image, every panel on one
    colour scale with one colour bar; ground-truth region outlined in cyan when ``regions``
    has an entry for the label.

    mean_image: ``(C, *spatial)`` or ``(*spatial)``, RGB when ``C == 3``, else grey;
    maps: name -> ``(1, *spatial)`` or ``(*spatial)``; regions: name -> same, bool.
    3D maps (a volume in RAS voxel order) are drawn as axial, coronal and sagittal slices
    through the voxel of the largest |value|, with orientation letters, on one colour scale
    with one colour bar (:func:`medexplain.report.panels.plot_group_panels`).
    """
    names = list(maps)
    ndim = to_numpy(maps[names[0]]).ndim  # maps are (1, *spatial) or (*spatial)
    if ndim == 3:
        from .panels import plot_group_panels

        background = to_numpy(mean_image)
        background = background[None] if background.ndim == 3 else background
        return plot_group_panels(
            background,
            {name: to_numpy(array) for name, array in maps.items()},
            path,
            signed=signed and any(float(to_numpy(m).min()) < 0 for m in maps.values()),
            title=title,
            regions={k: to_numpy(v) for k, v in (regions or {}).items() if k in maps},
        )
    background = spatial_view(mean_image, ndim)
    heats = {name: spatial_view(maps[name], ndim) for name in names}
    limit = max(float(np.abs(heat).max()) for heat in heats.values())
    signed = signed and any(float(heat.min()) < 0 for heat in heats.values())
    fig = _figure(figsize=(2.6 * len(names) + 0.7, 2.9))
    axes = fig.subplots(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        scale = _overlay(ax, background, heats[name], signed, name, limit=limit)
        if regions is not None and name in regions:
            outline = spatial_view(regions[name], ndim)
            ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.colorbar(scale, ax=axes[0].tolist(), fraction=0.03, pad=0.02)
    return _save(fig, path)


def plot_examples(
    images: torch.Tensor | np.ndarray,
    masks: torch.Tensor | np.ndarray | None,
    maps_by_method: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    signed_methods: Sequence[str] = (),
    cut: Sequence[int] | None = None,
) -> Path:
    """Grid: one row per image; columns = image, ground truth, each method's map.

    images: ``(N, C, *spatial)``, RGB when ``C == 3``, else grey; masks: ``(N, 1, *spatial)``;
    maps_by_method: name -> ``(N, 1, *spatial)``. In 3D each row shows the middle slice of
    the first axis, or with ``cut = (i, j, k)`` (voxel index) the axial slice through ``k``
    with anterior up.
    """
    n = len(images)
    ndim = images.ndim - 2
    columns = 2 + len(maps_by_method)
    fig = _figure(figsize=(1.7 * columns, 1.8 * n))
    axes = fig.subplots(n, columns, squeeze=False)
    for row in range(n):
        image = spatial_view(images[row], ndim, cut=cut)
        _show(axes[row, 0], image)
        axes[row, 0].set_title(titles[row] if titles else "image", fontsize=7)
        _show(axes[row, 1], image)
        if masks is not None:
            mask = spatial_view(masks[row], ndim, cut=cut)
            if mask.any():
                axes[row, 1].contour(mask, levels=[0.5], colors="lime")
        axes[row, 1].set_title("ground truth", fontsize=7)
        for col, (name, maps) in enumerate(maps_by_method.items(), start=2):
            heat = spatial_view(maps[row], ndim, cut=cut)
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
