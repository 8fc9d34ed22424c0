"""Voxel orientation of volumes with an affine, and the NIfTI header facts a map keeps.

A NIfTI volume is read in the closest canonical orientation, RAS+ (voxel axis 0 runs from
left to right, axis 1 from posterior to anterior, axis 2 from inferior to superior), as
:func:`nibabel.as_closest_canonical` gives it: axis permutations and flips only, so every
voxel keeps its value and its world position (the affine is updated exactly). Volumes
stored in different orientations then share one voxel layout, and a resize to ``--shape``
treats the same anatomical axis alike in every image. :func:`from_canonical` undoes it, so
a map is written in its source's own voxel order and with its source's own affine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "SCANNER",
    "UNKNOWN",
    "HeaderCodes",
    "SourceHeader",
    "canonical_affine",
    "from_canonical",
    "read_source_header",
    "to_canonical",
]


@dataclass(frozen=True)
class HeaderCodes:
    """The NIfTI header fields that say what the affine means: ``sform_code`` and
    ``qform_code`` (0 unknown, 1 scanner, 2 aligned, 3 Talairach, 4 MNI) and the units of
    the spatial and time axes (``"mm"``, ``"unknown"``...)."""

    sform_code: int = 0
    qform_code: int = 0
    xyz_units: str = "unknown"
    t_units: str = "unknown"


#: Codes of a grid with no known world space (PNG, npy).
UNKNOWN = HeaderCodes()


#: Codes of a grid in scanner space, in mm (a DICOM series' computed affine).
SCANNER = HeaderCodes(1, 1, "mm", "unknown")


@dataclass(frozen=True)
class SourceHeader:
    """What a NIfTI source file's header says, read without its voxels.

    ``affine`` ``(4, 4)`` is the file's own voxel -> world matrix (sform, else qform),
    ``shape`` its first three (spatial) axes in file order, ``codes`` its header codes.
    """

    affine: np.ndarray
    shape: tuple[int, ...]
    codes: HeaderCodes


def _reorientable(shape: tuple[int, ...]) -> bool:
    """Only true volumes are reoriented: a single slice ``(X, Y, 1)`` stays a 2D image."""
    return len(shape) >= 3 and min(shape[:3]) > 1


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` ``(X, Y, Z, ...)`` in file voxel order and its affine -> the same voxels in
    the closest RAS+ orientation and the updated affine (axes beyond the third follow
    along). Arrays with fewer than three axes, or a singleton among the first three, are
    returned unchanged."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    if not _reorientable(data.shape):
        return data, affine
    ornt = io_orientation(affine)
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return data, affine
    out = apply_orientation(data, ornt)
    return out, affine @ inv_ornt_aff(ornt, data.shape[:3])


def canonical_affine(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The affine :func:`to_canonical` gives a volume of spatial ``shape`` on ``affine``
    (computed without the voxels)."""
    from nibabel.orientations import inv_ornt_aff, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    if not _reorientable(tuple(shape)):
        return affine
    ornt = io_orientation(affine)
    return affine @ inv_ornt_aff(ornt, tuple(shape)[:3])


def from_canonical(
    volume: np.ndarray, affine: np.ndarray, target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` ``(X, Y, Z)`` on the grid ``affine`` reordered (axis permutations and
    flips only) into the voxel orientation of the affine ``target``; returns it and its
    affine. The inverse of :func:`to_canonical` when ``target`` is the file's affine."""
    from nibabel.orientations import (
        apply_orientation,
        inv_ornt_aff,
        io_orientation,
        ornt_transform,
    )

    affine = np.asarray(affine, dtype=np.float64)
    if volume.ndim != 3 or not _reorientable(volume.shape):
        return volume, affine
    transform = ornt_transform(io_orientation(affine), io_orientation(np.asarray(target)))
    out = apply_orientation(volume, transform)
    return out, affine @ inv_ornt_aff(transform, volume.shape)


def _codes_of(header) -> HeaderCodes:
    xyz, t = header.get_xyzt_units()
    return HeaderCodes(int(header["sform_code"]), int(header["qform_code"]), str(xyz), str(t))


def read_source_header(path: str | os.PathLike) -> SourceHeader | None:
    """The header of a NIfTI (``.nii``, ``.nii.gz``) or MGH (``.mgz``, ``.mgh``: scanner
    space, mm) file, or None for other files and for headers nibabel cannot read (the
    voxels are not loaded)."""
    import nibabel as nib

    name = Path(path).name.lower()
    if not name.endswith((".nii", ".nii.gz", ".mgz", ".mgh")):
        return None
    try:
        image = nib.load(str(path))
        header = image.header
        codes = _codes_of(header) if isinstance(image, nib.Nifti1Image) else SCANNER
        affine = np.asarray(image.affine, dtype=np.float64)
        shape = tuple(int(n) for n in image.shape[:3])
    except Exception:  # a damaged header: the caller falls back to the stored grid
        return None
    return SourceHeader(affine, shape, codes)
