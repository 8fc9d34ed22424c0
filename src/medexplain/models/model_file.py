"""What kind of model file a path holds, and reading each kind into an ``nn.Module``.

- TorchScript (a zip archive with ``constants.pkl`` or ``code/``): :func:`load_torchscript`;
- a state dict, or a dict with a ``"state_dict"`` entry, for the network a factory builds:
  :func:`build_with_factory`;
- a medexplain checkpoint (a dict with ``"format"``): :func:`load_medexplain_checkpoint`;
- an ONNX model (the ``.onnx`` suffix or an ONNX protobuf), run by ONNX Runtime, forward
  only: :func:`medexplain.models.onnx_model.load_onnx`.

Files are read with ``torch.load(..., weights_only=True)``: pickled Python objects (a whole
model saved with ``torch.save(model)``) are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import typed_line
from .factory import import_factory
from .model_config import ModelError
from .onnx_model import is_onnx, load_onnx


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of the file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


#: What ``torch.save`` writes: a zip archive, or (before torch 1.6) a pickle whose first
#: object is torch's magic number.
_LEGACY_TORCH_SAVE = b"\x80\x02\x8a\x0a"
KINDS = "a TorchScript file, state dict, medexplain checkpoint or ONNX model"


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as handle:
        head = handle.read(len(_LEGACY_TORCH_SAVE))
    if not zipfile.is_zipfile(path) and head != _LEGACY_TORCH_SAVE:
        what = "an unknown format" if head else "the file is empty"
        raise ModelError(f"cannot read {path}: not {KINDS} ({what})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelError(
            f"refusing to load {path}: it holds pickled Python objects (e.g. a whole model saved "
            "with torch.save(model)), which medexplain never unpickles because that can run "
            "code; save model.state_dict() and pass a factory, or save a TorchScript file"
        ) from error
    except Exception as error:
        raise ModelError(f"cannot read {path}: not {KINDS} ({typed_line(error)})") from error


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


def open_network(
    path: Path | None, factory: str | None, kwargs: Mapping[str, Any], device: torch.device
) -> tuple[nn.Module, str, Any]:
    """The network in ``path`` (None: built by ``factory`` alone), as
    ``(net, kind, class names the file stores or None)``; ``kind`` is ``"torchscript"``,
    ``"onnx"``, ``"factory"``, ``"state_dict"`` or ``"medexplain-checkpoint"``."""
    if path is not None and not is_torchscript(path) and is_onnx(path):
        if factory is not None:
            raise ModelError(
                f"{path} is an ONNX model, which carries its own architecture; do not pass a "
                f"factory ({factory})"
            )
        return load_onnx(path), "onnx", None
    if path is not None and is_torchscript(path):
        if factory is not None:
            raise ModelError(
                f"{path} is a TorchScript file, which carries its own architecture; do not "
                f"pass a factory ({factory})"
            )
        return load_torchscript(path, device), "torchscript", None
    if factory is not None:
        return build_with_factory(path, str(factory), kwargs)
    assert path is not None  # load_model refuses neither a file nor a factory
    return load_medexplain_checkpoint(path, device)


def load_torchscript(path: Path, device: torch.device) -> nn.Module:
    """The TorchScript module in ``path`` on ``device``."""
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; users have it
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location=device)
    except Exception as error:
        raise ModelError(f"cannot load TorchScript file {path}: {typed_line(error)}") from error


def build_with_factory(
    path: Path | None, factory: str, kwargs: Mapping[str, Any]
) -> tuple[nn.Module, str, Any]:
    """``factory(**kwargs)``, with the state dict in ``path`` loaded into it (strictly) when a
    path is given; returns ``(net, kind, class names stored with the weights or None)``."""
    build = import_factory(factory)
    try:
        net = build(**kwargs)
    except Exception as error:
        raise ModelError(f"factory {factory} failed: {typed_line(error)}") from error
    if not isinstance(net, nn.Module):
        raise ModelError(
            f"factory {factory} returned a {type(net).__name__}, not a torch.nn.Module"
        )
    if path is None:
        return net, "factory", None
    data = _torch_load(path)
    extra_labels = None
    if isinstance(data, Mapping) and isinstance(data.get("extra"), Mapping):
        extra_labels = data["extra"].get("class_names")
    _load_state(net, _state_dict_of(data, path), path, factory)
    return net, "state_dict", extra_labels


def load_medexplain_checkpoint(path: Path, device: torch.device) -> tuple[nn.Module, str, Any]:
    """A checkpoint of :mod:`medexplain.models.checkpoint` (which rebuilds its network);
    returns ``(net, "medexplain-checkpoint", its class names or None)``."""
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
    return net, "medexplain-checkpoint", extra.get("class_names")
