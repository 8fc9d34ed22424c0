"""Similar + adversarial generators (Charachon et al., METHODS.md section 4).

A U-Net with a shared encoder/decoder and two heads (:mod:`.unet`) turns an image ``x``
into a *similar* image ``x_s`` that the frozen classifier ``f`` still assigns to its own
decision ``y^ = argmax f(x)`` and an *adversarial* image ``x_a`` that ``f`` classifies
otherwise. The explanation is where the two differ:

    E = sum over channels |x_s - x_a|     (B, 1, *spatial), unsigned, one forward pass

Training loss per image (the paper's formulation, with classification weights c_s, c_a):

    c_s CE(f(x_s), y^) + c_a L_adv(f(x_a), y^) + w_s R(x_s, x) + w_a R(x_a, x_s),  R = MSE + MAE

- ``w_s = similar_weight = 10`` and ``w_a = adversarial_weight = 2``: the paper does not fix
  the weights; the successors' code used reconstruction weights 10 and 2, which we read as
  10 for keeping ``x_s`` close to the input and 2 for keeping ``x_a`` close to ``x_s``.
  ``R(x_a, x_s)`` back-propagates into both heads. ``c_s = 0.01`` and ``c_a = 0.2`` are
  the successor code's classification weights (``similar_ce_weight`` /
  ``adversarial_ce_weight``); on the benchmark they localize better than 1 / 1.
- ``L_adv`` (the paper is binary, where "classified otherwise" is one class; for K > 2
  classes, ``adversarial_target=`` chooses):

  * ``"any"`` (default): ``-log(1 - p_{y^}(x_a))``, cross-entropy to the set of all other
    classes (``logsumexp(z) - logsumexp(z without y^)``, stable when ``p_{y^} -> 1``). It
    only asks ``y^`` to lose and lets the generator pick the cheapest other class, so the
    map shows the cheapest way out of ``y^``: on the synthetic benchmark an atrophy image
    may be "explained" by painting a lesion into it rather than by undoing the atrophy;
  * a class index ``c``: ``CE(f(x_a), c)``, e.g. the healthy/normal class for "what would
    make this image normal" (counterfactual to a reference class); images predicted as
    ``c`` themselves use the "any" loss.

  For K = 2 both coincide with the paper's loss. (Cross-entropy to the runner-up class was
  tried and dropped: for a confident classifier that class is arbitrary.)
- A model with one logit ``z`` is treated as the two-class logits ``(0, z)`` (softmax of
  which is the sigmoid), so ``y^ = [z > 0]``.
- The classifier is frozen (eval mode, no parameter gradients) and restored afterwards.
- Random geometric augmentation of the training inputs regularises the generator as the
  paper reports (:func:`.sa_variants.variant_augment`): by default rotation +-5 degrees and
  zoom 0.8-1 without flips, so aligned images stay aligned (a left-right flip changes what a
  position means); ``variant="paper"`` adds the successor code's vertical flips.
  ``augment=False`` switches it off, a RandomAffine/dict/preset replaces it. ``y^`` is the
  decision on the augmented image.

Training goes through the shared :func:`medexplain.models.loop.train_loop` (progress,
early stopping on the validation metric ``kept * flipped`` = fraction of similar images
that keep ``y^`` times fraction of adversarial images that leave it, ``max_seconds``).

>>> explainer = create("similar_adversarial", model, checkpoint="gen.pt")   # saved by fit
>>> explainer = create("similar_adversarial", model, generator=fitted_unet)  # a UNet module
>>> explainer = fit_similar_adversarial(model, train_ds, val_ds, out="gen.pt")  # train now

An unfitted explainer raises a RuntimeError saying how to fit it.

Targets: the method explains the classifier's own decision. ``target=None`` (the predicted
class) is the intended use. A given target that differs from the prediction gets the map
of the predicted class anyway (``|x_s - x_a|`` does not depend on a class); by default a
warning says so (``other_target="warn"``; ``"raise"`` makes it an error, ``"ignore"`` stays
silent). Single-logit models accept only target 0 (their one output) and never warn.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ...core.model import model_guard, seeded_generator
from ...core.scores import chunked
from ...models.fingerprint import check_classifier, classifier_record
from ..augment import RandomAffine, warp
from ..base import Explainer, register
from .adversarial_losses import (
    _images,
    _TrainingMode,
    adversarial_loss,
    check_settings,
    decision_counts,
    generator_losses,
    reconstruction,
    two_class_logits,
)
from .sa_variants import augment_record, resolve_augment, resolve_ce_weights
from .unet import UNet, UNetConfig

CHECKPOINT_KIND = "similar_adversarial_unet"

__all__ = [
    "CHECKPOINT_KIND",
    "SimilarAdversarial",
    "adversarial_loss",
    "fit_similar_adversarial",
    "reconstruction",
    "two_class_logits",
]


def _register_checkpoint_builder() -> None:
    from ...models.checkpoint import register_builder

    register_builder(CHECKPOINT_KIND, UNetConfig, UNet)


@register(
    "similar_adversarial",
    "learned |x_s - x_a| of a similar/adversarial U-Net generator (Charachon et al.); needs fit",
)
class SimilarAdversarial(Explainer):
    """Explainer ``|x_s - x_a|`` from a two-headed U-Net trained against the frozen model.

    Parameters (network; ignored when a ``checkpoint`` or ``generator`` is given):
    ``widths`` (channels per U-Net level, depth = len; the paper fixes no architecture: the
    small default ``(8, 16, 32)`` trains to the benchmark targets in 5 CPU minutes at 64 px,
    use more and wider levels for large images), ``norm`` (``batch``/``instance``/``none``),
    ``residual`` (heads predict ``x + delta``).

    Loss and training (see the module docstring for the sources of the defaults):
    ``variant`` (``"default"`` or ``"paper"``: the successor code's classification weights
    and augmentation), ``similar_weight`` (w_s = 10), ``adversarial_weight`` (w_a = 2),
    ``similar_ce_weight`` / ``adversarial_ce_weight`` (c_s = 0.01, c_a = 0.2),
    ``adversarial_target`` (``"any"`` or a class index), ``augment`` (True = the variant's
    augmentation, False, or a RandomAffine/dict/preset name), ``epochs``, ``lr`` (Adam),
    ``train_batch_size``,
    ``patience``, ``max_seconds`` (None = no limit). The optimiser settings (Adam, lr 2e-3,
    batches of 16, early stopping after 8 epochs without improvement) are ours: the paper
    does not give them.

    ``other_target``: what to do when called with a target other than the prediction
    (``"warn"``, ``"raise"``, ``"ignore"``). ``batch_size`` bounds inference batches.
    """

    signed = False

    def __init__(
        self,
        model: nn.Module,
        *,
        checkpoint: str | Path | None = None,
        generator: UNet | None = None,
        widths: tuple[int, ...] = (8, 16, 32),
        norm: str = "batch",
        residual: bool = True,
        similar_weight: float = 10.0,
        adversarial_weight: float = 2.0,
        adversarial_target: str | int = "any",
        augment: bool | RandomAffine | Mapping[str, Any] | str = True,
        epochs: int = 40,
        lr: float = 2e-3,
        train_batch_size: int = 16,
        patience: int | None = 8,
        max_seconds: float | None = None,
        other_target: str = "warn",
        force: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        variant: str = "default",
        similar_ce_weight: float | None = None,
        adversarial_ce_weight: float | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size, seed=seed)
        self.variant = variant
        self.ce_weights = resolve_ce_weights(variant, similar_ce_weight, adversarial_ce_weight)
        self.force = bool(force)
        self.input_shape: tuple[int, ...] | None = None
        if checkpoint is not None and generator is not None:
            raise ValueError("give either checkpoint= or generator=, not both")
        check_settings(
            similar_weight,
            adversarial_weight,
            adversarial_target,
            other_target,
            epochs,
            train_batch_size,
            variant,
            self.ce_weights,
        )
        self.widths = tuple(int(w) for w in widths)
        self.norm = norm
        self.residual = bool(residual)
        self.similar_weight = float(similar_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.adversarial_target = adversarial_target
        self.augment = resolve_augment(augment, variant)
        self.epochs = int(epochs)
        self.lr = float(lr)
        self.train_batch_size = int(train_batch_size)
        self.patience = patience
        self.max_seconds = max_seconds
        self.other_target = other_target
        self.history = None
        self.generator: UNet | None = None
        if checkpoint is not None:
            self.load(checkpoint)
        elif generator is not None:
            self.set_generator(generator)

    # ------------------------------------------------------------------ generator handling

    def set_generator(self, generator: UNet) -> None:
        """Use a fitted :class:`UNet` (2 heads) as the generator, moved to the model's device."""
        if not isinstance(generator, nn.Module) or not isinstance(
            getattr(generator, "config", None), UNetConfig
        ):
            raise TypeError(
                "generator must be a medexplain UNet with a UNetConfig, got "
                f"{type(generator).__name__}"
            )
        if generator.config.heads != 2:
            raise ValueError(
                f"the generator needs 2 heads (similar, adversarial), got {generator.config.heads}"
            )
        self.generator = generator.to(self.device).eval()

    @property
    def fitted(self) -> bool:
        return self.generator is not None

    def _require_generator(self) -> UNet:
        if self.generator is None:
            raise RuntimeError(
                "similar_adversarial has no generator yet: fit it first with "
                "explainer.fit(train_dataset, val_dataset) or "
                "medexplain.explain.generative.similar_adversarial.fit_similar_adversarial(model, "
                "train_dataset, out='gen.pt') (CLI: medexplain fit similar-adversarial), then use "
                "create('similar_adversarial', model, checkpoint='gen.pt') or generator=<UNet>"
            )
        return self.generator

    def _check_input(self, x: torch.Tensor) -> None:
        config = self._require_generator().config
        if x.dim() - 2 != config.spatial_dims or x.shape[1] != config.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)} but the generator was built for "
                f"{config.in_channels}-channel {config.spatial_dims}D images"
            )

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The similar and adversarial images ``(x_s, x_a)``, each ``(B, C, *spatial)``.

        One generator pass per chunk of ``batch_size`` images, generator in eval mode.
        """
        generator = self._require_generator()
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError("x must be a floating point tensor (B, C, *spatial)")
        x = x.to(self.device, torch.float32)
        self._check_input(x)
        with _TrainingMode(generator, False):
            out = chunked(generator, x, self.batch_size)
        return out[:, 0], out[:, 1]

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.other_target != "ignore":
            self._check_targets(x, targets)
        x_s, x_a = self.generate(x)
        return (x_s - x_a).abs().sum(dim=1, keepdim=True)

    @torch.no_grad()
    def _check_targets(self, x: torch.Tensor, targets: torch.Tensor) -> None:
        logits = chunked(self.model, x, self.batch_size)
        if logits.shape[1] == 1:
            return  # target 0 is the only output; the decision is its sign
        different = int((logits.argmax(dim=1) != targets).sum())
        if different == 0:
            return
        message = (
            f"similar_adversarial explains the classifier's own decision: {different} of "
            f"{x.shape[0]} targets differ from the predicted class; their maps are those of "
            "the predicted class (call with target=None to avoid this message)"
        )
        if self.other_target == "raise":
            raise ValueError(message)
        warnings.warn(message, UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ training

    def losses(self, x: torch.Tensor, generator: UNet | None = None) -> dict[str, torch.Tensor]:
        """The four loss terms (means over the batch) and their weighted ``total``.

        ``x`` ``(B, C, *spatial)`` on the model's device; the model must be frozen by the
        caller (``fit`` does it). ``y^`` is the model's decision on ``x``.
        """
        generator = generator or self._require_generator()
        weights = (self.similar_weight, self.adversarial_weight)
        return generator_losses(
            self.model, generator, x, self.adversarial_target, *weights, self.ce_weights
        )

    @torch.no_grad()
    def decision_rates(self, data: Dataset | torch.Tensor) -> dict[str, float]:
        """On images (a dataset or a tensor): fraction of ``x_s`` that keep ``y^`` ("kept"),
        fraction of ``x_a`` that leave it ("flipped"), fraction of ``x_a`` classified as the
        chosen ``adversarial_target`` ("hit", among images not predicted as it; NaN for
        "any"), and the validation score ``kept * flipped``."""
        generator = self._require_generator()
        totals, n = [0, 0, 0, 0], 0
        with model_guard(self.model), _TrainingMode(generator, False):
            for x in self._batches(data):
                x = x.to(self.device, torch.float32)
                counts = decision_counts(self.model, generator, x, self.adversarial_target)
                totals = [a + b for a, b in zip(totals, counts)]
                n += x.shape[0]
        kept, flipped, hit, aimed = totals
        if n == 0:
            raise ValueError("no images to evaluate")
        return {
            "kept": kept / n,
            "flipped": flipped / n,
            "hit": hit / aimed if aimed else float("nan"),
            "score": (kept / n) * (flipped / n),
            "n": n,
        }

    def _batches(self, data: Dataset | torch.Tensor):
        if isinstance(data, torch.Tensor):
            yield from torch.split(data, self.batch_size)
            return
        for batch in DataLoader(data, batch_size=self.batch_size, shuffle=False):
            yield _images(batch)

    def fit(
        self,
        dataset: Dataset,
        val_dataset: Dataset | None = None,
        *,
        progress: bool = True,
        out: str | Path | None = None,
    ) -> SimilarAdversarial:
        """Train the generator on ``dataset`` (items ``(image, label)``, labels unused: the
        targets are the model's own decisions) and return ``self``.

        ``val_dataset`` drives early stopping and best-epoch restore via ``kept * flipped``
        (without it, the last epoch is kept). A generator already present (from a checkpoint
        or ``generator=``) is trained further; otherwise a new :class:`UNet` is built for
        the images' channels and dimensionality with weights seeded by ``seed``. ``out``
        saves a checkpoint. The model is left exactly as found.
        """
        from ...models.loop import train_loop

        if not hasattr(dataset, "__len__") or len(dataset) == 0:
            raise ValueError("dataset must be a non-empty map-style Dataset of (image, label)")
        first = _images(dataset[0]) if not isinstance(dataset[0], torch.Tensor) else dataset[0]
        first = torch.as_tensor(first)
        self.input_shape = tuple(int(s) for s in first.shape)
        if self.generator is None:
            config = UNetConfig(
                in_channels=int(first.shape[0]),
                spatial_dims=first.dim() - 1,
                widths=self.widths,
                norm=self.norm,
                residual=self.residual,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                generator = UNet(config)
            self.set_generator(generator)
        generator = self._require_generator()
        self._check_input(first.unsqueeze(0))
        device = self.device
        loader = DataLoader(
            dataset,
            batch_size=self.train_batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=len(dataset) > self.train_batch_size,
        )
        aug_generator = seeded_generator(self.seed + 1, "cpu")

        def loss_fn(batch: Any) -> torch.Tensor:
            x = _images(batch).to(device, torch.float32)
            if self.augment is not None:
                theta = self.augment.sample(x.shape[0], x.shape[2:], aug_generator, device)
                x = warp(x, theta, self.augment.padding_mode)
            return self.losses(x, generator)["total"]

        val_fn = None
        if val_dataset is not None:

            def val_fn() -> float:
                return self.decision_rates(val_dataset)["score"]

        with model_guard(self.model):
            self.history = train_loop(
                generator,
                loss_fn,
                loader,
                val_fn=val_fn,
                higher_is_better=True,
                epochs=self.epochs,
                lr=self.lr,
                patience=self.patience,
                max_seconds=self.max_seconds,
                seed=self.seed,
                progress=progress,
                description="similar/adversarial generator",
            )
        generator.eval()
        if out is not None:
            self.save(out)
        return self

    # ------------------------------------------------------------------ checkpoints

    def training_parameters(self) -> dict[str, Any]:
        """The loss/training hyper-parameters as plain values (stored in checkpoints)."""
        return {
            "variant": self.variant,
            "similar_weight": self.similar_weight,
            "adversarial_weight": self.adversarial_weight,
            "similar_ce_weight": self.ce_weights[0],
            "adversarial_ce_weight": self.ce_weights[1],
            "adversarial_target": self.adversarial_target,
            "augment": augment_record(self.augment),
            "epochs": self.epochs,
            "lr": self.lr,
            "train_batch_size": self.train_batch_size,
            "seed": self.seed,
        }

    def save(self, path: str | Path) -> Path:
        """Save the generator (tensors + plain config) with the training parameters."""
        from ...models.checkpoint import save_checkpoint

        generator = self._require_generator()
        extra: dict[str, Any] = {
            "method": "similar_adversarial",
            "training": self.training_parameters(),
            "classifier": classifier_record(self.model, self.input_shape),
        }
        if self.history is not None:
            extra["history"] = {
                "train_loss": list(self.history.train_loss),
                "val_metric": list(self.history.val_metric),
                "best_epoch": int(self.history.best_epoch),
                "seconds": float(self.history.seconds),
            }
        path = Path(path)
        save_checkpoint(path, generator, extra=extra)
        return path

    def load(self, path: str | Path) -> SimilarAdversarial:
        """Load a generator saved by :meth:`save` (``weights_only=True`` loading)."""
        from ...models.checkpoint import load_checkpoint

        module, extra = load_checkpoint(path, device=self.device)
        if not isinstance(module, UNet):
            raise ValueError(
                f"{path} holds a {type(module).__name__}, not a similar/adversarial generator"
            )
        check_classifier(extra, self.model, path, self.force)
        self.set_generator(module)
        training = (extra or {}).get("training", {})
        for key in ("variant", "similar_weight", "adversarial_weight", "adversarial_target"):
            if key in training:
                setattr(self, key, training[key])
        if training:  # checkpoints saved before the classification weights used 1 / 1
            keys = ("similar_ce_weight", "adversarial_ce_weight")
            self.ce_weights = (float(training.get(keys[0], 1)), float(training.get(keys[1], 1)))
        return self

    def __repr__(self) -> str:
        state = "fitted" if self.fitted else "unfitted"
        return (
            f"SimilarAdversarial({state}, variant={self.variant!r}, w_s={self.similar_weight}, "
            f"w_a={self.adversarial_weight}, "
            f"adversarial_target={self.adversarial_target!r}, augment={self.augment is not None})"
        )


def fit_similar_adversarial(
    model: nn.Module,
    train_dataset: Dataset,
    val_dataset: Dataset | None = None,
    *,
    out: str | Path | None = None,
    max_seconds: float | None = 300.0,
    seed: int = 0,
    progress: bool = True,
    **params: Any,
) -> SimilarAdversarial:
    """Build a :class:`SimilarAdversarial` explainer for ``model``, fit it and return it.

    ``params`` are the explainer's constructor parameters (``widths``, ``similar_weight``,
    ``augment``, ``epochs``, ...). ``max_seconds`` (default 5 minutes) bounds training;
    ``out`` saves the checkpoint to load later with
    ``create("similar_adversarial", model, checkpoint=out)``.
    """
    explainer = SimilarAdversarial(model, max_seconds=max_seconds, seed=seed, **params)
    return explainer.fit(train_dataset, val_dataset, progress=progress, out=out)


_register_checkpoint_builder()
