"""PEPPR figure: erase and restore curves of a
:class:`~medexplain.metrics.peppr_result.PepprResult` against random order."""

from __future__ import annotations

from pathlib import Path

from ..metrics.peppr_result import PepprResult


def plot_peppr(result: PepprResult, path: str | Path, title: str | None = None) -> Path:
    """Draw erase and restore curves (AUC and accuracy) against random order (mean ± std).

    Writes a PNG (or any format matplotlib infers from ``path``) from a bare
    :class:`matplotlib.figure.Figure`: no pyplot state, no backend chosen; returns the path.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(9, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    f = result.fractions
    for row, (metric, curves) in enumerate(
        (("AUC-ROC (macro)", result.auc), ("accuracy", result.accuracy))
    ):
        areas = curves.areas()
        for col, which in enumerate(("erase", "restore")):
            ax = axes[row, col]
            mean = getattr(curves, f"random_{which}_mean")
            std = getattr(curves, f"random_{which}_std")
            ax.plot(
                f,
                getattr(curves, which),
                color="C3",
                lw=2,
                label=f"global map (area {areas[f'{which}_area']:.3f})",
            )
            ax.plot(
                f,
                mean,
                color="0.3",
                lw=1.5,
                ls="--",
                label=f"random (area {areas[f'random_{which}_area']:.3f})",
            )
            ax.fill_between(f, mean - std, mean + std, color="0.6", alpha=0.35, lw=0)
            ax.set_ylabel(metric)
            ax.set_title(f"{'erasing' if which == 'erase' else 'restoring'} top pixels")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            if row == 1:
                ax.set_xlabel("fraction of pixels")
    fig.suptitle(title or f"PEPPR ({result.n_images} images, fill: {result.settings.get('fill')})")
    fig.savefig(path, dpi=110)
    return path
