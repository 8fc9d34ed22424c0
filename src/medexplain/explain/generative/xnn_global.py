"""XNN's global view: what each x-feature means across a dataset, as plain JSON values.

- :func:`class_contributions`: for each class ``c``, the mean over the images labelled ``c``
  of each x-feature's contribution ``W[c, j] e_j`` to that class's logit, and the head's bias;
- :func:`top_activating`: for each x-feature, the images that excite it most;
- :func:`global_view`: both in one document (what a report section shows; the label-wise
  global map of each x-feature is the global-map accumulator fed with
  :meth:`~.xnn.XNNExplainer.feature_maps`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .xnn import XNNExplainer

__all__ = ["class_contributions", "global_view", "top_activating"]


def _x_features(explainer: XNNExplainer, images: torch.Tensor) -> torch.Tensor:
    e, _ = explainer.x_features(images)
    return e.cpu()


def class_contributions(
    explainer: XNNExplainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    *,
    features: torch.Tensor | None = None,
) -> dict[str, Any]:
    """``{class name: {"mean_contribution": [k floats], "bias": float, "n": int}}`` for
    images ``(N, C, *S)`` with labels ``(N,)`` (classes without images are left out);
    ``features``: the x-features ``(N, k)`` if already computed."""
    network = explainer._fitted()
    e = _x_features(explainer, images) if features is None else features.cpu()
    weight = network.weight.detach().cpu()
    bias = network.bias.detach().cpu()
    labels = torch.as_tensor(labels).cpu().long()
    out: dict[str, Any] = {}
    for c in range(weight.shape[0]):
        rows = labels == c
        if not bool(rows.any()):
            continue
        name = str(class_names[c]) if class_names is not None else str(c)
        out[name] = {
            "mean_contribution": (weight[c] * e[rows]).mean(0).tolist(),
            "bias": float(bias[c]),
            "n": int(rows.sum()),
        }
    return out


def top_activating(
    explainer: XNNExplainer,
    images: torch.Tensor,
    n: int = 8,
    *,
    features: torch.Tensor | None = None,
) -> list[dict[str, list]]:
    """Per x-feature ``{"index": [n row indices], "value": [n x-feature values]}``, most
    exciting first (ties: lower index first)."""
    e = _x_features(explainer, images) if features is None else features.cpu()
    n = min(int(n), e.shape[0])
    out = []
    for j in range(e.shape[1]):
        order = sorted(range(e.shape[0]), key=lambda i: (-float(e[i, j]), i))[:n]
        out.append({"index": order, "value": [float(e[i, j]) for i in order]})
    return out


def global_view(
    explainer: XNNExplainer,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str] | None = None,
    n_top: int = 8,
) -> dict[str, Any]:
    """``{"k", "contributions", "top_activating"}`` (see the two functions above)."""
    e = _x_features(explainer, images)
    return {
        "k": int(e.shape[1]),
        "contributions": class_contributions(explainer, images, labels, class_names, features=e),
        "top_activating": top_activating(explainer, images, n_top, features=e),
    }
