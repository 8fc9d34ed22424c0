"""Deletion and insertion figure: the mean curves of a run's images (Petsiuk et al. 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot_deletion_curves(
    fractions: Sequence[float],
    deletion: Sequence[float],
    insertion: Sequence[float],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Draw the mean deletion and insertion curves (class score against the fraction of
    pixels changed, ``(n_steps + 1,)`` each) with their areas in the legend.

    Writes a PNG from a bare :class:`matplotlib.figure.Figure` (no pyplot state, no backend
    chosen); returns the path.
    """
    import numpy as np
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = np.asarray(fractions, dtype=float)
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, curve, colour in (("deletion", deletion, "C3"), ("insertion", insertion, "C0")):
        values = np.asarray(curve, dtype=float)
        area = float(np.trapezoid(values, f))
        ax.plot(f, values, color=colour, lw=2, label=f"{name} (area {area:.3f})")
    ax.set_xlabel("fraction of pixels changed (most important first)")
    ax.set_ylabel("class score")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="best")
    if title:
        ax.set_title(title)
    fig.savefig(path, dpi=100)
    return path
