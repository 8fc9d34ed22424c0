"""XNN: a prediction explained by a few learned concepts (Qi, Khorram & Li, arXiv 1709.05360).

A saliency map says *where*; XNN says *what*. It embeds one layer of the frozen classifier
(default: the last convolutional block's pooled features, :func:`~.xnn_features.default_layer`)
into ``k`` non-negative *x-features* from which a linear head reproduces the classifier's
logits (:mod:`.xnn_network`: faithfulness, sparse reconstruction autoencoder and pull-away
losses). Each prediction then reads as ``logit_t = sum_j W[t, j] e_j + b_t``: the
*contribution* of x-feature ``j`` is ``W[t, j] e_j``.

Each x-feature gets its own map: the gradient of ``e_j`` with respect to the input through
the frozen classifier, as Grad-CAM at a convolution (``feature_map="gradcam"``, default; the
last convolution with a spatial output unless ``cam_layer=``) or integrated gradients
(``feature_map="integrated_gradients"``), 2D and 3D alike. The explainer's map (the
contract's ``(B, 1, *S)``) is the contribution-weighted sum ``sum_j W[t, j] e_j map_j``;
:meth:`XNNExplainer.explain` also returns the per-x-feature maps and contributions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ...core.model import model_guard
from ...core.scores import chunked, default_targets
from ...models.checkpoint import load_checkpoint, save_checkpoint
from ...models.fingerprint import check_classifier, classifier_record
from ...models.loop import TrainHistory, train_loop
from ..base import Explainer, register
from ..gradcam import GradCAM
from ..gradients import IntegratedGradientsExplainer
from .xnn_features import XFeatureModel, collect_features, default_layer, resolve_module
from .xnn_network import XNNConfig, XNNNetwork, pull_away, xnn_losses

__all__ = ["XNNExplainer", "XNNExplanation", "XNNFitConfig", "fit_xnn"]

FEATURE_MAPS = ("gradcam", "integrated_gradients")


@dataclass
class XNNFitConfig:
    """Training of the explanation network (on the layer's features, cached once).

    ``reconstruction_weight`` and ``pull_away_weight`` weigh the SRAE and pull-away terms
    against faithfulness (weight 1); ``q`` is the log penalty's scale. ``max_seconds`` caps
    the optimisation (feature extraction not included).
    """

    epochs: int = 300
    lr: float = 3e-3
    train_batch_size: int = 64
    reconstruction_weight: float = 0.1
    pull_away_weight: float = 0.1
    q: float = 1.0
    patience: int | None = 30
    max_seconds: float | None = 180.0

    def __post_init__(self) -> None:
        if int(self.epochs) < 1 or int(self.train_batch_size) < 1:
            raise ValueError("epochs and train_batch_size must be >= 1")
        for name in ("reconstruction_weight", "pull_away_weight", "q"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if float(self.lr) <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass
class XNNExplanation:
    """What :meth:`XNNExplainer.explain` returns for ``B`` images and ``k`` x-features.

    ``maps`` ``(B, 1, *S)`` contribution-weighted sum; ``feature_maps`` ``(B, k, *S)``;
    ``x_features`` ``(B, k)``; ``contributions`` ``(B, k)`` (``W[t, j] e_j``); ``logits``
    ``(B, K)`` the head's prediction; ``targets`` ``(B,)``.
    """

    maps: torch.Tensor
    feature_maps: torch.Tensor
    x_features: torch.Tensor
    contributions: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor


_FIT_FIELDS = {f.name for f in fields(XNNFitConfig)}


@register(
    "xnn",
    "XNN (Qi et al.): a few learned x-features reproduce the logits; map = contribution-"
    "weighted sum of their Grad-CAM maps; needs fit() or checkpoint=",
)
class XNNExplainer(Explainer):
    """``maps = XNNExplainer(model, checkpoint=path)(x, target)`` -> ``(B, 1, *S)``.

    ``k`` x-features (default 5), ``hidden`` encoder/decoder width, ``layer`` the module
    embedded (None: :func:`~.xnn_features.default_layer`); ``feature_map`` and ``cam_layer``
    / ``n_steps`` choose the x-feature maps (module docstring); other keywords are
    :class:`XNNFitConfig` fields. Build it from ``checkpoint=`` or call :meth:`fit`.
    """

    signed = True

    def __init__(
        self,
        model: nn.Module,
        *,
        k: int = 5,
        hidden: int = 64,
        activation: str = "softplus",
        layer: str | None = None,
        feature_map: str = "gradcam",
        cam_layer: str | None = None,
        n_steps: int = 16,
        checkpoint: str | Path | None = None,
        force: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        **params: Any,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        unknown = sorted(set(params) - _FIT_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown xnn parameter(s) {unknown}; expected k, hidden, layer, feature_map, "
                f"cam_layer, n_steps or training fields {sorted(_FIT_FIELDS)}"
            )
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        XNNConfig(1, 1, k=k, hidden=hidden, activation=activation)  # validate now
        self.k, self.hidden, self.layer = int(k), int(hidden), layer
        self.activation = activation
        self.feature_map, self.cam_layer, self.n_steps = feature_map, cam_layer, int(n_steps)
        self.force = bool(force)
        self.fit_config = XNNFitConfig(**params)
        self.network: XNNNetwork | None = None
        self.history: TrainHistory | None = None
        self.input_shape: tuple[int, ...] | None = None
        self._last: XNNExplanation | None = None  # the explanation behind the last call
        if checkpoint is not None:
            self.load(checkpoint)

    @property
    def fitted(self) -> bool:
        return self.network is not None

    # ----------------------------------------------------------------- fitting and storage

    def fit(
        self, train: Dataset, val: Dataset | None = None, *, progress: bool = True
    ) -> XNNExplainer:
        """Fit on ``train`` (items ``(image, label, ...)``; only images are used: the targets
        are the classifier's own logits); ``val`` drives early stopping on faithfulness."""
        cfg = self.fit_config
        with model_guard(self.model):
            first = _images(train, 1)[0][:1].to(self.device)
            if self.layer is None:
                name, tap = default_layer(self.model, first)
            else:
                resolve_module(self.model, self.layer)
                name, tap = self.layer, "output"
            module = resolve_module(self.model, name)
            z, y = collect_features(self.model, module, tap, self._batches(train))
            zv, yv = (None, None)
            if val is not None:
                zv, yv = collect_features(self.model, module, tap, self._batches(val))
        config = XNNConfig(
            z.shape[1], y.shape[1], k=self.k, hidden=self.hidden, layer=name, tap=tap
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # seeded initialisation, global RNG untouched
            network = XNNNetwork(config)
        network.set_statistics(z, y)
        loader = DataLoader(
            TensorDataset(z, y),
            batch_size=cfg.train_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
        )

        def loss(batch) -> torch.Tensor:
            return xnn_losses(
                network,
                *batch,
                reconstruction_weight=cfg.reconstruction_weight,
                pull_away_weight=cfg.pull_away_weight,
                q=cfg.q,
            )["total"]

        val_fn = None
        if zv is not None:

            def val_fn() -> float:
                return float(faithfulness_r2(network, zv, yv))

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a tiny network: more threads only add synchronisation
        try:
            self.history = self._train(network, loss, loader, val_fn, progress)
        finally:
            torch.set_num_threads(threads)
        self.network = network.eval()
        self.input_shape = tuple(int(s) for s in first.shape[1:])
        return self

    def _train(self, network, loss, loader, val_fn, progress: bool) -> TrainHistory:
        cfg = self.fit_config
        return train_loop(
            network,
            loss,
            loader,
            val_fn=val_fn,
            higher_is_better=True,
            epochs=cfg.epochs,
            lr=cfg.lr,
            patience=cfg.patience if val_fn is not None else None,
            max_seconds=cfg.max_seconds,
            seed=self.seed,
            progress=progress,
            description="xnn",
        )

    def _batches(self, data: Dataset):
        for x in _images(data, self.batch_size):
            yield x.to(self.device, torch.float32)

    def save(self, path: str | Path) -> Path:
        """Save the explanation network, the classifier's fingerprint and the fit record."""
        network = self._fitted()
        extra: dict[str, Any] = {
            "fit_config": asdict(self.fit_config),
            "classifier": classifier_record(
                self.model, self.input_shape, network.config.num_outputs
            ),
        }
        if self.history is not None:
            h = self.history
            extra["history"] = {
                "train_loss": h.train_loss,
                "val_metric": h.val_metric,
                "seconds": h.seconds,
                "stop_reason": h.stop_reason,
            }
        save_checkpoint(path, network, extra=extra)
        return Path(path)

    def load(self, path: str | Path) -> XNNExplainer:
        """Load a network saved by :meth:`save`; refused for another classifier unless
        ``force``."""
        network, extra = load_checkpoint(path, device=self.device)
        if not isinstance(network, XNNNetwork):
            raise ValueError(f"{path} holds a {type(network).__name__}, not an xnn checkpoint")
        check_classifier(extra, self.model, path, self.force)
        resolve_module(self.model, network.config.layer)
        self.network = network.eval()
        self.k = network.config.k
        return self

    def _fitted(self) -> XNNNetwork:
        if self.network is None:
            raise RuntimeError(
                "xnn is not fitted: call .fit(train_dataset) first, or build it with "
                "create('xnn', model, checkpoint=path)"
            )
        return self.network

    # ----------------------------------------------------------------- explaining

    def x_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(e (B, k), y^ (B, K))``: the x-features and the head's logits for images ``x``."""
        network = self._fitted()
        wrapped = XFeatureModel(self.model, network)
        with torch.no_grad(), model_guard(wrapped):
            e = torch.cat(
                [wrapped(part) for part in torch.split(x.to(self.device), self.batch_size)]
            )
            return e, network.predict(e)

    def _map_method(self) -> Explainer:
        """The explainer of the x-features (kept while its settings and network stay)."""
        network = self._fitted()
        key = (self.feature_map, self.cam_layer, self.n_steps, self.batch_size, id(network))
        if getattr(self, "_method_key", None) != key:
            wrapped = XFeatureModel(self.model, network)
            if self.feature_map == "gradcam":
                method: Explainer = GradCAM(
                    wrapped, layer=self.cam_layer, relu=False, batch_size=self.batch_size
                )
            else:
                method = IntegratedGradientsExplainer(
                    wrapped, n_steps=self.n_steps, batch_size=self.batch_size
                )
            self._method, self._method_key = method, key
        return self._method

    def feature_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Per-x-feature maps ``(B, k, *S)`` (Grad-CAM or integrated gradients of ``e_j``)."""
        method = self._map_method()
        return torch.cat([method(x, j) for j in range(self.k)], dim=1)

    def explain(self, x: torch.Tensor, target: int | torch.Tensor | None = None) -> XNNExplanation:
        """Everything XNN says about images ``x`` ``(B, C, *S)`` (:class:`XNNExplanation`)."""
        x = x.to(self.device, torch.float32)
        if target is None:
            with torch.no_grad(), model_guard(self.model):
                target = default_targets(chunked(self.model, x, self.batch_size))
        targets = torch.as_tensor(target, device=self.device).long().reshape(-1)
        targets = targets.expand(x.shape[0]) if targets.numel() == 1 else targets
        e, logits = self.x_features(x)
        contributions = self._fitted().contributions(e, targets).detach()
        fmaps = self.feature_maps(x)
        shape = (*contributions.shape, *([1] * (x.dim() - 2)))
        maps = (contributions.view(shape) * fmaps).sum(1, keepdim=True)
        return XNNExplanation(maps, fmaps, e, contributions, logits, targets)

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._last = self.explain(x, targets)
        return self._last.maps

    def run_outputs(
        self, x: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The contract's maps ``(B, 1, *S)`` (checked as a call of the explainer checks them)
        and what a run stores beside them per image: ``xnn_feature_maps`` ``(B, k, 1, *S)``,
        ``xnn_contributions`` ``(B, k)`` (``W[t, j] e_j``) and ``xnn_x_features`` ``(B, k)``."""
        maps = self(x, targets)
        explanation, self._last = self._last, None
        arrays = {
            "xnn_feature_maps": explanation.feature_maps.unsqueeze(2),
            "xnn_contributions": explanation.contributions,
            "xnn_x_features": explanation.x_features,
        }
        return maps, {name: a.detach().to(torch.float32) for name, a in arrays.items()}

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear head ``(W (K, k), b (K,))``: ``logit_t = W[t] . e + b_t``."""
        network = self._fitted()
        return network.weight.detach().cpu(), network.bias.detach().cpu()

    def __repr__(self) -> str:
        state = "fitted" if self.network is not None else "unfitted"
        return f"XNNExplainer({state}, k={self.k}, feature_map={self.feature_map!r})"


def _images(data: Dataset, batch_size: int):
    """Image batches ``(b, C, *S)`` of a dataset of ``(image, label, ...)`` or ``{"image"}``."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for batch in loader:
        out.append(batch["image"] if isinstance(batch, dict) else batch[0])
    return out


def faithfulness_r2(network: XNNNetwork, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``R^2`` of the head's logits against the classifier's ``y`` ``(N, K)`` (pooled over
    logits, around each logit's mean)."""
    with torch.no_grad():
        _, y_hat, _ = network(z)
        residual = (y_hat - y).pow(2).sum()
        total = (y - y.mean(0)).pow(2).sum().clamp_min(1e-12)
        return 1 - residual / total


def x_feature_similarity(network: XNNNetwork, z: torch.Tensor) -> float:
    """Mean squared cosine between x-feature columns on features ``z`` (the pull-away term)."""
    with torch.no_grad():
        return float(pull_away(network.encode(z)))


def fit_xnn(
    model: nn.Module,
    train: Dataset,
    val: Dataset | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    **params: Any,
) -> XNNExplainer:
    """Fit XNN for ``model`` on ``train`` (and ``val``), save it to ``out`` if given."""
    explainer = XNNExplainer(model, **params).fit(train, val, progress=progress)
    if out is not None:
        explainer.save(out)
    return explainer
