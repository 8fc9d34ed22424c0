"""The optimisation loop shared by I-GOS and iGOS++: batched, one Armijo search per image.

The method, its defaults and every deliberate deviation from the papers are described in
:mod:`.igos`; this module holds the machinery: the trace, the per-batch problem and
:class:`_MaskOptimiser` (mask size, noise unit, TV scaling, line search, iterations).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import per_image_noise
from ..core.perturb import check_baseline, make_baseline, upsample_mask
from ..core.scores import check_activation
from .base import Explainer
from .igos_loss import PassCounter, PathScorer

#: Mask resolution the papers' regulariser weights were tuned for.
REFERENCE_MASK_SIZE = 28
#: Smallest mask resolution per spatial dim.
MIN_MASK_SIZE = 4
#: ``variant`` values: medexplain's defaults, or the authors' code as it runs.
VARIANTS = ("default", "paper")


@dataclass(frozen=True)
class IGOSOptions:
    """The algorithmic choices where medexplain's default and the authors' code differ.

    Every field is False by default; ``variant="paper"`` sets them all (:meth:`paper`). The
    benchmark ``benchmarks/igos_paper.py`` toggles them one at a time.

    - ``fresh_noise``: new noise for every evaluation of the objective, and the Armijo base
      ``L(M)`` evaluated anew every iteration (authors) instead of one fixed draw;
    - ``keep_going``: a failed line search still takes its last, tiny step and the
      optimisation goes on (authors) instead of stopping the image;
    - ``integrated_objective`` (I-GOS): the line search checks ``R(M)`` plus the integrated,
      noisy deletion score (authors) instead of ``R(M) + f_c(phi(x, b, M))``;
    - ``halved_data`` (iGOS++): the data terms' gradient is halved (authors);
    - ``product_of_upsampled`` (iGOS++): the combined data terms use ``up(Md) * up(Mi)``
      (authors) instead of ``up(Md * Mi)``;
    - ``standardised_btv`` (iGOS++): bilateral weights on the image in units of its standard
      deviation (:func:`~.igos_loss.standardised_bilateral_weights`, authors) instead of
      min-max normalised.
    """

    fresh_noise: bool = False
    keep_going: bool = False
    integrated_objective: bool = False
    halved_data: bool = False
    product_of_upsampled: bool = False
    standardised_btv: bool = False

    @classmethod
    def paper(cls) -> IGOSOptions:
        return cls(**{f.name: True for f in fields(cls)})


@dataclass
class IGOSTrace:
    """What the optimisation did, per iteration ``t`` and image ``b`` (tensors on the CPU).

    - ``loss`` ``(T, B)``: ``L(M_t)``, the value the Armijo test compares against (NaN once
      the image has stopped);
    - ``new_loss`` ``(T, B)``: ``L`` at the accepted step (NaN when none was accepted);
    - ``alpha`` ``(T, B)``: accepted step size, 0 when the search failed, NaN once stopped;
    - ``grad_sq`` ``(T, B)``: ``|g|^2`` over all masks of the image;
    - ``trials`` ``(T, B)``: objective evaluations made by the line search;
    - ``stopped_at`` ``(B,)``: first iteration without a step (T when it never stopped);
    - ``final_loss`` ``(B,)``: ``L`` of the returned masks;
    - ``masks`` ``(T + 1, B, K, *s)`` or None: the masks before every iteration and at the
      end (K = 1 for I-GOS; K = 2 for iGOS++: deletion, insertion), kept by
      :meth:`explain_with_trace`;
    - ``passes``: the model passes made (:class:`PassCounter`);
    - ``armijo_c``, ``armijo_slack``: the accepted steps satisfy
      ``new_loss <= loss - armijo_c * alpha * grad_sq + armijo_slack * max(1, |loss|)``.
    """

    loss: torch.Tensor
    new_loss: torch.Tensor
    alpha: torch.Tensor
    grad_sq: torch.Tensor
    trials: torch.Tensor
    stopped_at: torch.Tensor
    final_loss: torch.Tensor
    armijo_c: float
    armijo_slack: float = 0.0
    masks: torch.Tensor | None = None
    passes: PassCounter = field(default_factory=PassCounter)

    @property
    def accepted(self) -> torch.Tensor:
        """``(T, B)`` bool: a step was taken at this iteration."""
        return ~torch.isnan(self.new_loss)


@dataclass
class _Problem:
    """Everything fixed during one optimisation (one batch)."""

    scorer: PathScorer
    spatial: tuple[int, ...]
    coefficients: torch.Tensor  # (S,) k/S for k = 1..S
    noisy: bool
    l2: float  # effective TV weight (after scaling with the mask size)
    weights: list[torch.Tensor] | None = None  # iGOS++ bilateral weights per axis (B, 1, ...)


class _MaskOptimiser(Explainer):
    """Shared optimisation loop of I-GOS and iGOS++ (batched, per-image Armijo)."""

    signed: ClassVar[bool] = False
    #: Number of masks optimised per image.
    n_masks: ClassVar[int] = 1

    def __init__(
        self,
        model: nn.Module,
        *,
        size: int | tuple[int, ...] | None = None,
        iterations: int = 15,
        integration_steps: int = 20,
        l1: float = 1.0,
        l2: float = 20.0,
        scale_l2: bool | None = None,
        noise_std: float = 0.2,
        noise_relative: bool = True,
        alpha0: float = 1000.0,
        beta: float = 0.2,
        armijo_c: float = 1e-4,
        min_alpha: float = 1e-5,
        armijo_slack: float | None = None,
        baseline: str | torch.Tensor = "blur",
        mean_image: torch.Tensor | None = None,
        activation: str = "auto",
        early_reject: bool = True,
        batch_size: int = 32,
        seed: int = 0,
        variant: str = "default",
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        paper = variant == "paper"
        if scale_l2 is None:
            scale_l2 = not paper
        if armijo_slack is None:
            armijo_slack = 0.0 if paper else 1e-6
        _check_size(size)
        checks = {
            "iterations": (iterations, int(iterations) >= 1 if _is_int(iterations) else False),
            "integration_steps": (
                integration_steps,
                int(integration_steps) >= 1 if _is_int(integration_steps) else False,
            ),
            "l1": (l1, float(l1) >= 0),
            "l2": (l2, float(l2) >= 0),
            "noise_std": (noise_std, float(noise_std) >= 0),
            "alpha0": (alpha0, float(alpha0) > 0),
            "beta": (beta, 0 < float(beta) < 1),
            "armijo_c": (armijo_c, float(armijo_c) >= 0),
            "min_alpha": (min_alpha, 0 < float(min_alpha) <= float(alpha0)),
            "armijo_slack": (armijo_slack, float(armijo_slack) >= 0),
        }
        for name, (value, ok) in checks.items():
            if not ok:
                raise ValueError(f"invalid {name}={value!r} (see the IGOS docstring for ranges)")
        check_baseline(baseline, mean_image)
        check_activation(activation)
        self.size = size
        self.iterations = int(iterations)
        self.integration_steps = int(integration_steps)
        self.l1 = float(l1)
        self.l2 = float(l2)
        self.scale_l2 = bool(scale_l2)
        self.noise_std = float(noise_std)
        self.noise_relative = bool(noise_relative)
        self.alpha0 = float(alpha0)
        self.beta = float(beta)
        self.armijo_c = float(armijo_c)
        self.min_alpha = float(min_alpha)
        self.armijo_slack = float(armijo_slack)
        self.baseline = baseline
        self.mean_image = mean_image
        self.activation = activation
        self.early_reject = bool(early_reject)
        self.variant = variant
        self.options = IGOSOptions.paper() if paper else IGOSOptions()
        self.last_trace: IGOSTrace | None = None
        self.passes = PassCounter()
        self._keep_masks = False

    # ----------------------------------------------------------------- public helpers
    def mask_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """Mask resolution for images of size ``spatial``: ``size`` per dim, or by default
        28 clamped to the image. Raises when a size is outside ``[4, image size]``."""
        spatial = tuple(int(n) for n in spatial)
        if self.size is None:
            sizes = tuple(min(REFERENCE_MASK_SIZE, n) for n in spatial)
        elif isinstance(self.size, int):
            sizes = (self.size,) * len(spatial)
        else:
            sizes = tuple(self.size)
            if len(sizes) != len(spatial):
                raise ValueError(
                    f"size {sizes} has {len(sizes)} entries for images with {len(spatial)} "
                    f"spatial dims {spatial}"
                )
        for s, n in zip(sizes, spatial):
            if not MIN_MASK_SIZE <= s <= n:
                raise ValueError(
                    f"size must be between {MIN_MASK_SIZE} and the image size per spatial dim; "
                    f"got mask size {sizes} for images of spatial size {spatial}"
                )
        return sizes

    @staticmethod
    def noise_scales(x: torch.Tensor) -> torch.Tensor:
        """Per-image noise unit ``(B,)`` for ``noise_relative``: the standard deviation of
        each image over all its pixels and channels (1 for a constant image)."""
        std = x.flatten(1).std(dim=1, unbiased=False)
        return torch.where(std > 0, std, torch.ones_like(std))

    def effective_l2(self, mask_size: tuple[int, ...]) -> float:
        """TV weight used for masks of ``mask_size``: ``l2 * mean(s) / 28`` (or ``l2``)."""
        if not self.scale_l2:
            return self.l2
        return self.l2 * (sum(mask_size) / len(mask_size)) / REFERENCE_MASK_SIZE

    def explain_with_trace(
        self, x: torch.Tensor, target: int | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, IGOSTrace]:
        """Maps ``(B, 1, *spatial)`` and the optimisation trace including the masks of every
        iteration (``trace.masks``). Every call also leaves a trace without masks in
        ``self.last_trace`` and the pass counts in ``self.passes``."""
        self._keep_masks = True
        try:
            maps = self(x, target)
        finally:
            self._keep_masks = False
        assert self.last_trace is not None
        return maps, self.last_trace

    # ------------------------------------------------------------------- the method
    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        mask_size = self.mask_size(spatial)
        baseline = make_baseline(x, self.baseline, self.mean_image)
        steps = self.integration_steps
        noisy = self.noise_std > 0
        noise = fresh = None
        if noisy and self.options.fresh_noise:
            fresh = (self.seed, self.noise_std)
        elif noisy:
            shape = (2, steps, *x.shape[1:])
            noise = per_image_noise(shape, 1, self.seed, x.device, self.noise_std)[0]
        noise_scale = self.noise_scales(x) if noisy and self.noise_relative else None
        self.passes = PassCounter()
        scorer = PathScorer(
            self.model,
            x,
            baseline,
            targets,
            activation=self.activation,
            batch_size=self.batch_size,
            noise=noise,
            noise_scale=noise_scale,
            counter=self.passes,
            fresh_noise=fresh,
        )
        coefficients = torch.arange(1, steps + 1, device=x.device, dtype=x.dtype) / steps
        problem = _Problem(scorer, spatial, coefficients, noisy, self.effective_l2(mask_size))
        self._prepare(problem, x)
        masks = self._optimise(problem, x.shape[0], mask_size, x.device)
        combined = masks.prod(dim=1, keepdim=True)
        # Linear interpolation of values in [0, 1] can overshoot by one float ulp.
        return (1 - upsample_mask(combined, spatial)).clamp(0, 1)

    def _base_loss(
        self,
        problem: _Problem,
        idx: torch.Tensor,
        masks: torch.Tensor,
        current: torch.Tensor,
        base: torch.Tensor | None,
    ) -> torch.Tensor:
        """``L(M)`` ``(n,)`` for the Armijo test: with fresh noise a new evaluation (as the
        authors' line search does), else the by-product of the gradient or the known value."""
        if self.options.fresh_noise:
            return self._objective(problem, idx, masks[idx])
        if base is not None:
            return base
        base = current[idx]
        missing = torch.isnan(base)
        if bool(missing.any()):
            base = base.clone()
            base[missing] = self._objective(problem, idx[missing], masks[idx[missing]])
        return base

    def _prepare(self, problem: _Problem, x: torch.Tensor) -> None:
        """Hook for per-batch precomputation (iGOS++: bilateral weights)."""

    def _direction(
        self, problem: _Problem, idx: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Descent direction ``g`` ``(n, K, *s)`` and, when it is a by-product, ``L(masks)``."""
        raise NotImplementedError

    def _objective(
        self,
        problem: _Problem,
        idx: torch.Tensor,
        masks: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Line-search objective ``L`` ``(n,)`` of masks ``(n, K, *s)`` of images ``idx``.

        With ``threshold`` ``(n,)`` (and ``early_reject``), an image whose loss provably
        exceeds its threshold may get a lower bound of ``L`` (> threshold) instead of ``L``,
        without the model passes that would not change the Armijo decision.
        """
        raise NotImplementedError

    def _bounded(self) -> bool:
        """Whether ``f_c`` is known to lie in [0, 1] (softmax or sigmoid), so that the
        loss terms not yet evaluated can be bounded."""
        return self.early_reject and self.activation != "logit"

    def _line_search(
        self,
        problem: _Problem,
        idx: torch.Tensor,
        masks: torch.Tensor,
        grad: torch.Tensor,
        base: torch.Tensor,
        grad_sq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Armijo back-tracking, each image with its own step. Returns (alpha, new_loss,
        trials): new_loss NaN where no step >= min_alpha is accepted; there alpha is the first
        step below ``min_alpha`` (the step the authors' code takes anyway)."""
        n = idx.numel()
        alpha = torch.full((n,), self.alpha0, device=masks.device, dtype=masks.dtype)
        new_loss = torch.full((n,), float("nan"), device=masks.device, dtype=masks.dtype)
        trials = torch.zeros(n, dtype=torch.long, device=masks.device)
        pending = grad_sq > 0
        expand = (-1, *([1] * (masks.dim() - 1)))
        while bool(pending.any()):
            sel = pending.nonzero().squeeze(1)
            step = alpha[sel]
            candidate = (masks[sel] - step.view(expand) * grad[sel]).clamp(0, 1)
            threshold = base[sel] - self.armijo_c * step * grad_sq[sel]
            threshold = threshold + self.armijo_slack * base[sel].abs().clamp_min(1.0)
            loss = self._objective(problem, idx[sel], candidate, threshold)
            trials[sel] += 1
            good = loss <= threshold
            new_loss[sel[good]] = loss[good]
            pending[sel[good]] = False
            bad = sel[~good]
            alpha[bad] = alpha[bad] * self.beta
            pending[bad[alpha[bad] < self.min_alpha]] = False
        return alpha, new_loss, trials

    def _optimise(
        self, problem: _Problem, batch: int, mask_size: tuple[int, ...], device: torch.device
    ) -> torch.Tensor:
        T = self.iterations
        masks = torch.ones(batch, self.n_masks, *mask_size, device=device)
        current = torch.full((batch,), float("nan"), device=device)
        active = torch.ones(batch, dtype=torch.bool, device=device)
        nan = float("nan")
        loss_t = torch.full((T, batch), nan)
        new_loss_t = torch.full((T, batch), nan)
        alpha_t = torch.full((T, batch), nan)
        grad_sq_t = torch.full((T, batch), nan)
        trials_t = torch.zeros(T, batch, dtype=torch.long)
        stopped_at = torch.full((batch,), T, dtype=torch.long)
        history = [masks.detach().cpu().clone()] if self._keep_masks else None
        for t in range(T):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                if history is not None:
                    history.append(masks.detach().cpu().clone())
                continue
            grad, base = self._direction(problem, idx, masks[idx])
            base = self._base_loss(problem, idx, masks, current, base)
            current[idx] = base
            grad_sq = grad.flatten(1).pow(2).sum(1)
            alpha, new_loss, trials = self._line_search(
                problem, idx, masks[idx], grad, base, grad_sq
            )
            ok = ~torch.isnan(new_loss)
            if not self.options.keep_going:
                alpha = torch.where(ok, alpha, torch.zeros_like(alpha))
            expand = (-1, *([1] * (masks.dim() - 1)))
            masks[idx] = (masks[idx] - alpha.view(expand) * grad).clamp(0, 1)
            # Without a step the loss stays known; after keep_going's unchecked step it is
            # unknown (NaN) and evaluated when needed.
            current[idx] = torch.where(ok | self.options.keep_going, new_loss, base)
            if not self.options.keep_going:
                stopped = idx[~ok]
                active[stopped] = False
                stopped_at[stopped.cpu()] = t
            cpu_idx = idx.cpu()
            loss_t[t, cpu_idx] = base.detach().cpu()
            new_loss_t[t, cpu_idx] = new_loss.cpu()
            alpha_t[t, cpu_idx] = alpha.cpu()
            grad_sq_t[t, cpu_idx] = grad_sq.detach().cpu()
            trials_t[t, cpu_idx] = trials.cpu()
            if history is not None:
                history.append(masks.detach().cpu().clone())
        final = current.clone()
        missing = torch.isnan(final)
        if bool(missing.any()):  # only when T iterations never evaluated L (cannot happen)
            idx = missing.nonzero().squeeze(1)
            final[idx] = self._objective(problem, idx, masks[idx])
        self.last_trace = IGOSTrace(
            loss=loss_t,
            new_loss=new_loss_t,
            alpha=alpha_t,
            grad_sq=grad_sq_t,
            trials=trials_t,
            stopped_at=stopped_at,
            final_loss=final.cpu(),
            armijo_c=self.armijo_c,
            armijo_slack=self.armijo_slack,
            masks=None if history is None else torch.stack(history),
            passes=self.passes,
        )
        return masks

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, iterations={self.iterations}, "
            f"integration_steps={self.integration_steps}, l1={self.l1}, l2={self.l2}, "
            f"baseline={self.baseline if isinstance(self.baseline, str) else 'tensor'!r}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


def _check_size(size: int | tuple[int, ...] | None) -> None:
    if size is None:
        return
    sizes = (size,) if isinstance(size, int) else tuple(size)
    if not sizes or any(
        isinstance(s, bool) or not isinstance(s, int) or s < MIN_MASK_SIZE for s in sizes
    ):
        raise ValueError(
            f"size must be an int >= {MIN_MASK_SIZE} or a tuple of such ints (one per "
            f"spatial dim), or None for {REFERENCE_MASK_SIZE}; got {size!r}"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _backprop_masks(
    leaf: torch.Tensor,
    ups: torch.Tensor,
    up_grads: torch.Tensor,
    regulariser: torch.Tensor,
) -> torch.Tensor:
    """Gradient w.r.t. the coarse ``leaf`` masks from the gradient w.r.t. their upsampled
    copies ``ups`` (collected chunk by chunk by the scorer) plus the regulariser's graph."""
    torch.autograd.backward([ups, regulariser.sum()], [up_grads, None])
    assert leaf.grad is not None
    return leaf.grad.detach()
