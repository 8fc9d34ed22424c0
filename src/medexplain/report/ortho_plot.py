"""3D global maps in the neuroimaging convention: three orthogonal slices in world space.

Each label's map is drawn by :func:`nilearn.plotting.plot_stat_map` (``display_mode="ortho"``)
over the dataset mean image, with a colour bar, the cut through the centre of mass of the
label's ground-truth region (world millimetres, ``affine @ [i, j, k, 1]``) or, without a
region, through the map's peak |value|, and the region outlined. nilearn is an optional
dependency (the ``cohorts`` extra); without it the same cut is drawn with plain matplotlib:
sagittal, coronal and axial voxel slices through the cut voxel, a colour bar per row.

All panels go onto one :class:`matplotlib.figure.Figure`; any pyplot figure nilearn opens is
closed again, so the caller's pyplot state is left as it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .figures import _figure, _overlay, _save, to_numpy, upright


def _volume(array: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    """``(X, Y, Z)`` float64 from ``(1, X, Y, Z)`` or ``(X, Y, Z)``."""
    volume = to_numpy(array)
    if volume.ndim != 3:
        raise ValueError(f"{name}: expected (1, X, Y, Z) or (X, Y, Z), got {volume.shape}")
    return volume


def cut_voxel(heat: np.ndarray, region: np.ndarray | None = None) -> np.ndarray:
    """Voxel ``(3,)`` (float) the cut goes through: the region's centre of mass when the
    region ``(X, Y, Z)`` has a voxel (or, when that point lies outside a region in several
    parts, such as both hippocampi, the region voxel nearest to it, so every view cuts
    through the region), else the voxel of the map's peak |value|."""
    if region is not None and region.any():
        voxels = np.argwhere(region > 0.5)
        centre = voxels.mean(axis=0)
        if region[tuple(np.round(centre).astype(int))] > 0.5:
            return centre
        return voxels[np.argmin(((voxels - centre) ** 2).sum(axis=1))].astype(float)
    return np.asarray(np.unravel_index(int(np.argmax(np.abs(heat))), heat.shape), dtype=float)


def voxel_to_world(affine: np.ndarray, voxel: np.ndarray) -> tuple[float, float, float]:
    """World coordinates (mm) ``affine @ [i, j, k, 1]`` of a voxel ``(3,)``."""
    world = np.asarray(affine, dtype=float) @ np.append(np.asarray(voxel, dtype=float), 1.0)
    return (float(world[0]), float(world[1]), float(world[2]))


def plot_global_maps_ortho(
    mean_image: torch.Tensor | np.ndarray,
    maps: Mapping[str, torch.Tensor | np.ndarray],
    path: str | Path,
    *,
    affine: np.ndarray,
    regions: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    title: str = "",
    signed: bool = False,
    threshold_fraction: float = 0.1,
) -> Path:
    """One row per label: sagittal, coronal and axial slices of its global map over the mean
    image, cut through the label's region centre of mass (else the map's peak).

    mean_image: ``(1, X, Y, Z)`` or ``(X, Y, Z)``; maps: name -> ``(1, X, Y, Z)`` or
    ``(X, Y, Z)``; affine: ``(4, 4)`` voxel -> world (mm); regions: name -> ``(1, X, Y, Z)``
    bool, outlined in cyan. Voxels under ``threshold_fraction`` of the map's peak |value|
    are left transparent. Signed maps with negative values: ``RdBu_r`` symmetric about 0;
    otherwise ``inferno`` from 0 to the peak.
    """
    background = _volume(mean_image, "mean_image")
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {affine.shape}")
    names = list(maps)
    heats = {name: _volume(maps[name], name) for name in names}
    outlines = {
        name: _volume(regions[name], f"region {name}")
        for name in names
        if regions is not None and name in regions
    }
    voxels = {name: cut_voxel(heats[name], outlines.get(name)) for name in names}
    cuts = {name: voxel_to_world(affine, voxels[name]) for name in names}
    try:
        import nibabel  # noqa: F401
        from nilearn import plotting  # noqa: F401
    except ImportError:
        fig = _voxel_rows(background, heats, outlines, voxels, signed)
    else:
        fig = _nilearn_rows(background, heats, outlines, cuts, affine, signed, threshold_fraction)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _nilearn_rows(background, heats, outlines, cuts, affine, signed, threshold_fraction):
    """The figure drawn by nilearn: one ortho display per label on one Figure."""
    import nibabel as nib
    from matplotlib import pyplot
    from nilearn import plotting

    def image(array: np.ndarray):
        return nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)

    before = set(pyplot.get_fignums())
    fig = _figure(figsize=(9.0, 3.0 * len(heats)))
    axes = fig.subplots(len(heats), 1, squeeze=False)[:, 0]
    background_image = image(background)
    try:
        for ax, (name, heat) in zip(axes, heats.items()):
            peak = float(np.abs(heat).max())
            two_sided = signed and heat.min() < 0
            display = plotting.plot_stat_map(
                image(heat),
                bg_img=background_image,
                cut_coords=cuts[name],
                display_mode="ortho",
                colorbar=True,
                figure=fig,
                axes=ax,
                title=name,
                threshold=threshold_fraction * peak if peak > 0 else None,
                cmap="RdBu_r" if two_sided else "inferno",
                symmetric_cbar=two_sided,
                vmin=None if two_sided else 0.0,
                vmax=peak if peak > 0 else None,
                black_bg=True,
            )
            if name in outlines and outlines[name].any():
                display.add_contours(
                    image(outlines[name] > 0.5), levels=[0.5], colors="cyan", linewidths=0.8
                )
    finally:
        for number in set(pyplot.get_fignums()) - before:
            pyplot.close(number)
    return fig


def _upright_slices(volume: np.ndarray, voxel: tuple[int, int, int]) -> list[np.ndarray]:
    """Sagittal ``[i]``, coronal ``[:, j]`` and axial ``[:, :, k]`` slices of a RAS-ordered
    ``(X, Y, Z)`` volume, transposed and flipped so superior (axial: anterior) is up."""
    i, j, k = voxel
    return [upright(view) for view in (volume[i], volume[:, j], volume[:, :, k])]


def _voxel_rows(background, heats, outlines, voxels, signed):
    """Without nilearn: the three voxel slices through each label's cut voxel, the map over
    the mean image in grey, and a colour bar per row."""
    fig = _figure(figsize=(8.4, 2.8 * len(heats)))
    axes = fig.subplots(len(heats), 3, squeeze=False)
    for row, (name, heat) in enumerate(heats.items()):
        voxel = tuple(int(v) for v in np.rint(voxels[name]))
        labels = (f"{name}  x={voxel[0]}", f"y={voxel[1]}", f"z={voxel[2]}")
        views = zip(
            _upright_slices(background, voxel),
            _upright_slices(heat, voxel),
            _upright_slices(outlines[name], voxel) if name in outlines else [None] * 3,
            labels,
        )
        for ax, (back, view, outline, label) in zip(axes[row], views):
            scale = _overlay(ax, back, view, signed, label)
            if outline is not None and outline.any():
                ax.contour(outline, levels=[0.5], colors="cyan", linewidths=0.8)
        fig.colorbar(scale, ax=list(axes[row]), fraction=0.03, pad=0.02)
    return fig
