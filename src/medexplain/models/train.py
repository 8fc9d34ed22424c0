"""Classifier training, evaluation and BatchNorm recalibration on top of the one loop.

Training goes through :func:`medexplain.models.loop.train_loop`, the loop every learned
piece of medexplain shares (early stopping, time limits, seeding, progress).

Datasets for :func:`train_classifier` / :func:`evaluate_classifier` yield either tuples
``(image, label, ...)`` or dicts with an image key (``"image"``, ``"x"`` or ``"input"``)
and a label key (``"label"``, ``"y"`` or ``"target"``); images are ``(C, *spatial)``,
labels are integer class indices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..core.model import model_device, model_guard
from ..core.ranks import rank_auroc
from ..core.scores import predict_classes
from .loop import TrainHistory, train_loop

IMAGE_KEYS = ("image", "x", "input")
LABEL_KEYS = ("label", "y", "target")


# --------------------------------------------------------------------------- classifiers


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` from a collated batch: a tuple/list ``(x, y, ...)`` or a dict
    with an image key (``image``/``x``/``input``) and a label key (``label``/``y``/``target``).
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in IMAGE_KEYS if k in batch), None)
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        if x is None or y is None:
            raise ValueError(
                f"a dict batch needs an image key {IMAGE_KEYS} and a label key {LABEL_KEYS}; "
                f"got keys {sorted(batch)}"
            )
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise ValueError(
            "dataset items must be (image, label, ...) tuples or dicts with 'image' and 'label'; "
            f"got a batch of type {type(batch).__name__}"
        )
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if not x.dtype.is_floating_point:
        x = x.float()
    if y.dtype.is_floating_point or y.dtype == torch.bool:
        if y.dtype == torch.bool or torch.equal(y, y.round()):
            y = y.long()
        else:
            raise TypeError(f"labels must be integer class indices, got dtype {y.dtype}")
    return x, y.long().reshape(-1)


def _loader(data: Dataset, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"expected a map-style torch Dataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("the dataset is empty")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Always our own generator: even an unshuffled loader draws a base seed, and it must not
    # come from (and advance) the global RNG.
    generator = torch.Generator().manual_seed(int(seed))
    # A last batch of one image breaks batch norm in training mode: drop only that one.
    drop_last = shuffle and len(data) % int(batch_size) == 1 and len(data) > 1
    return DataLoader(
        data,
        batch_size=int(batch_size),
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        num_workers=0,
    )


def _predict(
    model: nn.Module, data: Dataset, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, K)`` and labels ``(N,)`` of a whole dataset (CPU tensors)."""
    logits, labels = [], []
    with model_guard(model, freeze=False), torch.no_grad():
        for batch in _loader(data, batch_size, shuffle=False, seed=0):
            x, y = split_batch(batch)
            out = model(x.to(device))
            if out.dim() != 2:
                raise ValueError(f"the model must return logits (B, K); got {tuple(out.shape)}")
            logits.append(out.float().cpu())
            labels.append(y.cpu())
    return torch.cat(logits), torch.cat(labels)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predict_classes(logits) == labels).float().mean())


def _classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits ``(B, K)`` (binary for a single logit): the training
    loss, and the validation score of ``monitor="loss"``."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
    return F.cross_entropy(logits, labels.long())


#: What ``train_classifier`` selects the best epoch by.
MONITORS = ("accuracy", "loss")


# Longer than 80 lines only through its signature and docstring (the body is ~55 lines).
def train_classifier(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None = None,
    *,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device | None = None,
    patience: int | None = 5,
    max_seconds: float | None = None,
    progress: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    bn_samples: int = 256,
    monitor: str = "accuracy",
) -> TrainHistory:
    """Train a classifier returning logits ``(B, K)`` with cross-entropy (Adam).

    ``val`` (optional) is scored after every epoch by ``monitor``: ``"accuracy"`` (higher is
    better) or ``"loss"`` (validation cross-entropy, lower is better); the best epoch's
    weights are restored (see :func:`train_loop`). Accuracy saturates early on easy data
    and then restores an early, under-confident model; select by loss when the predicted
    probabilities matter (e.g. thresholds on ``f_c`` such as SAG's 0.9 P).
    ``augment(x) -> x`` is applied to each training batch ``(B, C, *spatial)`` on the
    device. ``device`` moves the model there (default: where the model already is).
    Shuffling is seeded by ``seed``. A model with a single logit is trained with binary
    cross-entropy on labels 0/1.

    Batch-norm running statistics are re-estimated on a fixed random subset of
    ``bn_samples`` training images (without ``augment``) before every validation and at
    the end (:func:`recalibrate_batch_norm`); 0 keeps the moving averages.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if augment is not None and not callable(augment):
        raise TypeError("augment must be callable: augment(x) -> x")
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {MONITORS}, got {monitor!r}")
    if device is not None:
        model.to(device)
    dev = model_device(model)
    loader = _loader(train, batch_size, shuffle=True, seed=seed)

    def loss_fn(batch: Any) -> torch.Tensor:
        x, y = split_batch(batch)
        x, y = x.to(dev), y.to(dev)
        if augment is not None:
            x = augment(x)
        logits = model(x)
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits (B, K); got {tuple(logits.shape)}")
        return _classification_loss(logits, y)

    calibration = _calibration_loader(model, train, batch_size, bn_samples, seed)

    def calibrate() -> None:
        if calibration is not None:
            recalibrate_batch_norm(model, (split_batch(b)[0].to(dev) for b in calibration))

    val_fn = None
    if val is not None:

        def val_fn() -> float:
            calibrate()
            scored = _predict(model, val, max(int(batch_size), 128), dev)
            if monitor == "accuracy":
                return _accuracy(*scored)
            return float(_classification_loss(*scored))

    history = train_loop(
        model,
        loss_fn,
        loader,
        val_fn=val_fn,
        higher_is_better=monitor == "accuracy",
        epochs=epochs,
        lr=lr,
        patience=patience,
        max_seconds=max_seconds,
        seed=seed,
        progress=progress,
        description="classifier",
    )
    if val_fn is None:
        calibrate()  # with validation, the restored best state is already calibrated
    return history


def _calibration_loader(
    model: nn.Module, train: Dataset, batch_size: int, bn_samples: int, seed: int
) -> DataLoader | None:
    """A fixed random subset of the training set for :func:`recalibrate_batch_norm`, or
    None when the model has no batch norm (or ``bn_samples`` is 0)."""
    if int(bn_samples) < 0:
        raise ValueError(f"bn_samples must be >= 0, got {bn_samples}")
    if not _batch_norms(model) or int(bn_samples) == 0:
        return None
    generator = torch.Generator().manual_seed(int(seed) + 1)
    count = min(int(bn_samples), len(train))
    indices = torch.randperm(len(train), generator=generator)[:count].sort().values.tolist()
    return _loader(Subset(train, indices), batch_size, shuffle=False, seed=seed)


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def recalibrate_batch_norm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every batch-norm layer's running mean and variance from ``batches``.

    The running statistics become the plain average of the batch statistics over
    ``batches`` (inputs ``(B, C, *spatial)``) computed with the current weights: "precise
    BN" (Wu & Johnson 2021, arXiv 2105.07576). The exponential moving average kept during
    training lags behind weights that change fast, which makes eval-mode predictions
    much worse than train-mode ones early in training; validating (and keeping) a
    recalibrated model avoids that. Everything else runs in eval mode (no dropout); all
    train/eval flags and momenta are restored. Returns the number of layers updated.
    """
    norms = _batch_norms(model)
    if not norms:
        return 0
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("recalibrate_batch_norm needs at least one batch")
    flags = [m.training for m in model.modules()]
    momenta = [m.momentum for m in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average over the batches
            norm.train()
        with torch.no_grad():
            model(first)
            for x in iterator:
                model(x)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, flag in zip(model.modules(), flags):
            module.training = flag
    return len(norms)


# --------------------------------------------------------------------------- evaluation


def evaluate_classifier(
    model: nn.Module,
    data: Dataset,
    *,
    batch_size: int = 128,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Accuracy and one-vs-rest AUC-ROC of ``model`` on ``data``.

    Returns ``{"accuracy", "auc", "per_class_auc", "n"}``: per-class AUCs use the softmax
    probability of each class against all others (the sigmoid for a single-logit model,
    one AUC); ``auc`` is their unweighted (macro) mean over classes with both positives
    and negatives present (NaN entries mark classes that are not). The model's
    train/eval flags are restored afterwards; ``device`` defaults to the model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dev = torch.device(device) if device is not None else model_device(model)
    if dev != model_device(model):
        model.to(dev)
    logits, labels = _predict(model, data, batch_size, dev)
    if logits.shape[1] == 1:
        per_class = [float(rank_auroc(torch.sigmoid(logits[:, 0]), labels == 1))]
    else:
        probs = torch.softmax(logits, dim=1).T  # (K, N): one row per class
        classes = torch.arange(logits.shape[1]).view(-1, 1)
        per_class = rank_auroc(probs, labels.view(1, -1) == classes).tolist()
    defined = [a for a in per_class if not math.isnan(a)]
    return {
        "accuracy": _accuracy(logits, labels),
        "auc": float(np.mean(defined)) if defined else float("nan"),
        "per_class_auc": per_class,
        "n": int(labels.numel()),
    }
