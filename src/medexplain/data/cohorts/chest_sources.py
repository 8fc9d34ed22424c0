"""Real chest-radiograph annotations read from the torchxrayvision wheel (never imported).

The torchxrayvision wheel ships, as package data, the lung masks of the V7 Labs COVID-19
X-ray segmentation set (``semantic_masks_v7labs_lungs.zip``), the opacity boxes of the RSNA
Pneumonia Detection Challenge (``kaggle_stage_2_train_labels.csv.zip``, 1024x1024 pixel
coordinates) and the pneumothorax masks of the SIIM-ACR Pneumothorax Segmentation challenge
as run-length codes (``siim-pneumothorax-train-rle.csv.gz``, 1024x1024). The wheel is fetched
without its dependencies at build time (``make cohort-data``) and read here as a zip file:
the package itself, and its torchvision dependency, are never installed or imported.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "FETCH_COMMAND",
    "WHEEL_ENV",
    "decode_siim_rle",
    "find_wheel",
    "lung_masks",
    "rsna_boxes",
    "siim_masks",
]

WHEEL_ENV = "MEDEXPLAIN_CXR_WHEEL"
WHEEL_VERSION = "1.5.7"
WHEEL_GLOB = "torchxrayvision-*.whl"
FETCH_COMMAND = (
    "make cohort-data  (runs: pip download --no-deps -d .cache/wheels "
    f"torchxrayvision=={WHEEL_VERSION})"
)
_LUNGS = "torchxrayvision/data/semantic_masks_v7labs_lungs.zip"
_RSNA = "torchxrayvision/data/kaggle_stage_2_train_labels.csv.zip"
_SIIM = "torchxrayvision/data/siim-pneumothorax-train-rle.csv.gz"
SOURCE_SIZE = 1024  # RSNA and SIIM images are 1024x1024

# Where the lungs' joint bounding box is put in the canonical frame, as fractions of the
# image (rows top/bottom, columns left/right): the usual framing of a PA radiograph.
LUNG_BOX = (0.14, 0.86, 0.1, 0.9)


def _candidates(wheel: str | os.PathLike | None) -> list[Path]:
    if wheel is not None:
        return [Path(wheel)]
    if os.environ.get(WHEEL_ENV):
        return [Path(os.environ[WHEEL_ENV])]
    roots = [Path.cwd(), *Path(__file__).resolve().parents]
    found: list[Path] = []
    for root in roots:
        found.extend(sorted((root / ".cache" / "wheels").glob(WHEEL_GLOB), reverse=True))
    return found


def find_wheel(wheel: str | os.PathLike | None = None) -> Path:
    """The torchxrayvision wheel: ``wheel`` if given, else ``$MEDEXPLAIN_CXR_WHEEL``, else
    ``.cache/wheels/torchxrayvision-*.whl`` under the working directory or the repository.

    Raises FileNotFoundError naming the command that fetches it.
    """
    for path in _candidates(wheel):
        if path.is_file():
            return path.resolve()
    where = str(wheel) if wheel is not None else os.environ.get(WHEEL_ENV) or ".cache/wheels/"
    raise FileNotFoundError(
        f"The torchxrayvision wheel (chest annotations) was not found at {where}. "
        f"Fetch it with: {FETCH_COMMAND}; or point ${WHEEL_ENV} to the .whl file."
    )


@lru_cache(maxsize=4)
def _member(wheel: str, name: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(name)


def decode_siim_rle(rle: str, height: int = SOURCE_SIZE, width: int = SOURCE_SIZE) -> np.ndarray:
    """Boolean ``(height, width)`` mask of a SIIM-ACR run-length code.

    SIIM codes are pairs ``gap length``: each run starts ``gap`` pixels after the end of the
    previous run (the first after pixel 0), pixels counted in column-major order (down the
    first column, then the next). ``"-1"`` or an empty code is an empty mask.
    """
    values = np.asarray(rle.split(), dtype=np.int64)
    mask = np.zeros(height * width + 1, dtype=np.int32)
    if values.size >= 2:
        gaps, lengths = values[0::2], values[1::2]
        ends_before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        starts = np.cumsum(gaps) + ends_before
        np.add.at(mask, starts, 1)
        np.add.at(mask, starts + lengths, -1)
    flat = np.cumsum(mask[:-1]) > 0
    return flat.reshape(width, height).T


def _area_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """Fraction of each output pixel covered by ``mask`` (area interpolation)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="area")[0, 0].numpy()


def _two_lungs(mask: np.ndarray) -> np.ndarray | None:
    """The two largest components of a binary mask if they are two lungs side by side (each
    at least a fifth of the pair, centroids on either side of the middle), else None."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count < 2:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    order = np.argsort(sizes)[::-1][:2] + 1
    pair = np.isin(labels, order)
    if sizes[order - 1].min() < 0.2 * pair.sum() or pair.sum() < 0.9 * mask.sum():
        return None
    cols = [np.nonzero(labels == k)[1].mean() for k in order]
    middle = 0.5 * (np.nonzero(pair)[1].min() + np.nonzero(pair)[1].max())
    if min(cols) > middle or max(cols) < middle:
        return None
    return pair


def _canonical_lungs(data: bytes, size: int) -> np.ndarray | None:
    """Decode one lung-mask image, crop it to its lungs and put them in :data:`LUNG_BOX`."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.draft("L", (8 * size, 8 * size))  # JPEG decodes at a reduced scale; no-op for PNG
    image = image.convert("L")
    image.thumbnail((4 * size, 4 * size))  # the lung check needs no more than this
    array = np.asarray(image) > 127
    pair = _two_lungs(array)
    if pair is None:
        return None
    rows, cols = np.nonzero(pair)
    crop = pair[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    top, bottom, left, right = (round(f * (size - 1)) for f in LUNG_BOX)
    box = Image.fromarray(crop.astype(np.uint8) * 255).resize(
        (right - left + 1, bottom - top + 1), Image.Resampling.BILINEAR
    )
    out = np.zeros((size, size), dtype=bool)
    out[top : bottom + 1, left : right + 1] = np.asarray(box) > 127
    return _two_lungs(out)


_LUNG_CACHE: dict[tuple[str, int], list[np.ndarray]] = {}
_LUNG_SCANNED: dict[tuple[str, int], int] = {}  # how many archive entries each cache has read


def lung_masks(wheel: Path, count: int, size: int) -> np.ndarray:
    """``(count', size, size)`` bool: the first ``count`` usable V7 Labs lung masks (two
    lungs side by side) in a fixed shuffled order, cropped to the lungs and placed in
    :data:`LUNG_BOX`. Decoded lazily and cached, so a second call reads nothing new;
    ``count'`` < ``count`` only when the archive holds fewer usable masks."""
    key = (str(wheel), size)
    cached = _LUNG_CACHE.setdefault(key, [])
    inner = zipfile.ZipFile(io.BytesIO(_member(str(wheel), _LUNGS)))
    names = sorted(n for n in inner.namelist() if not n.endswith("/"))
    order = np.random.default_rng(0).permutation(len(names))
    cursor = _LUNG_SCANNED.get(key, 0)
    while len(cached) < count and cursor < len(names):
        mask = _canonical_lungs(inner.read(names[order[cursor]]), size)
        cursor += 1
        if mask is not None:
            cached.append(mask)
    _LUNG_SCANNED[key] = cursor
    return np.stack(cached[:count])


@lru_cache(maxsize=2)
def rsna_boxes(wheel: Path) -> tuple[np.ndarray, np.ndarray]:
    """RSNA opacity boxes of the positive patients: ``boxes (P, 4)`` float ``x, y, width,
    height`` in 1024x1024 pixels and ``patient (P,)`` int, the index of the box's patient
    (0 .. number of positive patients - 1, in file order); a patient has 1 to 4 boxes."""
    archive = zipfile.ZipFile(io.BytesIO(_member(str(wheel), _RSNA)))
    text = archive.read(archive.namelist()[0]).decode()
    ids: dict[str, int] = {}
    boxes, owners = [], []
    for row in csv.DictReader(io.StringIO(text)):
        if row["Target"] == "1":
            boxes.append([float(row[k]) for k in ("x", "y", "width", "height")])
            owners.append(ids.setdefault(row["patientId"], len(ids)))
    return np.asarray(boxes, dtype=np.float32), np.asarray(owners, dtype=np.int64)


@lru_cache(maxsize=2)
def _siim_codes(wheel: Path) -> tuple[tuple[str, ...], ...]:
    """Run-length codes grouped by image (one image may list several components), only the
    images with a pneumothorax, in file order."""
    text = gzip.decompress(_member(str(wheel), _SIIM)).decode()
    groups: dict[str, list[str]] = {}
    for line in text.splitlines()[1:]:
        image_id, _, code = line.partition(",")
        code = code.strip()
        if code and code != "-1":
            groups.setdefault(image_id.strip(), []).append(code)
    return tuple(tuple(codes) for codes in groups.values())


@lru_cache(maxsize=4)
def siim_masks(wheel: Path, count: int, size: int) -> np.ndarray:
    """``(count, size, size)`` float in [0, 1]: SIIM pneumothorax masks (the union of an
    image's components) in a fixed shuffled order, area-resized from 1024x1024."""
    codes = _siim_codes(wheel)
    order = np.random.default_rng(0).permutation(len(codes))[:count]
    out = np.empty((len(order), size, size), dtype=np.float32)
    for i, k in enumerate(order):
        mask = np.zeros((SOURCE_SIZE, SOURCE_SIZE), dtype=bool)
        for code in codes[k]:
            mask |= decode_siim_rle(code)
        out[i] = _area_resize(mask, size)
    return out
