"""Per-image maps as NIfTI files beside a run's chunks, and the one grid global maps need.

``RUN/maps/<row>_<stem>_<key8>.nii.gz`` holds the map of manifest row ``row`` (six digits),
``stem`` the source's file name made ASCII-safe and ``key8`` the first 8 hex digits of the
image's key (:func:`medexplain.data.manifest.record_key`), so names stay unique for paths
with spaces, non-ASCII characters or equal stems, and a file of that pattern is known to be
medexplain's own. Each map carries its own source's geometry and header codes:

- a NIfTI (or MGH) source: the map is put back into the file's voxel order (reads are in
  the closest RAS+ order, :mod:`medexplain.data.orientation`) and a left-right flipped row
  is flipped back, so without ``--shape`` the map has the file's shape and exactly its
  affine; resampled to ``--shape`` it has the resampled grid's affine (it overlays the
  source in a viewer either way). sform/qform codes and the xyz/t units are the file's.
- a DICOM series: the computed affine, scanner codes, mm.
- anything else (PNG, npy, a single DICOM file): an identity affine, codes 0 (unknown).

Maps are written atomically; :func:`sync_maps` writes the missing ones of a resumed run and
removes its own files of images the run no longer selects (their maps stay in the chunks).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.files import ImageDataset
from ..data.orientation import (
    SCANNER,
    UNKNOWN,
    HeaderCodes,
    canonical_affine,
    from_canonical,
    read_source_header,
)
from ..data.readers import lr_axis_from_affine
from ..report.nifti import nifti_bytes
from .atomic import atomic_write_bytes
from .chunk import Chunk
from .store import RunStore

__all__ = [
    "AFFINE_TOL",
    "MAPS_DIR",
    "SharedGrid",
    "map_file_name",
    "shared_grid",
    "sync_maps",
    "wants_maps",
    "write_chunk_maps",
]

MAPS_DIR = "maps"

#: Largest difference (mm, per affine entry) under which two images share one grid.
AFFINE_TOL = 1e-3

_OWN = re.compile(r"^\d{6,}_[A-Za-z0-9._-]*_[0-9a-f]{8}\.nii\.gz$")
_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".dcm", ".npy", ".png", ".jpg", ".jpeg")


def wants_maps(setting: bool | None, spatial_dims: int) -> bool:
    """Per-image NIfTI maps: as asked, else (None) for 3D images only."""
    return bool(setting) if setting is not None else spatial_dims == 3


def _stem(path: str) -> str:
    name = Path(path).name
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem if Path(name).suffix else name
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name).strip("._")[:40] or "image"


def map_file_name(index: int, path: str, key: str) -> str:
    """``<row:06d>_<ascii stem>_<key[:8]>.nii.gz`` (module docstring); a key that is not
    hexadecimal (chunks of old runs keyed by path) is hashed first."""
    key = str(key)
    if not re.fullmatch(r"[0-9a-f]{8,}", key):
        key = hashlib.blake2b(key.encode("utf-8"), digest_size=4).hexdigest()
    return f"{int(index):06d}_{_stem(path)}_{key[:8]}.nii.gz"


def _lr_axis(path: str, header, dims: int) -> int:
    """The axis :class:`~medexplain.data.files.ImageDataset` mirrors for a flipped row."""
    if header is not None:
        return lr_axis_from_affine(canonical_affine(header.affine, header.shape), dims)
    if Path(path).is_dir():
        return 2 % dims
    return dims - 1


def map_bytes(volume: np.ndarray, grid: np.ndarray, path: str, flip: bool = False) -> bytes:
    """The ``.nii.gz`` of one map ``(*S)`` on the item grid ``grid`` (4x4, NaN when the
    image had none) of the source ``path`` (module docstring)."""
    volume = np.asarray(volume, dtype=np.float32)
    dims = volume.ndim
    header = read_source_header(path)
    affine = np.asarray(grid, dtype=np.float64) if np.isfinite(grid).all() else None
    if flip:
        volume = np.flip(volume, axis=_lr_axis(path, header, dims))
    codes: HeaderCodes = UNKNOWN
    if header is not None:
        codes = header.codes
        if affine is not None:
            if dims == 3:
                volume, affine = from_canonical(volume, affine, header.affine)
            shape = volume.shape if dims == 3 else (*volume.shape, 1)
            if shape == header.shape and np.allclose(affine, header.affine, atol=1e-6):
                affine = header.affine  # exactly the source's own matrix
    elif affine is not None:
        codes = SCANNER
    return nifti_bytes(np.ascontiguousarray(volume), affine, codes)


def _flip_of(dataset: ImageDataset | None, index: int) -> bool:
    if dataset is None or not 0 <= index < len(dataset):
        return False
    return bool(dataset.records[index].flip)


def write_chunk_maps(
    store: RunStore, chunk: Chunk, dataset: ImageDataset | None, enabled: bool = True
) -> int:
    """Write the NIfTI map of every image of ``chunk`` that has none yet in ``RUN/maps/``
    (``chunk.index`` are manifest rows of ``dataset``); returns how many were written."""
    if not enabled or len(chunk) == 0 or chunk.maps.ndim < 2:
        return 0
    directory = store.root / MAPS_DIR
    present = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    written = 0
    for j in range(len(chunk)):
        index, path = int(chunk.index[j]), str(chunk.path[j])
        name = map_file_name(index, path, str(chunk.key[j]))
        if name in present:
            continue
        data = map_bytes(chunk.maps[j, 0], chunk.affine[j], path, _flip_of(dataset, index))
        atomic_write_bytes(directory / name, data)
        written += 1
    return written


def sync_maps(store: RunStore, dataset: ImageDataset | None, enabled: bool) -> int:
    """Make ``RUN/maps/`` hold one file per selected explained image: write the missing
    ones (a resumed or reordered run) and delete medexplain's own files of images no longer
    selected. Does nothing when ``enabled`` is False. Returns how many were written."""
    if not enabled:
        return 0
    expected: dict[str, int] = {}
    for chunk in store.iter_chunks(maps=False):
        for j in range(len(chunk)):
            name = map_file_name(int(chunk.index[j]), str(chunk.path[j]), str(chunk.key[j]))
            expected[name] = chunk.number
    directory = store.root / MAPS_DIR
    present = set()
    if directory.is_dir():
        present = {p.name for p in directory.iterdir() if _OWN.match(p.name)}
    for name in present - set(expected):
        (directory / name).unlink(missing_ok=True)
    missing = {expected[name] for name in set(expected) - present}
    written = 0
    if missing:
        for chunk in store.iter_chunks(maps=True):
            if chunk.number in missing:
                written += write_chunk_maps(store, chunk, dataset)
    return written


@dataclass(frozen=True)
class SharedGrid:
    """The grid of a run's maps: ``affine`` ``(4, 4)`` shared by every image (within
    :data:`AFFINE_TOL`) or None, the first image's header ``codes``, and ``problem``: None,
    or one line naming the first image whose affine differs."""

    affine: np.ndarray | None
    codes: HeaderCodes
    problem: str | None = None


def shared_grid(store: RunStore, atol: float = AFFINE_TOL) -> SharedGrid:
    """Check that every selected explained image has the first one's affine (in index
    order, ``np.allclose(..., rtol=0, atol=atol)``); images without an affine (PNG, npy)
    all share the identity with unknown codes."""
    rows = sorted(store.affines(), key=lambda row: row[0])
    if not rows:
        return SharedGrid(None, UNKNOWN)
    index0, path0, affine0 = rows[0]
    has = bool(np.isfinite(affine0).all())
    for index, path, affine in rows[1:]:
        finite = bool(np.isfinite(affine).all())
        if finite != has:
            which = "has no affine" if not finite else "has an affine"
            problem = (
                f"image {index} ({path}) {which} but the first image {index0} ({path0}) "
                f"{'has one' if has else 'has none'}"
            )
            return SharedGrid(None, UNKNOWN, problem)
        if has and not np.allclose(affine, affine0, rtol=0.0, atol=atol):
            gap = float(np.abs(affine - affine0).max())
            problem = (
                f"image {index} ({path}) has an affine that differs from the first image "
                f"{index0} ({path0}) by up to {gap:.4g} mm (tolerance {atol:g} mm)"
            )
            return SharedGrid(None, UNKNOWN, problem)
    if not has:
        return SharedGrid(None, UNKNOWN)
    header = read_source_header(path0)
    codes = header.codes if header is not None else SCANNER
    return SharedGrid(np.asarray(affine0, dtype=np.float64), codes)
