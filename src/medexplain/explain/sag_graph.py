"""Structured Attention Graph data: roots, the diverse subset, the graph, JSON (METHODS.md 3).

Pure data and combinatorics, no model: :mod:`medexplain.explain.sag` runs the search and
calls these functions with a scoring function.

Patches are numbered in C order over the grid: in 2D patch ``j`` is row ``j // g``, column
``j % g``; in 3D ``(j // g**2, (j // g) % g, j % g)``. A patch set is a sorted tuple of ints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PatchSet = tuple[int, ...]

#: Format version of :meth:`SAGResult.to_dict`.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SAGNode:
    """One node of the graph: a patch set, ``score = f_c(phi(x, b, indicator(patches)))``,
    ``ratio = score / P`` and ``level`` = fewest patches removed from a shown root."""

    patches: PatchSet
    score: float
    ratio: float
    level: int


@dataclass(frozen=True)
class SAGEdge:
    """Parent ``-> child`` (node indices): the child is the parent minus patch ``removed``;
    ``drop = ratio(parent) - ratio(child)`` (negative when removing the patch raised f_c)."""

    parent: int
    child: int
    removed: int
    drop: float


@dataclass
class SAGRoot:
    """A minimal sufficient patch set: visible alone it keeps ``score >= threshold * P`` and
    removing any one of its patches drops below."""

    patches: PatchSet
    score: float
    ratio: float


@dataclass
class SAGResult:
    """Everything one SAG explanation produced (see :func:`medexplain.explain.sag`).

    - ``roots``: minimal sufficient patch sets, best score first;
    - ``diverse``: indices into ``roots`` of the largest subset with pairwise overlap
      ``<= max_overlap`` patches (ties: highest total score), best score first;
      ``shown``: its first ``max_shown`` entries, the roots the graph grows from;
    - ``nodes``/``edges``: the graph (``nodes[:len(shown)]`` are the shown roots);
    - ``heuristic``: the I-GOS heuristic per patch ``(g**d,)``, higher = searched first;
    - ``passes``: images sent through the model by stage (``p``: the original image,
      ``search``: beam search and pruning, ``graph``: the graph, ``heuristic_forward`` /
      ``heuristic_backward``: I-GOS); ``forward_passes`` = p + search + graph (the
      heuristic is reported apart); ``forward_calls``: model calls for those images;
    - ``image``/``baseline``: ``(C, *S)`` CPU tensors, for drawing.
    """

    target: int
    probability: float
    grid: tuple[int, ...]
    spatial: tuple[int, ...]
    threshold: float
    child_threshold: float
    max_overlap: int
    roots: list[SAGRoot]
    diverse: list[int]
    shown: list[int]
    nodes: list[SAGNode]
    edges: list[SAGEdge]
    heuristic: list[float]
    passes: dict[str, int] = field(default_factory=dict)
    forward_calls: int = 0
    graph_truncated: bool = False
    image: torch.Tensor | None = None
    baseline: torch.Tensor | None = None

    # ------------------------------------------------------------------ views
    @property
    def forward_passes(self) -> int:
        """Images sent through the model by the search and the graph (plus P itself)."""
        return sum(self.passes.get(k, 0) for k in ("p", "search", "graph"))

    @property
    def num_patches(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    def diverse_roots(self) -> list[SAGRoot]:
        return [self.roots[i] for i in self.diverse]

    def shown_roots(self) -> list[SAGRoot]:
        return [self.roots[i] for i in self.shown]

    def children(self, node: int) -> list[SAGEdge]:
        """Edges leaving ``node``, largest child ratio first."""
        out = [e for e in self.edges if e.parent == node]
        return sorted(out, key=lambda e: (-self.nodes[e.child].ratio, e.removed))

    def patch_mask(self, patches: Sequence[int]) -> torch.Tensor:
        """Bool mask ``(*spatial)`` of the pixels covered by ``patches``."""
        return patch_mask(patches, self.grid, self.spatial)

    # ------------------------------------------------------------- serialising
    def to_dict(self, include_images: bool = True) -> dict[str, Any]:
        """Plain JSON-able dict; floats are exact (float32 images are stored as lists)."""
        out: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "method": "sag",
            "target": self.target,
            "probability": self.probability,
            "grid": list(self.grid),
            "spatial": list(self.spatial),
            "threshold": self.threshold,
            "child_threshold": self.child_threshold,
            "max_overlap": self.max_overlap,
            "roots": [
                {"patches": list(r.patches), "score": r.score, "ratio": r.ratio} for r in self.roots
            ],
            "diverse": list(self.diverse),
            "shown": list(self.shown),
            "nodes": [
                {"patches": list(n.patches), "score": n.score, "ratio": n.ratio, "level": n.level}
                for n in self.nodes
            ],
            "edges": [
                {"parent": e.parent, "child": e.child, "removed": e.removed, "drop": e.drop}
                for e in self.edges
            ],
            "heuristic": list(self.heuristic),
            "passes": dict(self.passes),
            "forward_passes": self.forward_passes,
            "forward_calls": self.forward_calls,
            "graph_truncated": self.graph_truncated,
        }
        if include_images:
            for name in ("image", "baseline"):
                value = getattr(self, name)
                out[name] = None if value is None else value.to(torch.float32).tolist()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAGResult:
        """Inverse of :meth:`to_dict`."""
        if data.get("method") != "sag" or data.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"not a SAG result of format {FORMAT_VERSION}: method={data.get('method')!r}, "
                f"format={data.get('format')!r}"
            )

        def tensor(name: str) -> torch.Tensor | None:
            value = data.get(name)
            return None if value is None else torch.tensor(value, dtype=torch.float32)

        return cls(
            target=int(data["target"]),
            probability=float(data["probability"]),
            grid=tuple(int(g) for g in data["grid"]),
            spatial=tuple(int(s) for s in data["spatial"]),
            threshold=float(data["threshold"]),
            child_threshold=float(data["child_threshold"]),
            max_overlap=int(data["max_overlap"]),
            roots=[
                SAGRoot(tuple(int(p) for p in r["patches"]), float(r["score"]), float(r["ratio"]))
                for r in data["roots"]
            ],
            diverse=[int(i) for i in data["diverse"]],
            shown=[int(i) for i in data["shown"]],
            nodes=[
                SAGNode(
                    tuple(int(p) for p in n["patches"]),
                    float(n["score"]),
                    float(n["ratio"]),
                    int(n["level"]),
                )
                for n in data["nodes"]
            ],
            edges=[
                SAGEdge(int(e["parent"]), int(e["child"]), int(e["removed"]), float(e["drop"]))
                for e in data["edges"]
            ],
            heuristic=[float(h) for h in data["heuristic"]],
            passes={str(k): int(v) for k, v in data.get("passes", {}).items()},
            forward_calls=int(data.get("forward_calls", 0)),
            graph_truncated=bool(data.get("graph_truncated", False)),
            image=tensor("image"),
            baseline=tensor("baseline"),
        )

    def to_json(self, path: str | Path | None = None, include_images: bool = True) -> str:
        """JSON text of :meth:`to_dict`; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(include_images=include_images))
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> SAGResult:
        """Read a result from JSON text or from a ``.json`` file path."""
        text = str(text_or_path)
        if isinstance(text_or_path, Path) or not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


# ---------------------------------------------------------------------- geometry
def pixel_cells(grid: Sequence[int], spatial: Sequence[int]) -> list[torch.Tensor]:
    """Per spatial axis, the patch row of every pixel: ``(i * g) // n`` (blocks of
    ``n / g`` pixels, sizes differing by at most one; nearest-neighbour upsampling)."""
    if len(grid) != len(spatial):
        raise ValueError(f"grid {tuple(grid)} and spatial {tuple(spatial)} differ in length")
    return [torch.arange(int(n)) * int(g) // int(n) for g, n in zip(grid, spatial)]


def upsample_cells(cells: torch.Tensor, grid: Sequence[int], spatial: Sequence[int]):
    """Hard patch indicator ``(K, g**d)`` -> pixel masks ``(K, 1, *spatial)`` (blocks)."""
    out = cells.reshape(cells.shape[0], 1, *grid)
    for axis, index in enumerate(pixel_cells(grid, spatial)):
        out = out.index_select(2 + axis, index.to(cells.device))
    return out


def patch_mask(patches: Sequence[int], grid: Sequence[int], spatial: Sequence[int]):
    """Bool mask ``(*spatial)`` of the pixels of ``patches``."""
    n = 1
    for g in grid:
        n *= int(g)
    cells = torch.zeros(1, n)
    cells[0, list(patches)] = 1.0
    return upsample_cells(cells, grid, spatial)[0, 0] > 0


# ---------------------------------------------------------------- diverse subset
def diverse_subset(
    sets: Sequence[Sequence[int]], scores: Sequence[float], max_overlap: int = 1
) -> list[int]:
    """Indices of the largest subset of ``sets`` whose members pairwise share at most
    ``max_overlap`` elements; ties go to the highest total score, then to the earliest
    indices. Exact (a maximum-clique search on the compatibility graph with size pruning):
    SAG applies it to at most ``max_roots + 1`` roots (11 by default), where it is instant.
    Returned best score first (ties: earlier index)."""
    if len(sets) != len(scores):
        raise ValueError(f"{len(sets)} sets but {len(scores)} scores")
    n = len(sets)
    frozen = [frozenset(s) for s in sets]
    ok = [[len(frozen[i] & frozen[j]) <= max_overlap for j in range(n)] for i in range(n)]
    best: list[int] = []
    best_key = (0, float("-inf"))

    def grow(chosen: list[int], candidates: list[int], total: float) -> None:
        nonlocal best, best_key
        key = (len(chosen), total)
        if key > best_key:
            best, best_key = list(chosen), key
        if len(chosen) + len(candidates) < best_key[0]:
            return
        for pos, i in enumerate(candidates):
            rest = [j for j in candidates[pos + 1 :] if ok[i][j]]
            chosen.append(i)
            grow(chosen, rest, total + float(scores[i]))
            chosen.pop()

    grow([], list(range(n)), 0.0)
    return sorted(best, key=lambda i: (-float(scores[i]), i))


# ------------------------------------------------------------------------ graph
def build_graph(
    roots: Sequence[PatchSet],
    score_sets: Callable[[list[PatchSet]], list[float]],
    probability: float,
    child_threshold: float = 0.4,
    max_nodes: int = 200,
) -> tuple[list[SAGNode], list[SAGEdge], bool]:
    """Grow the SAG from ``roots`` level by level (METHODS.md 3).

    A child is its parent minus one patch; it becomes a node when
    ``score(child) / P > child_threshold`` and is expanded in turn. Nodes reached from
    several parents (or roots) are kept once, with one edge per parent. All children of a
    level are scored in one call of ``score_sets`` (batched by the caller). At most
    ``max_nodes`` nodes (roots included) are kept; the third return value says whether the
    cap cut the graph.
    """
    if probability > 0:

        def ratio(s: float) -> float:
            return s / probability
    else:  # f_c(x) = 0: every set keeps "all" of it; report ratio 1

        def ratio(s: float) -> float:
            return 1.0

    index: dict[PatchSet, int] = {}
    nodes: list[SAGNode] = []
    edges: list[SAGEdge] = []
    unique_roots = list(dict.fromkeys(tuple(r) for r in roots))
    for root, score in zip(unique_roots, score_sets(unique_roots)):
        index[root] = len(nodes)
        nodes.append(SAGNode(root, score, ratio(score), 0))
    frontier = list(unique_roots)
    truncated = False
    level = 0
    while frontier:
        if len(nodes) >= max_nodes:
            truncated = any(len(p) > 0 for p in frontier)
            break
        level += 1
        moves = [(p, j, tuple(k for k in p if k != j)) for p in frontier for j in p]
        if not moves:
            break
        children = list(dict.fromkeys(child for _, _, child in moves))
        scores = dict(zip(children, score_sets(children)))
        next_frontier: list[PatchSet] = []
        for parent, removed, child in moves:
            r = ratio(scores[child])
            if not r > child_threshold:
                continue
            if child not in index:
                if len(nodes) >= max_nodes:
                    truncated = True
                    continue
                index[child] = len(nodes)
                nodes.append(SAGNode(child, scores[child], r, level))
                next_frontier.append(child)
            parent_node = nodes[index[parent]]
            edges.append(SAGEdge(index[parent], index[child], removed, parent_node.ratio - r))
        frontier = next_frontier
    return nodes, edges, truncated
