"""Resampling on the ``align_corners=True`` grid of :func:`medexplain.core.spatial.resize`:
masks by nearest neighbour, and the voxel -> world affine of a resampled grid."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["nearest_resize", "resized_affine"]


def nearest_resize(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour resampling of ``(B, C, *spatial)`` on the ``align_corners=True`` grid
    that :func:`medexplain.core.spatial.resize` uses: output index ``j`` reads input index
    ``round(j * (n_in - 1) / (n_out - 1))``. Works for any dtype (bool masks included)."""
    size = tuple(int(s) for s in size)
    out = mask
    for axis, n_out in enumerate(size):
        n_in = out.shape[2 + axis]
        if n_in == n_out:
            continue
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        index = torch.round(torch.arange(n_out, dtype=torch.float64) * scale).long()
        out = out.index_select(2 + axis, index.clamp_(0, n_in - 1).to(out.device))
    return out


def resized_affine(affine: np.ndarray, old: Sequence[int], new: Sequence[int]) -> np.ndarray:
    """The affine of a grid resampled from ``old`` to ``new`` voxels per axis with
    ``align_corners=True``: new index ``j`` sits at old index ``j * (old-1)/(new-1)``, so
    the first and last voxel centres keep their world positions."""
    scale = np.eye(4)
    for axis, (n_old, n_new) in enumerate(zip(old, new)):
        scale[axis, axis] = (n_old - 1) / (n_new - 1) if n_new > 1 else float(n_old)
    return np.asarray(affine, dtype=np.float64) @ scale
