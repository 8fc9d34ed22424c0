"""Import the function that builds a user's network: ``"module:function"`` or
``"path/to/file.py:function"`` (the ``factory`` of a model YAML or ``--model-factory``)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from ..core.errors import typed_line
from .model_config import ModelError


def import_factory(spec: str) -> Any:
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
