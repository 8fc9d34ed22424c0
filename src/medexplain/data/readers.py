"""Read one image file into a channels-first float32 array: one function per format.

Every reader returns ``(array, meta)`` with ``array`` of shape ``(C, H, W)`` (2D) or
``(C, D, H, W)`` (3D), float32, in the file's own intensity units (after the format's own
value transform: DICOM rescale slope/intercept, NIfTI ``scl_slope``/``scl_inter``), and an
:class:`ImageMeta`. Nothing is normalised or resized here; :mod:`medexplain.data.files`
does that. Every failure is a :class:`DataError` with a one-line message naming the file.

Formats (:func:`load_image` dispatches by extension; a file without a known extension is
read as DICOM when it carries the ``DICM`` magic; a directory is a DICOM series):

- PNG / JPEG / TIFF / BMP (Pillow): 8- and 16-bit grey, RGB(A) (alpha dropped), palette
  images (converted to RGB); a multi-page TIFF is a volume ``(C, pages, H, W)``.
- NIfTI ``.nii`` / ``.nii.gz`` (and ``.mgz``, via nibabel): a volume is read in the closest
  canonical (RAS+) voxel orientation, as :func:`nibabel.as_closest_canonical` gives it (axis
  permutations and flips only, :mod:`medexplain.data.orientation`), and ``meta.affine``
  (voxel -> world, RAS mm) maps the array's indices ``(D, H, W)`` = ``(i, j, k)`` to world
  space. A 4th axis becomes channels; a single slice ``(X, Y, 1)`` is a 2D image in the
  file's voxel order.
- DICOM (pydicom): modality LUT / rescale slope and intercept applied; ``MONOCHROME1``
  inverted within its representable range so that higher always means brighter; a
  multi-frame file is a volume ``(C, frames, rows, cols)``; a folder of single-frame
  slices is a volume sorted along the slice normal, with an affine (RAS) from
  ImagePositionPatient / ImageOrientationPatient / PixelSpacing.
- NumPy ``.npy`` (``allow_pickle=False``): ``(H, W)`` is a 2D image; ``(D, H, W)`` a volume
  unless ``spatial_dims=2`` (then channels-first ``(C, H, W)``); 4D is ``(C, D, H, W)``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import typed_line


class DataError(ValueError):
    """Bad input data: a missing, unreadable or inconsistent file, or a bad manifest.

    The message is one line naming the file or argument and what was expected.
    """


@dataclass(frozen=True)
class ImageMeta:
    """What a reader learned about a file besides its pixels.

    Attributes:
        format: ``"pil"``, ``"nifti"``, ``"dicom"``, ``"dicom-series"`` or ``"npy"``.
        affine: ``(4, 4)`` float64 voxel-index -> world (RAS, mm) matrix for the array's
            spatial axes (NIfTI, DICOM series), else None.
        value_range: ``(lo, hi)`` of the values the stored integer type can represent
            (after the DICOM rescale), e.g. ``(0, 255)`` for 8-bit PNG; None for float data.
            ``normalise="range"`` maps it to [0, 1].
        lr_axis: the spatial axis (0-based, within ``array.shape[1:]``) that runs left-right:
            the last axis for 2D images and DICOM; for NIfTI the voxel axis closest to world
            x. Used by flips and by the alignment check's mirror test.
    """

    format: str
    affine: np.ndarray | None = None
    value_range: tuple[float, float] | None = None
    lr_axis: int = -1


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"image file {path} does not exist")
    if not path.is_file():
        raise DataError(f"image path {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise DataError(f"image file {path} is not readable (permission denied)")


# --------------------------------------------------------------------------- Pillow

_PIL_BITS = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "LA": 8, "CMYK": 8, "YCbCr": 8}


def _pil_frame(frame, path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One Pillow frame as ``(C, H, W)`` float32 plus its representable value range."""
    mode = frame.mode
    if mode in ("P", "PA", "CMYK", "YCbCr", "RGBX", "HSV", "LAB"):
        frame = frame.convert("RGB")
    elif mode == "LA":
        frame = frame.convert("L")
    elif mode == "RGBA":
        frame = frame.convert("RGB")
    mode = frame.mode
    array = np.asarray(frame)
    if mode == "1":
        value_range: tuple[float, float] | None = (0.0, 1.0)
    elif mode in _PIL_BITS:
        value_range = (0.0, 255.0)
    elif mode.startswith("I;16"):
        value_range = (0.0, 65535.0)
    elif mode == "I" and path.suffix.lower() == ".png":
        value_range = (0.0, 65535.0)  # PNG stores at most 16 bits; old Pillow reads them as I
    else:
        value_range = None  # 32-bit int or float TIFF: no meaningful fixed range
    array = array.astype(np.float32)
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return np.ascontiguousarray(array), value_range


def read_pil(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """PNG/JPEG/TIFF/BMP via Pillow -> ``(C, H, W)`` (or ``(C, pages, H, W)`` for a multi-page
    TIFF), raw values (0..255 for 8 bit, 0..65535 for 16 bit)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                frames = []
                ranges = set()
                for page in range(getattr(image, "n_frames", 1)):
                    image.seek(page)
                    image.load()
                    array, value_range = _pil_frame(image, path)
                    frames.append(array)
                    ranges.add(value_range)
    except UnidentifiedImageError:
        raise DataError(
            f"cannot read {path}: not a valid {path.suffix or 'image'} file (corrupt or "
            "another format)"
        ) from None
    except Exception as error:  # Pillow plugins raise many types for damaged files
        raise DataError(
            f"cannot read {path}: corrupt or truncated image ({typed_line(error)})"
        ) from error
    if len({f.shape for f in frames}) != 1:
        raise DataError(f"cannot read {path}: its pages have different sizes or modes")
    array = frames[0] if len(frames) == 1 else np.stack(frames, axis=1)
    value_range = ranges.pop() if len(ranges) == 1 else None
    return array, ImageMeta("pil", None, value_range, -1)


# --------------------------------------------------------------------------- NIfTI


def lr_axis_from_affine(affine: np.ndarray, spatial_dims: int) -> int:
    """The voxel axis (among the first ``spatial_dims``) whose direction is closest to world
    x (left-right in RAS/LPS)."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :spatial_dims])))


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """NIfTI (or MGH) via nibabel -> ``(C, X, Y, Z)`` in the closest RAS+ voxel order, with
    the header's affine (sform, else qform) reoriented alike in ``meta.affine``."""
    import nibabel as nib

    from .orientation import to_canonical

    path = Path(path)
    _check_file(path)
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel raises many types for corrupt files
        raise DataError(f"cannot read {path} as NIfTI: {typed_line(error)}") from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    data, affine = to_canonical(data, affine)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim == 2 or data.ndim == 3:
        array = data[None]
    elif data.ndim == 4:
        array = np.moveaxis(data, -1, 0)
    else:
        raise DataError(
            f"{path} has NIfTI shape {data.shape}; expected 2D, 3D, or 3D + channels (4D)"
        )
    spatial_dims = array.ndim - 1
    meta = ImageMeta("nifti", affine, None, lr_axis_from_affine(affine, spatial_dims))
    return np.ascontiguousarray(array, dtype=np.float32), meta


# --------------------------------------------------------------------------- DICOM


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file has the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _dicom_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_file(path)
    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise DataError(f"cannot read {path}: not a valid DICOM file (no DICM header)") from None
    except Exception as error:
        raise DataError(f"cannot read {path} as DICOM: {typed_line(error)}") from error
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(f"DICOM file {path} has no pixel data (not an image)")
    return ds


def _functional_rescale(ds, frames: int) -> np.ndarray | None:
    """``(frames, 2)`` slope/intercept from the Pixel Value Transformation of an enhanced
    multi-frame file's functional groups (per frame, else shared), when the top-level
    Rescale tags and Modality LUT are absent; else None."""
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        return None

    def transform(group) -> tuple[float, float] | None:
        sequence = group.get("PixelValueTransformationSequence") if group else None
        if not sequence:
            return None
        item = sequence[0]
        return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))

    shared_groups = ds.get("SharedFunctionalGroupsSequence")
    shared = transform(shared_groups[0]) if shared_groups else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and len(per_frame) == frames:
        values = [transform(group) or shared for group in per_frame]
        if all(v is not None for v in values):
            return np.asarray(values, dtype=np.float64)
    if shared is not None:
        return np.asarray([shared] * frames, dtype=np.float64)
    return None


def _dicom_pixels(ds, path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """Pixels with the modality LUT applied and MONOCHROME1 inverted: ``(C, [F,] R, C)``."""
    from pydicom.pixels import apply_modality_lut

    try:
        raw = ds.pixel_array
    except Exception as error:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise DataError(
            f"cannot decode the pixels of DICOM file {path} (transfer syntax "
            f"{getattr(syntax, 'name', syntax)}): {typed_line(error)}"
        ) from error
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    value_range: tuple[float, float] | None = None
    if samples == 1:
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        signed = int(ds.get("PixelRepresentation", 0)) == 1
        if raw.dtype.kind == "f":
            values = raw.astype(np.float64)
        else:
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
            per_frame = _functional_rescale(ds, frames)
            try:
                if per_frame is not None:  # enhanced multi-frame: rescale in functional groups
                    shape = (frames, 1, 1) if frames > 1 else (1, 1)
                    slope = per_frame[:, 0].reshape(shape)
                    intercept = per_frame[:, 1].reshape(shape)
                    values = raw.astype(np.float64) * slope + intercept
                    ends = np.concatenate([lo * per_frame[:, 0], hi * per_frame[:, 0]])
                    ends = ends + np.tile(per_frame[:, 1], 2)
                else:
                    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
                    ends = np.asarray(apply_modality_lut(np.array([lo, hi], raw.dtype), ds))
            except Exception as error:
                raise DataError(
                    f"cannot apply the rescale/modality LUT of DICOM file {path}: "
                    f"{typed_line(error)}"
                ) from error
            value_range = (float(ends.min()), float(ends.max()))
        if photometric == "MONOCHROME1":
            if value_range is None:
                value_range = (float(values.min()), float(values.max()))
            values = value_range[0] + value_range[1] - values
        array = values[None]
    else:
        array = np.moveaxis(raw.astype(np.float64), -1, 0)  # (..., 3) -> (3, ...)
        bits = int(ds.get("BitsStored", 8))
        value_range = (0.0, float(2**bits - 1))
    expected = 2 + (frames > 1)
    if array.ndim != expected + 1:
        raise DataError(
            f"DICOM file {path} decoded to shape {raw.shape}, which does not fit "
            f"NumberOfFrames={frames}, SamplesPerPixel={samples}"
        )
    return np.ascontiguousarray(array, dtype=np.float32), value_range


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """One DICOM file -> ``(C, rows, cols)``, or ``(C, frames, rows, cols)`` if multi-frame."""
    path = Path(path)
    ds = _dicom_dataset(path)
    array, value_range = _dicom_pixels(ds, path)
    return array, ImageMeta("dicom", None, value_range, -1)


def _slice_geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(position (3,), row cosine (3,), column cosine (3,)) in LPS, or None if absent."""
    try:
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if position.shape != (3,) or cosines.shape != (6,):
        return None
    return position, cosines[:3], cosines[3:]


def read_dicom_series(path: str | os.PathLike) -> tuple[np.ndarray, ImageMeta]:
    """A folder of single-frame DICOM slices -> ``(C, slices, rows, cols)``.

    Files are every regular, non-hidden file in the folder. Slices are ordered along the
    slice normal (row cosine x column cosine) by ImagePositionPatient, else by
    InstanceNumber, else by file name. With the geometry tags present, ``meta.affine`` maps
    ``(slice, row, col)`` to RAS world mm (DICOM's LPS with x and y negated, as in NIfTI).
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"DICOM series {path} is not a directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"DICOM series folder {path} contains no files")
    slices = []
    for file in files:
        ds = _dicom_dataset(file)
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DataError(
                f"DICOM series folder {path} contains the multi-frame file {file.name}; "
                "a series folder must hold single-frame slices"
            )
        slices.append((file, ds))
    geometry = [_slice_geometry(ds) for _, ds in slices]
    if all(g is not None for g in geometry):
        normal = np.cross(geometry[0][1], geometry[0][2])
        keys = [float(np.dot(g[0], normal)) for g in geometry]
    elif all("InstanceNumber" in ds for _, ds in slices):
        keys = [float(ds.InstanceNumber) for _, ds in slices]
    else:
        keys = list(range(len(slices)))
    order = sorted(range(len(slices)), key=lambda i: (keys[i], slices[i][0].name))
    arrays, ranges = [], set()
    for i in order:
        file, ds = slices[i]
        array, value_range = _dicom_pixels(ds, file)
        if arrays and array.shape != arrays[0][1].shape:
            raise DataError(
                f"DICOM series {path}: slice {file.name} has shape {array.shape[1:]} but "
                f"{arrays[0][0].name} has {arrays[0][1].shape[1:]}"
            )
        arrays.append((file, array))
        ranges.add(value_range)
    volume = np.stack([a for _, a in arrays], axis=1)
    affine = None
    if all(g is not None for g in geometry) and "PixelSpacing" in slices[0][1]:
        first = geometry[order[0]]
        row_spacing, col_spacing = (float(v) for v in slices[order[0]][1].PixelSpacing)
        if len(order) > 1:
            step = (geometry[order[-1]][0] - first[0]) / (len(order) - 1)
        else:
            thickness = float(slices[0][1].get("SliceThickness", 1.0) or 1.0)
            step = np.cross(first[1], first[2]) * thickness
        lps = np.eye(4)
        # index (slice, row, col): rows advance along the column cosine, cols along the row one
        lps[:3, 0] = step
        lps[:3, 1] = first[2] * row_spacing
        lps[:3, 2] = first[1] * col_spacing
        lps[:3, 3] = first[0]
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    value_range = ranges.pop() if len(ranges) == 1 else None
    return volume, ImageMeta("dicom-series", affine, value_range, 2)


# --------------------------------------------------------------------------- NumPy

_INT_RANGES = {np.dtype(np.uint8): (0.0, 255.0), np.dtype(np.uint16): (0.0, 65535.0)}


def read_npy(
    path: str | os.PathLike, spatial_dims: int | None = None
) -> tuple[np.ndarray, ImageMeta]:
    """``.npy`` via ``np.load(allow_pickle=False)`` -> channels-first float32.

    ``(H, W)`` -> 2D; ``(D, H, W)`` -> a volume, or ``(C, H, W)`` when ``spatial_dims=2``;
    ``(C, D, H, W)`` -> a volume with channels. ``value_range`` is set for uint8/uint16.
    """
    path = Path(path)
    _check_file(path)
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise DataError(
                f"{path} holds Python objects (a pickled array); medexplain only loads plain "
                "numeric .npy arrays (np.save of a numeric array)"
            ) from error
        raise DataError(f"cannot read {path} as .npy: {typed_line(error)}") from error
    except Exception as error:
        raise DataError(f"cannot read {path} as .npy: {typed_line(error)}") from error
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "biuf":
        raise DataError(f"{path} holds dtype {getattr(data, 'dtype', '?')}; expected numbers")
    value_range = _INT_RANGES.get(data.dtype)
    if data.dtype.kind == "b":
        value_range = (0.0, 1.0)
    if data.ndim == 2:
        array = data[None]
    elif data.ndim == 3:
        array = data if spatial_dims == 2 else data[None]
    elif data.ndim == 4 and spatial_dims != 2:
        array = data
    else:
        raise DataError(
            f"{path} has array shape {data.shape}; expected (H, W), (C, H, W), (D, H, W) "
            "or (C, D, H, W)"
        )
    return np.ascontiguousarray(array, dtype=np.float32), ImageMeta("npy", None, value_range, -1)


# --------------------------------------------------------------------------- dispatch

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
NPY_SUFFIXES = (".npy",)
IMAGE_SUFFIXES = PIL_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES + NPY_SUFFIXES


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image_path(path: str | os.PathLike) -> bool:
    """True for a file :func:`load_image` can read by its name (or a DICOM without one)."""
    path = Path(path)
    if _suffix(path) in IMAGE_SUFFIXES:
        return True
    return path.suffix == "" and path.is_file() and is_dicom_file(path)


def reader_for(path: str | os.PathLike) -> Callable[[Path], tuple[np.ndarray, ImageMeta]]:
    """The reader :func:`load_image` would use for ``path``; raises DataError for others."""
    path = Path(path)
    suffix = _suffix(path)
    if path.is_dir() and suffix not in PIL_SUFFIXES + NIFTI_SUFFIXES + NPY_SUFFIXES:
        return read_dicom_series
    if suffix in PIL_SUFFIXES:
        return read_pil
    if suffix in NIFTI_SUFFIXES:
        return read_nifti
    if suffix in DICOM_SUFFIXES:
        return read_dicom
    if suffix in NPY_SUFFIXES:
        return read_npy
    if not path.exists():
        raise DataError(f"image file {path} does not exist")
    if is_dicom_file(path):
        return read_dicom
    raise DataError(
        f"cannot read {path}: unknown image format {suffix or '(no extension)'}; expected "
        f"one of {', '.join(IMAGE_SUFFIXES)}, a DICOM file or a DICOM series folder"
    )


def load_image(
    path: str | os.PathLike, *, spatial_dims: int | None = None
) -> tuple[np.ndarray, ImageMeta]:
    """Read one image file (or DICOM series folder) by its extension.

    Args:
        path: the file (PNG, JPEG, TIFF, BMP, NIfTI, DICOM, npy) or a DICOM series folder.
        spatial_dims: only used for ``.npy`` arrays of 3 dims: 2 reads them as ``(C, H, W)``,
            otherwise they are volumes ``(D, H, W)``.

    Returns:
        ``(array, meta)``: ``array`` float32 ``(C, H, W)`` or ``(C, D, H, W)`` in file units,
        ``meta`` an :class:`ImageMeta` (affine for NIfTI and DICOM series).

    Raises:
        DataError: the file is missing, unreadable, corrupt or of an unknown format.
    """
    path = Path(path)
    reader = reader_for(path)
    if reader is read_npy:
        return read_npy(path, spatial_dims)
    return reader(path)
