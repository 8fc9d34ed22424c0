"""The model YAML: what a model file cannot say about its outputs and inputs.

The format (keys ``labels``, ``activation``, ``outputs``, ``input: {shape, mean, std}``,
``factory``, ``factory_kwargs``) is shown in :mod:`medexplain.models.external`.
:func:`read_model_config` reads a file or dict and checks its keys; the ``check_*`` helpers
check the values (also when they come as keyword arguments of
:func:`medexplain.models.external.load_model`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import typed_line

#: How the scores become probabilities; ``probabilities`` and ``log_probabilities`` are
#: short for ``softmax`` over a network that already returns them (see ``OUTPUTS``).
ACTIVATIONS = ("softmax", "sigmoid", "probabilities", "log_probabilities")
#: What the network returns.
OUTPUTS = ("logits", "probabilities", "log_probabilities")
CONFIG_KEYS = ("labels", "activation", "outputs", "input", "factory", "factory_kwargs")
INPUT_KEYS = ("shape", "mean", "std")
#: The keys of :func:`read_model_config`'s answer (and of ``load_model``'s overrides).
SETTINGS = (
    "labels",
    "activation",
    "outputs",
    "input_shape",
    "mean",
    "std",
    "factory",
    "factory_kwargs",
)


class ModelError(ValueError):
    """A model that cannot be loaded or used as stated; one-line message naming the file or
    argument and what was expected."""


def as_floats(value: Any, name: str) -> tuple[float, ...] | None:
    """A number or a list of numbers as a non-empty tuple of finite floats; None stays None."""
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
    ``labels, activation, outputs, input_shape, mean, std, factory, factory_kwargs`` (None if
    absent). Unknown keys raise, naming the known ones."""
    out: dict[str, Any] = dict.fromkeys(SETTINGS)
    where = "model config"
    if config is not None and not isinstance(config, Mapping):
        path = Path(config)
        where = f"model config {path}"
        config = _read_yaml(path, where)
    if config is None:
        return out
    if not isinstance(config, Mapping):
        raise ModelError(f"{where} must be a mapping of {list(CONFIG_KEYS)}, got {config!r}")
    _refuse_unknown(config, CONFIG_KEYS, f"{where} has unknown key(s)")
    spec = config.get("input") or {}
    if not isinstance(spec, Mapping):
        raise ModelError(f"{where}: 'input' must be a mapping with {list(INPUT_KEYS)}")
    _refuse_unknown(spec, INPUT_KEYS, f"{where}: unknown input key(s)")
    out.update({key: config.get(key) for key in ("labels", "activation", "outputs", "factory")})
    out["factory_kwargs"] = config.get("factory_kwargs")
    out.update(input_shape=spec.get("shape"), mean=spec.get("mean"), std=spec.get("std"))
    return out


def _read_yaml(path: Path, where: str) -> Any:
    import yaml

    if not path.is_file():
        raise ModelError(f"{where} does not exist or is not a file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ModelError(f"{where} is not valid YAML: {typed_line(error)}") from error


def _refuse_unknown(mapping: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    """Raise ``"<what> [unknown keys]; expected some of <known>"`` if ``mapping`` has a key
    outside ``known``."""
    unknown = sorted(set(mapping) - set(known))
    if unknown:
        raise ModelError(f"{what} {unknown}; expected some of {known}")


def check_labels(labels: Any) -> list[str] | None:
    """Output names as a list of unique strings; None stays None."""
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ModelError(f"labels must be a non-empty list of names, got {labels!r}")
    names = [str(label) for label in labels]
    if len(set(names)) != len(names):
        raise ModelError(f"labels must be unique, got {names}")
    return names


def check_input_shape(shape: Any) -> tuple[int, ...] | None:
    """``(C, H, W)`` or ``(C, D, H, W)`` of positive ints; None stays None."""
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


def check_normalisation(
    mean: float | Sequence[float] | None,
    std: float | Sequence[float] | None,
    channels: int | None,
) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` as tuples of floats (None when not stated): finite, std positive, one
    value or one per channel of an input with ``channels`` channels (None: not stated)."""
    mean_t = as_floats(mean, "input mean")
    std_t = as_floats(std, "input std")
    if std_t is not None and min(std_t) <= 0:
        raise ModelError(f"input std must be positive, got {list(std_t)}")
    for name, values in (("mean", mean_t), ("std", std_t)):
        if values is not None and len(values) != 1 and channels not in (None, len(values)):
            raise ModelError(
                f"input {name} has {len(values)} values but the input has {channels} channels"
            )
    return mean_t, std_t
