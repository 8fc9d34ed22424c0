"""Which classifier a learned explainer was fitted for: a fingerprint of its weights.

A similar/adversarial generator or a warping simulator learns one classifier's decision; the
same checkpoint used with another classifier would still produce maps, silently wrong. So a
learned explainer's checkpoint records :func:`classifier_record` (the classifier's weight
fingerprint, its number of outputs, input shape and class names when known) and
:func:`check_classifier` refuses it for another classifier unless the caller forces it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ClassifierMismatchError", "check_classifier", "classifier_fingerprint"]


class ClassifierMismatchError(ValueError):
    """A learned explainer's checkpoint fitted for another classifier."""


def _tensor_digest(tensor: torch.Tensor) -> str:
    array = tensor.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{array.dtype}{tuple(tensor.shape)}".encode())
    h.update(array.view(torch.uint8).numpy().tobytes() if array.numel() else b"")
    return h.hexdigest()


def classifier_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the digests of the network's parameters and buffers, sorted, so that
    the same weights give the same fingerprint whatever the module names (a bare network,
    the same network inside :class:`~medexplain.models.external.LoadedModel`, or its
    TorchScript export). A LoadedModel's input normalisation counts when it normalises."""
    own = getattr(model, "fingerprint_tensors", None)
    tensors = own() if callable(own) else list(model.state_dict().values())
    digests = sorted(_tensor_digest(t) for t in tensors if isinstance(t, torch.Tensor))
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def classifier_record(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    num_outputs: int | None = None,
) -> dict[str, Any]:
    """Plain values identifying ``model`` for a checkpoint's ``extra["classifier"]``:
    ``sha256`` (:func:`classifier_fingerprint`), ``input_shape`` ``(C, *S)``,
    ``num_outputs`` and ``class_names`` (a LoadedModel's labels, else None)."""
    labels = getattr(model, "labels", None)
    return {
        "sha256": classifier_fingerprint(model),
        "input_shape": None if input_shape is None else [int(s) for s in input_shape],
        "num_outputs": None if num_outputs is None else int(num_outputs),
        "class_names": None if labels is None else [str(name) for name in labels],
    }


def check_classifier(
    extra: Mapping[str, Any] | None,
    model: nn.Module,
    path: str | Path,
    force: bool = False,
) -> None:
    """Refuse the checkpoint ``path`` (its ``extra``) for ``model`` unless it was fitted for
    the same weights; ``force`` skips the check (experts who know the weights are
    equivalent). Raises :class:`ClassifierMismatchError` naming both fingerprints."""
    if force:
        return
    record = (extra or {}).get("classifier")
    if not isinstance(record, Mapping) or not record.get("sha256"):
        raise ClassifierMismatchError(
            f"{path} does not record which classifier it was fitted for; fit it again with "
            "this version, or pass force=True (--force) if you know it matches the classifier"
        )
    actual = classifier_fingerprint(model)
    if record["sha256"] != actual:
        names = record.get("class_names")
        raise ClassifierMismatchError(
            f"{path} was fitted for another classifier (weights {record['sha256'][:12]}"
            f"{f', classes {names}' if names else ''}) than this one (weights {actual[:12]}); "
            "fit it for this classifier, or pass force=True (--force) if you know they match"
        )
