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
import torch.nn.functional as F

PatchSet = tuple[int, ...]

#: How a patch indicator becomes a pixel mask: ``"block"`` (ours: hard blocks) or
#: ``"bilinear"`` (the authors': the grid upsampled bilinearly / trilinearly with
#: corner alignment, so a patch is a tent that spills into its neighbours).
PATCH_SHAPES = ("block", "bilinear")

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
    - ``image``/``baseline``: ``(C, *S)`` CPU tensors, for drawing;
    - ``variant``: ``"default"``, ``"paper"`` or ``"mixed"`` (some parts of the paper's,
      for measurements); ``patch_shape``: ``"block"`` or ``"bilinear"`` (how patches
      became pixel masks, :func:`upsample_cells`). With the paper's search ``diverse`` and
      ``shown`` are in the order the roots were found.
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
    variant: str = "default"
    patch_shape: str = "block"

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
        """Bool mask ``(*spatial)`` of the pixels covered by ``patches`` (soft patches:
        where their insertion mask is at least 1/2)."""
        return patch_mask(patches, self.grid, self.spatial, self.patch_shape)

    def insertion_mask(self, patches: Sequence[int]) -> torch.Tensor:
        """The mask ``(*spatial)`` in [0, 1] that showed ``patches`` to the model."""
        return insertion_mask(patches, self.grid, self.spatial, self.patch_shape)

    # ------------------------------------------------------------- serialising
    def to_dict(self, include_images: bool = True) -> dict[str, Any]:
        """Plain JSON-able dict; floats are exact (float32 images are stored as lists)."""
        out: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "method": "sag",
            "variant": self.variant,
            "patch_shape": self.patch_shape,
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
            variant=str(data.get("variant", "default")),
            patch_shape=str(data.get("patch_shape", "block")),
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


def upsample_cells(
    cells: torch.Tensor, grid: Sequence[int], spatial: Sequence[int], shape: str = "block"
) -> torch.Tensor:
    """Patch indicator ``(K, g**d)`` -> pixel masks ``(K, 1, *spatial)``. ``"block"``:
    nearest-neighbour blocks (:func:`pixel_cells`); ``"bilinear"``: the ``g x g`` (x g)
    indicator interpolated bilinearly (trilinearly) with corner alignment, as the authors'
    ``UpsamplingBilinear2d``: patch centres fall on ``i (n - 1) / (g - 1)`` and the patches'
    masks sum to 1 at every pixel."""
    if shape not in PATCH_SHAPES:
        raise ValueError(f"patch shape must be one of {PATCH_SHAPES}, got {shape!r}")
    out = cells.reshape(cells.shape[0], 1, *grid)
    if shape == "bilinear":
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(grid)]
        size = tuple(int(n) for n in spatial)
        return F.interpolate(out, size=size, mode=mode, align_corners=True)
    for axis, index in enumerate(pixel_cells(grid, spatial)):
        out = out.index_select(2 + axis, index.to(cells.device))
    return out


def insertion_mask(
    patches: Sequence[int], grid: Sequence[int], spatial: Sequence[int], shape: str = "block"
) -> torch.Tensor:
    """Mask ``(*spatial)`` in [0, 1] showing ``patches`` (:func:`upsample_cells`)."""
    n = 1
    for g in grid:
        n *= int(g)
    cells = torch.zeros(1, n)
    cells[0, list(patches)] = 1.0
    return upsample_cells(cells, grid, spatial, shape)[0, 0]


def patch_mask(
    patches: Sequence[int], grid: Sequence[int], spatial: Sequence[int], shape: str = "block"
) -> torch.Tensor:
    """Bool mask ``(*spatial)`` of the pixels of ``patches``: the block, or for soft patches
    the pixels where their insertion mask is at least 1/2."""
    return insertion_mask(patches, grid, spatial, shape) >= 0.5 - 1e-6


# ---------------------------------------------------------------- diverse subset
def diverse_subset(
    sets: Sequence[Sequence[int]],
    scores: Sequence[float],
    max_overlap: int = 1,
    ties: str = "score",
) -> list[int]:
    """Indices of the largest subset of ``sets`` whose members pairwise share at most
    ``max_overlap`` elements. ``ties="score"`` (ours): ties go to the highest total score,
    then to the earliest indices, returned best score first (ties: earlier index);
    ``ties="first"`` (the authors' depth-first search): the lexicographically first largest
    subset of indices, returned in index order. Exact (a maximum-clique search on the
    compatibility graph with size pruning): SAG applies it to at most a few dozen roots
    (11 by default), where it is instant."""
    if ties not in ("score", "first"):
        raise ValueError(f"ties must be 'score' or 'first', got {ties!r}")
    if len(sets) != len(scores):
        raise ValueError(f"{len(sets)} sets but {len(scores)} scores")
    n = len(sets)
    frozen = [frozenset(s) for s in sets]
    ok = [[len(frozen[i] & frozen[j]) <= max_overlap for j in range(n)] for i in range(n)]
    best: list[int] = []
    best_key = (0, float("-inf"))

    def grow(chosen: list[int], candidates: list[int], total: float) -> None:
        nonlocal best, best_key
        key = (len(chosen), total if ties == "score" else 0.0)
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
    if ties == "first":
        return sorted(best)
    return sorted(best, key=lambda i: (-float(scores[i]), i))


# ------------------------------------------------------------------------ graph
def build_graph(
    roots: Sequence[PatchSet],
    score_sets: Callable[[list[PatchSet]], list[float]],
    probability: float,
    child_threshold: float = 0.4,
    max_nodes: int = 200,
    removals: int | None = 3,
) -> tuple[list[SAGNode], list[SAGEdge], bool]:
    """Grow the SAG from ``roots`` level by level (METHODS.md 3).

    A child is its parent minus one patch; every child becomes a node (the low-score leaves
    show which patch breaks the decision) and is expanded in turn only when
    ``score(child) / P > child_threshold``. ``removals=3`` (the authors' code): only the
    first three patches of a node (raster order) are removed, and a one-patch node has no
    children; ``removals=None``: every patch of a node in turn. Nodes reached from
    several parents (or roots) are kept once, with one edge per parent (the authors draw a
    tree in which such a node is repeated under each parent; the nodes and edges are the
    same). All children of a level are scored in one call of ``score_sets`` (batched by the
    caller). At most ``max_nodes`` nodes (roots included) are kept; the third return value
    says whether the cap cut the graph.
    """
    if probability > 0:

        def ratio(s: float) -> float:
            return s / probability
    else:  # f_c(x) = 0: every set keeps "all" of it; report ratio 1

        def ratio(s: float) -> float:
            return 1.0

    def removable(parent: PatchSet) -> PatchSet:
        if removals is None:
            return parent
        return parent[:removals] if len(parent) > 1 else ()

    index: dict[PatchSet, int] = {}
    nodes: list[SAGNode] = []
    edges: list[SAGEdge] = []
    unique_roots = list(dict.fromkeys(tuple(r) for r in roots))
    for root, score in zip(unique_roots, score_sets(unique_roots)):
        index[root] = len(nodes)
        nodes.append(SAGNode(root, score, ratio(score), 0))
    frontier = [
        r for r in unique_roots if removals is None or nodes[index[r]].ratio > child_threshold
    ]
    truncated = False
    level = 0
    while frontier:
        if len(nodes) >= max_nodes:
            truncated = any(len(removable(p)) > 0 for p in frontier)
            break
        level += 1
        moves = [(p, j, tuple(k for k in p if k != j)) for p in frontier for j in removable(p)]
        if not moves:
            break
        children = list(dict.fromkeys(child for _, _, child in moves))
        scores = dict(zip(children, score_sets(children)))
        next_frontier: list[PatchSet] = []
        for parent, removed, child in moves:
            r = ratio(scores[child])
            if child not in index:
                if len(nodes) >= max_nodes:
                    truncated = True
                    continue
                index[child] = len(nodes)
                nodes.append(SAGNode(child, scores[child], r, level))
                if r > child_threshold:
                    next_frontier.append(child)
            parent_node = nodes[index[parent]]
            edges.append(SAGEdge(index[parent], index[child], removed, parent_node.ratio - r))
        frontier = next_frontier
    return nodes, edges, truncated
