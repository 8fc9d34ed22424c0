"""Batching the items of an :class:`~medexplain.data.files.ImageDataset`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .readers import DataError

__all__ = ["collate"]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of an :class:`ImageDataset` (use as a DataLoader ``collate_fn``).

    Returns ``{"image": (B, C, *S), "label": (B,) or (B, K), "index": (B,) long,
    "path": [str], "affine": [array or None]}``, plus ``"mask": (B, 1, *S) bool`` and
    ``"has_mask": (B,) bool`` when any item has a mask (all-False masks fill the others).
    """
    items = list(items)
    if not items:
        raise ValueError("collate needs at least one item")
    shapes = {tuple(item["image"].shape) for item in items}
    if len(shapes) > 1:
        raise DataError(
            f"cannot batch images of different shapes {sorted(shapes)}; give the dataset a "
            "shape=(...)"
        )
    batch: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items]),
        "label": torch.stack([item["label"] for item in items]),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        "path": [item["path"] for item in items],
        "affine": [item.get("affine") for item in items],
    }
    if any("mask" in item for item in items):
        spatial = items[0]["image"].shape[1:]
        empty = torch.zeros((1, *spatial), dtype=torch.bool)
        batch["mask"] = torch.stack([item.get("mask", empty) for item in items])
        batch["has_mask"] = torch.tensor(["mask" in item for item in items], dtype=torch.bool)
    return batch
