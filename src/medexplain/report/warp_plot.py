"""Figures for warping simulators (METHODS.md section 5, USERS.md study 2).

:func:`plot_warp` draws one row per image: the original, the simulated image, the
displacement magnitude (voxels) and the Jacobian determinant with a diverging colormap
centred at 1 (shrinkage blue < 1 < expansion red). 3D volumes show their middle slice along
the first spatial axis (or ``slice_index``). NIfTI output of 3D maps:
:func:`medexplain.data.writers.save_nifti`.

Figures are bare :class:`matplotlib.figure.Figure` objects (no pyplot, no backend chosen),
so plotting works the same in a script and in a notebook.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..core.jacobian import jacobian_determinant
from ..core.spatial import spatial_dims_of
from ..explain.generative.spatial_transform import check_displacement


def _plane(volume: torch.Tensor, slice_index: int | None) -> np.ndarray:
    """A 2D numpy plane from ``(*spatial)``: the image itself, or a slice of a volume."""
    volume = volume.detach().float().cpu()
    if volume.dim() == 3:
        index = volume.shape[0] // 2 if slice_index is None else int(slice_index)
        if not 0 <= index < volume.shape[0]:
            raise ValueError(f"slice_index must be in [0, {volume.shape[0]}), got {slice_index}")
        volume = volume[index]
    return volume.numpy()


def plot_warp(
    x: torch.Tensor,
    simulated: torch.Tensor,
    displacement: torch.Tensor,
    jacobian: torch.Tensor | None = None,
    *,
    path: str | os.PathLike | None = None,
    slice_index: int | None = None,
    titles: list[str] | None = None,
    max_images: int = 8,
):
    """Draw original / simulated / ``|u|`` / ``J`` for each image of a batch.

    ``x`` and ``simulated`` ``(B, C, *spatial)`` (channel 0 is shown), ``displacement``
    ``(B, d, *spatial)``, ``jacobian`` ``(B, 1, *spatial)`` (computed from the displacement
    when None). The Jacobian uses ``TwoSlopeNorm`` centred at 1, symmetric in log scale
    around it. Saves a PNG when ``path`` is given; returns the matplotlib Figure.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    spatial_dims_of(x, "x")
    check_displacement(x, displacement)
    if simulated.shape != x.shape:
        raise ValueError(
            f"simulated must have the shape of x {tuple(x.shape)}, got {tuple(simulated.shape)}"
        )
    if jacobian is None:
        jacobian = jacobian_determinant(displacement)
    n = min(int(x.shape[0]), int(max_images))
    figure = Figure(figsize=(12, 3 * n))
    axes = figure.subplots(n, 4, squeeze=False)
    columns = ["original", "simulated", "|displacement| (voxels)", "Jacobian determinant"]
    for row in range(n):
        magnitude = displacement[row].detach().float().norm(dim=0)
        det = _plane(jacobian[row, 0], slice_index)
        spread = float(np.nanmax(np.abs(np.log(np.clip(det, 1e-3, None))))) or 0.1
        norm = TwoSlopeNorm(vcenter=1.0, vmin=float(np.exp(-spread)), vmax=float(np.exp(spread)))
        low = min(float(x[row, 0].min()), float(simulated[row, 0].min()))
        high = max(float(x[row, 0].max()), float(simulated[row, 0].max()))
        panels = [
            (_plane(x[row, 0], slice_index), dict(cmap="gray", vmin=low, vmax=high)),
            (_plane(simulated[row, 0], slice_index), dict(cmap="gray", vmin=low, vmax=high)),
            (_plane(magnitude, slice_index), dict(cmap="magma")),
            (det, dict(cmap="RdBu_r", norm=norm)),
        ]
        for col, (image, style) in enumerate(panels):
            ax = axes[row, col]
            shown = ax.imshow(image, **style)
            if col >= 2:
                figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            ax.set_xticks([])
            ax.set_yticks([])
            title = columns[col] if row == 0 else ""
            if col == 0 and titles is not None and row < len(titles):
                title = f"{titles[row]}\n{title}" if title else titles[row]
            ax.set_title(title, fontsize=9)
    figure.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    return figure


def plot_simulation(
    explainer,
    x: torch.Tensor,
    direction: int,
    cls: int,
    *,
    path: str | os.PathLike,
    slice_index: int | None = None,
    titles: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulate ``x`` ``(B, C, *spatial)`` with a fitted warping-simulator explainer
    (``direction`` -1 removes class ``cls``, +1 injects it) and draw it with
    :func:`plot_warp` into ``path``. Returns the simulated images and the Jacobian
    determinant ``(B, 1, *spatial)`` (for NIfTI output of volumes)."""
    simulated, displacement = explainer.simulate(x, direction, cls)
    det = jacobian_determinant(displacement)
    plot_warp(
        x.cpu(),
        simulated.cpu(),
        displacement.cpu(),
        det.cpu(),
        path=path,
        slice_index=slice_index,
        titles=titles,
    )
    return simulated, det
