"""Structured Attention Graphs (Shitole, Li et al., NeurIPS 2021; METHODS.md section 3).

SAG explains one image with several *minimal sufficient* patch sets ("roots"): the image is
cut into a ``g x g`` grid (``g**3`` cubes in 3D), everything outside a set ``S`` of
patches is replaced by the baseline (black by default) and ``ins(S) = f_c(phi(x, b,
indicator(S)))`` is the class score with only ``S`` visible. A set is sufficient when
``ins(S) >= threshold * P`` (``P = f_c(x)``) and minimal when removing any one patch drops
it below. Search (batched over all successors of one depth)::

    H = 1 - M, M the I-GOS mask at g x g after 2 iterations (the heuristic)
    beam = [{}]
    for depth = 1 .. g**d:
        successors = {S + j : S in beam, j among the q best-H patches not in S}
        score them all (batched forward passes), best first
        sufficient -> prune to minimal (drop the patch whose removal keeps the highest score
                      while it stays sufficient) and record as a root if new;
                      skipped when it contains a known root
        otherwise  -> next beam (the beam_width best)
        stop when more than max_roots roots were found

Then the diverse subset (the largest set of roots pairwise sharing <= 1 patch, ties by total
score) and the graph grown from its ``max_shown`` best roots (child = parent minus one of its
first ``graph_removals`` = 3 patches in raster order, the authors' rule, none of a one-patch
node; every child is kept, those with ``ins(child) / P > child_threshold`` are expanded).

Defaults from the paper: 7 x 7 grid at 224 px, q = 15 candidates, beam width 3, threshold
0.9, more than 10 roots, child threshold 0.4, 3 roots shown, black baseline, a 2-iteration
I-GOS heuristic with the authors' TV weight 20 at the grid (not rescaled with the mask size)
and line search from step 200. Our choices: the grid is the same number of patches per axis
whatever the image size (blocks of ``n / g`` pixels, sizes differing by at most one); the
I-GOS heuristic uses the same baseline as the search, and runs at ``max(g, 4)`` cells per
axis (I-GOS' minimum) pooled back to ``g`` by averaging; scores of sets already evaluated are
cached (a set is never sent through the model twice, so batched and one-at-a-time modes
make the same passes); ties (equal scores) keep the order in which sets were generated; a
sufficient successor that contains a root already found is neither pruned nor expanded (its
pruning mostly returns that root again, at a cost quadratic in its size: without this rule
the passes for one image explode once every further set contains a known root).

``variant="paper"`` runs the published algorithm as the authors' code does (module
:mod:`medexplain.explain.sag_search` for the search): soft patches (the g x g indicator
upsampled bilinearly with corner alignment, a tent that spills into the neighbours), the
heuristic's I-GOS with fresh noise at every step and line searches that go on after
failing, strict sufficiency ``ins(S) > threshold * P``, the beam walk that
stops once the beam holds ``beam_width + 1`` sets, pruning by raster greedy passes (every
sufficient successor, also one holding a known root), the root count checked after the
whole depth and the diverse subset first found in discovery order. The default
(``"default"``) keeps our choices above; docs/methods.md lists each difference with its
measured reason.

Registered explainer ``sag``: its map is, for every pixel, the score-weighted mean of the
diverse roots' insertion masks, ``sum_r w_r m_r / sum_r w_r`` with ``w_r = ins(r) / P`` and
``m_r`` the mask that showed root ``r`` (0/1 blocks, or soft patches in the paper variant;
in [0, 1]; 0 everywhere when the baseline alone is sufficient).

>>> result = StructuredAttentionGraph(model).explain_image(x)       # x (1, C, *S)
>>> result.roots[0].patches, result.roots[0].ratio
>>> run_sag(model, x, "out/")                                       # sag.json
>>> medexplain.report.sag_plot.plot_sag(result, "sag.png")          # the picture
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import model_guard
from ..core.perturb import apply_mask, check_baseline, make_baseline
from ..core.scores import as_targets, check_activation, check_targets, class_score
from ..core.spatial import adaptive_avg_pool, spatial_dims_of
from .base import Explainer, forward_only, register
from .sag_graph import SAGResult, SAGRoot, build_graph, diverse_subset, upsample_cells
from .sag_search import InsertionScorer, beam_search, paper_search

#: ``variant`` values: ours (``"default"``) and the authors' published code (``"paper"``).
VARIANTS = ("default", "paper")
#: The parts in which the variants differ (``paper_parts``): the patch shape, the I-GOS run
#: of the heuristic (fresh noise, failed line searches go on), the search (beam walk,
#: pruning, stopping, diverse subset). Both variants grow the authors' graph
#: (``graph_removals``).
PAPER_PARTS = frozenset({"patches", "heuristic", "search"})

#: I-GOS' smallest mask resolution per axis (explain/igos.py MIN_MASK_SIZE).
_IGOS_MIN_SIZE = 4


@register("sag", "Structured Attention Graphs: minimal sufficient patch sets (beam search)")
class StructuredAttentionGraph(Explainer):
    """SAG (Shitole, Li et al. 2021). Parameters (defaults from the paper unless noted):

    - ``grid``: patches per spatial axis (7; an int or one int per axis);
    - ``beam_width`` (3), ``candidates`` (q = 15 best-heuristic patches tried per set),
      ``threshold`` (0.9: sufficient when ``ins(S) >= 0.9 P``), ``max_roots`` (10: stop
      once more than this many roots are found);
    - ``baseline``: ``"zero"`` (black, the paper), ``"blur"``, ``"mean"`` (with
      ``mean_image``) or a tensor;
    - ``child_threshold`` (0.4), ``max_shown`` (3 roots grow the graph), ``max_overlap``
      (1 patch, the diverse-subset rule), ``max_nodes`` (ours: 200, bounds the graph),
      ``graph_removals`` (3: a node's children remove one of its first 3 patches in raster
      order, the authors' code; None: every patch, more children at more passes);
    - ``heuristic_iterations`` (2 I-GOS iterations), ``heuristic_steps`` (I-GOS
      integration steps, its default 20); a forward-only model (ONNX) gets the
      :meth:`occlusion_heuristic` instead;
    - ``batched``: score all successors of a step in chunks of ``batch_size`` (True) or one
      image per forward pass (False, same result, for benchmarks); ``batch_size`` (ours:
      16, where a small CNN's forward pass is cheapest per image on a CPU, measured in
      ``benchmarks/sag.py``; raise it on a GPU). The I-GOS heuristic uses chunks of
      ``max(batch_size, 32)`` (its default);
    - ``activation``: how logits become ``f_c`` (see :func:`medexplain.core.scores.probabilities`);
    - ``variant``: ``"default"`` (ours) or ``"paper"`` (the authors' published code: soft
      patches, their beam walk, raster pruning and diverse subset; module
      docstring).

    ``explain_image`` returns a :class:`SAGResult`; calling the explainer returns the
    score-weighted coverage map of the diverse roots ``(B, 1, *S)`` (module docstring).
    """

    signed: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = False  # forward passes only with a forward-only model

    def __init__(
        self,
        model: nn.Module,
        *,
        grid: int | Sequence[int] = 7,
        beam_width: int = 3,
        candidates: int = 15,
        threshold: float = 0.9,
        max_roots: int = 10,
        baseline: str | torch.Tensor = "zero",
        mean_image: torch.Tensor | None = None,
        child_threshold: float = 0.4,
        max_shown: int = 3,
        max_overlap: int = 1,
        max_nodes: int = 200,
        graph_removals: int | None = 3,
        heuristic_iterations: int = 2,
        heuristic_steps: int = 20,
        batched: bool = True,
        batch_size: int = 16,
        seed: int = 0,
        activation: str = "auto",
        variant: str = "default",
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        grids = (grid,) if isinstance(grid, int) else tuple(grid)
        if not grids or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grids):
            raise ValueError(f"grid must be a positive int or a tuple of them, got {grid!r}")
        positive = {
            "beam_width": beam_width,
            "candidates": candidates,
            "max_roots": max_roots,
            "max_shown": max_shown,
            "max_nodes": max_nodes,
            "heuristic_iterations": heuristic_iterations,
            "heuristic_steps": heuristic_steps,
        }
        if graph_removals is not None:
            positive["graph_removals"] = graph_removals
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(max_overlap, bool) or not isinstance(max_overlap, int) or max_overlap < 0:
            raise ValueError(f"max_overlap must be an int >= 0, got {max_overlap!r}")
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if not 0.0 <= float(child_threshold) < 1.0:
            raise ValueError(f"child_threshold must be in [0, 1), got {child_threshold!r}")
        check_baseline(baseline, mean_image)
        check_activation(activation)
        self.grid = grids
        self.beam_width = beam_width
        self.candidates = candidates
        self.threshold = float(threshold)
        self.max_roots = max_roots
        self.baseline = baseline
        self.mean_image = mean_image
        self.child_threshold = float(child_threshold)
        self.max_shown = max_shown
        self.max_overlap = max_overlap
        self.max_nodes = max_nodes
        self.graph_removals = graph_removals
        self.heuristic_iterations = heuristic_iterations
        self.heuristic_steps = heuristic_steps
        self.batched = bool(batched)
        self.activation = activation
        self.variant = variant
        #: Which parts follow the authors' code: all for ``variant="paper"``, none by default
        #: (set a subset to measure one difference alone, as ``benchmarks/sag_paper.py``).
        self.paper_parts = PAPER_PARTS if variant == "paper" else frozenset()
        self.last_results: list[SAGResult] = []

    # ------------------------------------------------------------------ helpers
    @property
    def patch_shape(self) -> str:
        """``"bilinear"`` (the authors' soft patches) or ``"block"`` (ours)."""
        return "bilinear" if "patches" in self.paper_parts else "block"

    def grid_for(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Patches per axis for images of size ``spatial`` (error when a grid is too fine)."""
        spatial = tuple(int(s) for s in spatial)
        grid = self.grid * len(spatial) if len(self.grid) == 1 else self.grid
        if len(grid) != len(spatial):
            raise ValueError(
                f"grid {self.grid} has {len(grid)} entries for images with spatial size {spatial}"
            )
        if any(g > n for g, n in zip(grid, spatial)):
            raise ValueError(f"grid {grid} is finer than the image {spatial}: at most 1 px/patch")
        return grid

    def heuristic(
        self, x: torch.Tensor, target: int, grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """I-GOS heuristic per patch ``(g**d,)`` (higher = more important) for ``x``
        ``(1, C, *S)``, and the I-GOS pass counts; for a forward-only model (ONNX), which
        gives I-GOS no gradients, :meth:`occlusion_heuristic` instead."""
        from .igos import IGOS
        from .igos_optimiser import IGOSOptions

        if forward_only(self.model) is not None:
            return self.occlusion_heuristic(x, target, grid)

        size = tuple(min(max(g, _IGOS_MIN_SIZE), n) for g, n in zip(grid, x.shape[2:]))
        if min(size) < _IGOS_MIN_SIZE:  # image smaller than I-GOS' smallest mask: no heuristic
            return torch.zeros(int(torch.tensor(grid).prod())), {}
        # The authors' heuristic (both variants): TV weight 20 at the grid itself (no
        # rescaling with the mask size) and a line search starting at step 200.
        igos = IGOS(
            self.model,
            size=size,
            iterations=self.heuristic_iterations,
            integration_steps=self.heuristic_steps,
            baseline=self.baseline,
            mean_image=self.mean_image,
            activation=self.activation,
            batch_size=max(self.batch_size, 32),
            seed=self.seed,
            scale_l2=False,
            alpha0=200.0,
        )
        if "heuristic" in self.paper_parts:
            # The authors' I-GOS run in their SAG code: fresh noise at every integration step
            # and a failed line search still takes its last step; its line search checks the
            # plain (not integrated) deletion score, as ours.
            igos.options = IGOSOptions(fresh_noise=True, keep_going=True)
        _, trace = igos.explain_with_trace(x, torch.tensor([target], device=x.device))
        assert trace.masks is not None
        importance = 1.0 - trace.masks[-1, :, :1].to(torch.float32)  # (1, 1, *size)
        if size != grid:
            importance = adaptive_avg_pool(len(grid))(grid)(importance)
        passes = {
            "heuristic_forward": igos.passes.images("forward"),
            "heuristic_backward": igos.passes.images("backward"),
        }
        return importance.flatten().cpu(), passes

    @torch.no_grad()
    def occlusion_heuristic(
        self, x: torch.Tensor, target: int, grid: tuple[int, ...]
    ) -> tuple[torch.Tensor, dict[str, int]]:
        """Forward-only heuristic (ours, for models without gradients): per patch ``j``,
        ``f_c(x) - f_c(phi(x, b, all patches but j))``, the score lost when ``j`` alone shows
        the baseline; ``(g**d,)`` and the pass count, forward passes in chunks of
        ``batch_size``."""
        n = int(torch.tensor(grid).prod())
        cells = 1.0 - torch.eye(n, device=x.device, dtype=x.dtype)
        masks = upsample_cells(cells, grid, x.shape[2:], self.patch_shape)
        baseline = make_baseline(x, self.baseline, self.mean_image)
        shape = (n, *x.shape[1:])
        hidden = apply_mask(x.expand(shape), baseline.expand(shape), masks)
        targets = torch.full((n + 1,), int(target), dtype=torch.long, device=x.device)
        scores = class_score(
            self.model, torch.cat([x, hidden]), targets, self.activation, self.batch_size
        )
        return (scores[0] - scores[1:]).cpu(), {"heuristic_forward": n + 1}

    # --------------------------------------------------------------- the method
    def explain_image(self, x: torch.Tensor, target: int | torch.Tensor | None = None) -> SAGResult:
        """SAG of one image ``x`` ``(1, C, *S)`` (or ``(C, H, W)`` in 2D) for class
        ``target`` (None: the predicted class)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        if x.dim() == 3:
            x = x.unsqueeze(0)  # (C, H, W)
        spatial_dims_of(x, "x")
        if x.shape[0] != 1:
            raise ValueError(
                "x must be one image: (C, H, W), (1, C, H, W) or (1, C, D, H, W) (a 3D volume "
                f"always with its leading 1); got shape {tuple(x.shape)}"
            )
        x = x.to(self.device, torch.float32)
        with model_guard(self.model):

            def logits() -> torch.Tensor:
                with torch.no_grad():
                    return self.model(x)

            targets = as_targets(target, 1, device=x.device, logits=logits)
            check_targets(targets, logits().shape[1])
            return self._explain_one(x, int(targets[0]))

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        maps = []
        self.last_results = []
        for i in range(x.shape[0]):
            result = self._explain_one(x[i : i + 1], int(targets[i]))
            self.last_results.append(result)
            maps.append(coverage_map(result).to(x.device))
        return torch.stack(maps).unsqueeze(1)

    def _explain_one(self, x: torch.Tensor, target: int) -> SAGResult:
        spatial = tuple(int(s) for s in x.shape[2:])
        grid = self.grid_for(spatial)
        baseline = make_baseline(x, self.baseline, self.mean_image)
        scorer = InsertionScorer(
            self.model,
            x,
            baseline,
            target,
            grid,
            self.activation,
            self.batch_size,
            self.batched,
            self.patch_shape,
        )
        paper = "search" in self.paper_parts
        everything = tuple(range(scorer.n_patches))
        probability = scorer([everything])[0]  # phi with every patch visible is x itself
        passes = {"p": scorer.images}
        heuristic, heuristic_passes = self.heuristic(x, target, grid)
        order = torch.argsort(-heuristic, stable=True).tolist()

        search = paper_search if paper else beam_search
        found = search(
            scorer,
            order,
            self.threshold * probability,
            self.beam_width,
            self.candidates,
            self.max_roots,
        )
        passes["search"] = scorer.images - passes["p"]

        ranked = sorted(found, key=lambda s: (-scorer.cache[s], len(s), s))
        ratio = (lambda s: s / probability) if probability > 0 else (lambda s: 1.0)
        root_list = [SAGRoot(r, scorer.cache[r], ratio(scorer.cache[r])) for r in ranked]
        if paper:  # the authors' subset: first largest in the order found, shown in that order
            chosen = diverse_subset(
                found, [scorer.cache[r] for r in found], self.max_overlap, ties="first"
            )
            diverse = [ranked.index(found[i]) for i in chosen]
        else:
            diverse = diverse_subset(
                [r.patches for r in root_list], [r.score for r in root_list], self.max_overlap
            )
        shown = diverse[: self.max_shown]
        nodes, edges, truncated = build_graph(
            [root_list[i].patches for i in shown],
            scorer,
            probability,
            self.child_threshold,
            self.max_nodes,
            removals=self.graph_removals,
        )
        passes["graph"] = scorer.images - passes["p"] - passes["search"]
        passes.update(heuristic_passes)
        return SAGResult(
            target=target,
            probability=probability,
            grid=grid,
            spatial=spatial,
            threshold=self.threshold,
            child_threshold=self.child_threshold,
            max_overlap=self.max_overlap,
            roots=root_list,
            diverse=diverse,
            shown=shown,
            nodes=nodes,
            edges=edges,
            heuristic=[float(h) for h in heuristic],
            passes=passes,
            forward_calls=scorer.calls,
            graph_truncated=truncated,
            image=x[0].detach().cpu().clone(),
            baseline=baseline[0].detach().cpu().clone(),
            variant=self.variant if self.paper_parts in (frozenset(), PAPER_PARTS) else "mixed",
            patch_shape=self.patch_shape,
        )


def coverage_map(result: SAGResult) -> torch.Tensor:
    """The ``sag`` explainer's map ``(*S)``: score-weighted mean of the diverse roots'
    insertion masks, ``sum_r w_r m_r / sum_r w_r``, ``w_r = ins(r) / P``."""
    total = torch.zeros(result.spatial, dtype=torch.float32)
    weights = 0.0
    for root in result.diverse_roots():
        weight = max(float(root.ratio), 0.0)
        weights += weight
        if root.patches:
            total += weight * result.insertion_mask(root.patches).to(torch.float32)
    return total / weights if weights > 0 else total


def run_sag(
    model: nn.Module,
    image: torch.Tensor,
    out_dir: str | Path,
    target: int | None = None,
    **params: Any,
) -> SAGResult:
    """Explain ``image`` ``(C, *S)`` or ``(1, C, *S)`` with SAG and write ``sag.json`` into
    ``out_dir`` (created); the picture is :func:`medexplain.report.sag_plot.plot_sag`.
    ``params`` go to :class:`StructuredAttentionGraph`."""
    out = Path(out_dir)
    result = StructuredAttentionGraph(model, **params).explain_image(image, target)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused call writes nothing
    result.to_json(out / "sag.json")
    return result
