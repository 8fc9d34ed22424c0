"""One training loop for every learned piece of medexplain.

:func:`train_loop` is generic: it knows nothing about classification. A caller gives it a
module, ``loss_fn(batch) -> scalar`` and an iterable of batches; the classifier
(:func:`medexplain.models.train.train_classifier`) and the learned explainers (generators,
warping simulators) all train through it, so early stopping, time limits, seeding and
progress behave the same everywhere.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.model import model_device
from ..core.progress import progress_bar

__all__ = ["TrainHistory", "seed_everything", "train_loop"]


@dataclass
class TrainHistory:
    """What :func:`train_loop` did.

    ``train_loss[e]`` is the mean of the step losses of epoch ``e``; ``val_metric[e]`` the
    value of ``val_fn`` after that epoch (empty without ``val_fn``). ``best_epoch`` is the
    0-based epoch whose weights the module holds at the end (the last epoch without
    ``val_fn``). ``stopped_early`` is True when patience or ``max_seconds`` ended training
    before ``epochs``; ``stop_reason`` says which ("completed", "patience" or "time").
    """

    train_loss: list[float]
    val_metric: list[float]
    best_epoch: int
    seconds: float
    stopped_early: bool
    stop_reason: str = "completed"
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every GPU)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def _seeded(module: nn.Module, seed: int) -> Iterator[None]:
    """Seed torch's RNG for the block (dropout, global-RNG shuffling) and restore the
    caller's RNG state afterwards, so training is deterministic without touching global
    state."""
    device = model_device(module)
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        index = device.index if device.index is not None else 0
        fork = torch.random.fork_rng(devices=[index], device_type=device.type)
    with fork:
        torch.manual_seed(int(seed))
        yield


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}")


# Longer than 80 lines only through its signature and docstring (the body is ~55 lines).
def train_loop(
    module: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    train_loader: Iterable,
    *,
    val_fn: Callable[[], float] | None = None,
    higher_is_better: bool = True,
    epochs: int = 20,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    patience: int | None = 5,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "training",
    parameters: Iterable[nn.Parameter] | None = None,
) -> TrainHistory:
    """Train ``module`` with Adam on ``loss_fn(batch)`` for every batch of ``train_loader``.

    - ``module.train()`` during the steps; ``module.eval()`` and ``torch.no_grad()`` while
      ``val_fn()`` runs after every epoch (use ``torch.enable_grad()`` inside ``val_fn`` if
      it needs gradients). ``train()``/``eval()`` reach every submodule: keep frozen
      networks (e.g. the classifier an explainer learns from) outside ``module`` and call
      them from ``loss_fn``.
    - With ``val_fn``: the best epoch (by ``higher_is_better``; NaN never counts as best)
      is remembered and its ``state_dict`` restored at the end, whatever ended training.
      Training stops after ``patience`` epochs in a row without improvement (``None``:
      never stop on patience).
    - ``max_seconds`` is checked before every optimisation step but an epoch's first: once
      exceeded, the current (partial) epoch is closed (validated if ``val_fn``) and
      training stops. At least one step always runs.
    - ``train_loader`` is iterated once per epoch, so it must be re-iterable (a
      ``DataLoader``, a list of batches); a generator only lasts one epoch.
    - ``seed`` seeds torch's RNG inside the loop (dropout, loaders that shuffle with the
      global RNG); the caller's RNG state is restored afterwards.
    - ``parameters`` restricts what Adam updates (default: every parameter of ``module``
      that requires grad).

    The module is left in eval mode. Returns a :class:`TrainHistory`.
    """
    params = _trainable(
        module, loss_fn, val_fn, epochs, lr, weight_decay, patience, max_seconds, parameters
    )
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    try:
        steps_per_epoch: int | None = len(train_loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = None
    total = int(epochs) * steps_per_epoch if steps_per_epoch else int(epochs)
    history = TrainHistory(
        train_loss=[], val_metric=[], best_epoch=-1, seconds=0.0, stopped_early=False
    )
    best = _Best(higher_is_better)
    start = time.perf_counter()

    def out_of_time() -> bool:
        return max_seconds is not None and time.perf_counter() - start > max_seconds

    def step(batch: Any, epoch: int, done: int) -> float:
        return _step(optimizer, loss_fn, batch, f"at epoch {epoch}, step {done}", description)

    with _seeded(module, seed), progress_bar(progress) as bar:
        task = bar.add_task(description, total=total, status="")
        for epoch in range(int(epochs)):
            if epoch > 0 and out_of_time():
                history.stopped_early, history.stop_reason = True, "time"
                break
            module.train()
            losses: list[float] = []
            timed_out = False
            for batch in train_loader:
                if losses and out_of_time():
                    timed_out = True
                    break
                losses.append(step(batch, epoch, len(losses)))
                if steps_per_epoch:
                    bar.update(task, advance=1, status=f"loss {losses[-1]:.4f}")
            history.steps += len(losses)
            _check_epoch_ran(losses, epoch)
            history.train_loss.append(float(np.mean(losses)))
            improved = _validate(module, val_fn, best, history, epoch)
            status = _status(history, epoch, epochs, improved if val_fn is not None else None)
            bar.update(task, advance=0 if steps_per_epoch else 1, status=status)
            if timed_out:
                history.stopped_early, history.stop_reason = True, "time"
                break
            if patience is not None and val_fn is not None and best.bad_epochs >= int(patience):
                history.stopped_early = epoch + 1 < int(epochs)
                history.stop_reason = "patience"
                break
        if steps_per_epoch:
            bar.update(task, completed=total)

    if best.state is not None:
        module.load_state_dict(best.state)
    elif val_fn is not None:
        # every validation was NaN: keep the last weights and say so.
        history.best_epoch = len(history.train_loss) - 1
    module.eval()
    history.seconds = time.perf_counter() - start
    return history


def _trainable(
    module: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    val_fn: Callable[[], float] | None,
    epochs: int,
    lr: float,
    weight_decay: float,
    patience: int | None,
    max_seconds: float | None,
    parameters: Iterable[nn.Parameter] | None,
) -> list[nn.Parameter]:
    """Check :func:`train_loop`'s arguments; the parameters Adam will update."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(batch) -> scalar tensor")
    if val_fn is not None and not callable(val_fn):
        raise TypeError("val_fn must be callable: val_fn() -> float")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    _check_positive("lr", lr)
    _check_positive("weight_decay", weight_decay, allow_zero=True)
    if patience is not None and int(patience) < 1:
        raise ValueError(f"patience must be >= 1 or None, got {patience}")
    if max_seconds is not None:
        _check_positive("max_seconds", max_seconds, allow_zero=True)
    params = list(parameters) if parameters is not None else list(module.parameters())
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("there is nothing to train: no parameter requires grad")
    return params


def _step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Any], torch.Tensor],
    batch: Any,
    where: str,
    description: str,
) -> float:
    """One optimisation step on ``batch``; its loss. Raises on a non-scalar or non-finite loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("loss_fn must return a scalar tensor")
    if not torch.isfinite(loss.detach()).all():
        raise FloatingPointError(
            f"{description}: loss is {loss.item()} {where}; lower lr or check the data"
        )
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _status(history: TrainHistory, epoch: int, epochs: int, improved: bool | None) -> str:
    """Progress text after an epoch; ``improved`` None when there is no validation."""
    status = f"epoch {epoch + 1}/{epochs} loss {history.train_loss[-1]:.4f}"
    if improved is not None:
        status += f" val {history.val_metric[-1]:.4f}" + (" *" if improved else "")
    return status


def _check_epoch_ran(losses: list[float], epoch: int) -> None:
    if not losses:
        advice = ": pass a re-iterable (a DataLoader, a list), not a generator"
        raise ValueError(
            f"train_loader yielded no batches in epoch {epoch}" + (advice if epoch else "")
        )


@dataclass
class _Best:
    """The best validation value so far, its weights, and the epochs since it improved."""

    higher_is_better: bool
    value: float | None = None
    state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0

    def update(self, value: float, module: nn.Module) -> bool:
        """Record ``value`` (NaN never counts as best); True when it is a new best."""
        if not math.isnan(value) and (
            self.value is None
            or (value > self.value if self.higher_is_better else value < self.value)
        ):
            self.value = value
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False


def _validate(
    module: nn.Module,
    val_fn: Callable[[], float] | None,
    best: _Best,
    history: TrainHistory,
    epoch: int,
) -> bool:
    """Run ``val_fn`` in eval mode without gradients after an epoch; True when it improved."""
    if val_fn is None:
        history.best_epoch = epoch
        return False
    module.eval()
    with torch.no_grad():
        value = float(val_fn())
    history.val_metric.append(value)
    improved = best.update(value, module)
    if improved:
        history.best_epoch = epoch
    return improved
