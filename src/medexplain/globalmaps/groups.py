"""Group keys and which images of a batch belong to each group.

Groups: the true label (``("label", name)``), the predicted label (``("prediction", name)``),
the outcome per label (``("outcome", name, "TP"|"FP"|"FN"|"TN")``, one-vs-rest for
multi-class) and all images (``("overall",)``). Multi-label data has ``(B, K)`` 0/1 labels
and predictions; an image then belongs to every label group it is positive for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KINDS = ("label", "prediction", "outcome")
OUTCOMES = ("TP", "FP", "FN", "TN")
OVERALL: tuple[str, ...] = ("overall",)

GroupKey = tuple[str, ...]


def possible_keys(class_names: Sequence[str], kinds: Sequence[str]) -> list[GroupKey]:
    """Every group key the ``kinds`` of groupings can fill, in a stable order."""
    keys: list[GroupKey] = [OVERALL]
    for kind in ("label", "prediction"):
        if kind in kinds:
            keys += [(kind, name) for name in class_names]
    if "outcome" in kinds:
        keys += [("outcome", name, o) for name in class_names for o in OUTCOMES]
    return keys


def binary_matrix(
    values: torch.Tensor | Sequence, name: str, batch: int, num_classes: int, multilabel: bool
) -> torch.Tensor:
    """Labels or predictions as a bool ``(B, K)`` membership matrix."""
    tensor = torch.as_tensor(values).cpu()
    if multilabel:
        if tensor.shape != (batch, num_classes):
            raise ValueError(
                f"{name} must be (B, K) = ({batch}, {num_classes}) 0/1 values for multi-label "
                f"data; got {tuple(tensor.shape)}"
            )
        if not bool(((tensor == 0) | (tensor == 1)).all()):
            raise ValueError(f"{name} must hold only 0/1 values for multi-label data")
        return tensor == 1
    if tensor.dim() == 0:
        tensor = tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(
            f"{name} must be (B,) = ({batch},) class indices for multi-class data "
            f"(use multilabel=True for (B, K) 0/1 labels); got {tuple(tensor.shape)}"
        )
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {tensor.dtype}")
    if batch and (int(tensor.min()) < 0 or int(tensor.max()) >= num_classes):
        raise ValueError(f"{name} holds a class index outside [0, {num_classes})")
    return torch.nn.functional.one_hot(tensor.long(), num_classes).bool()


def memberships(
    truth: torch.Tensor | None,
    pred: torch.Tensor | None,
    class_names: Sequence[str],
    kinds: Sequence[str],
    batch: int,
) -> dict[GroupKey, torch.Tensor]:
    """``{group key: bool (B,) members}`` for a batch with ``(B, K)`` bool ``truth`` and
    ``pred`` (either may be None: the groupings that need it are skipped)."""
    members: dict[GroupKey, torch.Tensor] = {OVERALL: torch.ones(batch, dtype=torch.bool)}
    for j, name in enumerate(class_names):
        if "label" in kinds and truth is not None:
            members[("label", name)] = truth[:, j]
        if "prediction" in kinds and pred is not None:
            members[("prediction", name)] = pred[:, j]
        if "outcome" in kinds and truth is not None and pred is not None:
            t, p = truth[:, j], pred[:, j]
            members[("outcome", name, "TP")] = t & p
            members[("outcome", name, "FP")] = ~t & p
            members[("outcome", name, "FN")] = t & ~p
            members[("outcome", name, "TN")] = ~t & ~p
    return members
