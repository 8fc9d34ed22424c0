"""A user's classifier with its label names, activation and input normalisation.

:class:`LoadedModel` wraps the network so that ``(x - mean) / std`` happens inside
``forward``: explainers perturb and baselines live in the dataset's intensity space (what
the user sees), not in the network's normalised space. :func:`check_logits` refuses
non-finite outputs, naming the images that produced them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.errors import typed_line
from .model_config import (
    ACTIVATIONS,
    OUTPUTS,
    ModelError,
    check_input_shape,
    check_labels,
    check_normalisation,
)


class LoadedModel(nn.Module):
    """A classifier with its label names, activation and input normalisation.

    ``forward(x)``: ``x`` is ``(B, C, *S)`` in the data's intensity space; the network sees
    ``(x - mean) / std`` and returns ``(B, K)`` (``(B,)`` is read as ``(B, 1)``) logits,
    probabilities or log-probabilities (``outputs``). ``forward`` returns the scores every
    explainer and metric reads (``score``): the logits; for a network that returns
    probabilities, their logarithm under softmax (log-probabilities, whose softmax gives the
    probabilities back) and the logit ``log p - log(1 - p)`` under sigmoid.

    Attributes:
        net: the wrapped network (TorchScript or ``nn.Module``).
        labels: output names, ``labels[i]`` for logit ``i`` (``"0".."K-1"`` if not stated).
        activation: ``"softmax"`` (exactly one class per image) or ``"sigmoid"``
            (independent labels); default sigmoid for one output, else softmax. The
            shorthands ``"probabilities"`` and ``"log_probabilities"`` set ``outputs``.
        outputs: what the network returns: ``"logits"`` (default), ``"probabilities"`` or
            ``"log_probabilities"``.
        input_shape: ``(C, *S)`` the network expects, or None if not stated.
        source: where the model came from (file, sha256, kind, factory), for run records.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        labels: Sequence[str] | None = None,
        activation: str | None = None,
        outputs: str | None = None,
        input_shape: Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ModelError(f"the network must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net
        self.labels = check_labels(labels)
        self._activation, self.outputs = _activation_and_outputs(activation, outputs)
        self.input_shape = check_input_shape(input_shape)
        channels = self.input_shape[0] if self.input_shape else None
        mean_t, std_t = check_normalisation(mean, std, channels)
        self.register_buffer("mean", torch.tensor(mean_t or (0.0,), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std_t or (1.0,), dtype=torch.float32))
        self._normalises = mean_t is not None or std_t is not None
        self.source: dict[str, Any] = dict(source or {})
        if self.labels is not None:
            self._check_activation(len(self.labels))

    # ------------------------------------------------------------------ description

    def fingerprint_tensors(self) -> list[torch.Tensor]:
        """The tensors that decide the function: the network's state, plus the input
        normalisation when it normalises (see ``models.fingerprint``)."""
        tensors = list(self.net.state_dict().values())
        return [*tensors, self.mean, self.std] if self._normalises else tensors

    @property
    def activation(self) -> str:
        if self._activation is not None:
            return self._activation
        return "sigmoid" if self.labels is not None and len(self.labels) == 1 else "softmax"

    @property
    def score(self) -> str:
        """What ``forward`` returns: ``"logits"``, or ``"log_probabilities"`` for a softmax
        network that returns (log-)probabilities."""
        if self.outputs == "logits" or self.activation == "sigmoid":
            return "logits"
        return "log_probabilities"

    @property
    def num_outputs(self) -> int | None:
        return None if self.labels is None else len(self.labels)

    @property
    def spatial_dims(self) -> int | None:
        return None if self.input_shape is None else len(self.input_shape) - 1

    def _check_activation(self, outputs: int) -> None:
        if self._activation == "softmax" and outputs == 1:
            raise ModelError(
                "activation 'softmax' over a single output is always 1; use 'sigmoid' for a "
                "one-logit binary model"
            )

    def describe(self) -> dict[str, Any]:
        """Plain values for ``results.json`` and for recognising the model when resuming."""
        return {
            **self.source,
            "labels": self.labels,
            "activation": self.activation,
            "outputs": self.outputs,
            "score": self.score,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "mean": self.mean.tolist() if self._normalises else None,
            "std": self.std.tolist() if self._normalises else None,
        }

    def extra_repr(self) -> str:
        return (
            f"labels={self.labels}, activation={self.activation!r}, outputs={self.outputs!r}, "
            f"input_shape={self.input_shape}"
        )

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, K)`` (see the class docstring) of images ``(B, C, *S)``."""
        return self._scores(self._outputs(x))

    def _scores(self, out: torch.Tensor) -> torch.Tensor:
        """The network's outputs as scores: logits, or log-probabilities (softmax)."""
        if self.outputs == "logits":
            return out
        log_floor = math.log(torch.finfo(out.dtype).tiny)
        if self.outputs == "probabilities":
            log_p = torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
        else:
            log_p = out.clamp(log_floor, 0.0)
        if self.activation == "softmax":
            return log_p.clamp_min(log_floor)
        # log(1 - p) with p = exp(log_p) < 1 (kept below 1 so the logit stays finite)
        eps = torch.finfo(out.dtype).eps
        log_p = log_p.clamp_max(math.log1p(-eps))
        return log_p - torch.log(-torch.expm1(log_p))

    def _outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The network's outputs ``(B, K)`` for images ``(B, C, *S)``, checked."""
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
            raise ModelError(
                f"the model input must be a tensor (B, C, H, W) or (B, C, D, H, W), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        shape = self.input_shape
        if shape is not None and (x.dim() - 1 != len(shape) or x.shape[1] != shape[0]):
            raise ModelError(
                f"the model expects inputs (B, {', '.join(map(str, shape))}) "
                f"(input shape in the model config), got {tuple(x.shape)}"
            )
        if self._normalises:
            view = (1, -1) + (1,) * (x.dim() - 2)
            x = (x - self.mean.view(view)) / self.std.view(view)
        out = self.net(x)
        if not isinstance(out, torch.Tensor):
            raise ModelError(
                f"the network returned a {type(out).__name__}; medexplain needs a logits "
                "tensor (B, K) (wrap the network to return only the logits)"
            )
        if out.dim() == 1 and out.shape[0] == x.shape[0]:
            out = out.unsqueeze(1)
        if out.dim() != 2 or out.shape[0] != x.shape[0]:
            raise ModelError(
                f"the network returned shape {tuple(out.shape)} for a batch of {x.shape[0]}; "
                "expected logits (B, K)"
            )
        if self.labels is not None and out.shape[1] != len(self.labels):
            raise ModelError(
                f"the network returns {out.shape[1]} output(s) but {len(self.labels)} labels "
                f"are stated ({self.labels}); list one label per output, in output order"
            )
        return out

    def validate(self, example: torch.Tensor | None = None) -> torch.Tensor:
        """Run one forward pass (on ``example``, or on a seeded random batch of two images of
        ``input_shape`` in [0, 1]) in eval mode without gradients; check the logits are finite
        and match the labels. Without stated labels, they become ``"0".."K-1"``. Returns the
        logits."""
        if example is None:
            if self.input_shape is None:
                raise ModelError(
                    "cannot check the model without an input shape; state input.shape in the "
                    "model config or pass an example batch"
                )
            generator = torch.Generator().manual_seed(0)
            example = torch.rand((2, *self.input_shape), generator=generator)
        device = next(iter(self.buffers())).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                raw = self._outputs(example.to(device))
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(
                f"the model failed on an input of shape {tuple(example.shape)}: {typed_line(error)}"
            ) from error
        finally:
            self.train(was_training)
        check_logits(raw, "the check input")
        if self.labels is None:
            self.labels = [str(i) for i in range(raw.shape[1])]
        self._check_activation(raw.shape[1])
        self._check_outputs(raw)
        return self._scores(raw)

    def _check_outputs(self, raw: torch.Tensor) -> None:
        """Refuse outputs that cannot be what ``outputs`` states; warn when logits look like
        softmax probabilities."""
        raw = raw.double()
        softmax = self.activation == "softmax"
        if self.outputs == "logits":
            sums = raw.sum(1)
            if raw.shape[1] > 1 and raw.min() >= 0 and torch.allclose(sums, torch.ones_like(sums)):
                warnings.warn(
                    "the network's outputs lie in [0, 1] and sum to 1 like probabilities; if "
                    "it applies softmax itself, state activation: probabilities in the model "
                    "config, or explainers read probabilities as logits",
                    UserWarning,
                    stacklevel=3,
                )
            return
        p = raw if self.outputs == "probabilities" else raw.exp()
        if raw.isnan().any() or p.min() < -1e-4 or p.max() > 1 + 1e-4:
            raise ModelError(
                f"outputs: {self.outputs} is stated but the network returned values in "
                f"[{float(raw.min()):.3g}, {float(raw.max()):.3g}]; state outputs: logits for "
                "a network that returns logits"
            )
        sums = p.sum(1)
        if (
            softmax
            and p.shape[1] > 1
            and not torch.allclose(sums, torch.ones_like(sums), atol=1e-3)
        ):
            raise ModelError(
                f"softmax {self.outputs} must sum to 1 per image but sum to "
                f"{float(sums.min()):.3g}..{float(sums.max()):.3g}; for independent labels "
                f"state activation: sigmoid with outputs: {self.outputs}"
            )


def check_logits(logits: torch.Tensor, where: str | Sequence[str]) -> torch.Tensor:
    """Raise :class:`ModelError` if ``logits`` ``(B, K)`` hold NaN or inf.

    ``where`` names the input: one string for the batch, or one name (e.g. image path) per
    row, in which case the message lists the offending images. Returns ``logits``.
    """
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return logits
    rows = (~finite).reshape(finite.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
    kind = "NaN" if bool(torch.isnan(logits).any()) else "inf"
    if isinstance(where, str):
        names = where
    else:
        where = list(where)
        bad = [where[i] if i < len(where) else f"row {i}" for i in rows]
        names = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ModelError(
        f"the model returned non-finite logits ({kind}) for {names}; check the input "
        "intensities and normalisation (mean/std) and the model weights"
    )


def _activation_and_outputs(activation: str | None, outputs: str | None) -> tuple[str | None, str]:
    """``(activation or None for the default, outputs)``, with the shorthand activations
    ``probabilities`` / ``log_probabilities`` resolved into ``outputs``."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ModelError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if outputs is not None and outputs not in OUTPUTS:
        raise ModelError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    if activation in OUTPUTS:
        if outputs not in (None, activation):
            raise ModelError(
                f"activation: {activation} contradicts outputs: {outputs}; state activation "
                "softmax or sigmoid with outputs"
            )
        return None, str(activation)
    return activation, outputs or "logits"
