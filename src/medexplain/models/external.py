"""Load the user's own classifier safely, with what its outputs mean and how it wants inputs.

Four kinds of model file (:func:`load_model`):

- a TorchScript file (``torch.jit.save`` of ``torch.jit.script``/``trace``): the
  architecture travels with the weights; no factory needed;
- a state dict (``torch.save(model.state_dict(), path)``, or a dict with a ``"state_dict"``
  entry, as many training loops save) plus ``factory="module:function"`` that builds the
  network; weights are read with ``torch.load(..., weights_only=True)``;
- a medexplain checkpoint (:mod:`medexplain.models.checkpoint`), which rebuilds itself;
- an ONNX model (``.onnx``), run by ONNX Runtime (``medexplain[onnx]``), forward only
  (:mod:`medexplain.models.onnx_model`).

A pickled whole model (``torch.save(model, path)``) is refused and never unpickled:
unpickling runs arbitrary code, and model files travel between hospitals.

What the file cannot say, the user states in a small YAML file (or as keyword arguments,
which override it)::

    labels: [normal, pneumonia]      # output i is labels[i]
    activation: softmax              # softmax: one class per image; sigmoid: multi-label
    outputs: logits                  # or probabilities / log_probabilities (activation inside)
    input:
      shape: [1, 224, 224]           # (C, H, W) or (C, D, H, W)
      mean: 0.5                      # scalar or one per channel
      std: 0.25
    factory: lab.nets:resnet         # optional, same as the factory argument
    factory_kwargs: {num_classes: 2} # optional keyword arguments for the factory

:class:`LoadedModel` wraps the network so that ``(x - mean) / std`` happens inside
``forward``: explainers perturb and baselines live in the dataset's intensity space (what
the user sees), not in the network's normalised space.

The parts live in their own modules: the YAML in :mod:`.model_config`, the wrapper in
:mod:`.loaded`, the file kinds in :mod:`.model_file`, the factory import in
:mod:`.factory`; this module puts them together and keeps their public names importable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .loaded import LoadedModel, check_logits
from .model_config import (
    ACTIVATIONS,
    CONFIG_KEYS,
    INPUT_KEYS,
    ModelError,
    read_model_config,
)
from .model_file import file_sha256, open_network

__all__ = [
    "ACTIVATIONS",
    "CONFIG_KEYS",
    "INPUT_KEYS",
    "LoadedModel",
    "ModelError",
    "check_logits",
    "load_model",
    "read_model_config",
]


def load_model(
    model_path: str | os.PathLike | None,
    factory: str | None = None,
    *,
    device: str | torch.device | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    activation: str | None = None,
    outputs: str | None = None,
    input_shape: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    check: bool = True,
) -> LoadedModel:
    """Load a classifier from outside medexplain (see the module docstring).

    Args:
        model_path: TorchScript file, state-dict file, medexplain checkpoint or ONNX model
            (its static input shape is used when none is stated); None builds
            the network with ``factory`` alone (its own initial or built-in weights).
        factory: ``"module:function"`` (or ``"file.py:function"``) returning the
            ``nn.Module`` the state dict belongs to; called with ``factory_kwargs``.
        device: where to put the model (default CPU).
        config: model YAML path or dict (``labels``, ``activation``, ``outputs``, ``input``,
            ``factory``, ``factory_kwargs``); keyword arguments override it.
        check: with an input shape stated, run :meth:`LoadedModel.validate` on a dummy
            batch (output count vs labels, finite logits).

    Returns:
        A :class:`LoadedModel` in eval mode on ``device``.

    Raises:
        ModelError: a missing or unreadable file, a pickled model, weights that do not fit
            the factory's network, a bad config, or outputs that do not match the labels.
    """
    stated = _stated_settings(
        config,
        labels=labels,
        activation=activation,
        outputs=outputs,
        input_shape=input_shape,
        mean=mean,
        std=std,
        factory=factory,
        factory_kwargs=factory_kwargs,
    )
    factory = stated["factory"]
    kwargs = stated["factory_kwargs"] or {}
    if not isinstance(kwargs, Mapping):
        raise ModelError(f"factory_kwargs must be a mapping, got {kwargs!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    source: dict[str, Any] = {"path": None, "sha256": None, "kind": None, "factory": factory}
    path = None if model_path is None else _existing_file(Path(model_path))
    if path is not None:
        source.update(path=str(path), sha256=file_sha256(path))
    if path is None and factory is None:
        raise ModelError("load_model needs a model file, a factory ('module:function'), or both")
    net, source["kind"], extra_labels = open_network(path, factory, kwargs, device)
    if stated["input_shape"] is None and source["kind"] == "onnx":
        stated["input_shape"] = net.input_shape  # the graph's static (C, *S), or None
    model = LoadedModel(
        net,
        labels=stated["labels"] if stated["labels"] is not None else extra_labels,
        activation=stated["activation"],
        outputs=stated["outputs"],
        input_shape=stated["input_shape"],
        mean=stated["mean"],
        std=stated["std"],
        source=source,
    )
    model.to(device)
    model.eval()
    if check and model.input_shape is not None:
        model.validate()
    return model


def _stated_settings(
    config: str | os.PathLike | Mapping[str, Any] | None, **overrides: Any
) -> dict[str, Any]:
    """The model config's settings, with every keyword argument that is not None in place of
    the config's value."""
    stated = read_model_config(config)
    stated.update({k: v for k, v in overrides.items() if v is not None})
    return stated


def _existing_file(path: Path) -> Path:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    return path
