"""SAG's paper variant (explain/sag.py ``variant="paper"``, explain/sag_search.py): soft
patches against the bilinear tent by hand, the authors' raster pruning, beam walk and
diverse subset on hand-worked scores, and on a model that reads two squares: roots on both
squares (minimal sufficient under an independent evaluation) and the low-score children
kept in the graph."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medexplain.explain.sag import StructuredAttentionGraph, coverage_map
from medexplain.explain.sag_graph import SAGResult, diverse_subset, upsample_cells
from medexplain.explain.sag_search import beam_search, paper_search, prune_best, raster_prune
from medexplain.report.sag_plot import plot_sag


# ------------------------------------------------------------------ independent reference
def tent(n: int, g: int) -> torch.Tensor:
    """``(n, g)``: weight of cell ``c`` at pixel ``i`` for linear interpolation with corner
    alignment: pixel ``i`` sits at ``u = i (g - 1) / (n - 1)`` cells, weight
    ``max(0, 1 - |u - c|)``."""
    u = torch.arange(n, dtype=torch.float64) * (g - 1) / (n - 1)
    return (1 - (u[:, None] - torch.arange(g, dtype=torch.float64)[None, :]).abs()).clamp(min=0)


def soft_mask(patches, grid, spatial) -> torch.Tensor:
    """Insertion mask of ``patches`` built from :func:`tent` alone (2D or 3D)."""
    weights = [tent(n, g) for n, g in zip(spatial, grid)]
    out = torch.zeros(spatial, dtype=torch.float64)
    for j in patches:
        cell, idx = [], j
        for g in reversed(grid):
            cell.append(idx % g)
            idx //= g
        cell.reverse()
        if len(grid) == 2:
            out += torch.outer(weights[0][:, cell[0]], weights[1][:, cell[1]])
        else:
            out += torch.einsum(
                "i,j,k->ijk", weights[0][:, cell[0]], weights[1][:, cell[1]], weights[2][:, cell[2]]
            )
    return out


def reference_ins(model, x, target, grid, sets) -> torch.Tensor:
    """f_c with only ``sets`` visible (soft patches, black elsewhere), without the package."""
    images = [x[0] * soft_mask(s, grid, x.shape[2:]).to(x.dtype) for s in sets]
    with torch.no_grad():
        return torch.softmax(model(torch.stack(images)), dim=1)[:, target]


class FakeScorer:
    """Scores patch sets with a given function and records every list it was asked for."""

    def __init__(self, n_patches: int, score) -> None:
        self.n_patches = n_patches
        self.score = score
        self.cache: dict = {}
        self.asked: list[list[tuple[int, ...]]] = []

    def __call__(self, sets):
        self.asked.append(list(sets))
        for s in sets:
            self.cache[s] = self.score(s)
        return [self.cache[s] for s in sets]


def additive(weights):
    return lambda s: sum(weights[j] for j in s)


# ------------------------------------------------------------------------- geometry
@pytest.mark.parametrize(("grid", "spatial"), [((7, 7), (28, 20)), ((3, 2, 4), (9, 6, 11))])
def test_soft_patches_are_the_corner_aligned_tent(grid, spatial):
    n = 1
    for g in grid:
        n *= g
    cells = torch.eye(n, dtype=torch.float64)
    masks = upsample_cells(cells, grid, spatial, "bilinear")[:, 0]
    for j in range(n):
        assert torch.allclose(masks[j], soft_mask([j], grid, spatial), atol=1e-12)
    # Corner alignment: the first and last pixel of an axis are the centres of its end
    # patches; the masks of all patches sum to 1 everywhere (the full image is x itself).
    assert masks[0][(0,) * len(grid)] == 1.0 and masks[-1][tuple(s - 1 for s in spatial)] == 1.0
    assert torch.allclose(masks.sum(0), torch.ones(spatial, dtype=torch.float64))
    # Blocks are unchanged: one patch per pixel.
    assert torch.equal(upsample_cells(cells, grid, spatial).sum(0)[0], torch.ones(spatial))


# ------------------------------------------------------------------- search by hand
def test_raster_prune_differs_from_best_removal_by_hand():
    # ins = sum of weights, need 0.85 (strict). Raster pass over (0, 1, 2, 3): dropping 0
    # leaves 0.9 > 0.85, dropping 1, 2 or 3 next leaves 0.6: result (1, 2, 3). Best
    # removal drops one of the 0.3 patches first (1.05 is the best child), then nothing:
    # result (0, 2, 3).
    weights = [0.45, 0.3, 0.3, 0.3]
    scorer = FakeScorer(4, additive(weights))
    assert raster_prune(scorer, (0, 1, 2, 3), 0.85) == (1, 2, 3)
    assert prune_best(FakeScorer(4, additive(weights)), (0, 1, 2, 3), 0.85) == (0, 2, 3)
    # Strict sufficiency: a child exactly at need is not sufficient for the authors.
    assert raster_prune(FakeScorer(2, additive([0.5, 0.5])), (0, 1), 0.5) == (0, 1)


def test_paper_beam_walk_by_hand():
    # Six patches, heuristic order 5, 4, ..., 0, never sufficient (need 100), q = 6, beam
    # width 1. Depth 1 ranks the singletons 5 > 4 > ...; the authors' walk stops once the
    # beam holds beam_width + 1 = 2 sets: (5,), (4,). Depth 2: the successors of (5,) then
    # of (4,), with (4, 5) listed twice (from both parents); best first (stable) the first
    # two are (4, 5) and (4, 5) again: the beam is that set twice.
    weights = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    order = [5, 4, 3, 2, 1, 0]
    scorer = FakeScorer(6, additive(weights))
    assert paper_search(scorer, order, 100.0, 1, 6, 10) == []
    assert scorer.asked[0] == [(5,), (4,), (3,), (2,), (1,), (0,)]
    assert scorer.asked[1][:5] == [(4, 5), (3, 5), (2, 5), (1, 5), (0, 5)]
    assert scorer.asked[1][5:] == [(4, 5), (3, 4), (2, 4), (1, 4), (0, 4)]
    assert scorer.asked[2] == 2 * [(3, 4, 5), (2, 4, 5), (1, 4, 5), (0, 4, 5)]
    # Ours: a beam of exactly beam_width distinct sets.
    ours = FakeScorer(6, additive(weights))
    beam_search(ours, order, 100.0, 1, 6, 10)
    assert ours.asked[1] == [(4, 5), (3, 5), (2, 5), (1, 5), (0, 5)]


def test_paper_search_finishes_the_depth_by_hand():
    # Any two patches are sufficient (need 0.95, weights 0.5 each, 4 patches): with
    # max_roots = 0 ours stops at the first root; the authors' walk finishes depth 2, and
    # prunes every sufficient successor met before the beam fills.
    weights = [0.5, 0.5, 0.5, 0.5]
    order = [0, 1, 2, 3]
    ours = beam_search(FakeScorer(4, additive(weights)), order, 0.95, 3, 4, 0)
    paper = paper_search(FakeScorer(4, additive(weights)), order, 0.95, 3, 4, 0)
    assert ours == [(0, 1)]
    # Depth 2 successors of (0,), (1,), (2,), (3,) (beam of 4), all sufficient, pruned
    # by raster passes: each is already minimal (a singleton is 0.5). In generation order.
    assert paper == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def test_diverse_subset_first_found_by_hand():
    # Conflicts (overlap > 1 patch): 0-1 and 2-3. Largest subsets have 2 members, e.g.
    # {0, 2} (total 0.2) and {1, 3} (total 1.8). By score ours takes {1, 3}; the authors'
    # depth-first search keeps the first largest, {0, 2}, in index order.
    sets = [(0, 1, 2), (0, 1, 3), (4, 5, 6), (4, 5, 7)]
    scores = [0.1, 0.9, 0.1, 0.9]
    assert sorted(diverse_subset(sets, scores)) == [1, 3]
    assert diverse_subset(sets, scores, ties="first") == [0, 2]


# ------------------------------------------------------------------ two-squares model
class TwoSquares(nn.Module):
    """Lesion logit ``10 * max(mean of square A, mean of square B) - 5``: either square
    visible alone carries the decision."""

    A = (slice(2, 11), slice(2, 11))
    B = (slice(16, 25), slice(16, 25))

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, x):
        a = x[:, 0][(slice(None), *self.A)].mean(dim=(1, 2))
        b = x[:, 0][(slice(None), *self.B)].mean(dim=(1, 2))
        logit = self.scale * torch.maximum(a, b) - 5
        return torch.stack([torch.zeros_like(logit), logit], dim=1)


@pytest.fixture(scope="module")
def two_squares():
    model = TwoSquares()
    x = torch.zeros(1, 1, 28, 28)
    x[(0, 0, *TwoSquares.A)] = 1.0
    x[(0, 0, *TwoSquares.B)] = 1.0
    sag = StructuredAttentionGraph(model, variant="paper", heuristic_steps=4, max_roots=4)
    return model, x, sag.explain_image(x, 1)


def test_paper_sag_finds_both_squares_and_keeps_low_children(two_squares):
    model, x, result = two_squares
    assert result.variant == "paper" and result.patch_shape == "bilinear"
    p = float(reference_ins(model, x, 1, result.grid, [tuple(range(49))])[0])
    assert p == pytest.approx(result.probability, abs=1e-5)
    need = result.threshold * p
    # Every root is minimal sufficient under the hand-built soft patches (strictly above).
    for root in result.roots:
        score = float(reference_ins(model, x, 1, result.grid, [root.patches])[0])
        assert score == pytest.approx(root.score, abs=1e-5) and score > need
        children = [tuple(k for k in root.patches if k != j) for j in root.patches]
        assert (reference_ins(model, x, 1, result.grid, children) <= need + 1e-6).all()
    # The shown roots cover both squares (each square overlaps some shown root).
    square = {name: torch.zeros(28, 28, dtype=torch.bool) for name in "AB"}
    square["A"][TwoSquares.A] = True
    square["B"][TwoSquares.B] = True
    shown = result.shown_roots()
    for name in "AB":
        assert any((result.patch_mask(r.patches) & square[name]).any() for r in shown), name
    # The graph keeps the children at or below 0.4 P (leaves: not expanded), and an expanded
    # node has exactly the children without one of its first three patches.
    low = [i for i, node in enumerate(result.nodes) if node.ratio <= result.child_threshold]
    assert low, "no low-score child kept"
    parents = {e.parent for e in result.edges}
    assert not parents & set(low)
    for i in parents:
        patches = result.nodes[i].patches
        removed = sorted(e.removed for e in result.edges if e.parent == i)
        assert removed == sorted(patches[:3])
        for e in result.edges:
            if e.parent == i:
                child = result.nodes[e.child]
                assert child.patches == tuple(k for k in patches if k != e.removed)
                (score,) = reference_ins(model, x, 1, result.grid, [child.patches])
                assert child.ratio == pytest.approx(float(score) / p, abs=1e-5)
    # The default grows the same graph (first three patches); graph_removals=None removes
    # every patch of an expanded node; both keep the low children.
    for removals in (3, None):
        ours = StructuredAttentionGraph(
            model, heuristic_steps=4, max_roots=4, graph_removals=removals
        ).explain_image(x, 1)
        assert any(node.ratio <= ours.child_threshold for node in ours.nodes)
        for i in {e.parent for e in ours.edges}:
            assert ours.nodes[i].ratio > ours.child_threshold
            removed = sorted(e.removed for e in ours.edges if e.parent == i)
            patches = ours.nodes[i].patches
            assert removed == (list(patches) if removals is None else sorted(patches[:3]))


def test_paper_map_json_and_picture(two_squares, tmp_path):
    result = two_squares[2]
    weights = [r.ratio for r in result.diverse_roots()]
    expected = sum(
        w * soft_mask(r.patches, result.grid, (28, 28))
        for w, r in zip(weights, result.diverse_roots())
    ) / sum(weights)
    assert torch.allclose(coverage_map(result).double(), expected, atol=1e-6)
    back = SAGResult.from_json(result.to_json())
    assert json.loads(back.to_json()) == json.loads(result.to_json())
    assert back.patch_shape == "bilinear" and back.variant == "paper"
    assert plot_sag(back, tmp_path / "sag.png").stat().st_size > 1000


def test_paper_3d_roots_are_minimal_sufficient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten())
    x = torch.rand(1, 1, 8, 8, 8)
    sag = StructuredAttentionGraph(
        model, grid=2, candidates=4, heuristic_steps=2, max_roots=3, variant="paper"
    )
    result = sag.explain_image(x)
    assert result.grid == (2, 2, 2)
    need = result.threshold * result.probability
    for root in result.roots:
        (score,) = reference_ins(model, x, result.target, result.grid, [root.patches])
        assert score > need
        for j in root.patches:
            child = tuple(k for k in root.patches if k != j)
            (cs,) = reference_ins(model, x, result.target, result.grid, [child])
            assert cs <= need + 1e-6
    with pytest.raises(ValueError, match="variant"):
        StructuredAttentionGraph(model, variant="authors")
