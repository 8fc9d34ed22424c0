"""The explanation network of XNN (Qi, Khorram & Li, arXiv 1709.05360) and its losses.

Given the features ``z`` ``(B, D)`` of one layer of a frozen classifier and its logits ``y``
``(B, K)``, the network learns

- an encoder ``e = E(z)`` ``(B, k)``: the *x-features*, ``k`` small (default 5), non-negative
  (a ReLU output), so that an image either excites an x-feature or not;
- a linear head ``y^ = W e + b`` ``(B, K)``: the prediction read from the x-features alone,
  so each logit is a sum of per-x-feature contributions ``W[t, j] e_j``;
- a decoder ``z^ = D(e)`` ``(B, D)``: the sparse reconstruction autoencoder (SRAE) part.

Inputs are standardised with statistics of the training features (buffers ``z_mean``,
``z_std``), and the head works on standardised logits (``y^ = y_mean + y_scale (W' e + b')``,
``y_scale`` the pooled standard deviation of the training logits), so training does not
depend on the classifier's logit scale; ``W = y_scale W'`` is the head in logit units.
The faithfulness loss then reads as ``1 - R^2``.

Losses (:func:`xnn_losses`):

- faithfulness ``mean (y^ - y)^2 / var(y)``;
- sparse reconstruction ``mean log(1 + q (z^ - z)^2)`` on standardised features: the log
  penalty grows slowly for large residuals, so the x-features may reconstruct *part* of the
  layer's features well and ignore the rest (the paper's "reconstruct part of the original
  feature space", in our reading); ``q = 1``;
- pull-away ``1/(k(k-1)) sum_{i != j} cos^2(e_i, e_j)``, the cosine between x-feature columns
  over the batch (the term of Zhao et al.'s energy-based GAN; applying it to the x-feature
  columns, so that they do not duplicate each other, is our reading of the paper).

Loss weights (:class:`~.xnn.XNNFitConfig`) are ours, chosen on the synthetic benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...models.checkpoint import register_builder

__all__ = [
    "XNNConfig",
    "XNNNetwork",
    "build_xnn",
    "faithfulness_loss",
    "pull_away",
    "sparse_reconstruction",
    "xnn_losses",
]


ACTIVATIONS = ("softplus", "relu")


@dataclass
class XNNConfig:
    """Architecture of :class:`XNNNetwork` (plain values, so checkpoints stay safe).

    ``layer``: dotted name of the classifier module whose features are embedded; ``tap``:
    ``"input"`` (the module's input, e.g. the pooled features entering the final linear
    layer) or ``"output"`` (its output, spatially averaged when it is a feature map).
    """

    in_features: int
    num_outputs: int
    k: int = 5
    hidden: int = 64
    layer: str = ""
    tap: str = "input"
    activation: str = "softplus"

    def __post_init__(self) -> None:
        for name in ("in_features", "num_outputs", "k", "hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.tap not in ("input", "output"):
            raise ValueError(f"tap must be 'input' or 'output', got {self.tap!r}")


class XNNNetwork(nn.Module):
    """Encoder, linear head and decoder of XNN: ``forward(z) -> (e, y^, z^)``.

    Shapes: ``z`` ``(B, D)`` raw layer features; ``e`` ``(B, k)``; ``y^`` ``(B, K)``;
    ``z^`` ``(B, D)`` standardised reconstruction (compare with :meth:`standardise`).
    """

    def __init__(self, config: XNNConfig) -> None:
        super().__init__()
        self.config = config
        d, h, k = config.in_features, config.hidden, config.k
        last = nn.Softplus() if config.activation == "softplus" else nn.ReLU()
        self.encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, k), last)
        self.head = nn.Linear(k, config.num_outputs)
        self.decoder = nn.Sequential(nn.Linear(k, h), nn.ReLU(), nn.Linear(h, d))
        self.register_buffer("z_mean", torch.zeros(d))
        self.register_buffer("z_std", torch.ones(d))
        self.register_buffer("y_mean", torch.zeros(config.num_outputs))
        self.register_buffer("y_scale", torch.ones(()))

    def standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.z_mean) / self.z_std

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """x-features ``(B, k)`` of raw layer features ``z`` ``(B, D)``."""
        return self.encoder(self.standardise(z))

    def predict(self, e: torch.Tensor) -> torch.Tensor:
        """The head's logits ``(B, K)`` (classifier units) from x-features ``e`` ``(B, k)``."""
        return self.y_mean + self.y_scale * self.head(e)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        e = self.encode(z)
        return e, self.predict(e), self.decoder(e)

    @property
    def weight(self) -> torch.Tensor:
        """``W`` ``(K, k)``: the head's weights in logit units."""
        return self.y_scale * self.head.weight

    @property
    def bias(self) -> torch.Tensor:
        """``b`` ``(K,)``: the head's bias in logit units (``y^ = W e + b``)."""
        return self.y_mean + self.y_scale * self.head.bias

    def contributions(self, e: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``W[t, j] e_j`` ``(B, k)``: what each x-feature adds to the target's logit
        (they sum to ``y^_t - b_t``)."""
        return self.weight[targets] * e

    @torch.no_grad()
    def set_statistics(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Standardisation from training features ``z`` ``(N, D)`` and logits ``y`` ``(N, K)``."""
        self.z_mean.copy_(z.mean(0))
        self.z_std.copy_(z.std(0, unbiased=False).clamp_min(1e-6))
        self.y_mean.copy_(y.mean(0))
        self.y_scale.copy_((y - y.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6))


def build_xnn(config: XNNConfig) -> XNNNetwork:
    return XNNNetwork(config)


register_builder("xnn", XNNConfig, build_xnn)


def faithfulness_loss(y_hat: torch.Tensor, y: torch.Tensor, y_scale: torch.Tensor) -> torch.Tensor:
    """``mean (y^ - y)^2 / y_scale^2`` over images and logits (``1 - R^2`` on the batch when
    ``y_scale`` is the batch's pooled standard deviation)."""
    return ((y_hat - y) / y_scale).pow(2).mean()


def sparse_reconstruction(z_hat: torch.Tensor, z: torch.Tensor, q: float = 1.0) -> torch.Tensor:
    """``mean log(1 + q (z^ - z)^2)``: a reconstruction error whose log penalty lets large
    residuals on some features cost little (sparse reconstruction)."""
    return torch.log1p(q * (z_hat - z).pow(2)).mean()


def pull_away(e: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``1/(k(k-1)) sum_{i != j} cos^2(e_i, e_j)`` over the columns of ``e`` ``(B, k)``:
    0 when the x-features are orthogonal across the batch, 1 when all are parallel."""
    k = e.shape[1]
    if k < 2:
        return e.new_zeros(())
    unit = e / e.norm(dim=0, keepdim=True).clamp_min(eps)
    cos = unit.T @ unit
    off = cos - torch.diag(torch.diagonal(cos))
    return off.pow(2).sum() / (k * (k - 1))


def xnn_losses(
    network: XNNNetwork,
    z: torch.Tensor,
    y: torch.Tensor,
    *,
    reconstruction_weight: float,
    pull_away_weight: float,
    q: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The XNN objective on raw features ``z`` ``(B, D)`` and the classifier's logits ``y``
    ``(B, K)``: ``{"faithfulness", "reconstruction", "pull_away", "total"}``."""
    e, y_hat, z_hat = network(z)
    terms = {
        "faithfulness": faithfulness_loss(y_hat, y, network.y_scale),
        "reconstruction": sparse_reconstruction(z_hat, network.standardise(z), q),
        "pull_away": pull_away(e),
    }
    terms["total"] = (
        terms["faithfulness"]
        + reconstruction_weight * terms["reconstruction"]
        + pull_away_weight * terms["pull_away"]
    )
    return terms
