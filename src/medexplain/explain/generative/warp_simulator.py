"""Conditional warping simulators (Liu, Adeli, Pohl, Zhao; METHODS.md section 5).

A simulator ``S(x, c)`` (:class:`~.warp_network.WarpSimulator`) predicts a displacement
``u`` that warps an image so that a frozen classifier's score ``f`` for a class moves by a
required margin: ``c = +1`` injects the class's pattern, ``c = -1`` removes it. The
explanation is anatomical: where and how much the image must shrink or expand, read off the
Jacobian determinant of the warp.

Score ``f``: for a classifier with ``K > 1`` logits, ``f_k = z_k - logsumexp_{j != k} z_j``,
the log-odds ``log p_k / (1 - p_k)`` of class ``k`` under the softmax (a choice: it equals the
logit of a binary softmax or of a single-logit model, and it cannot be moved by shifting
every logit together); for a single-logit model ``f`` is that logit.

Losses (the authors' formulation and weights as METHODS.md section 5 gives them, plus one):

- ``L_cls = mean relu(c (f(x) - f(x~)) + b)``: injection must raise ``f`` by at least the
  margin ``b``, removal must lower it by ``b``. The authors use ``b = 12.5`` for their
  classifier; the right margin depends on the classifier's logit scale, so the default
  (``margin=None``) is chosen at fit time from the classifier's scores on the training
  images (:func:`auto_margin`);
- smoothness ``mean |grad u|`` (forward differences, voxel units), weight ``0.001 x 0.04``;
- cycle ``MSE(x, warp(x~, S(x~, -c)))``, weight 1;
- magnitude ``mean |u|^2`` (voxels^2), weight 0.3 — *our addition*: with only the authors'
  terms our small classifier is fooled by large global warps (displacements of tens of
  voxels, folding, Jacobian maps away from the evidence); a quadratic penalty on the
  displacement makes the cheapest solution the local one and spreads it isotropically
  (``magnitude_weight=0`` restores the authors' objective).

Only correctly classified images train the simulator: for every class ``k`` it acts on,
images of class ``k`` learn removal and images of other classes learn injection (a
single-logit model: positives remove, negatives inject). One network serves every class
and both directions through its condition (one-hot class + direction).

Explanation map (explainer ``"warp_simulator"``): for each image and target class ``t``,
if the model decides ``t`` the map is ``log J`` of the *removal* warp; otherwise it is
``-log J`` of the *injection* warp. Both read as the log volume ratio of the image *with*
the pattern over the image *without* it (:mod:`medexplain.core.jacobian`: ``J`` of the
pull-back warp is the source volume over the target volume), so the sign is anatomical:
negative where the pattern shrinks tissue (atrophy), positive where it expands it (widened
ventricles). Use ``|map|`` as the strength of the evidence.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...core.jacobian import jacobian_determinant, log_jacobian
from ...core.model import model_guard
from ...core.scores import chunked
from ...models.checkpoint import load_checkpoint, register_builder, save_checkpoint
from ...models.fingerprint import check_classifier, classifier_record
from ...models.loop import TrainHistory, train_loop
from ..base import Explainer, register
from .warp_network import (
    WarpSimulator,
    WarpSimulatorConfig,
    build_warp_simulator,
    make_condition,
)
from .warp_training import (
    AUTHORS_MARGIN,
    DEFAULT_MARGIN_FRACTION,
    WarpFitConfig,
    _subsample,
    auto_margin,
    class_log_odds,
    collect_samples,
    network_config,
    smoothness,
    warp_losses,
)

__all__ = [
    "AUTHORS_MARGIN",
    "WarpFitConfig",
    "WarpSimulator",
    "WarpSimulatorConfig",
    "WarpSimulatorExplainer",
    "auto_margin",
    "class_log_odds",
    "fit_warp_simulator",
    "jacobian_determinant",
    "make_condition",
    "smoothness",
    "warp_losses",
]

register_builder("warp_simulator", WarpSimulatorConfig, build_warp_simulator)

# --------------------------------------------------------------------------- the explainer

_NETWORK_FIELDS = {f.name for f in fields(WarpSimulatorConfig)}
_FIT_FIELDS = {f.name for f in fields(WarpFitConfig)}


@register(
    "warp_simulator",
    "Conditional warping simulator (Liu et al.): log Jacobian of the warp that removes "
    "(or injects) the target's pattern; needs fit() or checkpoint=",
)
class WarpSimulatorExplainer(Explainer):
    """``maps = WarpSimulatorExplainer(model, checkpoint=path)(x, target)`` -> ``(B, 1, *S)``.

    Build it from a checkpoint (``checkpoint=``), a simulator network (``simulator=``), or
    unfitted with hyper-parameters and call :meth:`fit`. Keyword ``params`` are fields of
    :class:`~.warp_network.WarpSimulatorConfig` (architecture: ``widths``,
    ``diffeomorphic``, ...) or :class:`WarpFitConfig` (training: ``margin``, ``epochs``,
    ``target_class``, ...). The map: ``log J`` of the removal warp where the model decides
    the target, ``-log J`` of the injection warp elsewhere (module docstring). Calling an
    unfitted explainer raises a RuntimeError.
    """

    signed = True

    def __init__(
        self,
        model: nn.Module,
        *,
        simulator: WarpSimulator | None = None,
        checkpoint: str | Path | None = None,
        force: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        **params: Any,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.force = bool(force)
        self.input_shape: tuple[int, ...] | None = None
        unknown = sorted(set(params) - _NETWORK_FIELDS - _FIT_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown warp_simulator parameter(s) {unknown}; architecture: "
                f"{sorted(_NETWORK_FIELDS)}; training: {sorted(_FIT_FIELDS)}"
            )
        self.network_params = {k: v for k, v in params.items() if k in _NETWORK_FIELDS}
        WarpSimulatorConfig(**self.network_params)  # validate now, not after data loading
        self.fit_config = WarpFitConfig(**{k: v for k, v in params.items() if k in _FIT_FIELDS})
        self.simulator: WarpSimulator | None = None
        self.margin: float | None = self.fit_config.margin
        self.target_classes: list[int] | None = None
        self.history: TrainHistory | None = None
        if simulator is not None and checkpoint is not None:
            raise ValueError("give either simulator= or checkpoint=, not both")
        if checkpoint is not None:
            self.load(checkpoint)
        elif simulator is not None:
            if not isinstance(simulator, WarpSimulator):
                raise TypeError(
                    f"simulator must be a WarpSimulator, got {type(simulator).__name__}"
                )
            self.simulator = simulator.to(self.device).eval()

    # ----------------------------------------------------------------- fitting and storage

    def fit(
        self, train: Dataset, val: Dataset | None = None, *, progress: bool = True
    ) -> WarpSimulatorExplainer:
        """Train a new simulator on ``train`` (items ``(image, label, ...)``); ``val`` (same
        form) drives early stopping on the mean validation loss. Returns ``self``."""
        cfg = self.fit_config
        with model_guard(self.model):
            samples, num_outputs, shape, classes = collect_samples(
                self.model, train, cfg.target_class
            )
            fraction = cfg.margin_fraction
            if fraction is None:
                fraction = DEFAULT_MARGIN_FRACTION[len(shape) - 1]
            margin = (
                float(cfg.margin) if cfg.margin is not None else auto_margin(samples.f0, fraction)
            )
            config = network_config(self.network_params, shape, num_outputs)
            simulator = WarpSimulator(config).to(self.device)
            device = self.device
            generator = torch.Generator().manual_seed(self.seed)
            loader = DataLoader(
                samples, batch_size=cfg.train_batch_size, shuffle=True, generator=generator
            )

            def losses(batch) -> dict[str, torch.Tensor]:
                x, cls, direction, f0 = (t.to(device) for t in batch)
                return warp_losses(
                    simulator,
                    self.model,
                    x,
                    cls,
                    direction,
                    f0,
                    margin=margin,
                    smooth_weight=cfg.smooth_weight,
                    cycle_weight=cfg.cycle_weight,
                    magnitude_weight=cfg.magnitude_weight,
                )

            val_fn = None
            if val is not None:
                val_samples, *_ = collect_samples(self.model, val, cfg.target_class)
                val_loader = DataLoader(
                    _subsample(val_samples, cfg.max_val), batch_size=self.batch_size
                )

                def val_fn() -> float:
                    total, count = 0.0, 0
                    for batch in val_loader:
                        total += float(losses(batch)["total"]) * len(batch[0])
                        count += len(batch[0])
                    return total / count

            history = train_loop(
                simulator,
                lambda batch: losses(batch)["total"],
                loader,
                val_fn=val_fn,
                higher_is_better=False,
                epochs=cfg.epochs,
                lr=cfg.lr,
                patience=cfg.patience,
                max_seconds=cfg.max_seconds,
                seed=self.seed,
                progress=progress,
                description="warp simulator",
            )
        self.simulator = simulator.eval()
        self.margin = margin
        self.target_classes = classes
        self.history = history
        self.input_shape = tuple(int(s) for s in shape)
        return self

    def _extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {
            "margin": self.margin,
            "target_classes": self.target_classes,
            "fit_config": asdict(self.fit_config),
            "classifier": classifier_record(
                self.model, self.input_shape, self._fitted().config.num_classes
            ),
        }
        if self.history is not None:
            h = self.history
            extra["history"] = {
                "train_loss": h.train_loss,
                "val_metric": h.val_metric,
                "best_epoch": h.best_epoch,
                "seconds": h.seconds,
                "steps": h.steps,
                "stop_reason": h.stop_reason,
            }
        return extra

    def save(self, path: str | Path) -> Path:
        """Save the simulator and its training facts (margin, classes) as a checkpoint."""
        save_checkpoint(path, self._fitted(), extra=self._extra())
        return Path(path)

    def load(self, path: str | Path) -> WarpSimulatorExplainer:
        """Load a simulator saved by :meth:`save` / :func:`fit_warp_simulator`."""
        simulator, extra = load_checkpoint(path, device=self.device)
        if not isinstance(simulator, WarpSimulator):
            raise ValueError(
                f"{path} holds a {type(simulator).__name__}, not a warp simulator checkpoint"
            )
        check_classifier(extra, self.model, path, self.force)
        self.simulator = simulator.eval()
        self.margin = extra.get("margin")
        classes = extra.get("target_classes")
        self.target_classes = None if classes is None else [int(k) for k in classes]
        return self

    def _fitted(self) -> WarpSimulator:
        if self.simulator is None:
            raise RuntimeError(
                "warp_simulator is not fitted: call .fit(train_dataset) first, or build it "
                "with create('warp_simulator', model, checkpoint=path) or simulator=..."
            )
        return self.simulator

    # ----------------------------------------------------------------- using the simulator

    def _check_classes(self, cls: torch.Tensor, num_outputs: int) -> None:
        simulator = self._fitted()
        if simulator.config.num_classes != num_outputs:
            raise ValueError(
                f"the simulator conditions on {simulator.config.num_classes} class(es) but the "
                f"model returns {num_outputs} logits: was it fitted for another model?"
            )
        if self.target_classes is not None:
            unknown = sorted(set(cls.tolist()) - set(self.target_classes))
            if unknown:
                raise ValueError(
                    f"the simulator was trained for class(es) {self.target_classes}, not for "
                    f"{unknown}; fit it with target_class=None (all classes) or those classes"
                )

    @torch.no_grad()
    def simulate(
        self, x: torch.Tensor, direction: int | torch.Tensor, cls: int | torch.Tensor = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x~, u)``: inject (+1) or remove (-1) class ``cls``'s pattern from ``x``
        ``(B, C, *spatial)``; ``u`` ``(B, d, *spatial)`` voxel displacement, ``x~ = warp(x, u)``.
        """
        simulator = self._fitted()
        x = x.to(self.device, torch.float32)
        with model_guard(simulator):
            parts = [
                simulator.simulate(part, d, c)
                for part, d, c in zip(
                    torch.split(x, self.batch_size),
                    _split_like(direction, x.shape[0], self.batch_size),
                    _split_like(cls, x.shape[0], self.batch_size),
                )
            ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def score_shift(
        self,
        x: torch.Tensor,
        direction: int | torch.Tensor,
        cls: int | torch.Tensor = 0,
        *,
        simulated: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f(x), f(x~))`` ``(B,)`` each: the classifier's log-odds of ``cls`` before and
        after the simulated warp; the requested shift is reached where
        ``direction * (f(x~) - f(x)) >= self.margin``. ``simulated``: ``x~`` if the caller
        already has it from :meth:`simulate` (same ``direction`` and ``cls``), else it is
        simulated here."""
        x = x.to(self.device, torch.float32)
        if simulated is None:
            simulated, _ = self.simulate(x, direction, cls)
        x_sim = simulated.to(self.device, torch.float32)
        cls_t = torch.as_tensor(cls, device=x.device).long().reshape(-1).expand(x.shape[0])
        with model_guard(self.model):
            f0 = self._log_odds(x, cls_t)
            f1 = self._log_odds(x_sim, cls_t)
        return f0, f1

    def _log_odds(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return chunked(lambda part, c: class_log_odds(self.model(part), c), x, self.batch_size, cls)

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        simulator = self._fitted()

        def one_chunk(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
            logits = self.model(xs)
            self._check_classes(ts, logits.shape[1])
            # the model decides the target: explain by removal; otherwise by injection
            single = logits.shape[1] == 1
            decided = logits[:, 0] > 0 if single else logits.argmax(dim=1) == ts
            direction = torch.where(decided, -1.0, 1.0)
            cond = make_condition(
                ts, direction, xs.shape[0], simulator.config.num_classes, xs.device
            )
            u = simulator(xs, cond)
            sign = -direction.view(-1, *([1] * (xs.dim() - 1)))
            return sign * log_jacobian(u)

        with torch.no_grad(), model_guard(simulator):
            return chunked(one_chunk, x, self.batch_size, targets)

    def __repr__(self) -> str:
        state = "fitted" if self.simulator is not None else "unfitted"
        return (
            f"{type(self).__name__}({state}, margin={self.margin}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


def _split_like(value, batch: int, size: int):
    """Chunks of a per-image tensor matching ``torch.split(x, size)``; scalars repeat."""
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        if value.numel() != batch:
            raise ValueError(f"expected a scalar or {batch} values, got {value.numel()}")
        return torch.split(value.reshape(-1), size)
    return [value] * math.ceil(batch / size)


def fit_warp_simulator(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset | None = None,
    *,
    target_class: int | Sequence[int] | None = None,
    out: str | Path | None = None,
    max_seconds: float | None = 300.0,
    seed: int = 0,
    progress: bool = True,
    **params: Any,
) -> WarpSimulatorExplainer:
    """Fit a warping simulator for ``model`` and (if ``out``) save its checkpoint.

    ``target_class``: the class(es) to inject/remove (None: every class, one network).
    ``max_seconds`` caps training (default 5 min); ``params`` are the explainer's keywords
    (architecture and :class:`WarpFitConfig` fields, ``batch_size``). Returns the fitted
    explainer: ``explainer(x, target)`` gives the maps, ``explainer.simulate(...)`` the
    warped images, ``explainer.history`` the training record.
    """
    explainer = WarpSimulatorExplainer(
        model, target_class=target_class, max_seconds=max_seconds, seed=seed, **params
    )
    explainer.fit(train_dataset, val_dataset, progress=progress)
    if out is not None:
        explainer.save(out)
    return explainer
