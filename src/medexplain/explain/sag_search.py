"""The search of Structured Attention Graphs: scoring patch sets, the beam search for
minimal sufficient sets and the pruning to minimal (METHODS.md section 3).

Two variants (see :class:`medexplain.explain.sag.StructuredAttentionGraph`):

- ``default`` (ours): :func:`beam_search` scores every successor of a depth, walks all of
  them best first, prunes with :func:`prune_best` and stops as soon as more than
  ``max_roots`` roots exist; the beam holds exactly ``beam_width`` sets;
- ``paper``: :func:`paper_search` and :func:`raster_prune` follow the authors' published
  code (Shitole, Li et al., NeurIPS 2021): the successors of a depth are walked best first
  until the beam holds ``beam_width + 1`` insufficient sets, every sufficient one met before
  is pruned by raster greedy passes, the depth is finished before the root count is checked,
  and sufficiency is strict (``ins(S) > threshold * P``).

Patch sets are sorted tuples of patch indices (C order over the grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..core.perturb import apply_mask
from ..core.scores import class_score
from .sag_graph import PatchSet, upsample_cells


class InsertionScorer:
    """``ins(S)`` for lists of patch sets of one image, cached, counting model passes.

    ``x`` ``(1, C, *S)`` and ``baseline`` (same shape); ``shape`` is how a patch indicator
    becomes a pixel mask (``"block"`` or ``"bilinear"``, see
    :func:`medexplain.explain.sag_graph.upsample_cells`). ``batched=True`` sends the
    not-yet-scored sets of one call through the model in chunks of ``batch_size``;
    ``batched=False`` one image per forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        baseline: torch.Tensor,
        target: int,
        grid: tuple[int, ...],
        activation: str,
        batch_size: int,
        batched: bool,
        shape: str = "block",
    ) -> None:
        self.model = model
        self.x = x
        self.baseline = baseline
        self.target = int(target)
        self.grid = grid
        self.n_patches = int(torch.tensor(grid).prod())
        self.activation = activation
        self.chunk = int(batch_size) if batched else 1
        self.shape = shape
        self.cache: dict[PatchSet, float] = {}
        self.images = 0
        self.calls = 0

    @torch.no_grad()
    def _evaluate(self, sets: list[PatchSet]) -> list[float]:
        k = len(sets)
        cells = torch.zeros(k, self.n_patches, device=self.x.device, dtype=self.x.dtype)
        for row, s in enumerate(sets):
            if s:
                cells[row, list(s)] = 1.0
        masks = upsample_cells(cells, self.grid, self.x.shape[2:], self.shape)
        shape = (k, *self.x.shape[1:])
        inputs = apply_mask(self.x.expand(shape), self.baseline.expand(shape), masks)
        targets = torch.full((k,), self.target, dtype=torch.long, device=self.x.device)
        scores = class_score(self.model, inputs, targets, self.activation)
        self.images += k
        self.calls += 1
        return [float(v) for v in scores.cpu()]

    def __call__(self, sets: Sequence[PatchSet]) -> list[float]:
        todo = list(dict.fromkeys(s for s in sets if s not in self.cache))
        for start in range(0, len(todo), self.chunk):
            part = todo[start : start + self.chunk]
            self.cache.update(zip(part, self._evaluate(part)))
        return [self.cache[s] for s in sets]


def _successors(beam: list[PatchSet], order: list[int], candidates: int) -> list[PatchSet]:
    """For every set of ``beam`` in turn, the set plus each of the ``candidates`` first
    patches of ``order`` it does not hold (duplicates kept, in generation order)."""
    out: list[PatchSet] = []
    for current in beam:
        members = set(current)
        tried = [j for j in order if j not in members][:candidates]
        out.extend(tuple(sorted((*current, j))) for j in tried)
    return out


def beam_search(
    scorer: InsertionScorer,
    order: list[int],
    need: float,
    beam_width: int,
    candidates: int,
    max_roots: int,
) -> list[PatchSet]:
    """Our search: minimal sufficient sets (``ins >= need``) in the order found."""
    roots: dict[PatchSet, None] = {}
    beam: list[PatchSet] = [()]
    for _depth in range(scorer.n_patches):
        successors = list(dict.fromkeys(_successors(beam, order, candidates)))
        if not successors:
            break
        scores = scorer(successors)
        ranking = sorted(range(len(successors)), key=lambda i: -scores[i])
        next_beam: list[PatchSet] = []
        for i in ranking:
            if scores[i] >= need:
                members = set(successors[i])
                if any(members.issuperset(root) for root in roots):
                    continue  # holds a known root: pruning would re-find known ground
                roots.setdefault(prune_best(scorer, successors[i], need))
                if len(roots) > max_roots:
                    return list(roots)
            elif len(next_beam) < beam_width:
                next_beam.append(successors[i])
        if not next_beam:
            break
        beam = next_beam
    return list(roots)


def prune_best(scorer: InsertionScorer, patches: PatchSet, need: float) -> PatchSet:
    """Drop patches while the set stays sufficient (each round removes the patch whose
    removal keeps the highest score); the result is minimal: every child is below."""
    current = patches
    while current:
        children = [tuple(k for k in current if k != j) for j in current]
        scores = scorer(children)
        best = max(range(len(children)), key=lambda i: scores[i])
        if scores[best] < need:
            break
        current = children[best]
    return current


def paper_search(
    scorer: InsertionScorer,
    order: list[int],
    need: float,
    beam_width: int,
    candidates: int,
    max_roots: int,
) -> list[PatchSet]:
    """The authors' beam search: minimal sufficient sets (``ins > need``) in the order found.

    Per depth: the successors of every beam set (the same set reached from two parents is
    listed twice, as there), best score first (stable); walking them, a sufficient one is
    pruned (:func:`raster_prune`) and kept if new, an insufficient one joins the next beam,
    and the walk ends once the beam holds ``beam_width + 1`` sets. The root count is checked
    after the depth."""
    roots: dict[PatchSet, None] = {}
    beam: list[PatchSet] = [()]
    for _depth in range(scorer.n_patches):
        successors = _successors(beam, order, candidates)
        if not successors:
            break
        scores = scorer(successors)
        ranking = sorted(range(len(successors)), key=lambda i: -scores[i])
        beam = []
        for i in ranking:
            if scores[i] > need:
                roots.setdefault(raster_prune(scorer, successors[i], need))
            else:
                beam.append(successors[i])
                if len(beam) > beam_width:
                    break
        if len(roots) > max_roots:
            break
    return list(roots)


def raster_prune(scorer: InsertionScorer, patches: PatchSet, need: float) -> PatchSet:
    """The authors' pruning: passes over the set in raster order, dropping each patch whose
    removal keeps the set sufficient (``> need``) at once; repeated until a pass drops
    nothing, so the result is minimal."""
    current = tuple(sorted(patches))
    changed = True
    while changed:
        changed = False
        for j in current:
            trial = tuple(k for k in current if k != j)
            if scorer([trial])[0] > need:
                current, changed = trial, True
    return current
