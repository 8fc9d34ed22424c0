"""Is the dataset aligned? Correlation of every image with the mean image and its mirror.

Global label-wise maps (Engelmann et al., METHODS.md section 1) average explanations pixel
by pixel, which only means something when each pixel position is the same place on the
imaged object. :func:`check_alignment` finds the images that break this:

- ``correlation``: Pearson correlation of the image with the template, by default the
  dataset mean *without that image* (leave-one-out, so an outlier does not pull the
  template towards itself; the mean is accumulated in one streaming pass, so memory holds
  one running sum, never the dataset);
- ``mirror_correlation``: correlation with the template mirrored left-right (along the
  dataset's left-right axis, see :attr:`medexplain.data.readers.ImageMeta.lr_axis`).

Flags (no paper fixes these rules; they are the standard robust outlier rule):

- ``low``: ``correlation < median - k * spread`` where ``spread = max(1.4826 * MAD,
  min_spread)`` is the robust standard deviation (MAD = median absolute deviation; k = 3.5
  is Iglewicz & Hoaglin's cut for modified z-scores), or, when ``threshold`` is given,
  ``correlation < threshold``;
- ``flipped``: the mirrored template fits better than the template itself,
  ``mirror - correlation > flip_margin``, *and* that gain is an outlier by the same rule
  (``> median + k * spread`` of the gains). The second condition keeps nearly symmetric
  anatomy (brains), where the two correlations are almost equal for everyone, from being
  flagged at random.

``min_spread`` (0.02 correlation units: at k = 3.5 nothing within 0.07 of the median is
flagged) stops a near-perfectly uniform dataset (synthetic or heavily preprocessed) from
flagging differences too small to matter.
"""

from __future__ import annotations

import csv
import heapq
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.progress import progress_bar
from .files import ImageDataset
from .readers import DataError

MAD_TO_SD = 1.4826  # MAD of a normal distribution times this is its standard deviation


@dataclass
class AlignmentReport:
    """Per-image correlations with the template and the resulting flags.

    Arrays have one entry per input image (NaN correlations for images that failed to load,
    whose messages are in ``errors``). ``template`` is ``(C, *S)`` float32: the dataset mean
    (with every image) or the given template. ``previews`` holds 2D views (middle slice of
    3D volumes along the first axis) of the worst images, by index, for plotting.
    """

    paths: list[str]
    correlation: np.ndarray
    mirror_correlation: np.ndarray
    low: np.ndarray
    flipped: np.ndarray
    errors: dict[int, str]
    template: np.ndarray
    low_cut: float
    flip_cut: float
    params: dict[str, Any] = field(default_factory=dict)
    previews: dict[int, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def checked(self) -> int:
        """Number of images that were read and compared."""
        return len(self) - len(self.errors)

    @property
    def flagged(self) -> list[int]:
        """Indices of images flagged as misaligned (low correlation or flipped)."""
        return [int(i) for i in np.flatnonzero(self.low | self.flipped)]

    @property
    def fraction_flagged(self) -> float:
        """Flagged images over checked images (images that failed to load are not counted)."""
        return len(self.flagged) / self.checked if self.checked else 0.0

    def reason(self, index: int) -> str:
        """``"low correlation"``, ``"flipped"``, both joined by ``"; "``, the load error, or
        ``""``."""
        if index in self.errors:
            return f"error: {self.errors[index]}"
        reasons = []
        if self.low[index]:
            reasons.append("low correlation")
        if self.flipped[index]:
            reasons.append("flipped")
        return "; ".join(reasons)

    def summary(self) -> dict[str, Any]:
        """Plain numbers for ``results.json``."""
        valid = self.correlation[np.isfinite(self.correlation)]
        return {
            "n_images": len(self),
            "n_checked": self.checked,
            "n_errors": len(self.errors),
            "n_flagged": len(self.flagged),
            "n_low": int(self.low.sum()),
            "n_flipped": int(self.flipped.sum()),
            "fraction_flagged": self.fraction_flagged,
            "median_correlation": float(np.median(valid)) if valid.size else math.nan,
            "low_cut": self.low_cut,
            "flip_cut": self.flip_cut,
            "flagged": self.flagged,
            **self.params,
        }

    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per image: index, path, correlation, mirror_correlation, flagged, reason."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(
                ["index", "path", "correlation", "mirror_correlation", "flagged", "reason"]
            )
            flagged = set(self.flagged)
            for i, name in enumerate(self.paths):
                r, m = self.correlation[i], self.mirror_correlation[i]
                writer.writerow(
                    [
                        i,
                        name,
                        "" if not np.isfinite(r) else f"{r:.6f}",
                        "" if not np.isfinite(m) else f"{m:.6f}",
                        int(i in flagged),
                        self.reason(i),
                    ]
                )
        return path


def _as_array(image: Any) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    return np.asarray(image, dtype=np.float64)


def preview(image: np.ndarray) -> np.ndarray:
    """A 2D view of ``(C, *S)``: grey ``(H, W)`` or RGB ``(H, W, 3)`` scaled to [0, 1]; the
    middle slice along the first spatial axis of a volume."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 4:
        image = image[:, image.shape[1] // 2]
    view = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image.mean(axis=0)
    lo, hi = float(view.min()), float(view.max())
    return (view - lo) / (hi - lo) if hi > lo else np.zeros_like(view)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _robust_cut(values: np.ndarray, k: float, min_spread: float, side: int) -> float:
    """``median + side * k * max(1.4826 * MAD, min_spread)``."""
    median = float(np.median(values))
    spread = max(MAD_TO_SD * float(np.median(np.abs(values - median))), min_spread)
    return median + side * k * spread


class _Source:
    """Uniform access to a dataset, a batch tensor or a sequence of images."""

    def __init__(self, data: Any) -> None:
        if isinstance(data, ImageDataset):
            self.n = len(data)
            self.paths = data.paths
            self._get = lambda i: self._from_dataset(data, i)
            self.lr_axis = data.lr_axis if len(data) else -1
        elif isinstance(data, (torch.Tensor, np.ndarray, Sequence)):
            if isinstance(data, (torch.Tensor, np.ndarray)) and data.ndim not in (4, 5):
                raise DataError(
                    f"images must have shape (N, C, H, W) or (N, C, D, H, W), got {data.shape}"
                )
            self.n = len(data)
            self.paths = [f"#{i}" for i in range(self.n)]
            self._get = lambda i: (_as_array(data[i]), None)
            self.lr_axis = -1
        else:
            raise TypeError(
                "check_alignment needs an ImageDataset, a tensor (N, C, *S) or a sequence of "
                f"(C, *S) images (it reads them twice), got {type(data).__name__}"
            )

    @staticmethod
    def _from_dataset(data: ImageDataset, i: int) -> tuple[np.ndarray | None, str | None]:
        item, error = data.try_get(i)
        return (None, error) if item is None else (_as_array(item["image"]), None)

    def get(self, i: int) -> tuple[np.ndarray | None, str | None]:
        return self._get(i)


def check_alignment(
    data: ImageDataset | torch.Tensor | np.ndarray | Sequence[Any],
    template: torch.Tensor | np.ndarray | None = None,
    *,
    k: float = 3.5,
    threshold: float | None = None,
    flip_margin: float = 0.0,
    min_spread: float = 0.02,
    lr_axis: int | None = None,
    n_previews: int = 8,
    progress: bool = False,
) -> AlignmentReport:
    """Correlate every image with the (leave-one-out) mean image and its mirror; flag outliers.

    Args:
        data: an :class:`~medexplain.data.files.ImageDataset` (images that fail to load are
            recorded in ``report.errors``), a tensor/array ``(N, C, *S)``, or a sequence of
            ``(C, *S)`` images. It is read twice (mean, then correlations) unless
            ``template`` is given.
        template: ``(C, *S)`` or ``(*S)`` reference image (e.g. an atlas); default: the
            dataset mean, leaving each image out of its own template.
        k: robust cut in spreads (3.5, Iglewicz & Hoaglin 1993); ``math.inf`` disables the
            robust rule.
        threshold: optional absolute minimum correlation; images below it are flagged too.
        flip_margin: minimum gain ``mirror - correlation`` for a flip flag.
        min_spread: floor of the robust spread (correlation units).
        lr_axis: spatial axis to mirror; default the dataset's left-right axis (the last
            axis for tensors).
        n_previews: number of worst images kept as 2D previews for the figure
            (:func:`medexplain.report.alignment_plot.plot_alignment`).
        progress: show a progress bar with ETA.
    """
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}")
    if threshold is not None and not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is a correlation in [-1, 1], got {threshold}")
    source = _Source(data)
    if source.n == 0:
        raise DataError("check_alignment got no images")
    reader = _Reader(source)
    fixed = None if template is None else _as_array(template)
    with progress_bar(progress) as bar:
        total, count = (None, 0) if fixed is not None else _mean_pass(reader, bar)
        template_of = _LeaveOneOut(total, count) if fixed is None else _Given(fixed)
        correlation, mirror, previews = _correlation_pass(
            reader, template_of, lr_axis, n_previews, bar
        )
    low, flipped, low_cut, flip_cut = _flags(
        correlation,
        mirror,
        k=k,
        min_spread=min_spread,
        threshold=threshold,
        flip_margin=flip_margin,
    )
    if fixed is not None:
        template_out = np.broadcast_to(fixed, reader.shape or fixed.shape).astype(np.float32)
    else:
        template_out = (total / count).astype(np.float32)
    params = dict(
        k=float(k),
        threshold=threshold,
        flip_margin=float(flip_margin),
        min_spread=float(min_spread),
        template="given" if fixed is not None else "leave-one-out mean",
    )
    return AlignmentReport(
        paths=list(source.paths),
        correlation=correlation,
        mirror_correlation=mirror,
        low=low,
        flipped=flipped,
        errors=reader.errors,
        template=template_out,
        low_cut=float(low_cut),
        flip_cut=float(flip_cut),
        params=params,
        previews=previews,
    )


class _Reader:
    """Reads image ``i`` of a source for each pass; an image that fails to load or holds
    NaN/Inf is recorded in ``errors`` once and left out of every pass. ``shape`` is the
    first image's; every other must match."""

    def __init__(self, source: _Source) -> None:
        self.source = source
        self.errors: dict[int, str] = {}
        self.shape: tuple[int, ...] | None = None

    def read(self, i: int) -> np.ndarray | None:
        if i in self.errors:
            return None
        path = self.source.paths[i]
        image, error = self.source.get(i)
        if image is None:
            self.errors[i] = error or "unreadable"
            return None
        if image.ndim not in (3, 4):
            raise DataError(f"image {path} has shape {image.shape}; expected (C, *S)")
        finite = np.isfinite(image)
        if not finite.all():
            bad = int(image.size - np.count_nonzero(finite))
            self.errors[i] = f"image {path} has {bad} NaN/Inf value(s); left out"
            return None
        if self.shape is None:
            self.shape = image.shape
        elif image.shape != self.shape:
            raise DataError(
                f"image {path} has shape {image.shape} but the first image has "
                f"{self.shape}; resample them to one shape first"
            )
        return image


def _mean_pass(reader: _Reader, bar: Any) -> tuple[np.ndarray, int]:
    """The reading pass: the sum of every readable image and their count."""
    n = reader.source.n
    task = bar.add_task("alignment: mean image", total=n)
    total: np.ndarray | None = None
    count = 0
    for i in range(n):
        image = reader.read(i)
        bar.advance(task)
        if image is None:
            continue
        total = image.copy() if total is None else total + image
        count += 1
    if total is None:
        raise DataError(
            f"none of the {n} images could be read; first error: "
            f"{next(iter(reader.errors.values()))}"
        )
    return total, count


class _LeaveOneOut:
    """The dataset mean without the image itself (the whole sum when only one was read)."""

    def __init__(self, total: np.ndarray, count: int) -> None:
        self.total, self.count = total, count

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self.count > 1:
            return (self.total - image) / (self.count - 1)
        return self.total


class _Given:
    """A given template ``(C, *S)``, or ``(*S)`` broadcast over the channels."""

    def __init__(self, fixed: np.ndarray) -> None:
        self.fixed = fixed

    def __call__(self, image: np.ndarray) -> np.ndarray:
        reference = self.fixed
        if reference.ndim == image.ndim - 1:
            reference = np.broadcast_to(reference[None], image.shape)
        if reference.shape != image.shape:
            raise DataError(f"template has shape {self.fixed.shape}; the images have {image.shape}")
        return reference


def _mirror_axis(image: np.ndarray, source_axis: int, lr_axis: int | None) -> int:
    """The array axis of ``image`` ``(C, *S)`` to mirror: ``lr_axis`` if given, else the
    source's left-right axis."""
    dims = image.ndim - 1
    chosen = source_axis if lr_axis is None else lr_axis
    if not -dims <= chosen < dims:
        raise ValueError(f"lr_axis={chosen} is not a spatial axis of {dims}D images")
    return 1 + chosen % dims


def _correlation_pass(
    reader: _Reader,
    template_of: Callable[[np.ndarray], np.ndarray],
    lr_axis: int | None,
    n_previews: int,
    bar: Any,
) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """The correlation pass: ``(correlation, mirror correlation, previews)``, NaN for the
    images left out; previews of the ``n_previews`` lowest correlations and largest
    mirror gains."""
    n = reader.source.n
    task = bar.add_task("alignment: correlations", total=n)
    correlation = np.full(n, np.nan)
    mirror = np.full(n, np.nan)
    worst = _Worst(n_previews)
    axis = None
    for i in range(n):
        image = reader.read(i)
        bar.advance(task)
        if image is None:
            continue
        reference = template_of(image)
        if axis is None:
            axis = _mirror_axis(image, reader.source.lr_axis, lr_axis)
        correlation[i] = _pearson(image, reference)
        mirror[i] = _pearson(image, np.flip(reference, axis=axis))
        worst.offer(i, image, correlation[i], mirror[i])
    return correlation, mirror, worst.previews()


class _Worst:
    """Previews of the ``n`` images with the lowest correlation and of the ``n`` with the
    largest mirror gain, kept in two bounded heaps while streaming."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.low: list[tuple[float, int, np.ndarray]] = []
        self.flip: list[tuple[float, int, np.ndarray]] = []

    def offer(self, i: int, image: np.ndarray, correlation: float, mirror: float) -> None:
        if self.n <= 0:
            return
        for heap, score in ((self.low, -correlation), (self.flip, mirror - correlation)):
            if len(heap) < self.n:
                heapq.heappush(heap, (score, i, preview(image)))
            elif score > heap[0][0]:
                heapq.heapreplace(heap, (score, i, preview(image)))

    def previews(self) -> dict[int, np.ndarray]:
        return {i: p for _, i, p in self.low + self.flip}


def _flags(
    correlation: np.ndarray,
    mirror: np.ndarray,
    *,
    k: float,
    min_spread: float,
    threshold: float | None,
    flip_margin: float,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The robust cut: ``(low, flipped, low_cut, flip_cut)`` (see the module docstring);
    NaN correlations are never flagged."""
    valid = np.isfinite(correlation)
    gain = mirror - correlation
    low_cut = _robust_cut(correlation[valid], k, min_spread, -1) if valid.any() else math.nan
    flip_cut = _robust_cut(gain[valid], k, min_spread, +1) if valid.any() else math.nan
    if threshold is not None:
        low_cut = max(low_cut, float(threshold))
    with np.errstate(invalid="ignore"):
        low = valid & (correlation < low_cut)
        flipped = valid & (gain > flip_margin) & (gain > flip_cut)
    return low, flipped, low_cut, flip_cut
