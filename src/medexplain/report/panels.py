"""Static report figures with one colour scale per figure: group maps and per-image examples.

Conventions: the image in grey (RGB for three-channel photographs); a signed map in a
diverging colour map (``RdBu_r``, symmetric about 0), a magnitude in a sequential one
(``inferno``, from 0); the opacity of the overlay grows with |value| so weak attributions
leave the anatomy visible. Every panel of one figure shares the scale, shown by one colour
bar. A volume ``(X, Y, Z)`` is drawn as three orthogonal slices (axial, coronal, sagittal)
through one voxel (:func:`mass_cut`: per axis, the slice holding most of the map), each
upright (see :mod:`medexplain.report.viewer` for the axis conventions) with the
orientation letters of its four edges.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .figures import _save, upright
from .viewer import axis_letters, view_names

__all__ = ["mass_cut", "peak_voxel", "plot_examples_panels", "plot_group_panels", "slice_view"]


def mass_cut(volume: np.ndarray) -> tuple[int, ...]:
    """Per axis, the slice holding the most |value| of ``(*S)`` (the centre for an all-zero
    array): the cut of the orthogonal views, through where most of a map lies rather than
    through one extreme voxel (a marker or an edge artefact)."""
    magnitude = np.abs(np.asarray(volume, dtype=np.float64))
    if not magnitude.max() > 0:
        return tuple(n // 2 for n in magnitude.shape)
    axes = range(magnitude.ndim)
    return tuple(int(np.argmax(magnitude.sum(axis=tuple(b for b in axes if b != a)))) for a in axes)


def peak_voxel(volume: np.ndarray) -> tuple[int, ...]:
    """Index of the largest |value| of ``(*S)`` (the centre for an all-zero array)."""
    volume = np.asarray(volume)
    if not np.abs(volume).max() > 0:
        return tuple(n // 2 for n in volume.shape)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(volume))), volume.shape))


def slice_view(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice of ``(X, Y, Z)`` (or ``(X, Y, Z, 3)``) that fixes ``axis`` at ``index``,
    upright: columns run along the lower remaining axis, rows along the higher one, its
    positive end up."""
    view = np.take(volume, int(index), axis=axis)
    if view.ndim == 3:  # RGB
        return np.stack([upright(view[..., c]) for c in range(3)], axis=-1)
    return upright(view)


def _display_image(background: np.ndarray) -> np.ndarray:
    """``(C, *S)`` -> ``(*S, 3)`` RGB in [0, 1] for three channels, else ``(*S)`` grey."""
    background = np.asarray(background, dtype=np.float64)
    if background.shape[0] == 3:
        return np.clip(np.moveaxis(background, 0, -1), 0.0, 1.0)
    return background.mean(axis=0)


def _scale(maps: Sequence[np.ndarray], signed: bool):
    """The shared ``(Normalize, colour map name)`` of a figure's maps."""
    from matplotlib.colors import Normalize

    top = max((float(np.abs(m).max()) for m in maps), default=0.0) or 1.0
    return (Normalize(-top, top), "RdBu_r") if signed else (Normalize(0.0, top), "inferno")


def _draw(ax, image: np.ndarray, heat: np.ndarray, norm, cmap: str, title: str) -> None:
    from matplotlib import colormaps

    if image.ndim == 3:
        ax.imshow(image, interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray", interpolation="nearest")
    colours = colormaps[cmap](norm(heat))
    strength = np.abs(heat) / max(abs(norm.vmin), abs(norm.vmax))
    colours[..., 3] = np.clip(strength, 0, 1) * 0.85
    ax.imshow(colours, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _letters(ax, letters: Sequence[tuple[str, str]], axis: int) -> None:
    """Orientation letters on the four edges of a slice that fixes ``axis``."""
    u, v = (a for a in range(3) if a != axis)
    style = {"color": "#ffde59", "fontsize": 7, "fontweight": "bold", "transform": ax.transAxes}
    ax.text(0.02, 0.5, letters[u][0], ha="left", va="center", **style)
    ax.text(0.98, 0.5, letters[u][1], ha="right", va="center", **style)
    ax.text(0.5, 0.98, letters[v][1], ha="center", va="top", **style)
    ax.text(0.5, 0.02, letters[v][0], ha="center", va="bottom", **style)


def _ortho_order(letters: Sequence[tuple[str, str]]) -> list[int]:
    """Voxel axes fixed by the axial, coronal and sagittal views, in that order."""
    names = view_names(letters)
    return sorted(range(3), key=lambda a: names[a])


def _constrained(figsize: tuple[float, float]):
    """A figure whose layout keeps titles, panels and the colour bar apart."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _colour_bar(fig, axes, norm, cmap: str, label: str) -> None:
    from matplotlib.cm import ScalarMappable

    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, fraction=0.03, pad=0.02)
    bar.set_label(label, fontsize=7)
    bar.ax.tick_params(labelsize=6)


def plot_group_panels(
    background: np.ndarray,
    maps: Mapping[str, np.ndarray],
    path: str | Path,
    *,
    signed: bool,
    affine: np.ndarray | None = None,
    cut: Sequence[int] | None = None,
    title: str = "",
    axial_only: bool = False,
    columns: int = 4,
    label: str = "mean map",
    regions: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """One panel per map over ``background`` with one shared scale and colour bar.

    background: ``(C, *S)``; maps: name -> ``(*S)``. 2D: a grid of ``columns`` panels per
    row. 3D: one row per map with its axial, coronal and sagittal slices through ``cut``
    (default: :func:`mass_cut` of the maps' summed |values|), or with ``axial_only`` a grid
    of axial slices; every slice carries its orientation letters (:func:`axis_letters`).
    regions: name -> ``(*S)`` bool, outlined in cyan on that map's panels.
    """
    names = list(maps)
    arrays = [np.asarray(maps[n], dtype=np.float64) for n in names]
    norm, cmap = _scale(arrays, signed)
    image = _display_image(background)
    ndim = arrays[0].ndim
    if ndim == 3:
        letters = axis_letters(affine)
        order = _ortho_order(letters)
        if cut is None:
            cut = mass_cut(np.sum(np.abs(np.stack(arrays)), axis=0))
        panels = [
            (name, array, axis)
            for name, array in zip(names, arrays)
            for axis in (order[:1] if axial_only else order)
        ]
        per_row = columns if axial_only else 3
    else:
        panels = [(name, array, None) for name, array in zip(names, arrays)]
        per_row = min(columns, len(panels))
    rows = -(-len(panels) // per_row)
    fig = _constrained(figsize=(2.2 * per_row + 0.8, 2.4 * rows + (0.4 if title else 0.1)))
    axes = fig.subplots(rows, per_row, squeeze=False)
    view = view_names(axis_letters(affine)) if ndim == 3 else []
    regions = regions or {}
    for ax, (name, array, axis) in zip(axes.flat, panels):
        outline = regions.get(name)
        if axis is None:
            _draw(ax, image, array, norm, cmap, name)
        else:
            index = int(cut[axis])
            _draw_slice(ax, image, array, axis, index, norm, cmap, f"{name} · {view[axis]} {index}")
            _letters(ax, letters, axis)
            outline = (
                None if outline is None else slice_view(np.asarray(outline, float), axis, index)
            )
        if outline is not None and np.asarray(outline).any():
            ax.contour(np.asarray(outline, float), levels=[0.5], colors="cyan", linewidths=0.8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    _colour_bar(fig, axes.ravel().tolist(), norm, cmap, label)
    return _save(fig, path)


def _draw_slice(ax, image, array, axis: int, index: int, norm, cmap, heading: str) -> None:
    """Slice ``index`` along ``axis`` of a volume ``image`` and its ``array``, drawn as one
    2D panel (:func:`_draw`)."""
    _draw(
        ax,
        slice_view(image, axis, index),
        slice_view(array, axis, index),
        norm,
        cmap,
        heading,
    )


def plot_examples_panels(
    examples: Sequence[tuple[np.ndarray, np.ndarray, str]],
    path: str | Path,
    *,
    signed: bool,
    affine: np.ndarray | None = None,
    columns: int = 6,
) -> Path:
    """Per-image maps over their images, each map divided by its own largest |value| (one
    colour bar: the fraction of the image's peak).

    examples: (image ``(C, *S)``, map ``(*S)``, title). 2D: a grid of ``columns`` panels.
    3D: one row per image, its axial, coronal and sagittal slices through the map's
    :func:`mass_cut`.
    """
    from matplotlib.colors import Normalize

    norm, cmap = (Normalize(-1, 1), "RdBu_r") if signed else (Normalize(0, 1), "inferno")
    ndim = np.asarray(examples[0][1]).ndim
    per_row = 3 if ndim == 3 else min(columns, len(examples))
    rows = len(examples) if ndim == 3 else -(-len(examples) // per_row)
    fig = _constrained(figsize=(2.0 * per_row + 0.8, (2.9 if ndim == 3 else 2.5) * rows))
    axes = fig.subplots(rows, per_row, squeeze=False)
    letters = axis_letters(affine) if ndim == 3 else []
    for number, (background, heat, title) in enumerate(examples):
        heat = np.asarray(heat, dtype=np.float64)
        peak = float(np.abs(heat).max())
        heat = heat / peak if peak > 0 else heat
        image = _display_image(background)
        if ndim == 2:
            _draw(axes.flat[number], image, heat, norm, cmap, title)
            continue
        voxel = mass_cut(heat)
        for col, axis in enumerate(_ortho_order(letters)):
            ax = axes[number, col]
            index = voxel[axis]
            heading = (f"{title}\n" if col == 0 else "") + f"{view_names(letters)[axis]} {index}"
            _draw_slice(ax, image, heat, axis, index, norm, cmap, heading)
            _letters(ax, letters, axis)
    for ax in list(axes.flat)[len(examples) if ndim == 2 else rows * 3 :]:
        ax.axis("off")
    _colour_bar(fig, axes.ravel().tolist(), norm, cmap, "map / its peak |value|")
    return _save(fig, path)
