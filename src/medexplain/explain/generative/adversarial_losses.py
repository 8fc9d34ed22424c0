"""Losses and helpers of the similar/adversarial generator (Charachon et al.).

The method, its loss and where each default comes from are described in
:mod:`.similar_adversarial`, which trains and applies the generator with these.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

OTHER_TARGET = ("warn", "raise", "ignore")
ADVERSARIAL_MODES = ("any",)
#: ``variant`` values of the generator: medexplain's defaults or the successor code's.
VARIANTS = ("default", "paper")
#: Weights of the two classification terms ``(similar, adversarial)``: the successor code's
#: (its similar "classification_sym" 0.01, adversarial 0.2) for both variants; they beat
#: 1 / 1 on the benchmark (``benchmarks/generators_paper.py``).
CE_WEIGHTS = {"default": (0.01, 0.2), "paper": (0.01, 0.2)}


def two_class_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, K)`` with ``K >= 2``; a single logit ``z`` becomes ``(0, z)``."""
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits (B, K); got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return torch.cat([torch.zeros_like(logits), logits], dim=1)
    return logits


def reconstruction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``R(a, b) = MSE(a, b) + MAE(a, b)`` per image, ``(B,)``."""
    diff = (a - b).flatten(1)
    return (diff * diff).mean(dim=1) + diff.abs().mean(dim=1)


def adversarial_loss(
    logits: torch.Tensor, predicted: torch.Tensor, target: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Per-image loss ``(B,)`` that pushes ``x_a`` away from the predicted class.

    ``target=None``: ``-log(1 - p_{predicted})`` (any other class). ``target`` = a class
    index or ``(B,)`` indices: ``CE(logits, target)``, except where ``target == predicted``,
    which gets the "any other class" loss. ``logits`` ``(B, K)`` need ``K >= 2`` columns
    (see :func:`two_class_logits`).
    """
    others = logits.masked_fill(F.one_hot(predicted, logits.shape[1]).bool(), float("-inf"))
    any_other = torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)
    if target is None:
        return any_other
    chosen = torch.as_tensor(target, device=predicted.device).long().expand_as(predicted)
    to_target = F.cross_entropy(logits, chosen, reduction="none")
    return torch.where(predicted == chosen, any_other, to_target)


def adversarial_classes(
    logits: torch.Tensor, mode: str | int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y^, target)`` for logits ``(B, K >= 2)``: the predicted class and the adversarial
    target of ``mode`` (None for "any", else the class index as a ``(B,)`` tensor)."""
    predicted = logits.argmax(dim=1)
    if mode == "any":
        return predicted, None
    if int(mode) >= logits.shape[1]:
        raise ValueError(
            f"adversarial_target={mode} is out of range for a model with {logits.shape[1]} classes"
        )
    return predicted, torch.full_like(predicted, int(mode))


def _images(batch: Any) -> torch.Tensor:
    """Images from a collated batch: a tensor, a tuple ``(image, label, ...)`` or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    from ...models.train import split_batch

    if isinstance(batch, (list, tuple)) and len(batch) == 1:
        return batch[0]
    return split_batch(batch)[0]


class _TrainingMode:
    """Put a module in train/eval mode for a block and restore every flag afterwards."""

    def __init__(self, module: nn.Module, training: bool) -> None:
        self.module, self.training = module, training

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.module.modules()]
        self.module.train(self.training)

    def __exit__(self, *exc: object) -> None:
        for m, flag in zip(self.module.modules(), self.flags):
            m.training = flag


def check_settings(
    similar_weight: float,
    adversarial_weight: float,
    adversarial_target: str | int,
    other_target: str,
    epochs: int,
    train_batch_size: int,
    variant: str = "default",
    ce_weights: tuple[float, float] = (1.0, 1.0),
) -> None:
    """Raise on a setting :class:`~.similar_adversarial.SimilarAdversarial` cannot use."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if min(ce_weights) < 0:
        raise ValueError(
            f"similar_ce_weight and adversarial_ce_weight must be >= 0, got {ce_weights}"
        )
    if similar_weight < 0 or adversarial_weight < 0:
        raise ValueError(
            "similar_weight and adversarial_weight must be >= 0, got "
            f"{similar_weight} and {adversarial_weight}"
        )
    if not (
        adversarial_target in ADVERSARIAL_MODES or isinstance(adversarial_target, int)
    ) or isinstance(adversarial_target, bool):
        raise ValueError(
            f"adversarial_target must be one of {ADVERSARIAL_MODES} or a class index, "
            f"got {adversarial_target!r}"
        )
    if isinstance(adversarial_target, int) and adversarial_target < 0:
        raise ValueError(f"adversarial_target must be >= 0, got {adversarial_target}")
    if other_target not in OTHER_TARGET:
        raise ValueError(f"other_target must be one of {OTHER_TARGET}, got {other_target!r}")
    if int(epochs) < 1 or int(train_batch_size) < 1:
        raise ValueError(
            f"epochs and train_batch_size must be >= 1, got {epochs} and {train_batch_size}"
        )


def generator_losses(
    model: nn.Module,
    generator: nn.Module,
    x: torch.Tensor,
    mode: str | int,
    similar_weight: float,
    adversarial_weight: float,
    ce_weights: tuple[float, float] = (1.0, 1.0),
) -> dict[str, torch.Tensor]:
    """The four loss terms (means over the batch ``x`` ``(B, C, *spatial)``) and their
    weighted ``total`` (``ce_weights`` multiply the similar and the adversarial
    classification terms); ``y^`` is the frozen ``model``'s decision on ``x``."""
    with torch.no_grad():
        predicted, target = adversarial_classes(two_class_logits(model(x)), mode)
    out = generator(x)
    x_s, x_a = out[:, 0], out[:, 1]
    logits = two_class_logits(model(torch.cat([x_s, x_a])))
    logits_s, logits_a = logits[: x.shape[0]], logits[x.shape[0] :]
    terms = {
        "similar_ce": F.cross_entropy(logits_s, predicted),
        "adversarial_ce": adversarial_loss(logits_a, predicted, target).mean(),
        "similar_rec": reconstruction(x_s, x).mean(),
        "adversarial_rec": reconstruction(x_a, x_s).mean(),
    }
    terms["total"] = (
        ce_weights[0] * terms["similar_ce"]
        + ce_weights[1] * terms["adversarial_ce"]
        + similar_weight * terms["similar_rec"]
        + adversarial_weight * terms["adversarial_rec"]
    )
    return terms


def decision_counts(
    model: nn.Module, generator: nn.Module, x: torch.Tensor, mode: str | int
) -> tuple[int, int, int, int]:
    """``(kept, flipped, hit, aimed)`` on one batch ``x``: similar images that keep ``y^``,
    adversarial images that leave it, and (for a target class ``mode``) adversarial images
    that reach it among the ``aimed`` images not already predicted as it."""
    predicted, target = adversarial_classes(two_class_logits(model(x)), mode)
    out = generator(x)
    pred_s = two_class_logits(model(out[:, 0])).argmax(dim=1)
    pred_a = two_class_logits(model(out[:, 1])).argmax(dim=1)
    kept = int((pred_s == predicted).sum())
    flipped = int((pred_a != predicted).sum())
    hit = aimed = 0
    if target is not None:
        other = predicted != target
        hit = int((pred_a[other] == target[other]).sum())
        aimed = int(other.sum())
    return kept, flipped, hit, aimed
