"""What a classifier says about a class: targets, probabilities, chunked forward passes.

Shared by explainers (which optimise or perturb against ``f_c``) and metrics (which
record ``f_c`` along deletion/insertion/PEPPR curves). METHODS.md: ``f_c`` is the
softmax probability of class c, or the sigmoid for a model with a single logit;
multi-label models (independent sigmoid heads) use ``activation="sigmoid"``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS = ("auto", "softmax", "sigmoid", "logit")


def chunked(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    batch_size: int | None,
    *aligned: torch.Tensor,
) -> torch.Tensor:
    """``fn(x_chunk, *aligned_chunks)`` on chunks of ``batch_size`` along dim 0, concatenated.

    The one helper for forward (and backward) passes over many images: it bounds memory for
    methods that make many passes. ``aligned`` are per-image tensors (targets, classes) split
    the same way as ``x``. ``batch_size=None`` or a size at least ``len(x)`` makes one call.
    """
    if batch_size is None or batch_size >= x.shape[0]:
        return fn(x, *aligned)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = zip(torch.split(x, batch_size), *(torch.split(t, batch_size) for t in aligned))
    return torch.cat([fn(*parts) for parts in chunks], dim=0)


def _check_logits(logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits (B, K); got shape {tuple(logits.shape)}")


def predict_classes(logits: torch.Tensor, multilabel: bool = False) -> torch.Tensor:
    """The model's decision for logits ``(B, K)``: the one rule used by every layer.

    - ``K > 1`` single-label: the argmax, long ``(B,)``;
    - ``K == 1``: class 1 when the logit is > 0 (sigmoid > 1/2), else class 0, long ``(B,)``;
    - ``multilabel``: one independent decision per head, ``logit > 0``, long ``(B, K)``.
    """
    _check_logits(logits)
    if multilabel:
        return (logits > 0).to(torch.long)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.long)
    return logits.argmax(dim=1)


def default_targets(logits: torch.Tensor) -> torch.Tensor:
    """The output index an explainer explains when no target is given, long ``(B,)``.

    The predicted class (argmax) for ``K > 1``; for a one-logit model the only output, index 0,
    whatever :func:`predict_classes` decides (the map of that logit is evidence for class 1,
    and a signed map's sign says which class it supports).
    """
    _check_logits(logits)
    if logits.shape[1] == 1:
        return torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits.argmax(dim=1)


def as_targets(
    target: int | torch.Tensor | None,
    batch: int,
    device: torch.device | str | None = None,
    logits: Callable[[], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Normalise a target argument to a long tensor ``(B,)``.

    ``target`` may be an int (same class for every image), a tensor/sequence of B ints, or
    None: then :func:`default_targets` of ``logits()``.
    """
    if target is None:
        if logits is None:
            raise ValueError("target=None needs the model's logits to pick the predicted class")
        return default_targets(logits()).to(device)
    if isinstance(target, bool):
        raise TypeError("target must be an int, a tensor of ints or None, not a bool")
    if isinstance(target, int):
        return torch.full((batch,), int(target), dtype=torch.long, device=device)
    tensor = torch.as_tensor(target, device=device)
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {tensor.dtype}")
    tensor = tensor.long().flatten() if tensor.dim() <= 1 else tensor
    if tensor.dim() != 1:
        raise ValueError(
            f"target must be an int or a 1D tensor of B ints, got {tuple(tensor.shape)}"
        )
    if tensor.numel() == 1 and batch > 1:
        tensor = tensor.expand(batch)
    if tensor.numel() != batch:
        raise ValueError(f"target has {tensor.numel()} entries for a batch of {batch} images")
    return tensor.contiguous()


def check_targets(targets: torch.Tensor, num_outputs: int) -> None:
    """Raise a clear error when a target index is outside the model's outputs."""
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_outputs):
        raise ValueError(
            f"target class {int(targets.max())} is out of range for a model with "
            f"{num_outputs} output(s)"
        )


def check_activation(activation: str) -> None:
    """Raise unless ``activation`` is one of :data:`ACTIVATIONS` (:func:`probabilities`);
    methods call this in their constructor so that a bad value fails before any work."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def probabilities(logits: torch.Tensor, activation: str = "auto") -> torch.Tensor:
    """Turn logits ``(B, K)`` into the scores ``f`` the methods use.

    ``auto``: softmax for K > 1, sigmoid for K == 1 (METHODS.md); ``softmax``; ``sigmoid``
    (multi-label heads); ``logit`` (raw logits, e.g. for the warping simulators).
    """
    if activation == "auto":
        activation = "sigmoid" if logits.shape[1] == 1 else "softmax"
    if activation == "softmax":
        return torch.softmax(logits, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    check_activation(activation)  # "logit", or an unknown name that raises here
    return logits


def class_score(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    activation: str = "auto",
    batch_size: int | None = None,
) -> torch.Tensor:
    """``f_c(x)`` for each image: ``(B,)``, differentiable; forward passes chunked by batch_size.

    ``targets`` is ``(B,)``; chunks of ``x`` take the matching chunk of targets.
    """

    def score(xs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        probs = probabilities(model(xs), activation)
        return probs.gather(1, ts.view(-1, 1).to(probs.device)).squeeze(1)

    return chunked(score, x, batch_size, targets)


@torch.no_grad()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int | None = 64, activation: str = "auto"
) -> torch.Tensor:
    """Class scores ``(B, K)`` without gradients, in chunks."""
    return chunked(lambda part: probabilities(model(part), activation), x, batch_size)
