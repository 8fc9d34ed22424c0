"""The global maps of every group, their contrasts, and their ``.npy`` + JSON files."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .contrast import ContrastResult, welch_contrast
from .groups import OVERALL, GroupKey
from .moments import GroupMap

# Version of the saved index and of the accumulator's state_dict.
STATE_VERSION = 1


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
            "version": STATE_VERSION,
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
