"""The explainer contract, the registry, and the guard that leaves the model untouched.

Contract (DESIGN.md): ``maps = Explainer(model, **params)(x, target)``

- ``x``: ``(B, C, *spatial)``, spatial ``(H, W)`` or ``(D, H, W)``;
- ``target``: an int, a tensor of B ints, or None (the predicted class);
- ``maps``: float32 ``(B, 1, *spatial)`` at input resolution, higher = more evidence for
  the target (signed methods keep their sign);
- batch-invariant (N images at once equal N single calls), memory bounded by an internal
  ``batch_size`` for the forward passes a method makes, deterministic for a given ``seed``;
- the model is left exactly as found: train/eval flags, ``requires_grad``, hooks.

Subclasses implement :meth:`Explainer._attribute` and register with :func:`register`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.model import model_device, model_guard
from ..core.scores import as_targets, check_targets, chunked
from ..core.spatial import spatial_dims_of

__all__ = [
    "Explainer",
    "ExplainerFactory",
    "NeedsGradientsError",
    "available",
    "create",
    "explainer_class",
    "forward_only",
    "forward_only_methods",
    "register",
    "register_wrapper",
]


class Explainer(ABC):
    """Base class of every image-wise explainer.

    Parameters common to all: ``batch_size`` bounds how many images one forward pass
    carries; ``seed`` makes random methods deterministic. Subclasses add their own
    hyper-parameters (defaults from the papers, see METHODS.md) as keyword arguments.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: False for methods whose map is unsigned by construction (masks, |x_s - x_a|).
    signed: ClassVar[bool] = True
    #: False for methods that only run the model forward: the only ones :func:`create`
    #: builds for a forward-only model (an ONNX model, see :func:`forward_only`).
    needs_gradients: ClassVar[bool] = True

    def __init__(self, model: nn.Module, *, batch_size: int = 32, seed: int = 0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._outputs_by_shape: dict[tuple[int, tuple[int, ...]], int] = {}

    @property
    def device(self) -> torch.device:
        return model_device(self.model)

    def __call__(self, x: torch.Tensor, target: int | torch.Tensor | None = None) -> torch.Tensor:
        spatial_dims_of(x, "x")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        x = x.to(self.device, torch.float32)
        with model_guard(self.model):
            logits_cache: dict[str, torch.Tensor] = {}

            def logits() -> torch.Tensor:
                if "out" not in logits_cache:
                    with torch.no_grad():
                        logits_cache["out"] = chunked(self.model, x, self.batch_size)
                return logits_cache["out"]

            targets = as_targets(target, x.shape[0], device=x.device, logits=logits)
            check_targets(targets, self._num_outputs(x, logits_cache))
            maps = self._attribute(x, targets)
        expected = (x.shape[0], 1, *x.shape[2:])
        if tuple(maps.shape) != expected:
            raise RuntimeError(
                f"{type(self).__name__} returned maps of shape {tuple(maps.shape)}, "
                f"expected {expected}"
            )
        return maps.detach().to(torch.float32)

    def _num_outputs(self, x: torch.Tensor, logits_cache: dict[str, torch.Tensor]) -> int:
        """The model's number of outputs for images shaped like ``x``: from the logits when
        the targets needed them, else from one image's forward pass, remembered per model
        and image shape (a whole batch's forward pass only to count outputs would cost a
        third of a one-pass method's time)."""
        if "out" in logits_cache:
            return int(logits_cache["out"].shape[1])
        key = (id(self.model), tuple(x.shape[1:]))
        if key not in self._outputs_by_shape:
            with torch.no_grad():
                self._outputs_by_shape[key] = int(self.model(x[:1]).shape[1])
        return self._outputs_by_shape[key]

    @abstractmethod
    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Maps ``(B, 1, *spatial)`` for images ``x`` ``(B, C, *spatial)`` and targets ``(B,)``.

        Called inside :func:`model_guard` (model in eval mode, parameters frozen), with x on
        the model's device and targets already validated.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, seed={self.seed})"


ExplainerFactory = Callable[..., Explainer]


class NeedsGradientsError(ValueError):
    """An explainer that needs gradients was asked for a model that runs forward only."""


def forward_only(model: nn.Module) -> str | None:
    """What makes ``model`` forward-only (e.g. ``"the ONNX model net.onnx"``): a submodule
    with a true ``forward_only`` attribute; None when gradients flow through the model."""
    for module in model.modules():
        if getattr(module, "forward_only", False):
            return str(getattr(module, "forward_only_name", type(module).__name__))
    return None


def forward_only_methods() -> list[str]:
    """Registered methods that run the model forward only (no gradients), sorted."""
    return sorted(name for name, cls in _REGISTRY.items() if not cls.needs_gradients)


def _check_gradients(name: str, cls: type[Explainer], model: nn.Module) -> None:
    if not cls.needs_gradients or not isinstance(model, nn.Module):
        return
    reason = forward_only(model)
    if reason is not None:
        raise NeedsGradientsError(
            f"{name} needs the model's gradients, but {reason} runs forward only; use a "
            f"forward-only method: {', '.join(forward_only_methods())}"
        )


_REGISTRY: dict[str, type[Explainer]] = {}
_WRAPPERS: dict[str, Callable[..., Explainer]] = {}


def register(name: str, description: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: make an explainer available to :func:`create` under ``name``."""

    def decorate(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"an explainer named {name!r} is already registered")
        cls.name = name
        cls.description = description
        _REGISTRY[name] = cls
        return cls

    return decorate


def register_wrapper(prefix: str, description: str) -> Callable[[Callable], Callable]:
    """Register ``prefix`` so that ``create("prefix:inner", model, ...)`` calls
    ``wrapper(inner_name, model, **params)``."""

    def decorate(fn: Callable[..., Explainer]) -> Callable[..., Explainer]:
        fn.description = description  # type: ignore[attr-defined]
        _WRAPPERS[prefix] = fn
        return fn

    return decorate


def create(name: str, model: nn.Module, **params: Any) -> Explainer:
    """Build the explainer registered as ``name`` for ``model`` with the given parameters.

    ``name`` may be ``"wrapper:inner"`` (e.g. ``"augmented:integrated_gradients"``).
    A method that needs gradients is refused for a forward-only model (an ONNX model) with
    :class:`NeedsGradientsError` naming the forward-only methods.
    """
    if ":" in name:
        prefix, inner = name.split(":", 1)
        if prefix not in _WRAPPERS:
            raise KeyError(f"unknown explainer wrapper {prefix!r}; known: {sorted(_WRAPPERS)}")
        return _WRAPPERS[prefix](inner, model, **params)
    if name not in _REGISTRY:
        raise KeyError(f"unknown explainer {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    _check_gradients(name, _REGISTRY[name], model)
    return _REGISTRY[name](model, **params)


def available() -> dict[str, str]:
    """Registered explainer names with one-line descriptions (wrappers as ``prefix:<name>``)."""
    names = {name: cls.description for name, cls in sorted(_REGISTRY.items())}
    for prefix, fn in sorted(_WRAPPERS.items()):
        names[f"{prefix}:<name>"] = fn.description  # type: ignore[attr-defined]
    return names


def explainer_class(name: str) -> type[Explainer]:
    """The class registered as ``name`` (KeyError with the list of names otherwise)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown explainer {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
