"""MNI152 space for the brain cohort: the template, the coarse grid and its affine, NIfTI.

nilearn bundles the ICBM 2009a nonlinear symmetric MNI152 template (T1, brain, grey- and
white-matter masks at 2 mm); it is read offline from the installed package, never fetched.
A cohort volume ``(X, Y, Z)`` holds voxel ``(i, j, k)`` at world point ``affine @ (i, j, k, 1)``
(mm, RAS), so the affine applies unchanged when the volume is written as NIfTI.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from ..deform import sample_channels
from ..writers import save_nifti
from .base import Cohort

__all__ = [
    "MARGIN_MM",
    "SLICE_Z_MM",
    "brain_grid",
    "cohort_geometry",
    "grid_sample_coordinates",
    "lift_to_slice",
    "load_mni152",
    "sample_template",
    "save_cohort_nifti",
    "smooth_field",
    "template_channels",
    "world_points",
]

SLICE_Z_MM = -14.0  # the axial slice of dims=2, through both hippocampal centres
MARGIN_MM = 4.0  # around the template brain mask's bounding box


@functools.lru_cache(maxsize=1)
def load_mni152() -> tuple[np.ndarray, np.ndarray]:
    """``(4, 99, 117, 95)`` float32 T1, brain, GM, WM at 2 mm and their affine (cached)."""
    from nilearn import datasets

    images = [
        datasets.load_mni152_template(resolution=2),
        datasets.load_mni152_brain_mask(resolution=2),
        datasets.load_mni152_gm_mask(resolution=2),
        datasets.load_mni152_wm_mask(resolution=2),
    ]
    volumes = np.stack([np.asarray(im.get_fdata(), dtype=np.float32) for im in images])
    return volumes, np.asarray(images[0].affine, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def template_channels(spacing: float) -> torch.Tensor:
    """``(1, 2, 99, 117, 95)`` template T1 and WM mask blurred to the grid spacing (anti-aliasing:
    a Gaussian of FWHM ``sqrt(spacing^2 - 2^2)`` mm, so the 2 mm voxels reach ``spacing``)."""
    from ...core.spatial import gaussian_blur

    volumes, _ = load_mni152()
    x = torch.from_numpy(volumes[[0, 3]])[None]
    sigma_mm = math.sqrt(max(spacing**2 - 4.0, 0.0)) / math.sqrt(8 * math.log(2))
    return gaussian_blur(x, sigma_mm / 2.0) if sigma_mm > 0.1 else x


def brain_grid(
    spacing: float = 4.0, size: tuple[int, int, int] | None = None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape ``(X, Y, Z)`` and ``(4, 4)`` MNI affine of the cohort's 3D grid.

    The grid covers the template brain mask's bounding box plus ``MARGIN_MM``. By default
    its spacing is ``spacing`` mm on every axis (39 x 47 x 41 voxels at 4 mm);
    ``size`` fixes the shape instead, with per-axis spacing so that it covers the same box.
    """
    volumes, affine = load_mni152()
    idx = np.argwhere(volumes[1] > 0)
    lo = affine[:3, :3] @ idx.min(0) + affine[:3, 3] - MARGIN_MM
    hi = affine[:3, :3] @ idx.max(0) + affine[:3, 3] + MARGIN_MM
    if size is None:
        shape = tuple(int(np.floor((top - low) / spacing)) + 1 for low, top in zip(lo, hi))
        steps = np.full(3, float(spacing))
    else:
        shape = tuple(int(s) for s in size)
        if len(shape) != 3 or min(shape) < 2:
            raise ValueError(f"size must be three ints >= 2, got {size}")
        steps = (hi - lo) / (np.asarray(shape) - 1)
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] @ np.diag(steps / np.abs(np.diag(affine)[:3]))
    scaled[:3, 3] = lo
    return shape, scaled  # type: ignore[return-value]


def world_points(shape: tuple[int, ...], affine: np.ndarray, dims: int) -> torch.Tensor:
    """World coordinates (mm) ``(*S, dims)`` of every voxel: in-plane x, y only for 2D."""
    axes = [torch.arange(s, dtype=torch.float64) for s in shape]
    index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    if dims == 2:
        index = torch.cat([index, torch.zeros(*shape, 1, dtype=torch.float64)], dim=-1)
    world = index @ torch.from_numpy(affine[:3, :3]).T + torch.from_numpy(affine[:3, 3])
    return world[..., :dims].float()


def grid_sample_coordinates(
    points: torch.Tensor, affine: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """World points ``(..., d)`` -> grid_sample coordinates of a volume (reversed axis order)."""
    d = points.shape[-1]
    inverse = np.linalg.inv(affine)
    extent = np.asarray([s - 1 for s in shape[:d]], dtype=np.float64)
    scale = 2.0 * inverse[:d, :d] / extent[:, None]
    offset = torch.from_numpy(2.0 * inverse[:d, 3] / extent - 1.0).float()
    if np.count_nonzero(scale - np.diag(np.diag(scale))) == 0:
        out = points * torch.from_numpy(np.diag(scale).copy()).float() + offset
    else:
        out = points @ torch.from_numpy(scale).float().T + offset
    return out.flip(-1)


def smooth_field(coeffs: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``(n, C, *[c] * d)`` control values -> ``(n, C, *shape)`` smooth field.

    Separable Gaussian partition of unity (control points spread evenly over each axis,
    width one control spacing, weights normalised to sum to 1): the field is infinitely
    smooth and bounded by the largest control value.
    """
    out = coeffs
    c = coeffs.shape[-1]
    for axis, length in enumerate(shape):
        x = torch.linspace(0.0, 1.0, length)[:, None]
        knots = torch.linspace(0.0, 1.0, c)[None]
        weights = torch.exp(-0.5 * ((x - knots) * (c - 1)) ** 2)
        weights = weights / weights.sum(1, keepdim=True)
        out = torch.movedim(torch.movedim(out, 2 + axis, -1) @ weights.T, -1, 2 + axis)
    return out


def lift_to_slice(points: torch.Tensor, dims: int) -> torch.Tensor:
    """In-plane points ``(..., 2)`` -> 3D points on the slice ``z = SLICE_Z_MM``; 3D as is."""
    if dims == 3:
        return points
    z = torch.full_like(points[..., :1], SLICE_Z_MM)
    return torch.cat([points, z], dim=-1)


def sample_template(channels: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Template channels ``(1, K, *T)`` at world points ``(n, *S, d)`` -> ``(n, K, *S)``."""
    _, template_affine = load_mni152()
    dims = points.shape[-1]
    grid = grid_sample_coordinates(
        lift_to_slice(points, dims), template_affine, tuple(channels.shape[2:])
    )
    if dims == 2:
        return sample_channels(channels, grid[..., None, :])[..., 0]
    return sample_channels(channels, grid)


def cohort_geometry(
    dims: int, spacing: float, size: int | tuple[int, ...] | None
) -> tuple[tuple[int, ...], np.ndarray]:
    """Grid shape and ``(4, 4)`` affine for ``dims``; in 2D the axial slice at ``SLICE_Z_MM``
    (voxel ``(i, j, 0)`` maps to ``(x, y, -14)`` mm)."""
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if isinstance(size, int):
        size = (size,) * dims
    if size is not None and len(size) == 2:
        size = (*size, 2)
    shape, affine = brain_grid(spacing, size)
    if dims == 2:
        affine = affine.copy()
        affine[2, 3] = SLICE_Z_MM
        return shape[:2], affine
    return shape, affine


def save_cohort_nifti(volume: torch.Tensor | np.ndarray, path: str | Path, cohort: Cohort) -> Path:
    """Write one map of ``cohort`` as float32 NIfTI in MNI space.

    ``volume`` is ``(*S)`` with leading singleton axes allowed; a 2D slice ``(X, Y)`` is
    written as ``(X, Y, 1)``. The header carries the cohort's affine as sform and qform with
    code MNI (``NIFTI_XFORM_MNI_152`` = 4), so the map opens aligned on any MNI152 image.
    """
    if cohort.affine is None:
        raise ValueError("the cohort has no affine; only MNI-space cohorts can be written")
    array = volume.detach().cpu().numpy() if isinstance(volume, torch.Tensor) else volume
    array = np.asarray(array, dtype=np.float32)
    dims = int(cohort.config.get("dims", 3))
    while array.ndim > dims and array.shape[0] == 1:
        array = array[0]
    if array.ndim != dims:
        raise ValueError(f"expected a {dims}D map, got shape {array.shape}")
    if dims == 2:
        array = array[..., None]
    return save_nifti(array, path, cohort.affine, space="mni")
