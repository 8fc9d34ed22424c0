"""Draw a Structured Attention Graph with matplotlib (no graphviz).

One column block per shown root: the root on top (the image with only its patches visible,
the rest the baseline), its children below it level by level, each thumbnail labelled with
``ins / P``; an edge joins a parent to a child and is coloured by the score drop
``ratio(parent) - ratio(child)`` (colour bar on the right). A node reachable from several
roots is drawn under the first of them. 3D volumes are shown as maximum-intensity
projections along the first spatial axis (patch cubes anywhere in depth stay visible).

The figure is a bare :class:`matplotlib.figure.Figure` saved with ``savefig`` (no pyplot, no
backend chosen).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..explain.sag_graph import SAGResult


def _thumbnail(result: SAGResult, patches: tuple[int, ...]) -> np.ndarray:
    """The image with only ``patches`` visible ``(H, W)`` (channel mean; 3D: MIP)."""
    assert result.image is not None
    image = result.image.to(torch.float32)
    baseline = result.baseline if result.baseline is not None else torch.zeros_like(image)
    mask = result.insertion_mask(patches).to(torch.float32)  # soft patches as the model saw them
    visible = baseline + mask * (image - baseline)
    flat = visible.mean(dim=0)
    if flat.dim() == 3:
        flat = flat.max(dim=0).values
    return flat.numpy()


def _layout(result: SAGResult, max_levels: int, max_per_level: int):
    """Per shown root: list of levels, each a list of node indices (drawn nodes only)."""
    children: dict[int, list[int]] = {}
    for edge in result.edges:
        children.setdefault(edge.parent, []).append(edge.child)
    placed: set[int] = set()
    blocks = []
    for root in range(len(result.shown)):
        if root in placed or root >= len(result.nodes):
            continue
        placed.add(root)
        levels = [[root]]
        for _ in range(max_levels):
            below = []
            for parent in levels[-1]:
                for child in children.get(parent, []):
                    if child not in placed and child not in below:
                        below.append(child)
            below.sort(key=lambda n: (-result.nodes[n].ratio, result.nodes[n].patches))
            below = below[:max_per_level]
            if not below:
                break
            placed.update(below)
            levels.append(below)
        blocks.append(levels)
    return blocks


def plot_sag(
    result: SAGResult,
    path: str | Path,
    max_levels: int = 2,
    max_per_level: int = 5,
    dpi: int = 100,
) -> Path:
    """Save the SAG picture of ``result`` to ``path`` (PNG/PDF by extension); returns it.

    ``max_levels`` levels of children and at most ``max_per_level`` nodes per level and
    root (the best ratios) are drawn; the JSON keeps the whole graph.
    """
    import matplotlib
    from matplotlib import cm, colors
    from matplotlib.figure import Figure

    if result.image is None:
        raise ValueError("result has no image (to_dict(include_images=False)?); cannot plot")
    blocks = _layout(result, max_levels, max_per_level)
    widths = [max(len(level) for level in levels) for levels in blocks] or [1]
    n_levels = max((len(levels) for levels in blocks), default=1)
    total_width = sum(widths) + max(len(widths) - 1, 0) * 0.5
    fig_w = 1.0 + 1.9 * total_width
    fig_h = 0.6 + 2.3 * n_levels
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    ax = fig.subplots()
    ax.set_xlim(-0.1, total_width + 0.1)
    ax.set_ylim(-(n_levels * 1.5) + 0.2, 0.6)
    ax.set_aspect("equal")
    ax.axis("off")
    drops = [e.drop for e in result.edges] or [0.0]
    norm = colors.Normalize(vmin=min(0.0, min(drops)), vmax=max(max(drops), 1e-6))
    cmap = matplotlib.colormaps["plasma"]
    image = result.image.to(torch.float32)
    vmin, vmax = float(image.min()), float(image.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    centres: dict[int, tuple[float, float]] = {}
    left = 0.0
    for levels, width in zip(blocks, widths):
        for depth, level in enumerate(levels):
            offset = left + (width - len(level)) / 2
            for k, node_index in enumerate(level):
                x0, top = offset + k, -depth * 1.5 + 0.5
                node = result.nodes[node_index]
                ax.imshow(
                    _thumbnail(result, node.patches),
                    cmap="gray",
                    vmin=vmin,
                    vmax=vmax,
                    extent=(x0 + 0.05, x0 + 0.95, top - 0.9, top),
                    interpolation="nearest",
                )
                label = f"{node.ratio:.2f} P" + ("  (root)" if depth == 0 else "")
                ax.text(x0 + 0.5, top - 0.95, label, ha="center", va="top", fontsize=7)
                centres[node_index] = (x0 + 0.5, top)
        left += width + 0.5
    for edge in result.edges:
        if edge.parent in centres and edge.child in centres:
            (px, py), (cx, cy) = centres[edge.parent], centres[edge.child]
            ax.plot([px, cx], [py - 1.05, cy + 0.02], color=cmap(norm(edge.drop)), lw=1.5, zorder=0)
    mappable = cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=ax, fraction=0.03, pad=0.01, label="score drop (fraction of P)")
    ax.set_title(
        f"SAG: class {result.target}, P = {result.probability:.3f}, "
        f"{len(result.roots)} roots, {len(result.diverse)} diverse",
        fontsize=9,
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out
