"""Training a warping simulator: its losses, its margin and its training pairs.

:class:`~.warp_simulator.WarpSimulatorExplainer` fits with these (METHODS.md section 5);
the defaults and their sources are on each constant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...core.model import model_device
from ...core.scores import predict_classes
from ...models.train import IMAGE_KEYS, split_batch
from .spatial_transform import warp
from .warp_network import WarpSimulator, WarpSimulatorConfig, make_condition, reverse_condition

#: The authors' required logit shift (Liu et al.), for their classifier's logit scale.
AUTHORS_MARGIN = 12.5
#: Smoothness weight of the authors' code: 0.001 x 0.04.
SMOOTH_WEIGHT = 0.001 * 0.04
#: Cycle-consistency weight (authors).
CYCLE_WEIGHT = 1.0
#: Weight of ``mean |u|^2`` (ours, not the authors': keeps the warp local; see WarpFitConfig).
MAGNITUDE_WEIGHT = 0.3
#: ``margin=None``: this fraction of the median |f| of the correctly classified training
#: images (see :func:`auto_margin`).
AUTO_MARGIN_FRACTION = 1.0
#: ``margin_fraction=None`` per spatial dimension. 3D asks for more: on the 32^3 atrophy
#: benchmark a shift of 1x the median |f| was bought by warping the head's outline (removal
#: |log J| AUROC 0.69 plain / 0.71 diffeomorphic), 1.5x leaves only the nucleus (0.99);
#: in 2D 1.5x raised plain folding from 0 to 0.5% (benchmarks/warp_simulator.py, measured
#: with the field at full resolution, before ``field_downsample`` became 2 in 2D).
DEFAULT_MARGIN_FRACTION = {2: AUTO_MARGIN_FRACTION, 3: 1.5}


@dataclass
class WarpFitConfig:
    """Training hyper-parameters of a warping simulator (constructor keywords of the explainer).

    ``target_class``: the class(es) the simulator learns to inject/remove (None: every class
    of the model). ``margin``: the required shift ``b`` of ``f`` (None: :func:`auto_margin`
    with ``margin_fraction``; None: ``DEFAULT_MARGIN_FRACTION`` of the image dimension).
    ``smooth_weight`` (authors: 0.001 x 0.04), ``cycle_weight`` (authors: 1) and
    ``magnitude_weight`` (ours, 0.3, on ``mean |u|^2``) weight the losses.
    ``epochs``/``lr``/``train_batch_size``/``patience``/``max_seconds`` go to the shared
    :func:`~medexplain.models.loop.train_loop` (Adam; the authors also use Adam, lr 1e-3 is
    our choice for the small nets); ``max_val`` caps the validation samples scored per epoch.
    ``patience`` 16 epochs: on the 3D benchmark 8 stopped the fit before the logit shift
    was reached for 90% of the volumes (measurements in ``benchmarks/results/``).
    """

    target_class: int | tuple[int, ...] | None = None
    margin: float | None = None
    margin_fraction: float | None = None
    smooth_weight: float = SMOOTH_WEIGHT
    cycle_weight: float = CYCLE_WEIGHT
    magnitude_weight: float = MAGNITUDE_WEIGHT
    epochs: int = 40
    lr: float = 1e-3
    train_batch_size: int = 16
    patience: int | None = 16
    max_seconds: float | None = None
    max_val: int = 256

    def __post_init__(self) -> None:
        if self.margin is not None and not float(self.margin) > 0:
            raise ValueError(f"margin must be > 0 or None, got {self.margin}")
        if self.margin_fraction is not None and not float(self.margin_fraction) > 0:
            raise ValueError(f"margin_fraction must be > 0, got {self.margin_fraction}")
        for name in ("smooth_weight", "cycle_weight", "magnitude_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "train_batch_size", "max_val"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if isinstance(self.target_class, Sequence) and not isinstance(self.target_class, str):
            self.target_class = tuple(int(k) for k in self.target_class)
        elif self.target_class is not None:
            if isinstance(self.target_class, bool):
                raise TypeError("target_class must be an int, a sequence of ints or None")
            self.target_class = int(self.target_class)


# --------------------------------------------------------------------------- scores, losses


def class_log_odds(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``f`` ``(B,)`` of class ``cls`` ``(B,)`` from logits ``(B, K)``.

    ``K > 1``: ``z_k - logsumexp_{j != k} z_j`` (softmax log-odds); ``K = 1``: the logit.
    """
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits (B, K); got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return logits[:, 0]
    cls = cls.to(logits.device).long().view(-1, 1)
    own = logits.gather(1, cls).squeeze(1)
    others = logits.scatter(1, cls, float("-inf"))
    return own - torch.logsumexp(others, dim=1)


def smoothness(displacement: torch.Tensor) -> torch.Tensor:
    """``mean |grad u|``: mean absolute forward difference over components and axes."""
    dims = displacement.dim() - 2
    terms = [displacement.diff(dim=2 + axis).abs().mean() for axis in range(dims)]
    return torch.stack(terms).mean()


def warp_losses(
    simulator: WarpSimulator,
    model: nn.Module,
    x: torch.Tensor,
    cls: torch.Tensor,
    direction: torch.Tensor,
    f0: torch.Tensor,
    *,
    margin: float,
    smooth_weight: float = SMOOTH_WEIGHT,
    cycle_weight: float = CYCLE_WEIGHT,
    magnitude_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The simulator's losses on one batch (METHODS.md section 5).

    ``x`` ``(B, C, *spatial)``, ``cls`` ``(B,)`` class indices, ``direction`` ``(B,)`` of
    +1/-1, ``f0`` ``(B,)`` = ``f(x)`` of the frozen classifier. Returns ``cls``, ``smooth``,
    ``cycle``, ``total`` (scalars) and ``shift`` ``(B,)`` = ``c (f(x~) - f(x))`` (the
    requested shift is reached where ``shift >= margin``).
    """
    cond = make_condition(cls, direction, x.shape[0], simulator.config.num_classes, x.device)
    u = simulator(x, cond)
    x_sim = warp(x, u)
    f1 = class_log_odds(model(x_sim), cls)
    c = direction.to(f1.dtype)
    l_cls = F.relu(c * (f0 - f1) + margin).mean()
    l_smooth = smoothness(u)
    terms = {"cls": l_cls, "smooth": l_smooth}
    total = l_cls + smooth_weight * l_smooth
    if magnitude_weight > 0:
        terms["magnitude"] = u.square().mean()
        total = total + magnitude_weight * terms["magnitude"]
    if cycle_weight > 0:
        back = simulator(x_sim, reverse_condition(cond))
        l_cycle = F.mse_loss(warp(x_sim, back), x)
        terms["cycle"] = l_cycle
        total = total + cycle_weight * l_cycle
    terms["total"] = total
    terms["shift"] = (c * (f1 - f0)).detach()
    return terms


def auto_margin(scores: torch.Tensor, fraction: float = AUTO_MARGIN_FRACTION) -> float:
    """Default margin ``b``: ``fraction`` x the median ``|f|`` of the training images.

    ``f = 0`` is the decision boundary of the log-odds, so ``b = median |f|`` asks each
    warp to move a typical image by as much as it takes to bring it from where it sits to
    the boundary — a change of the decision for half the images and a shift comparable to
    the classifier's own separation. The authors' ``b = 12.5`` plays the same role for
    their classifier (whose logit scale we do not share).
    """
    scores = scores.detach().float().abs().flatten()
    if scores.numel() == 0:
        raise ValueError("no correctly classified training image to choose a margin from")
    return max(float(fraction) * float(scores.median()), 1e-3)


# --------------------------------------------------------------------------- data


def _image_of(item: Any) -> torch.Tensor:
    if isinstance(item, Mapping):
        for key in IMAGE_KEYS:
            if key in item:
                return torch.as_tensor(item[key]).float()
        raise ValueError(f"a dict item needs an image key {IMAGE_KEYS}; got keys {sorted(item)}")
    if isinstance(item, (tuple, list)):
        return torch.as_tensor(item[0]).float()
    return torch.as_tensor(item).float()


class _Samples(Dataset):
    """``(image, class, direction, f(x))`` for the selected (image, class) pairs."""

    def __init__(self, base: Dataset, index, cls, direction, f0) -> None:
        self.base, self.index, self.cls, self.direction, self.f0 = base, index, cls, direction, f0

    def __len__(self) -> int:
        return int(self.index.numel())

    def __getitem__(self, i: int):
        image = _image_of(self.base[int(self.index[i])])
        return image, self.cls[i], self.direction[i], self.f0[i]


def _classes(target_class, num_outputs: int) -> list[int]:
    if num_outputs == 1:
        if target_class not in (None, 0, (0,)):
            raise ValueError(
                f"a single-logit model has one class (0); got target_class={target_class}"
            )
        return [0]
    if target_class is None:
        return list(range(num_outputs))
    classes = [target_class] if isinstance(target_class, int) else list(target_class)
    for k in classes:
        if not 0 <= int(k) < num_outputs:
            raise ValueError(
                f"target_class {k} is out of range for a model with {num_outputs} logits"
            )
    return [int(k) for k in classes]


@torch.no_grad()
def collect_samples(
    model: nn.Module, dataset: Dataset, target_class=None, batch_size: int = 64
) -> tuple[_Samples, int, tuple[int, ...], list[int]]:
    """Training pairs from the correctly classified images of ``dataset`` under the frozen
    ``model`` (call inside :func:`~medexplain.core.model.model_guard`).

    ``dataset`` items are ``(image, label, ...)`` or dicts. For each class ``k`` of
    ``target_class`` (None: all): correct images of class ``k`` -> removal (-1), correct
    images of other classes -> injection (+1). A single-logit model has one class (0):
    label 1 -> removal, label 0 -> injection. Returns the samples, the model's number of
    logits ``K``, the image shape ``(C, *spatial)`` and the classes.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"expected a map-style torch Dataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("the dataset is empty")
    device = model_device(model)
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = split_batch(batch)
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y.cpu())
    logits, labels = torch.cat(logits), torch.cat(labels)
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits (B, K); got shape {tuple(logits.shape)}")
    num_outputs = logits.shape[1]
    classes = _classes(target_class, num_outputs)
    if num_outputs == 1:
        if not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("labels must be 0 or 1 for a model with a single logit")
        positive_label = {0: 1}
    else:
        positive_label = {k: k for k in classes}
    pred = predict_classes(logits)
    correct = (pred == labels).nonzero().flatten()
    index, cls, direction = [], [], []
    for k in classes:
        is_positive = labels[correct] == positive_label[k]
        index.append(correct)
        cls.append(torch.full_like(correct, k))
        direction.append(torch.where(is_positive, -1.0, 1.0))
    index, cls, direction = torch.cat(index), torch.cat(cls), torch.cat(direction)
    if index.numel() == 0:
        raise ValueError(
            "no image of the dataset is classified correctly by the model: the simulator "
            "trains on correctly classified images only"
        )
    f0 = class_log_odds(logits[index], cls)
    shape = tuple(_image_of(dataset[0]).shape)
    return _Samples(dataset, index, cls, direction, f0), num_outputs, shape, classes


def _subsample(samples: _Samples, limit: int) -> _Samples:
    """At most ``limit`` samples, evenly spaced (deterministic)."""
    n = len(samples)
    if n <= limit:
        return samples
    keep = torch.linspace(0, n - 1, limit).round().long()
    return _Samples(
        samples.base,
        samples.index[keep],
        samples.cls[keep],
        samples.direction[keep],
        samples.f0[keep],
    )


def network_config(
    network_params: Mapping[str, Any], shape: tuple[int, ...], num_outputs: int
) -> WarpSimulatorConfig:
    """The simulator architecture for training images ``shape`` ``(C, *spatial)`` and a
    classifier with ``num_outputs`` logits; ``network_params`` may not contradict them."""
    dims = len(shape) - 1
    given = {k: network_params[k] for k in ("spatial_dims", "in_channels") if k in network_params}
    if given and (given.get("spatial_dims", dims), given.get("in_channels", shape[0])) != (
        dims,
        shape[0],
    ):
        raise ValueError(
            f"spatial_dims/in_channels {given} do not match the training images "
            f"(C, *spatial) = {shape}"
        )
    return WarpSimulatorConfig(
        **{
            **network_params,
            "spatial_dims": dims,
            "in_channels": shape[0],
            "num_classes": num_outputs,
        }
    )
