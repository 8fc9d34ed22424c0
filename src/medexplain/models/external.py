"""Load the user's own classifier safely, with what its outputs mean and how it wants inputs.

Three kinds of model file (:func:`load_model`):

- a TorchScript file (``torch.jit.save`` of ``torch.jit.script``/``trace``): the
  architecture travels with the weights; no factory needed;
- a state dict (``torch.save(model.state_dict(), path)``, or a dict with a ``"state_dict"``
  entry, as many training loops save) plus ``factory="module:function"`` that builds the
  network; weights are read with ``torch.load(..., weights_only=True)``;
- a medexplain checkpoint (:mod:`medexplain.models.checkpoint`), which rebuilds itself.

A pickled whole model (``torch.save(model, path)``) is refused and never unpickled:
unpickling runs arbitrary code, and model files travel between hospitals.

What the file cannot say, the user states in a small YAML file (or as keyword arguments,
which override it)::

    labels: [normal, pneumonia]      # output i is labels[i]
    activation: softmax              # softmax: one class per image; sigmoid: multi-label
    input:
      shape: [1, 224, 224]           # (C, H, W) or (C, D, H, W)
      mean: 0.5                      # scalar or one per channel
      std: 0.25
    factory: lab.nets:resnet         # optional, same as the factory argument
    factory_kwargs: {num_classes: 2} # optional keyword arguments for the factory

:class:`LoadedModel` wraps the network so that ``(x - mean) / std`` happens inside
``forward``: explainers perturb and baselines live in the dataset's intensity space (what
the user sees), not in the network's normalised space.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import typed_line

ACTIVATIONS = ("softmax", "sigmoid")
CONFIG_KEYS = ("labels", "activation", "input", "factory", "factory_kwargs")
INPUT_KEYS = ("shape", "mean", "std")


class ModelError(ValueError):
    """A model that cannot be loaded or used as stated; one-line message naming the file or
    argument and what was expected."""


# --------------------------------------------------------------------------- config


def _as_floats(value: Any, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ModelError(f"{name} must be a number or a list of numbers, got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ModelError(f"{name} must hold finite numbers, got {value!r}")
    return out


def read_model_config(config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """Read and check a model YAML (or an equivalent dict); returns a flat dict with keys
    ``labels, activation, input_shape, mean, std, factory, factory_kwargs`` (None if
    absent). Unknown keys raise, naming the known ones."""
    out: dict[str, Any] = dict.fromkeys(
        ("labels", "activation", "input_shape", "mean", "std", "factory", "factory_kwargs")
    )
    if config is None:
        return out
    where = "model config"
    if not isinstance(config, Mapping):
        import yaml

        path = Path(config)
        where = f"model config {path}"
        if not path.is_file():
            raise ModelError(f"{where} does not exist or is not a file")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ModelError(f"{where} is not valid YAML: {typed_line(error)}") from error
        if config is None:
            return out
    if not isinstance(config, Mapping):
        raise ModelError(f"{where} must be a mapping of {list(CONFIG_KEYS)}, got {config!r}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ModelError(f"{where} has unknown key(s) {unknown}; expected some of {CONFIG_KEYS}")
    out["labels"] = config.get("labels")
    out["activation"] = config.get("activation")
    out["factory"] = config.get("factory")
    out["factory_kwargs"] = config.get("factory_kwargs")
    spec = config.get("input") or {}
    if not isinstance(spec, Mapping):
        raise ModelError(f"{where}: 'input' must be a mapping with {list(INPUT_KEYS)}")
    unknown = sorted(set(spec) - set(INPUT_KEYS))
    if unknown:
        raise ModelError(f"{where}: unknown input key(s) {unknown}; expected some of {INPUT_KEYS}")
    out["input_shape"] = spec.get("shape")
    out["mean"] = spec.get("mean")
    out["std"] = spec.get("std")
    return out


def _check_labels(labels: Any) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ModelError(f"labels must be a non-empty list of names, got {labels!r}")
    names = [str(label) for label in labels]
    if len(set(names)) != len(names):
        raise ModelError(f"labels must be unique, got {names}")
    return names


def _check_shape(shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ModelError(
            f"input shape must be a list [C, H, W] or [C, D, H, W], got {shape!r}"
        ) from None
    if len(out) not in (3, 4) or min(out) < 1:
        raise ModelError(
            f"input shape must be [C, H, W] or [C, D, H, W] of positive ints, got {list(out)}"
        )
    return out


# --------------------------------------------------------------------------- the wrapper


class LoadedModel(nn.Module):
    """A classifier with its label names, activation and input normalisation.

    ``forward(x)``: ``x`` is ``(B, C, *S)`` in the data's intensity space; the network sees
    ``(x - mean) / std`` and must return logits ``(B, K)`` (``(B,)`` is read as ``(B, 1)``).

    Attributes:
        net: the wrapped network (TorchScript or ``nn.Module``).
        labels: output names, ``labels[i]`` for logit ``i`` (``"0".."K-1"`` if not stated).
        activation: ``"softmax"`` (exactly one class per image) or ``"sigmoid"``
            (independent labels); default sigmoid for one output, else softmax.
        input_shape: ``(C, *S)`` the network expects, or None if not stated.
        source: where the model came from (file, sha256, kind, factory), for run records.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        labels: Sequence[str] | None = None,
        activation: str | None = None,
        input_shape: Sequence[int] | None = None,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise ModelError(f"the network must be a torch.nn.Module, got {type(net).__name__}")
        self.net = net
        self.labels = _check_labels(labels)
        if activation is not None and activation not in ACTIVATIONS:
            raise ModelError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self._activation = activation
        self.input_shape = _check_shape(input_shape)
        mean_t = _as_floats(mean, "input mean")
        std_t = _as_floats(std, "input std")
        if std_t is not None and min(std_t) <= 0:
            raise ModelError(f"input std must be positive, got {list(std_t)}")
        channels = self.input_shape[0] if self.input_shape else None
        for name, values in (("mean", mean_t), ("std", std_t)):
            if values is not None and len(values) != 1 and channels not in (None, len(values)):
                raise ModelError(
                    f"input {name} has {len(values)} values but the input has {channels} channels"
                )
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
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "mean": self.mean.tolist() if self._normalises else None,
            "std": self.std.tolist() if self._normalises else None,
        }

    def extra_repr(self) -> str:
        return (
            f"labels={self.labels}, activation={self.activation!r}, input_shape={self.input_shape}"
        )

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
                logits = self(example.to(device))
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(
                f"the model failed on an input of shape {tuple(example.shape)}: {typed_line(error)}"
            ) from error
        finally:
            self.train(was_training)
        check_logits(logits, "the check input")
        if self.labels is None:
            self.labels = [str(i) for i in range(logits.shape[1])]
        self._check_activation(logits.shape[1])
        return logits


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


# --------------------------------------------------------------------------- loading


def _import_factory(spec: str) -> Any:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` -> the callable.

    A module that is not importable from ``sys.path`` is retried from the current working
    directory (as ``python -m`` would find it).
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or spec.startswith(":"):
        raise ModelError(f"factory must be 'module:function' (e.g. 'lab.nets:cnn3d'), got {spec!r}")
    module_name, attribute = spec.split(":")
    if not attribute:
        raise ModelError(f"factory {spec!r} names no function after ':'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ModelError(f"factory file {path} does not exist")
            name = f"_medexplain_factory_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as error:
                if error.name is None or not module_name.startswith(error.name):
                    raise
                cwd = os.getcwd()
                sys.path.insert(0, cwd)
                try:
                    module = importlib.import_module(module_name)
                finally:
                    with contextlib.suppress(ValueError):
                        sys.path.remove(cwd)
    except ModelError:
        raise
    except Exception as error:
        raise ModelError(
            f"cannot import the factory module {module_name!r}: {typed_line(error)}"
        ) from error
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelError(f"factory {spec!r}: module {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"factory {spec!r} is not callable")
    return target


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"refusing to load {path}: it holds pickled Python objects (e.g. a whole model saved "
            "with torch.save(model)), which medexplain never unpickles because that can run "
            "code; save model.state_dict() and pass a factory, or save a TorchScript file"
        ) from error
    except Exception as error:
        raise ModelError(
            f"cannot read {path}: not a TorchScript file, state dict or medexplain checkpoint "
            f"({typed_line(error)})"
        ) from error


def _state_dict_of(data: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not data:
        raise ModelError(
            f"{path} holds a {type(data).__name__}, not a state dict (a dict of tensors or a "
            "dict with a 'state_dict' entry)"
        )
    if not all(isinstance(v, torch.Tensor) for v in data.values()):
        keys = list(data)[:8]
        raise ModelError(
            f"{path} holds a dict with keys {keys} but no state dict (expected name -> tensor "
            "entries or a 'state_dict' entry)"
        )
    state = dict(data)
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_state(net: nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: str) -> None:
    expected = set(net.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ModelError(
            f"the weights in {path} do not fit the network built by {spec}: "
            f"{' and '.join(parts)} key(s)"
        )
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        detail = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise ModelError(
            f"the weights in {path} do not fit the network built by {spec}: "
            f"{detail[0] if detail else typed_line(error)}"
        ) from error


def load_model(
    model_path: str | os.PathLike | None,
    factory: str | None = None,
    *,
    device: str | torch.device | None = None,
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    activation: str | None = None,
    input_shape: Sequence[int] | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    check: bool = True,
) -> LoadedModel:
    """Load a classifier from outside medexplain (see the module docstring).

    Args:
        model_path: TorchScript file, state-dict file or medexplain checkpoint; None builds
            the network with ``factory`` alone (its own initial or built-in weights).
        factory: ``"module:function"`` (or ``"file.py:function"``) returning the
            ``nn.Module`` the state dict belongs to; called with ``factory_kwargs``.
        device: where to put the model (default CPU).
        config: model YAML path or dict (``labels``, ``activation``, ``input``, ``factory``,
            ``factory_kwargs``); keyword arguments override it.
        check: with an input shape stated, run :meth:`LoadedModel.validate` on a dummy
            batch (output count vs labels, finite logits).

    Returns:
        A :class:`LoadedModel` in eval mode on ``device``.

    Raises:
        ModelError: a missing or unreadable file, a pickled model, weights that do not fit
            the factory's network, a bad config, or outputs that do not match the labels.
    """
    stated = read_model_config(config)
    overrides = dict(
        labels=labels,
        activation=activation,
        input_shape=input_shape,
        mean=mean,
        std=std,
        factory=factory,
        factory_kwargs=factory_kwargs,
    )
    stated.update({k: v for k, v in overrides.items() if v is not None})
    factory = stated["factory"]
    kwargs = stated["factory_kwargs"] or {}
    if not isinstance(kwargs, Mapping):
        raise ModelError(f"factory_kwargs must be a mapping, got {kwargs!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    source: dict[str, Any] = {"path": None, "sha256": None, "kind": None, "factory": factory}
    extra_labels = None
    path = None if model_path is None else Path(model_path)
    if path is not None:
        if not path.exists():
            raise ModelError(f"model file {path} does not exist")
        if not path.is_file():
            raise ModelError(f"model path {path} is not a file")
        source.update(path=str(path), sha256=_sha256(path))
    if path is None and factory is None:
        raise ModelError("load_model needs a model file, a factory ('module:function'), or both")
    if path is not None and _is_torchscript(path):
        if factory is not None:
            raise ModelError(
                f"{path} is a TorchScript file, which carries its own architecture; do not "
                f"pass a factory ({factory})"
            )
        try:
            with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users have it
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location=device)
        except Exception as error:
            raise ModelError(f"cannot load TorchScript file {path}: {typed_line(error)}") from error
        source["kind"] = "torchscript"
    elif factory is not None:
        build = _import_factory(str(factory))
        try:
            net = build(**kwargs)
        except Exception as error:
            raise ModelError(f"factory {factory} failed: {typed_line(error)}") from error
        if not isinstance(net, nn.Module):
            raise ModelError(
                f"factory {factory} returned a {type(net).__name__}, not a torch.nn.Module"
            )
        source["kind"] = "factory"
        if path is not None:
            data = _torch_load(path)
            if isinstance(data, Mapping) and isinstance(data.get("extra"), Mapping):
                extra_labels = data["extra"].get("class_names")
            _load_state(net, _state_dict_of(data, path), path, str(factory))
            source["kind"] = "state_dict"
    else:
        data = _torch_load(path)
        if not (isinstance(data, Mapping) and "format" in data):
            raise ModelError(
                f"{path} is a state dict without its architecture; pass "
                "factory='module:function' (--model-factory) that builds the network"
            )
        try:
            from .checkpoint import load_checkpoint
        except ImportError as error:  # pragma: no cover - the module ships with medexplain
            raise ModelError(f"cannot read medexplain checkpoint {path}: {error}") from error
        try:
            net, extra = load_checkpoint(path, device)
        except (ValueError, FileNotFoundError) as error:
            raise ModelError(typed_line(error).split(": ", 1)[-1]) from error
        extra_labels = extra.get("class_names")
        source["kind"] = "medexplain-checkpoint"
    model = LoadedModel(
        net,
        labels=stated["labels"] if stated["labels"] is not None else extra_labels,
        activation=stated["activation"],
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
