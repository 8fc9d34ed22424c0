"""Figure of an alignment check (:func:`medexplain.data.alignment.check_alignment`).

A bare :class:`matplotlib.figure.Figure` saved with ``savefig``: no pyplot, no backend chosen.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.alignment import AlignmentReport, preview


def plot_alignment(report: AlignmentReport, path: str | os.PathLike, n_worst: int = 6) -> Path:
    """Save a PNG: histogram of correlations with the cut, correlation vs mirror
    correlation (flipped images lie above the diagonal), the template, and the worst
    images (flagged first, then lowest correlation) with their numbers."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    valid = np.isfinite(report.correlation)
    flagged = set(report.flagged)
    order = sorted(
        report.previews,
        key=lambda i: (i not in flagged, report.correlation[i]),
    )[: max(int(n_worst), 0)]
    columns = max(3, len(order))
    figure = Figure(figsize=(2.6 * columns, 5.6), layout="constrained")
    grid = figure.add_gridspec(2, columns)
    ax = figure.add_subplot(grid[0, 0])
    if valid.any():
        ax.hist(report.correlation[valid], bins=min(50, max(5, int(valid.sum()) // 2)), color="0.4")
    if np.isfinite(report.low_cut):
        ax.axvline(report.low_cut, color="tab:red", linestyle="--", label="cut")
        ax.legend(fontsize=7)
    ax.set_xlabel("correlation with template")
    ax.set_ylabel("images")
    ax.set_title(f"{len(flagged)} of {report.checked} flagged", fontsize=9)
    ax = figure.add_subplot(grid[0, 1])
    mask = np.zeros(len(report), dtype=bool)
    mask[list(flagged)] = True
    ax.scatter(
        report.correlation[valid & ~mask],
        report.mirror_correlation[valid & ~mask],
        s=6,
        color="0.4",
        label="ok",
    )
    ax.scatter(
        report.correlation[mask],
        report.mirror_correlation[mask],
        s=12,
        color="tab:red",
        label="flagged",
    )
    if valid.any():
        lo = float(
            np.nanmin([report.correlation[valid].min(), report.mirror_correlation[valid].min()])
        )
        ax.plot([lo, 1], [lo, 1], color="0.7", linewidth=0.8)
    ax.set_xlabel("correlation")
    ax.set_ylabel("mirrored correlation")
    ax.legend(fontsize=7)
    ax = figure.add_subplot(grid[0, 2])
    ax.imshow(preview(report.template), cmap="gray")
    ax.set_title("template (mean image)", fontsize=9)
    ax.axis("off")
    for column, index in enumerate(order):
        ax = figure.add_subplot(grid[1, column])
        ax.imshow(report.previews[index], cmap="gray")
        name = Path(report.paths[index]).name
        reason = report.reason(index) or "ok"
        ax.set_title(
            f"{name}\nr={report.correlation[index]:.2f} "
            f"mirror={report.mirror_correlation[index]:.2f}\n{reason}",
            fontsize=7,
            color="tab:red" if index in flagged else "black",
        )
        ax.axis("off")
    figure.savefig(path, dpi=100)
    return path
