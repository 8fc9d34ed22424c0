"""The streaming, mergeable accumulator of label-wise global maps (a monoid: ``update``,
``merge``, ``result``), with its ``state_dict`` for resuming and sharding."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .contrast import ContrastResult
from .groups import KINDS, OVERALL, GroupKey, binary_matrix, memberships
from .groups import possible_keys as _possible_keys
from .moments import GroupMap, Moments
from .normalise import check_options, normalise_maps
from .result import STATE_VERSION, GlobalResult

_STATE_FORMAT = "medexplain.GlobalMaps"


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
        check_options(normalise, transform)
        self.normalise = normalise
        self.transform = transform
        self.multilabel = bool(multilabel)
        kinds = tuple(kinds)
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"kinds must be a subset of {KINDS}, got unknown {sorted(unknown)}")
        self.kinds = tuple(k for k in KINDS if k in kinds)
        self._moments: dict[GroupKey, Moments] = {}

    # ---------------------------------------------------------------- bookkeeping

    def possible_keys(self) -> list[GroupKey]:
        """Every group key this accumulator can fill, in a stable order."""
        return _possible_keys(self.class_names, self.kinds)

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
            None if labels is None else binary_matrix(labels, "labels", batch, k, self.multilabel)
        )
        pred = None if preds is None else binary_matrix(preds, "preds", batch, k, self.multilabel)
        members = memberships(truth, pred, self.class_names, self.kinds, batch)
        for key, selected in members.items():
            if not bool(selected.any()):
                continue
            everyone = bool(selected.all())
            # boolean indexing copies, so that copy may be overwritten; x itself may not
            moments = Moments.of(x if everyone else x[selected], owned=not everyone)
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
            "version": STATE_VERSION,
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
        if state.get("version") != STATE_VERSION:
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
            acc._moments[tuple(entry["key"])] = Moments(int(entry["count"]), mean, m2)
        return acc

    def __repr__(self) -> str:
        return (
            f"GlobalMaps(spatial_shape={self.spatial_shape}, class_names={list(self.class_names)}, "
            f"normalise={self.normalise!r}, transform={self.transform!r}, "
            f"multilabel={self.multilabel}, images={self.count})"
        )
