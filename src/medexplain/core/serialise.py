"""Turn results into values ``json.dumps`` accepts, the same way everywhere."""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np
import torch


def json_safe(value: Any) -> Any:
    """A JSON-serialisable copy of ``value``.

    Dicts (keys become strings), lists and tuples (become lists) are converted recursively;
    numpy arrays and torch tensors become nested lists; numpy scalars become Python scalars;
    non-finite floats (NaN, +-inf) become None, since JSON has no NaN; paths become strings.
    Anything else is returned unchanged.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, PurePath):
        return str(value)
    return value
