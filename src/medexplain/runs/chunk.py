"""One chunk of a run: the maps and facts of a few explained images, with checksums.

A chunk's ``.npz`` holds, for the images it explained: ``key (n,)``, ``index (n,)``
(manifest row when explained), ``maps (n, 1, *S) float32``, ``label (n,)`` or ``(n, K)``,
``pred`` (same), ``target (n,)``, ``logits (n, K)``, ``affine (n, 4, 4)`` (NaN when the file
has none), ``path``, the images' running ``image_sum (C, *S) float64`` and ``image_count``,
the images that failed (``err_index``, ``err_path``, ``err_reason``, ``err_key``) and
``digests``: a SHA-256 of every other array, checked when the chunk is read, so a damaged
chunk is named instead of being half read.

A method may store more per-image arrays beside the map (:attr:`Chunk.extra`, first axis
``n``; none by default, so other methods' chunks keep this layout). XNN stores
``xnn_feature_maps (n, k, 1, *S)``, ``xnn_contributions (n, k)`` and ``xnn_x_features (n, k)``
(:mod:`medexplain.runs.xnn_run`). Arrays whose name ends in ``maps`` are maps: a chunk read
without maps skips them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Chunk", "array_digest"]

_FIELDS = frozenset(
    {"index", "key", "maps", "label", "pred", "target", "logits", "affine", "path", "digests"}
    | {"image_count", "image_sum", "err_index", "err_path", "err_reason", "err_key"}
)


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()


@dataclass
class Chunk:
    """The explained images of one chunk (see the module docstring for the fields).

    ``errors`` holds ``(index, path, reason, key)`` of the images that failed; ``extra``
    a method's further per-image arrays by name (first axis ``n``, module docstring).
    """

    number: int
    index: np.ndarray
    maps: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    target: np.ndarray
    logits: np.ndarray
    affine: np.ndarray
    path: np.ndarray
    key: np.ndarray | None = None
    image_sum: np.ndarray | None = None
    image_count: int = 0
    errors: list[tuple[int, str, str, str]] = field(default_factory=list)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.key is None:  # stores written without keys: the path is the key
            self.key = np.asarray(self.path, dtype=np.str_)
        self.errors = [
            (int(e[0]), str(e[1]), str(e[2]), str(e[3]) if len(e) > 3 else str(e[1]))
            for e in self.errors
        ]

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def finished(self) -> set[str]:
        """Keys this chunk settled: explained or recorded as an error."""
        return {str(k) for k in self.key} | {e[3] for e in self.errors}

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "index": np.asarray(self.index, dtype=np.int64),
            "key": np.asarray(self.key, dtype=np.str_),
            "maps": np.asarray(self.maps, dtype=np.float32),
            "label": np.asarray(self.label),
            "pred": np.asarray(self.pred),
            "target": np.asarray(self.target, dtype=np.int64),
            "logits": np.asarray(self.logits, dtype=np.float32),
            "affine": np.asarray(self.affine, dtype=np.float64),
            "path": np.asarray(self.path, dtype=np.str_),
            "image_count": np.asarray(self.image_count, dtype=np.int64),
            "err_index": np.asarray([e[0] for e in self.errors], dtype=np.int64),
            "err_path": np.asarray([e[1] for e in self.errors], dtype=np.str_),
            "err_reason": np.asarray([e[2] for e in self.errors], dtype=np.str_),
            "err_key": np.asarray([e[3] for e in self.errors], dtype=np.str_),
        }
        if self.image_sum is not None:
            arrays["image_sum"] = np.asarray(self.image_sum, dtype=np.float64)
        if set(self.extra) & _FIELDS:
            raise ValueError(f"extra arrays {sorted(set(self.extra) & _FIELDS)} shadow fields")
        arrays.update({name: np.asarray(array) for name, array in self.extra.items()})
        digests = {name: array_digest(array) for name, array in arrays.items()}
        arrays["digests"] = np.asarray(json.dumps(digests, sort_keys=True))
        return arrays

    @classmethod
    def from_arrays(cls, number: int, data: Mapping[str, np.ndarray]) -> Chunk:
        keys = data.get("err_key")
        errors = [
            (int(i), str(p), str(r), str(keys[j]) if keys is not None else str(p))
            for j, (i, p, r) in enumerate(
                zip(data["err_index"], data["err_path"], data["err_reason"])
            )
        ]
        return cls(
            number=number,
            index=data["index"],
            maps=data["maps"],
            label=data["label"],
            pred=data["pred"],
            target=data["target"],
            logits=data["logits"],
            affine=data["affine"],
            path=data["path"],
            key=data.get("key"),
            image_sum=data.get("image_sum"),
            image_count=int(data["image_count"]),
            errors=errors,
            extra={name: data[name] for name in data if name not in _FIELDS},
        )

    def subset(self, rows: Sequence[int], index: Sequence[int]) -> Chunk:
        """The chunk restricted to ``rows``, renumbered with manifest rows ``index``. The
        image sum is kept only when every row is kept (it cannot be split)."""
        rows = np.asarray(rows, dtype=np.int64)
        whole = len(rows) == len(self) and bool((rows == np.arange(len(self))).all())
        return Chunk(
            number=self.number,
            index=np.asarray(index, dtype=np.int64),
            maps=self.maps[rows] if self.maps.ndim > 1 else self.maps,
            label=self.label[rows],
            pred=self.pred[rows],
            target=self.target[rows],
            logits=self.logits[rows],
            affine=self.affine[rows],
            path=self.path[rows],
            key=np.asarray(self.key)[rows],
            image_sum=self.image_sum if whole else None,
            image_count=self.image_count if whole else 0,
            extra={name: array[rows] for name, array in self.extra.items()},
        )


def selected_rows(
    chunk: Chunk, selection: dict[str, int], seen: set[str]
) -> tuple[list[int], list[int], list[tuple[int, str, str, str]]]:
    """The rows of ``chunk`` whose keys are selected and not in ``seen`` (adding them), their
    manifest rows, and its errors of selected unseen keys re-indexed to the manifest."""
    rows, index = [], []
    for j, key in enumerate(chunk.key.tolist()):
        if key in selection and key not in seen:
            seen.add(key)
            rows.append(j)
            index.append(selection[key])
    errors = []
    for _row, path, reason, key in chunk.errors:
        if key in selection and key not in seen:
            seen.add(key)
            errors.append((selection[key], path, reason, key))
    return rows, index, errors
