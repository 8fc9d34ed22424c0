"""Label-wise global maps for aligned images (Engelmann et al., METHODS.md section 1).

For an aligned modality every pixel position means the same place on the imaged object, so
the mean of image-wise maps over a group of images is a *global map*: where the model looks
for that group. :class:`GlobalMaps` is a streaming, mergeable accumulator (a monoid:
``update``, ``merge``, ``result``) of per-group running moments:

- each image-wise map ``E_i`` ``(1, *S)`` is first moved to the CPU in float64, then
  transformed (``signed`` keeps it, ``abs`` takes ``|E|``, ``positive`` keeps ``max(E, 0)``)
  and *then* normalised per image (``none``; ``max``: divide by ``max |E|``, the authors'
  "max1"; ``mass``: divide by ``sum |E|``, "mass1"). An all-zero map stays zero.
- groups: the true label (``("label", name)``), the predicted label
  (``("prediction", name)``), the outcome per label (``("outcome", name, "TP"|"FP"|"FN"|"TN")``,
  one-vs-rest for multi-class) and all images (``("overall",)``). The paper does not fix
  the grouping, so all are offered. Multi-label data has ``(B, K)`` 0/1 labels and
  predictions; an image then belongs to every label group it is positive for.
- per group only ``count``, ``mean`` and ``M2`` (sum of squared deviations) are kept, in
  float64 on the CPU, updated and merged with the parallel algorithm of Chan, Golub and
  LeVeque (1979). Memory is bounded by the number of groups times the map size, never by
  the number of images, and sharded runs merged in any order equal one pass up to rounding
  (~1e-15 relative).

A per-pixel Welch t contrast between two groups (with two-sided p-values and
Benjamini-Hochberg q-values) gives the voxel-wise group comparison that voxel-based
morphometry users expect.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

NORMALISATIONS = ("max", "mass", "none")
TRANSFORMS = ("signed", "abs", "positive")
KINDS = ("label", "prediction", "outcome")
OUTCOMES = ("TP", "FP", "FN", "TN")
OVERALL: tuple[str, ...] = ("overall",)
_STATE_FORMAT = "medexplain.GlobalMaps"
_STATE_VERSION = 1
# Relative size below which a contrast treats a pixel's variance / mean difference as zero:
# float64 means of identical values can differ from them in the last bit.
_ZERO_TOL = 1e-12

GroupKey = tuple[str, ...]


# --------------------------------------------------------------------------- normalisation


def normalise_maps(
    maps: torch.Tensor, normalise: str = "max", transform: str = "signed"
) -> torch.Tensor:
    """Per-image value transform followed by per-image normalisation of ``(B, 1, *S)`` maps.

    Order: the transform (``signed``/``abs``/``positive``) first, then the normalisation
    (``none``; ``max``: divide by the image's max ``|value|``; ``mass``: divide by its sum of
    ``|value|``), so that ``positive`` + ``mass`` yields maps that sum to one. Computed in
    the input's dtype and device; an all-zero map (after the transform) stays all zero.
    """
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if transform == "abs":
        maps = maps.abs()
    elif transform == "positive":
        maps = maps.clamp_min(0)
    if normalise == "none":
        return maps
    flat = maps.flatten(1).abs()
    scale = flat.amax(dim=1) if normalise == "max" else flat.sum(dim=1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return maps / scale.view(-1, *([1] * (maps.dim() - 1)))


# --------------------------------------------------------------------------- moments


@dataclass
class _Moments:
    """count, mean and M2 = sum of squared deviations, float64 ``(1, *S)`` on the CPU."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor

    @staticmethod
    def of(x: torch.Tensor, owned: bool = False) -> _Moments:
        """Moments of a batch ``(n, 1, *S)`` (two passes within the batch). ``owned``: ``x``
        is a scratch copy that may be overwritten."""
        mean = x.mean(dim=0)
        if x.shape[0] == 1:
            return _Moments(1, mean, torch.zeros_like(mean))
        deviations = x.sub_(mean) if owned else x - mean
        return _Moments(int(x.shape[0]), mean, deviations.pow_(2).sum(dim=0))

    def clone(self) -> _Moments:
        return _Moments(self.count, self.mean.clone(), self.m2.clone())

    def merge_(self, other: _Moments) -> _Moments:
        """Chan et al. (1979) pairwise combination, in place; exact up to rounding and
        independent of the order of combination."""
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean.add_(delta, alpha=other.count / n)
        self.m2.add_(other.m2).addcmul_(delta, delta, value=self.count * other.count / n)
        self.count = n
        return self


@dataclass(frozen=True)
class GroupMap:
    """A group's global map: ``count`` images, per-pixel ``mean`` and sample ``std``.

    ``mean`` and ``std`` are float64 ``(1, *S)`` CPU tensors; ``mean`` can be passed as the
    ``ranking_map`` of :func:`medexplain.metrics.peppr.peppr`. ``std`` uses ``ddof=1`` (the
    estimate the Welch test needs) and is zero for a group of one image.
    """

    count: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def var(self) -> torch.Tensor:
        return self.std**2

    @staticmethod
    def from_moments(moments: _Moments) -> GroupMap:
        if moments.count > 1:
            var = (moments.m2 / (moments.count - 1)).clamp_min(0)
        else:
            var = torch.zeros_like(moments.m2)
        return GroupMap(moments.count, moments.mean.clone(), var.sqrt())


# --------------------------------------------------------------------------- statistics


def benjamini_hochberg(p: torch.Tensor) -> torch.Tensor:
    """Benjamini-Hochberg adjusted p-values (q-values) of any-shaped ``p``, float64.

    ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the ``m`` p-values sorted ascending
    (Benjamini & Hochberg 1995); same values as
    ``scipy.stats.false_discovery_control(p, method="bh")``.
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    flat = p.flatten()
    if flat.numel() == 0:
        return p.clone()
    if torch.isnan(flat).any() or (flat < 0).any() or (flat > 1).any():
        raise ValueError("p must hold p-values in [0, 1] without NaN")
    m = flat.numel()
    order = torch.argsort(flat, stable=True)
    ranks = torch.arange(1, m + 1, dtype=torch.float64, device=flat.device)
    scaled = flat[order] * m / ranks
    q_sorted = torch.flip(torch.cummin(torch.flip(scaled, [0]), dim=0).values, [0]).clamp_max(1.0)
    q = torch.empty_like(flat)
    q[order] = q_sorted
    return q.view(p.shape)


@dataclass(frozen=True)
class ContrastResult:
    """Per-pixel Welch t-test of group ``a`` against group ``b``; float64 ``(1, *S)`` maps.

    ``t > 0`` where group a's mean map is higher. ``p`` is two-sided, ``q`` the
    Benjamini-Hochberg adjusted p-value over the pixels tested (inside ``mask``).
    """

    t: torch.Tensor
    df: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    group_a: GroupKey
    group_b: GroupKey
    count_a: int
    count_b: int

    def significant(self, alpha: float = 0.05) -> torch.Tensor:
        """Boolean ``(1, *S)`` map of pixels with FDR-adjusted ``q < alpha``."""
        return self.q < alpha

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"t", "df", "p", "q"}`` as numpy arrays of shape ``S`` (channel dim dropped)."""
        return {name: getattr(self, name)[0].numpy() for name in ("t", "df", "p", "q")}


def welch_contrast(
    a: GroupMap,
    b: GroupMap,
    mask: torch.Tensor | None = None,
    *,
    keys: tuple[GroupKey, GroupKey] = ((), ()),
) -> ContrastResult:
    """Welch's unequal-variance t-test per pixel between two :class:`GroupMap` s.

    ``t = (mean_a - mean_b) / sqrt(var_a/n_a + var_b/n_b)`` with Welch-Satterthwaite degrees
    of freedom; equals ``scipy.stats.ttest_ind(equal_var=False)`` on the raw maps. Pixels
    whose variance is zero in both groups (e.g. an always-zero background) get ``t = 0``,
    ``p = 1`` when the means agree, ``t = +-inf``, ``p = 0`` when they differ (perfect
    separation), and ``df = n_a + n_b - 2``; never NaN. ``mask`` (bool, broadcastable to
    ``(1, *S)``) restricts the test: pixels outside get ``t = 0``, ``p = q = 1`` and do not
    count in the FDR correction. Each group needs at least two images.
    """
    if a.count < 2 or b.count < 2:
        raise ValueError(
            f"a contrast needs at least 2 images per group; got {a.count} and {b.count}"
        )
    if a.mean.shape != b.mean.shape:
        raise ValueError(
            f"group maps differ in shape: {tuple(a.mean.shape)} vs {tuple(b.mean.shape)}"
        )
    na, nb = float(a.count), float(b.count)
    sa, sb = a.var / na, b.var / nb
    se2 = sa + sb
    diff = a.mean - b.mean
    scale = torch.maximum(a.mean.abs(), b.mean.abs())
    zero_var = se2.sqrt() <= _ZERO_TOL * scale
    zero_diff = diff.abs() <= _ZERO_TOL * scale
    safe_se = torch.where(zero_var, torch.ones_like(se2), se2.sqrt())
    t = torch.where(
        zero_var,
        torch.where(zero_diff, torch.zeros_like(diff), torch.sign(diff) * float("inf")),
        diff / safe_se,
    )
    denom = sa**2 / (na - 1) + sb**2 / (nb - 1)
    df = torch.where(
        zero_var,
        torch.full_like(se2, na + nb - 2),
        se2**2 / torch.where(zero_var, torch.ones_like(denom), denom),
    )
    if mask is None:
        inside = torch.ones_like(t, dtype=torch.bool)
    else:
        inside = torch.as_tensor(mask).to(torch.bool).expand_as(t)
    t = torch.where(inside, t, torch.zeros_like(t))
    p = torch.from_numpy(2.0 * stats.t.sf(np.abs(t.numpy()), df.numpy())).to(torch.float64)
    p = torch.where(inside, p.clamp(0.0, 1.0), torch.ones_like(p))
    q = torch.ones_like(p)
    if inside.any():
        q[inside] = benjamini_hochberg(p[inside])
    return ContrastResult(t, df, p, q, keys[0], keys[1], a.count, b.count)


# --------------------------------------------------------------------------- result


def _safe_name(key: GroupKey) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in key)


@dataclass
class GlobalResult:
    """Global maps of every non-empty group.

    ``groups`` maps keys such as ``("label", "lesion")``, ``("prediction", "lesion")``,
    ``("outcome", "lesion", "TP")`` and ``("overall",)`` to :class:`GroupMap`; groups that
    received no image are absent from ``groups`` but listed with count 0 in ``counts``.
    """

    groups: dict[GroupKey, GroupMap]
    counts: dict[GroupKey, int]
    spatial_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def overall(self) -> GroupMap:
        """Mean map over all images."""
        return self.group(OVERALL)

    def group(self, key: GroupKey | Sequence[str]) -> GroupMap:
        key = tuple(key)
        if key not in self.groups:
            if key in self.counts:
                raise KeyError(f"group {key} received no image")
            raise KeyError(f"unknown group {key}; known: {sorted(self.counts)}")
        return self.groups[key]

    def contrast(
        self,
        group_a: GroupKey | Sequence[str],
        group_b: GroupKey | Sequence[str],
        mask: torch.Tensor | None = None,
    ) -> ContrastResult:
        """Per-pixel Welch t contrast ``group_a - group_b`` (see :func:`welch_contrast`)."""
        a, b = self.group(group_a), self.group(group_b)
        return welch_contrast(a, b, mask, keys=(tuple(group_a), tuple(group_b)))

    def _file_names(self) -> dict[GroupKey, str]:
        names: dict[GroupKey, str] = {}
        used: set[str] = set()
        for key in self.groups:
            base = _safe_name(key)
            name, i = base, 1
            while name in used:
                i += 1
                name = f"{base}_{i}"
            used.add(name)
            names[key] = name
        return names

    def to_arrays(self) -> dict[str, np.ndarray]:
        """``{"<kind>__<label>[__<outcome>]_mean"|"..._std": array of shape S}`` (float64)."""
        arrays = {}
        for key, name in self._file_names().items():
            group = self.groups[key]
            arrays[f"{name}_mean"] = group.mean[0].numpy()
            arrays[f"{name}_std"] = group.std[0].numpy()
        return arrays

    def save(self, directory: str | Path) -> Path:
        """Write every group's mean/std as ``.npy`` (shape S) and ``index.json``; returns it.

        The index lists each group's key, count and files, the empty groups, the spatial
        shape, the class names and the aggregation settings.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for key, name in self._file_names().items():
            group = self.groups[key]
            files = {}
            for stat in ("mean", "std"):
                file = f"{name}_{stat}.npy"
                np.save(directory / file, getattr(group, stat)[0].numpy())
                files[stat] = file
            entries.append({"key": list(key), "count": group.count, **files})
        index = {
            "format": "medexplain.GlobalResult",
            "version": _STATE_VERSION,
            "spatial_shape": list(self.spatial_shape),
            "class_names": list(self.class_names),
            "settings": self.settings,
            "groups": entries,
            "empty_groups": [list(k) for k, n in self.counts.items() if n == 0],
        }
        path = directory / "index.json"
        path.write_text(json.dumps(index, indent=2))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> GlobalResult:
        """Read a result written by :meth:`save`."""
        directory = Path(directory)
        index = json.loads((directory / "index.json").read_text())
        groups: dict[GroupKey, GroupMap] = {}
        counts: dict[GroupKey, int] = {}
        for entry in index["groups"]:
            key = tuple(entry["key"])
            mean = torch.from_numpy(np.load(directory / entry["mean"])).unsqueeze(0)
            std = torch.from_numpy(np.load(directory / entry["std"])).unsqueeze(0)
            groups[key] = GroupMap(int(entry["count"]), mean, std)
            counts[key] = int(entry["count"])
        for key in index["empty_groups"]:
            counts[tuple(key)] = 0
        return cls(
            groups,
            counts,
            tuple(index["spatial_shape"]),
            tuple(index["class_names"]),
            dict(index.get("settings", {})),
        )


# --------------------------------------------------------------------------- accumulator


def _binary_matrix(
    values: torch.Tensor | Sequence, name: str, batch: int, num_classes: int, multilabel: bool
) -> torch.Tensor:
    """Labels or predictions as a bool ``(B, K)`` membership matrix."""
    tensor = torch.as_tensor(values).cpu()
    if multilabel:
        if tensor.shape != (batch, num_classes):
            raise ValueError(
                f"{name} must be (B, K) = ({batch}, {num_classes}) 0/1 values for multi-label "
                f"data; got {tuple(tensor.shape)}"
            )
        if not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError(f"{name} must hold only 0/1 values for multi-label data")
        return tensor == 1
    if tensor.dim() == 0:
        tensor = tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(
            f"{name} must be (B,) = ({batch},) class indices for multi-class data "
            f"(use multilabel=True for (B, K) 0/1 labels); got {tuple(tensor.shape)}"
        )
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {tensor.dtype}")
    if batch and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        raise ValueError(f"{name} holds a class index outside [0, {num_classes})")
    return torch.nn.functional.one_hot(tensor.long(), num_classes).bool()


class GlobalMaps:
    """Streaming, mergeable accumulator of label-wise global maps.

    >>> acc = GlobalMaps((64, 64), ["healthy", "lesion"], normalise="max", transform="abs")
    >>> for x, y in loader:
    ...     maps = explainer(x, target=preds)
    ...     acc.update(maps, labels=y, preds=preds)
    >>> result = acc.result()
    >>> result.groups[("label", "lesion")].mean        # (1, 64, 64) float64

    Args:
        spatial_shape: ``(H, W)`` or ``(D, H, W)`` of the maps.
        class_names: one name per label (K names).
        normalise: per-image normalisation ``"max"`` (default, the authors' "max1"),
            ``"mass"`` or ``"none"``, applied after ``transform`` (:func:`normalise_maps`).
        transform: ``"signed"`` (default; keep signed methods' sign), ``"abs"`` or
            ``"positive"``.
        multilabel: labels and predictions are ``(B, K)`` 0/1 instead of ``(B,)`` indices.
        kinds: which groupings to accumulate, a subset of ``("label", "prediction",
            "outcome")``; the overall map is always kept. Fewer kinds use less memory.

    All statistics live on the CPU in float64 whatever the maps' device (a GPU run moves
    each batch of maps once); memory is ``(number of non-empty groups) x 2 x prod(S)``
    float64 values.
    """

    def __init__(
        self,
        spatial_shape: Sequence[int],
        class_names: Sequence[str],
        normalise: str = "max",
        transform: str = "signed",
        multilabel: bool = False,
        kinds: Iterable[str] = KINDS,
    ) -> None:
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        if len(self.spatial_shape) not in (2, 3) or min(self.spatial_shape) < 1:
            raise ValueError(
                f"spatial_shape must be (H, W) or (D, H, W) with positive sizes, got "
                f"{tuple(spatial_shape)}"
            )
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of names, not one string")
        self.class_names = tuple(str(c) for c in class_names)
        if not self.class_names:
            raise ValueError("class_names must name at least one label")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must be unique, got {self.class_names}")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
        self.normalise = normalise
        self.transform = transform
        self.multilabel = bool(multilabel)
        kinds = tuple(kinds)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"kinds must be a subset of {KINDS}, got unknown {sorted(unknown)}")
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self._moments: dict[GroupKey, _Moments] = {}

    # ---------------------------------------------------------------- bookkeeping

    def possible_keys(self) -> list[GroupKey]:
        """Every group key this accumulator can fill, in a stable order."""
        keys: list[GroupKey] = [OVERALL]
        for kind in ("label", "prediction"):
            if kind in self.kinds:
                keys += [(kind, name) for name in self.class_names]
        if "outcome" in self.kinds:
            keys += [("outcome", name, o) for name in self.class_names for o in OUTCOMES]
        return keys

    @property
    def count(self) -> int:
        """Number of images seen."""
        overall = self._moments.get(OVERALL)
        return 0 if overall is None else overall.count

    def __len__(self) -> int:
        return self.count

    def _settings(self) -> dict[str, Any]:
        return {
            "normalise": self.normalise,
            "transform": self.transform,
            "multilabel": self.multilabel,
            "kinds": list(self.kinds),
        }

    def _check_compatible(self, other: GlobalMaps) -> None:
        if not isinstance(other, GlobalMaps):
            raise TypeError(f"can only merge another GlobalMaps, got {type(other).__name__}")
        mine = (self.spatial_shape, self.class_names, self._settings())
        theirs = (other.spatial_shape, other.class_names, other._settings())
        if mine != theirs:
            raise ValueError(
                f"cannot merge accumulators with different settings: {mine} vs {theirs}"
            )

    # ---------------------------------------------------------------- monoid

    def update(
        self,
        maps: torch.Tensor,
        labels: torch.Tensor | Sequence | None = None,
        preds: torch.Tensor | Sequence | None = None,
    ) -> GlobalMaps:
        """Add a batch of maps ``(B, 1, *S)`` with their labels and predictions; returns self.

        labels / preds: ``(B,)`` class indices, or ``(B, K)`` 0/1 when ``multilabel``.
        Either may be None (e.g. unlabeled data): the groupings that need it are skipped
        for this batch. Outcome groups need both.
        """
        if not isinstance(maps, torch.Tensor):
            raise TypeError(f"maps must be a torch.Tensor (B, 1, *S), got {type(maps).__name__}")
        expected = (1, *self.spatial_shape)
        if maps.dim() != len(expected) + 1 or tuple(maps.shape[1:]) != expected:
            raise ValueError(
                f"maps must have shape (B, 1, {', '.join(map(str, self.spatial_shape))}); "
                f"got {tuple(maps.shape)}"
            )
        batch = maps.shape[0]
        if batch == 0:
            return self
        x = normalise_maps(maps.detach().to("cpu", torch.float64), self.normalise, self.transform)
        if not torch.isfinite(x).all():
            raise ValueError("maps contain NaN or infinite values")
        k = len(self.class_names)
        truth = (
            None if labels is None else _binary_matrix(labels, "labels", batch, k, self.multilabel)
        )
        pred = None if preds is None else _binary_matrix(preds, "preds", batch, k, self.multilabel)
        members: dict[GroupKey, torch.Tensor] = {OVERALL: torch.ones(batch, dtype=torch.bool)}
        for j, name in enumerate(self.class_names):
            if "label" in self.kinds and truth is not None:
                members[("label", name)] = truth[:, j]
            if "prediction" in self.kinds and pred is not None:
                members[("prediction", name)] = pred[:, j]
            if "outcome" in self.kinds and truth is not None and pred is not None:
                t, p = truth[:, j], pred[:, j]
                members[("outcome", name, "TP")] = t & p
                members[("outcome", name, "FP")] = ~t & p
                members[("outcome", name, "FN")] = t & ~p
                members[("outcome", name, "TN")] = ~t & ~p
        for key, selected in members.items():
            if not bool(selected.any()):
                continue
            everyone = bool(selected.all())
            # boolean indexing copies, so that copy may be overwritten; x itself may not
            moments = _Moments.of(x if everyone else x[selected], owned=not everyone)
            current = self._moments.get(key)
            if current is None:
                self._moments[key] = moments
            else:
                current.merge_(moments)
        return self

    def merge(self, other: GlobalMaps) -> GlobalMaps:
        """A NEW accumulator holding both ``self`` and ``other``; neither is modified.

        The combination is exact (up to float64 rounding) and order-free, so shards of a run
        can be merged in any order.
        """
        self._check_compatible(other)
        merged = GlobalMaps(
            self.spatial_shape,
            self.class_names,
            self.normalise,
            self.transform,
            self.multilabel,
            self.kinds,
        )
        for key in set(self._moments) | set(other._moments):
            a, b = self._moments.get(key), other._moments.get(key)
            if a is None or b is None:
                merged._moments[key] = (a if b is None else b).clone()
            else:
                merged._moments[key] = a.clone().merge_(b)
        return merged

    def __add__(self, other: GlobalMaps) -> GlobalMaps:
        return self.merge(other)

    def result(self) -> GlobalResult:
        """The current global maps (copies; the accumulator can keep updating)."""
        if OVERALL not in self._moments:
            raise ValueError("no maps were added: call update() before result()")
        order = self.possible_keys()
        groups = {
            key: GroupMap.from_moments(self._moments[key]) for key in order if key in self._moments
        }
        counts = {key: (self._moments[key].count if key in self._moments else 0) for key in order}
        return GlobalResult(groups, counts, self.spatial_shape, self.class_names, self._settings())

    def contrast(
        self,
        group_a: GroupKey | Sequence[str],
        group_b: GroupKey | Sequence[str],
        mask: torch.Tensor | None = None,
    ) -> ContrastResult:
        """Per-pixel Welch t contrast ``group_a - group_b`` with p and BH q-values."""
        return self.result().contrast(group_a, group_b, mask)

    # ---------------------------------------------------------------- persistence

    def state_dict(self) -> dict[str, Any]:
        """Plain types and CPU tensors only (``torch.save`` / ``torch.load(weights_only=True)``)."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "spatial_shape": list(self.spatial_shape),
            "class_names": list(self.class_names),
            **self._settings(),
            "groups": [
                {"key": list(key), "count": m.count, "mean": m.mean.clone(), "m2": m.m2.clone()}
                for key, m in self._moments.items()
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> GlobalMaps:
        """Rebuild an accumulator saved with :meth:`state_dict`."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError("state is not a GlobalMaps state_dict")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported GlobalMaps state version {state.get('version')!r}")
        acc = cls(
            state["spatial_shape"],
            state["class_names"],
            state["normalise"],
            state["transform"],
            state["multilabel"],
            state["kinds"],
        )
        shape = (1, *acc.spatial_shape)
        for entry in state["groups"]:
            # copies: updates work in place and must not write into the caller's state
            mean = torch.as_tensor(entry["mean"]).to("cpu", torch.float64, copy=True)
            m2 = torch.as_tensor(entry["m2"]).to("cpu", torch.float64, copy=True)
            if tuple(mean.shape) != shape or tuple(m2.shape) != shape:
                raise ValueError(
                    f"group {entry['key']} has maps of shape {tuple(mean.shape)}, expected {shape}"
                )
            acc._moments[tuple(entry["key"])] = _Moments(int(entry["count"]), mean, m2)
        return acc

    def __repr__(self) -> str:
        return (
            f"GlobalMaps(spatial_shape={self.spatial_shape}, class_names={list(self.class_names)}, "
            f"normalise={self.normalise!r}, transform={self.transform!r}, "
            f"multilabel={self.multilabel}, images={self.count})"
        )
