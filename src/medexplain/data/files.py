"""The user's own images as a torch Dataset: CSV manifests, class folders, DICOM, NIfTI.

    ds = ImageDataset.from_csv("uwf.csv", labels=["DR", "glaucoma"], shape=(512, 512),
                               normalise="range")
    ds = ImageDataset.from_folder("dicoms/", channels=1, shape=(512, 512))
    ds = open_dataset("t1.csv", normalise="zscore")          # CSV file or folder
    loader = DataLoader(ds, batch_size=16, collate_fn=collate)

An item is a dict::

    {"image": (C, *S) float32, "label": () long (-1: unlabelled) or (K,) float32 (multi-label),
     "mask": (1, *S) bool (only when the row has a mask), "index": int, "path": str,
     "affine": (4, 4) float64 numpy voxel -> world for the item's grid (NIfTI, DICOM
               series), else None}

Per item, in this order: read (:func:`~medexplain.data.readers.load_image`), fit the
channels (``channels=1`` turns RGB into grey with the ITU-R 601 luma weights, Pillow's "L";
``channels=3`` repeats grey), mirror left-right if the row's ``flip`` is set, resample to
``shape`` (linear, :func:`medexplain.core.spatial.resize`; masks by nearest neighbour on the same
``align_corners=True`` grid; the affine is rescaled so it still maps the resampled grid to
world space), then normalise intensities per image (:data:`NORMALISATIONS`). Without
``shape`` every image must have the first image's shape.

Errors are :class:`~medexplain.data.readers.DataError` with a one-line message naming the
file; :meth:`ImageDataset.try_get` returns them instead of raising, so a long run can record
the few corrupt files and go on.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core.errors import one_line
from ..core.spatial import check_dims, resize
from .collate import collate
from .intensity import NORMALISATIONS, normalise_intensity, range_text
from .manifest import (
    Manifest,
    Record,
    read_csv_manifest,
    read_folder_manifest,
    records_from_paths,
)
from .readers import DataError, ImageMeta, load_image
from .resample import nearest_resize, resized_affine

__all__ = [
    "NORMALISATIONS",
    "DataError",
    "ImageDataset",
    "ImageMeta",
    "collate",
    "load_image",
    "nearest_resize",
    "normalise_intensity",
    "open_dataset",
    "resized_affine",
]

# ITU-R 601-2 luma weights, the ones Pillow's convert("L") uses.
LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class _Reference:
    """The first readable image: sets the expected channels and shape."""

    path: Path
    channels: int
    shape: tuple[int, ...]
    lr_axis: int
    meta: ImageMeta


class ImageDataset(Dataset):
    """Images listed by a :class:`~medexplain.data.manifest.Manifest` (see the module
    docstring for the item format and the processing order).

    Args:
        manifest: the records and class names (use the ``from_*`` constructors).
        shape: spatial output shape ``(H, W)`` or ``(D, H, W)``; None keeps the files' shape,
            which must then be the same for every image.
        channels: 1 (grey; RGB is converted), 3 (RGB; grey is repeated), another int (must
            match), or None: every image must have as many channels as the first one.
        normalise: one of :data:`NORMALISATIONS` (default ``"none"``: file units).
        spatial_dims: 2 or 3; only needed to read 3-dim ``.npy`` arrays as ``(C, H, W)``
            (inferred from ``shape`` when given).
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        shape: Sequence[int] | None = None,
        channels: int | None = None,
        normalise: str = "none",
        spatial_dims: int | None = None,
    ) -> None:
        if not isinstance(manifest, Manifest):
            raise TypeError(f"manifest must be a Manifest, got {type(manifest).__name__}")
        if shape is not None:
            if isinstance(shape, int) or not all(isinstance(s, (int, np.integer)) for s in shape):
                raise DataError(f"shape must be a tuple (H, W) or (D, H, W) of ints, got {shape!r}")
            shape = tuple(int(s) for s in shape)
            if len(shape) not in (2, 3) or min(shape) < 1:
                raise DataError(f"shape must be (H, W) or (D, H, W) of positive ints, got {shape}")
            if spatial_dims is not None and spatial_dims != len(shape):
                raise DataError(f"spatial_dims={spatial_dims} contradicts shape={shape}")
            spatial_dims = len(shape)
        if spatial_dims is not None:
            check_dims(spatial_dims)
        if channels is not None and (isinstance(channels, bool) or int(channels) < 1):
            raise DataError(f"channels must be a positive int or None, got {channels!r}")
        if normalise not in NORMALISATIONS:
            raise DataError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        self.manifest = manifest
        self._shape = shape
        self._channels = None if channels is None else int(channels)
        self.normalise = normalise
        self._spatial_dims = spatial_dims
        self._reference_cache: _Reference | None = None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_csv(
        cls,
        csv_path: str | os.PathLike,
        *,
        labels: Sequence[str] | None = None,
        label_column: str | None = "label",
        path_column: str = "path",
        mask_column: str = "mask",
        flip_column: str = "flip",
        class_names: Sequence[str] | None = None,
        **options: Any,
    ) -> ImageDataset:
        """Dataset from a CSV manifest
        (:func:`~medexplain.data.manifest.read_csv_manifest`); ``options`` go to the
        constructor (``shape``, ``channels``, ``normalise``, ``spatial_dims``)."""
        manifest = read_csv_manifest(
            csv_path,
            labels=labels,
            label_column=label_column,
            path_column=path_column,
            mask_column=mask_column,
            flip_column=flip_column,
            class_names=class_names,
        )
        return cls(manifest, **options)

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike,
        *,
        layout: str = "auto",
        class_names: Sequence[str] | None = None,
        **options: Any,
    ) -> ImageDataset:
        """Dataset from ``root/<class>/<files>`` or a flat folder of images
        (:func:`~medexplain.data.manifest.read_folder_manifest`)."""
        return cls(read_folder_manifest(root, layout=layout, class_names=class_names), **options)

    @classmethod
    def from_paths(
        cls,
        paths: Sequence[str | os.PathLike],
        labels: Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        **options: Any,
    ) -> ImageDataset:
        """Dataset from explicit image paths and optional integer labels."""
        return cls(records_from_paths(paths, labels, class_names), **options)

    # ------------------------------------------------------------------ description

    def __len__(self) -> int:
        return len(self.manifest.records)

    @property
    def records(self) -> list[Record]:
        return self.manifest.records

    @property
    def class_names(self) -> list[str]:
        """Class names in label-index order (multi-label: the label columns); [] if
        unlabelled."""
        return list(self.manifest.class_names)

    @property
    def multilabel(self) -> bool:
        return self.manifest.multilabel

    @property
    def labelled(self) -> bool:
        return self.manifest.labelled

    @property
    def paths(self) -> list[str]:
        return [str(r.path) for r in self.manifest.records]

    def targets(self) -> np.ndarray:
        """Every label without loading images: ``(N,)`` int64 or ``(N, K)`` float32."""
        return self.manifest.targets()

    def column(self, name: str) -> list[str]:
        """Values of an extra manifest column (e.g. a group column), one per item."""
        records = self.manifest.records
        if not any(name in r.extra for r in records):
            found = sorted({k for r in records for k in r.extra})
            raise DataError(f"no manifest column {name!r}; extra columns found: {found}")
        return [r.extra.get(name, "") for r in records]

    def missing_files(self) -> list[str]:
        """Image and mask paths that do not exist (cheap: no file is opened)."""
        out = []
        for record in self.manifest.records:
            for path in (record.path, record.mask):
                if path is not None and not path.exists():
                    out.append(str(path))
        return out

    def _reference(self) -> _Reference:
        """The first image (in index order) that loads; every worker finds the same one."""
        if self._reference_cache is None:
            errors = []
            for record in self.manifest.records:
                try:
                    array, meta = load_image(record.path, spatial_dims=self._spatial_dims)
                except DataError as error:
                    errors.append(one_line(error))
                    continue
                dims = array.ndim - 1
                self._reference_cache = _Reference(
                    record.path, array.shape[0], tuple(array.shape[1:]), meta.lr_axis % dims, meta
                )
                break
            else:
                raise DataError(
                    f"none of the {len(self)} images could be read; first error: {errors[0]}"
                )
        return self._reference_cache

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of every item's image, ``(H, W)`` or ``(D, H, W)``."""
        return self._shape if self._shape is not None else self._reference().shape

    @property
    def spatial_dims(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> int:
        """Number of channels ``C`` of every item's image."""
        return self._channels if self._channels is not None else self._reference().channels

    @property
    def lr_axis(self) -> int:
        """Spatial axis that runs left-right (of the first image; see ``ImageMeta.lr_axis``)."""
        return self._reference().lr_axis

    def describe(self) -> dict[str, Any]:
        """Plain values for ``results.json`` and for checking that a resumed run reads the
        same data (no image is opened)."""
        return {
            "source": None if self.manifest.source is None else str(self.manifest.source),
            "n_images": len(self),
            "class_names": self.class_names,
            "multilabel": self.multilabel,
            "shape": None if self._shape is None else list(self._shape),
            "channels": self._channels,
            "normalise": self.normalise,
        }

    def __repr__(self) -> str:
        source = self.manifest.source
        return (
            f"ImageDataset({len(self)} images{f' from {source}' if source else ''}, "
            f"classes={self.class_names}, shape={self._shape}, channels={self._channels}, "
            f"normalise={self.normalise!r})"
        )

    # ------------------------------------------------------------------ items

    def _fit_channels(self, array: np.ndarray, path: Path) -> np.ndarray:
        have = array.shape[0]
        want = self._channels
        if want is None:
            ref = self._reference()
            if have != ref.channels:
                fix = (
                    "a 4D NIfTI's fourth axis is read as channels: give one volume per file"
                    if ".nii" in path.name.lower() and have > 1
                    else "pass --channels 1 (grey) or 3 (RGB) (channels= in Python) to "
                    "convert them all"
                )
                raise DataError(
                    f"{path} has {have} channel(s) but {ref.path} has {ref.channels}; {fix}"
                )
            return array
        if have == want:
            return array
        if want == 1 and have == 3:
            return np.tensordot(LUMA, array, axes=(0, 0))[None].astype(np.float32)
        if want == 3 and have == 1:
            return np.repeat(array, 3, axis=0)
        raise DataError(
            f"{path} has {have} channel(s); expected {want} (only grey <-> RGB is converted)"
        )

    def _fit_shape(
        self, image: torch.Tensor, path: Path
    ) -> tuple[torch.Tensor, tuple[int, ...] | None]:
        """Resample ``(1, C, *S)`` to ``shape``; returns the tensor and the target size."""
        spatial = tuple(image.shape[2:])
        if self._shape is None:
            ref = self._reference()
            if len(spatial) != len(ref.shape):
                raise DataError(
                    f"{path} is {len(spatial)}D {spatial} but {ref.path} is {len(ref.shape)}D "
                    f"{ref.shape}; one dataset holds images of one dimension only"
                )
            if spatial != ref.shape:
                raise DataError(
                    f"{path} has shape {spatial} but {ref.path} has shape {ref.shape}; pass "
                    f"--shape (shape=(...) in Python) to resample all images to one shape"
                )
            return image, None
        if len(spatial) != len(self._shape):
            raise DataError(
                f"{path} is {len(spatial)}D with shape {spatial}, but --shape {self._shape} "
                f"asks for {len(self._shape)}D images"
            )
        return resize(image, self._shape), self._shape

    def _load_mask(self, record: Record, spatial: tuple[int, ...], lr_axis: int) -> torch.Tensor:
        mask, _ = load_image(record.mask, spatial_dims=len(spatial))
        if tuple(mask.shape[1:]) != spatial:
            raise DataError(
                f"mask {record.mask} has shape {tuple(mask.shape[1:])} but its image "
                f"{record.path} has shape {spatial}; a mask must be on the image's grid"
            )
        mask = (mask > 0).any(axis=0, keepdims=True)
        if record.flip:
            mask = np.flip(mask, axis=1 + lr_axis)
        out = torch.from_numpy(np.ascontiguousarray(mask))[None]
        if self._shape is not None:
            out = nearest_resize(out, self._shape)
        return out[0]

    def load(self, index: int) -> dict[str, Any]:
        """The item at ``index`` (see the module docstring); raises DataError."""
        record = self.manifest.records[index]
        array, meta = load_image(record.path, spatial_dims=self._spatial_dims)
        return self._process(index, record, array, meta)

    def _check_values(self, array: np.ndarray, meta: ImageMeta, path: Path) -> None:
        """Refuse NaN/Inf pixels, and (without normalisation) an image whose stored value
        range differs from the first image's: 8-bit next to 16-bit PNGs in file units are
        not comparable intensities."""
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise DataError(
                f"{path} has {bad} NaN/Inf value(s) of {array.size}; replace them (e.g. with 0) "
                "before explaining"
            )
        if self.normalise != "none" or meta.format != "pil":
            return
        ref = self._reference()
        if ref.meta.format == "pil" and meta.value_range != ref.meta.value_range:
            raise DataError(
                f"{path} stores values in {range_text(meta.value_range)} but the first image "
                f"{ref.path} stores {range_text(ref.meta.value_range)}; with --normalise none "
                "their intensities are not comparable: use --normalise range (or minmax, "
                "zscore, percentile)"
            )

    def _process(
        self, index: int, record: Record, array: np.ndarray, meta: ImageMeta
    ) -> dict[str, Any]:
        path = record.path
        self._check_values(array, meta, path)
        array = self._fit_channels(array, path)
        spatial = tuple(array.shape[1:])
        lr_axis = meta.lr_axis % len(spatial)
        if record.flip:
            array = np.flip(array, axis=1 + lr_axis)
        image = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
        image, target = self._fit_shape(image, path)
        image_np = normalise_intensity(
            image[0].numpy(), self.normalise, meta.value_range, str(path)
        )
        affine = meta.affine
        if affine is not None and target is not None:
            affine = resized_affine(affine, spatial, target)
        if self.multilabel:
            label = torch.tensor(record.label, dtype=torch.float32)
        else:
            label = torch.tensor(int(record.label), dtype=torch.long)
        item: dict[str, Any] = {
            "image": torch.from_numpy(np.ascontiguousarray(image_np, dtype=np.float32)),
            "label": label,
            "index": int(index),
            "path": str(path),
            "affine": None if affine is None else np.array(affine, dtype=np.float64),
        }
        if record.mask is not None:
            item["mask"] = self._load_mask(record, spatial, lr_axis)
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = operator.index(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} images")
        return self.load(index)

    def try_get(self, index: int) -> tuple[dict[str, Any] | None, str | None]:
        """``(item, None)``, or ``(None, one-line error naming the file)`` when the item cannot
        be loaded (missing, corrupt, wrong channels or shape). Other exceptions propagate."""
        try:
            return self[index], None
        except DataError as error:
            return None, one_line(error)

    collate = staticmethod(collate)


def open_dataset(source: str | os.PathLike, **kwargs: Any) -> ImageDataset:
    """A CSV manifest (``.csv``/``.tsv``/``.txt`` file) or a folder, as :class:`ImageDataset`.

    ``kwargs`` go to :meth:`ImageDataset.from_csv` or :meth:`ImageDataset.from_folder`.
    """
    source = Path(source)
    if source.is_dir():
        return ImageDataset.from_folder(source, **kwargs)
    if source.is_file():
        if source.suffix.lower() in (".csv", ".tsv", ".txt"):
            return ImageDataset.from_csv(source, **kwargs)
        raise DataError(
            f"data source {source} is a {source.suffix or 'extensionless'} file; expected a CSV "
            "manifest (.csv) or a folder of images"
        )
    raise DataError(f"data source {source} does not exist; expected a CSV manifest or a folder")
