"""Safe checkpoints: tensors and plain Python only, rebuilt through a registry of builders.

A checkpoint is one ``torch.save`` file holding a dict::

    {"format": "medexplain/1", "kind": "classifier", "config": {...plain values...},
     "state_dict": {name: tensor}, "extra": {...plain values and tensors...},
     "medexplain_version": "0.1.0"}

It is always read with ``torch.load(..., weights_only=True)``: no arbitrary object is ever
unpickled, so a checkpoint from an untrusted source cannot run code. The module is rebuilt
from ``config`` by the builder registered for ``kind`` (:func:`register_builder`); the
small CNN classifier is registered as ``"classifier"``, and learned explainers register
their own kinds when their module is imported.
"""

from __future__ import annotations

import os
import pickle
import types
import typing
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .. import __version__

FORMAT = "medexplain/1"


class CheckpointError(ValueError):
    """A file that is not a (loadable) medexplain checkpoint."""


class Builder(NamedTuple):
    config_cls: type
    build: Callable[[Any], nn.Module]


_BUILDERS: dict[str, Builder] = {}


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_builder(kind: str, config_cls: type, build: Callable[[Any], nn.Module]) -> None:
    """Make modules whose ``.config`` is a ``config_cls`` savable and loadable as ``kind``.

    ``build(config_cls(...)) -> nn.Module`` must rebuild the architecture from the config
    alone (the weights come from the state dict). Registering the same kind again with the
    same class and builder (e.g. after a module reload) replaces it; a different one raises.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not (isinstance(config_cls, type) and is_dataclass(config_cls)):
        raise TypeError(f"config_cls must be a dataclass type, got {config_cls!r}")
    if not callable(build):
        raise TypeError(f"build must be callable, got {build!r}")
    old = _BUILDERS.get(kind)
    if old is not None and (
        _qualname(old.config_cls) != _qualname(config_cls)
        or _qualname(old.build) != _qualname(build)
    ):
        raise ValueError(
            f"checkpoint kind {kind!r} is already registered to {_qualname(old.build)} "
            f"with {_qualname(old.config_cls)}"
        )
    _BUILDERS[kind] = Builder(config_cls, build)


def registered_kinds() -> list[str]:
    """Kinds :func:`load_checkpoint` can rebuild right now."""
    return sorted(_BUILDERS)


# --------------------------------------------------------------------------- configs


def _coerce(tp: Any, value: Any) -> Any:
    """Turn stored plain values back into the annotated type: lists into tuples, dicts into
    nested dataclasses (recursively). Anything else is returned unchanged."""
    if value is None or tp is None or tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            out = _coerce(arg, value)
            if out is not value:
                return out
        return value
    if isinstance(tp, type) and is_dataclass(tp) and isinstance(value, Mapping):
        return config_from_dict(tp, value)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if args and len(args) == len(value):
            return tuple(_coerce(a, v) for a, v in zip(args, value))
        return tuple(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [_coerce(args[0] if args else None, v) for v in value]
    if origin in (dict, Mapping) and isinstance(value, Mapping):
        inner = args[1] if len(args) == 2 else None
        return {k: _coerce(inner, v) for k, v in value.items()}
    return value


def config_from_dict(config_cls: type, data: Mapping[str, Any]) -> Any:
    """Build the dataclass ``config_cls`` from a plain dict (as stored in a checkpoint).

    Lists become tuples where the field is annotated as a tuple, nested dicts become nested
    dataclasses; unknown keys raise, missing keys take the field's default.
    """
    if not (isinstance(config_cls, type) and is_dataclass(config_cls)):
        raise TypeError(f"config_cls must be a dataclass type, got {config_cls!r}")
    if not isinstance(data, Mapping):
        raise TypeError(f"a {config_cls.__name__} config must be a dict, got {type(data).__name__}")
    names = {f.name for f in fields(config_cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown {config_cls.__name__} field(s) {unknown}; expected some of {sorted(names)}"
        )
    hints = typing.get_type_hints(config_cls)
    return config_cls(**{k: _coerce(hints.get(k), v) for k, v in data.items()})


def _plain(value: Any, where: str, allow_tensors: bool) -> Any:
    """A copy of ``value`` made of the types ``torch.load(weights_only=True)`` accepts;
    tuples become lists. Raises TypeError naming ``where`` for anything else."""
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor):
        if not allow_tensors:
            raise TypeError(f"{where} is a tensor; configs hold plain Python values only")
        return value.detach().cpu()
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{where} has a key {key!r}; only str and int keys can be saved")
            out[key] = _plain(item, f"{where}[{key!r}]", allow_tensors)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", allow_tensors) for i, item in enumerate(value)]
    for plain in (bool, int, float, str):  # subclasses (np.float64, IntEnum) -> the base type
        if isinstance(value, plain):
            return plain(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalars
        return _plain(value.item(), where, allow_tensors)
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__name__}; a checkpoint holds only "
        "None, bool, int, float, str, lists, dicts and tensors (convert arrays with "
        "torch.as_tensor or .tolist())"
    )


# --------------------------------------------------------------------------- save / load


def _kind_of(model: nn.Module, kind: str | None) -> str:
    config = getattr(model, "config", None)
    if config is None or not is_dataclass(config) or isinstance(config, type):
        raise TypeError(
            f"save_checkpoint needs a module with a dataclass .config (got "
            f"{type(model).__name__} without one); for other models save "
            "model.state_dict() with torch.save"
        )
    if kind is not None:
        if kind not in _BUILDERS:
            raise ValueError(f"unknown checkpoint kind {kind!r}; registered: {registered_kinds()}")
        if not isinstance(config, _BUILDERS[kind].config_cls):
            raise TypeError(
                f"kind {kind!r} expects a {_BUILDERS[kind].config_cls.__name__} config, "
                f"the model has a {type(config).__name__}"
            )
        return kind
    matches = [k for k, b in _BUILDERS.items() if type(config) is b.config_cls]
    if not matches:
        raise ValueError(
            f"no builder is registered for {type(config).__name__}; call "
            "register_builder(kind, config_cls, build) first"
        )
    if len(matches) > 1:
        raise ValueError(f"{type(config).__name__} is registered as {matches}; pass kind=")
    return matches[0]


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    extra: dict[str, Any] | None = None,
    *,
    kind: str | None = None,
) -> None:
    """Save ``model`` (which must carry a registered dataclass ``.config``) to ``path``.

    ``extra`` holds plain values and tensors (class names, metrics, normalisation stats);
    anything ``torch.load(weights_only=True)`` could not read back is refused here, with
    the offending key named. ``kind`` is found from the config's class unless given. The
    file is written to a temporary file beside ``path`` and moved into place atomically,
    so a crash never leaves a half-written checkpoint. Tensors are stored on the CPU.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, Mapping):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    kind = _kind_of(model, kind)
    payload = {
        "format": FORMAT,
        "kind": kind,
        "config": _plain(asdict(model.config), "config", allow_tensors=False),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": _plain(dict(extra or {}), "extra", allow_tensors=True),
        "medexplain_version": __version__,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name beside the target (same file system, so os.replace is atomic), created
    # with open(..., "xb") so the file gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _reason(error: BaseException) -> str:
    """The informative part of torch's weights-only refusal (or the first line otherwise)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        tail = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        lines = [line.strip() for line in tail.splitlines() if line.strip()]
        if lines:
            return lines[0].split(". Please use", 1)[0].rstrip(".")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format
PICKLE_MAGIC = b"\x80"  # pickle protocol >= 2 (torch's legacy format and plain pickles)


def _read(path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, expected a file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC)):
        raise CheckpointError(
            f"{path} is not a medexplain checkpoint: it is not a readable torch file "
            f"(starts with {head!r}, neither a torch.save archive nor a pickle)"
        )
    try:
        with warnings.catch_warnings():
            # plain pickles (protocol 4) make torch warn before it refuses them anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} is not a medexplain checkpoint: torch.load(weights_only=True) refused "
            f"to unpickle it ({_reason(error)}). medexplain only loads files made by "
            "save_checkpoint (tensors and plain Python values) and never unpickles "
            "arbitrary objects."
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a medexplain checkpoint: it is not a readable torch file "
            f"({type(error).__name__}: {_reason(error)})"
        ) from error


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the module saved by :func:`save_checkpoint`; returns ``(module, extra)``.

    The module is in eval mode on ``device`` (default CPU). Files that are not medexplain
    checkpoints, or that hold pickled objects, raise :class:`CheckpointError` naming the
    file; a missing file raises ``FileNotFoundError``.
    """
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict) or "format" not in data:
        raise CheckpointError(
            f"{path} is not a medexplain checkpoint (a torch file without the "
            f"'format': {FORMAT!r} entry; was it saved with medexplain's save_checkpoint?)"
        )
    if data["format"] != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {data['format']!r}; this medexplain reads {FORMAT!r}"
        )
    missing = [k for k in ("kind", "config", "state_dict") if k not in data]
    if missing:
        raise CheckpointError(f"{path} is a damaged medexplain checkpoint: missing {missing}")
    kind = data["kind"]
    if kind not in _BUILDERS:
        raise CheckpointError(
            f"{path} holds a {kind!r} checkpoint, but no builder is registered for it "
            f"(registered: {registered_kinds()}); import the module that defines it first"
        )
    builder = _BUILDERS[kind]
    try:
        config = config_from_dict(builder.config_cls, data["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid {kind!r} config: {error}") from error
    module = builder.build(config)
    try:
        module.load_state_dict(data["state_dict"], strict=True)
    except (RuntimeError, TypeError) as error:
        raise CheckpointError(
            f"{path}: the weights do not fit the {kind!r} architecture: {error}"
        ) from error
    module.to(torch.device(device) if device is not None else torch.device("cpu"))
    module.eval()
    extra = data.get("extra") or {}
    return module, extra


def _register_defaults() -> None:
    from .cnn import CNNConfig, build_classifier
    from .standard import StandardNetConfig, build_standard_network

    register_builder("classifier", CNNConfig, build_classifier)
    register_builder("standard_network", StandardNetConfig, build_standard_network)


_register_defaults()
