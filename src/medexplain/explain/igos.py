"""I-GOS and iGOS++: optimise a soft mask with integrated gradients (METHODS.md section 2).

- ``igos`` (Qi, Khorram, Li, AAAI 2020, arXiv 1905.00954): one deletion mask ``M``;
- ``igos++`` (Khorram, Lawson, Li, CHIL 2021, arXiv 2012.15783): a deletion mask ``Md``
  and an insertion mask ``Mi``, combined ``M = Md * Mi``, bilateral TV.

>>> maps = create("igos++", model, size=28)(x, target)           # (B, 1, *spatial)
>>> maps = create("igos++", model, **QUICK_PARAMS)(x, target)     # the demo's fast setting
>>> explainer = create("igos", model); maps, trace = explainer.explain_with_trace(x, target)

Heatmap = ``1 - up(M)`` at the image resolution, in [0, 1]; higher = more evidence.

Optimisation, per image (a batch is optimised together, but every image keeps its own
mask, its own line-search step and its own stopping, so a result never depends on what
else is in the batch)::

    M = 1 at resolution s (28 per spatial dim)
    repeat T = 15 times (iterations):
        g = gradient of the objective (integrated over S = 20 steps, noise N(0, 0.2^2))
        Armijo back-tracking: alpha = 1000; while L(clip(M - alpha g)) > L(M) - 1e-4 alpha |g|^2:
            alpha *= 0.2; give up when alpha < 1e-5
        M = clip(M - alpha g, 0, 1)

I-GOS: ``g = grad R(M) + (1/S) sum_k grad_M f_c(phi(x, b, (k/S) M) + noise_k)`` and the line
search objective is ``L(M) = R(M) + f_c(phi(x, b, M))``, ``R = l1 mean|1-M| + l2 TV(M)``.
iGOS++: ``L = Del(Md) + Ins(Mi) + Del(M) + Ins(M) + l1 mean|1-M| + l2 BTV(M)`` with
``Del(M) = (1/S) sum_k f_c(phi(x, b, (k/S) M) + noise_k)`` and
``Ins(M) = -(1/S) sum_k f_c(phi(b, x, (k/S) M) + noise_k)``; ``g`` is the exact gradient of
``L`` w.r.t. both masks and one Armijo search moves both.

``variant="paper"`` runs the algorithm as the authors' public code does (every
:class:`IGOSOptions` field on, ``scale_l2=False``, ``armijo_slack=0``): fresh noise for every
evaluation and a new noisy ``L(M)`` for every Armijo test; a failed line search still takes
its last step (below ``min_alpha``) and the optimisation goes on; I-GOS's line search checks
``R(M)`` plus the integrated noisy deletion score; iGOS++ halves the data terms' gradient,
uses ``up(Md) * up(Mi)`` in the combined data terms and computes the bilateral weights on
the image in units of its standard deviation (the authors: the network's standardised
input). What the variant keeps from medexplain: the noise unit (``noise_relative``), the
separate names of iterations and integration steps, per-image batching.

Choices where the papers are silent or the public code differs (documented, deliberate;
each measured against the authors' choice in ``benchmarks/igos_paper.py``):

- Noise: one draw per path kind and integration step (seed ``seed``), the same for every
  image and kept for the whole optimisation. ``L`` is then one deterministic function, the
  Armijo test compares exact values, and an accepted step never increases the loss.
  Its unit: the authors add N(0, 0.2^2) to ImageNet-standardised inputs, i.e. 0.2 standard
  deviations of the data. medexplain assumes no normalisation, so by default
  (``noise_relative=True``) the noise is ``noise_std`` times each image's own standard
  deviation (over its pixels and channels). On [0, 1] images an absolute 0.2 would be
  about four times the authors' level; on the built-in benchmark it makes the classifier
  call every noisy image healthy and the integrated objective lose its signal
  (``noise_relative=False`` gives the absolute noise).
- Bilateral weights (iGOS++): on the image min-max normalised per image, so that an edge of
  contrast 0.1 in a [0, 1] image gets weight ``exp(-1)`` = 0.37 with sigma 0.01; on the
  authors' standardised input (std about 0.23) it gets about 3e-9 and the edge-stopping term
  barely acts. Combined data mask ``up(Md * Mi)`` (one upsampling of the mask the map shows)
  instead of the authors' ``up(Md) * up(Mi)``.
- Early rejection (``early_reject=True``, exact): 0 <= f_c <= 1, so a line-search trial
  whose regulariser alone (or with the insertion terms) already fails the Armijo test is
  rejected without the remaining model passes. It changes no result, only the pass count.
- Armijo slack: a trial passes when ``L_new <= L - c alpha |g|^2 + armijo_slack *
  max(1, |L|)`` (1e-6, float32 rounding level). Without it, where ``f_c`` is flat (e.g. an
  untrained net) ``L_new`` and the bound agree to rounding, and rounding differs between
  batch compositions (convolution kernels depend on the batch size), so one image could
  stop when explained alone and go on inside a batch. The loss then never increases by
  more than the slack.
- Stopping: when no step size >= ``min_alpha`` satisfies Armijo (or ``g = 0``) the image
  takes no step and stops; it makes no further model passes. (Continuing would repeat the
  same failing search: the objective and the mask no longer change.)
- Regulariser weights: ``l1 = 1``, ``l2 = 20`` are the papers' values for ``s = 28``. Both
  terms are means over mask cells, so ``l1`` needs no scaling; the TV of a sharp-edged mask
  falls like ``1/s`` (edges are a vanishing share of the differences), so by default ``l2``
  is scaled by ``mean(s) / 28`` to penalise a given shape equally at every resolution
  (``scale_l2=False`` uses ``l2`` as given). The iGOS++ gradient is not halved as in the
  authors' code: ``g`` is exactly the gradient of the ``L`` the line search checks.
- The iteration count (15) and the integration steps (20) are separate parameters with
  unambiguous names (the authors' main script swaps the two).

Baselines: "blur" is the papers' default. For aligned medical data the dataset mean image
(``baseline="mean", mean_image=...``) is often the better "absence of evidence": on the
built-in benchmark the classifier calls blurred images "atrophy" (f_c ~ 0.96), so a blur
baseline cannot reveal atrophy evidence, while the mean image is not confidently any
disease (benchmarks/igos.py uses it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..core.perturb import upsample_mask
from .base import register
from .igos_loss import (
    DELETION,
    INSERTION,
    bilateral_tv,
    bilateral_weights,
    l1_term,
    standardised_bilateral_weights,
    total_variation,
)
from .igos_optimiser import (
    VARIANTS,
    IGOSOptions,
    IGOSTrace,
    _backprop_masks,
    _MaskOptimiser,
    _Problem,
)

__all__ = [
    "IGOS",
    "QUICK_PARAMS",
    "VARIANTS",
    "IGOSOptions",
    "IGOSPlusPlus",
    "IGOSTrace",
    "path_masks",
]

#: A fast setting for demos and smoke runs (5/15 iterations x 8/20 steps: about an eighth of
#: the model passes); the defaults (15 iterations, 20 integration steps) are the papers'.
#: Use as ``create("igos++", model, **QUICK_PARAMS)``.
QUICK_PARAMS: dict[str, Any] = {"iterations": 5, "integration_steps": 8}


@register("igos", "I-GOS: deletion mask optimised with integrated gradients (Qi 2020)")
class IGOS(_MaskOptimiser):
    """I-GOS (Qi, Khorram, Li 2020). Maps = ``1 - up(M)`` ``(B, 1, *spatial)`` in [0, 1].

    Parameters (defaults from the paper / authors' code, METHODS.md section 2):

    - ``size``: mask resolution per spatial dim, int or tuple, 4 .. image size
      (None: 28, clamped to the image);
    - ``iterations`` T = 15, ``integration_steps`` S = 20, ``noise_std`` 0.2 (in units of the
      image's standard deviation unless ``noise_relative=False``; see the module docstring);
    - ``l1`` = 1 (mean |1 - M|), ``l2`` = 20 (TV, mean squared differences) at s = 28;
      ``scale_l2`` multiplies ``l2`` by mean(s) / 28 (None: True, False for the paper
      variant; see the module docstring);
    - Armijo: ``alpha0`` 1000, ``beta`` 0.2, ``armijo_c`` 1e-4, ``min_alpha`` 1e-5;
      ``armijo_slack`` (None: 1e-6, float32 slack relative to max(1, |L|); 0 for the paper
      variant; module docstring);
    - ``variant``: "default" or "paper" (the authors' code as it runs; module docstring).
      ``options`` (:class:`IGOSOptions`) holds the resulting choices;
    - ``baseline``: "blur" (I-GOS default, medexplain.core.perturb.blur_baseline), "mean" (with
      ``mean_image`` (C, *spatial)), "zero" or a tensor;
    - ``activation``: "auto" (softmax, sigmoid for one logit), "softmax", "sigmoid", "logit";
    - ``early_reject``: skip line-search passes that cannot change the Armijo decision;
    - ``batch_size`` (32): images per model pass (a batch of B images makes passes over
      ``B * integration_steps`` perturbed images, chunked by it). Ours: a small CNN on a CPU
      runs slower per image in chunks of 64 than of 20-40 (cache size; measured in
      ``benchmarks/igos.py``), so 32; raise it on a GPU. ``seed``: the noise.

    After a call: ``last_trace`` (:class:`IGOSTrace`, without masks) and ``passes``
    (:class:`~medexplain.explain.igos_loss.PassCounter`); :meth:`explain_with_trace`
    also keeps the masks of every iteration.
    """

    n_masks: ClassVar[int] = 1

    def _regulariser(self, problem: _Problem, masks: torch.Tensor) -> torch.Tensor:
        return self.l1 * l1_term(masks) + problem.l2 * total_variation(masks)

    def _direction(
        self, problem: _Problem, idx: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, None]:
        with torch.enable_grad():
            leaf = masks.detach().clone().requires_grad_(True)
            up = upsample_mask(leaf, problem.spatial)
            weights = torch.ones(idx.numel(), 1, device=masks.device)
            _, up_grad = problem.scorer.evaluate(
                idx,
                up.unsqueeze(1),
                [DELETION],
                problem.coefficients,
                noisy=problem.noisy,
                weights=weights,
            )
            assert up_grad is not None
            grad = _backprop_masks(leaf, up, up_grad.squeeze(1), self._regulariser(problem, leaf))
        return grad, None

    @torch.no_grad()
    def _objective(
        self,
        problem: _Problem,
        idx: torch.Tensor,
        masks: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        loss = self._regulariser(problem, masks)
        todo = torch.ones_like(loss, dtype=torch.bool)
        if threshold is not None and self._bounded():
            todo = loss <= threshold  # f_c >= 0: L >= R(M) already fails Armijo otherwise
        if bool(todo.any()):
            sel = todo.nonzero().squeeze(1)
            up = upsample_mask(masks[sel], problem.spatial).unsqueeze(1)
            if self.options.integrated_objective:  # the authors' line search: the IG path
                score, _ = problem.scorer.evaluate(
                    idx[sel], up, [DELETION], problem.coefficients, noisy=problem.noisy
                )
            else:
                one = torch.ones(1, device=masks.device, dtype=masks.dtype)
                score, _ = problem.scorer.evaluate(idx[sel], up, [DELETION], one, noisy=False)
            score = score[:, 0]
            loss[sel] = loss[sel] + score
        return loss


def path_masks(
    masks: torch.Tensor, spatial: tuple[int, ...], product_of_upsampled: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """iGOS++ masks at the image resolution for masks ``(B, 2, *s)`` (deletion, insertion):
    ``up(Md)``, ``up(Mi)``, the combined mask of the two data terms and ``up(Md * Mi)`` (the
    regulariser's), each ``(B, 1, *spatial)``. The combined data mask is ``up(Md * Mi)``, or
    ``up(Md) * up(Mi)`` as in the authors' code with ``product_of_upsampled``."""
    deletion, insertion = masks[:, 0:1], masks[:, 1:2]
    up_del = upsample_mask(deletion, spatial)
    up_ins = upsample_mask(insertion, spatial)
    up_comb = upsample_mask(deletion * insertion, spatial)
    up_data = up_del * up_ins if product_of_upsampled else up_comb
    return up_del, up_ins, up_data, up_comb


@register("igos++", "iGOS++: deletion and insertion masks, bilateral TV (Khorram 2021)")
class IGOSPlusPlus(_MaskOptimiser):
    """iGOS++ (Khorram, Lawson, Li 2021). Maps = ``1 - up(Md * Mi)`` ``(B, 1, *spatial)``.

    Same parameters as :class:`IGOS` plus ``btv_sigma`` = 0.01 (the paper's value, which
    the authors apply to the network's standardised input; medexplain's default applies it to
    the image min-max normalised per image, ``variant="paper"`` to the image in units of its
    standard deviation). One model pass carries up to ``batch_size`` of the
    ``B * 4 * integration_steps`` perturbed images of the four path terms.
    """

    n_masks: ClassVar[int] = 2
    _PATHS = (DELETION, INSERTION, DELETION, INSERTION)  # Del(Md), Ins(Mi), Del(M), Ins(M)
    _SIGNS = (1.0, -1.0, 1.0, -1.0)

    def __init__(self, model: nn.Module, *, btv_sigma: float = 0.01, **params: Any) -> None:
        super().__init__(model, **params)
        if not float(btv_sigma) > 0:
            raise ValueError(f"btv_sigma must be > 0, got {btv_sigma!r}")
        self.btv_sigma = float(btv_sigma)

    def _prepare(self, problem: _Problem, x: torch.Tensor) -> None:
        if self.options.standardised_btv:
            scale = self.noise_scales(x)
            problem.weights = standardised_bilateral_weights(x, self.btv_sigma, scale)
        else:
            problem.weights = bilateral_weights(x, self.btv_sigma)

    def _terms(
        self, problem: _Problem, idx: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Upsampled path masks ``(n, 4, 1, *spatial)`` and the regulariser ``(n,)``."""
        combined = masks[:, 0:1] * masks[:, 1:2]
        up_del, up_ins, up_data, up_comb = path_masks(
            masks, problem.spatial, self.options.product_of_upsampled
        )
        ups = torch.stack([up_del, up_ins, up_data, up_data], dim=1)
        assert problem.weights is not None
        weights = [w[idx] for w in problem.weights]
        reg = self.l1 * l1_term(combined) + problem.l2 * bilateral_tv(combined, up_comb, weights)
        return ups, reg

    def _signs(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.tensor(self._SIGNS, device=device).expand(n, -1)

    def _direction(
        self, problem: _Problem, idx: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            leaf = masks.detach().clone().requires_grad_(True)
            ups, reg = self._terms(problem, idx, leaf)
            signs = self._signs(idx.numel(), masks.device)
            # The authors halve the data terms' gradient (not their loss).
            half = 0.5 if self.options.halved_data else 1.0
            scores, up_grad = problem.scorer.evaluate(
                idx,
                ups,
                self._PATHS,
                problem.coefficients,
                noisy=problem.noisy,
                weights=signs * half,
            )
            assert up_grad is not None
            grad = _backprop_masks(leaf, ups, up_grad, reg)
        return grad, (scores * signs).sum(1) + reg.detach()

    @torch.no_grad()
    def _objective(
        self,
        problem: _Problem,
        idx: torch.Tensor,
        masks: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ups, loss = self._terms(problem, idx, masks)
        if threshold is None or not self._bounded():
            scores, _ = problem.scorer.evaluate(
                idx, ups, self._PATHS, problem.coefficients, noisy=problem.noisy
            )
            return (scores * self._signs(idx.numel(), masks.device)).sum(1) + loss
        # Early rejection, exact because 0 <= f_c <= 1: every Del term is >= 0 and every
        # Ins term >= -1. Stage 0: L >= R - 2; stage 1 (insertion terms evaluated):
        # L >= R + Ins(Mi) + Ins(M); stage 2: the deletion terms complete L. An image leaves
        # as soon as its lower bound exceeds the Armijo threshold.
        stages = ((1, 3), (0, 2))
        unknown = -float(len(stages[0]))  # lower bound of the terms not evaluated yet
        todo = torch.ones_like(loss, dtype=torch.bool)
        for terms in stages:
            todo &= loss + unknown <= threshold
            if not bool(todo.any()):
                break
            sel = todo.nonzero().squeeze(1)
            paths = [self._PATHS[j] for j in terms]
            scores, _ = problem.scorer.evaluate(
                idx[sel], ups[sel][:, list(terms)], paths, problem.coefficients, noisy=problem.noisy
            )
            signs = torch.tensor([self._SIGNS[j] for j in terms], device=masks.device)
            loss[sel] = loss[sel] + (scores * signs).sum(1)
            unknown = 0.0
        return loss

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", btv_sigma={self.btv_sigma})"
