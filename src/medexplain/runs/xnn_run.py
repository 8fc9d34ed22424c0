"""XNN in a run folder: what each chunk stores beside the map, and how to read it back
(Qi, Khorram & Li, arXiv 1709.05360).

The map of an ``xnn`` run (``maps (n, 1, *S)``, the contract's map) is the contribution-
weighted sum ``sum_j W[t, j] e_j map_j`` for the image's target ``t``. Each chunk also holds,
written atomically with it (:attr:`medexplain.runs.chunk.Chunk.extra`):

- ``xnn_feature_maps (n, k, 1, *S) float32``: the map of every x-feature ``j``;
- ``xnn_contributions (n, k) float32``: ``W[t, j] e_j``, which sum with the head's bias
  ``b_t`` to the head's logit for the target;
- ``xnn_x_features (n, k) float32``: the x-feature activations ``e_j``.

``run.json`` holds the linear head (``xnn``: ``k``, ``weight (K, k)``, ``bias (K,)``,
``feature_map``). ``RUN/xnn.csv`` has one row per explained image: ``index, path, label,
target, bias`` (``b_t``), ``contribution_0 .. contribution_{k-1}``, ``x_feature_0 ..``.
:func:`xnn_table` and :func:`xnn_image` read the same numbers in Python.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from ..explain.generative.xnn import XNNExplainer
from .atomic import atomic_write_text
from .chunk import Chunk
from .errors import RunError
from .store import RunStore
from .tables import cell, csv_text

__all__ = ["ARRAYS", "batch_outputs", "write_xnn_csv", "xnn_image", "xnn_record", "xnn_table"]

#: The per-image arrays an ``xnn`` chunk stores beside the map.
ARRAYS = ("xnn_feature_maps", "xnn_contributions", "xnn_x_features")


def batch_outputs(
    explainer: Any, x: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Maps ``(B, 1, *S)`` on the CPU and the per-image arrays the explainer asks a run to
    store beside them (``run_outputs``; none for most methods)."""
    outputs = getattr(explainer, "run_outputs", None)
    if outputs is None:
        return explainer(x, targets).cpu(), {}
    maps, extra = outputs(x, targets)
    return maps.cpu(), {name: array.cpu() for name, array in extra.items()}


def xnn_record(explainer: Any) -> dict[str, Any]:
    """``{"xnn": {k, weight (K, k), bias (K,), feature_map}}`` for ``run.json`` of an XNN
    explainer, ``{}`` for any other method."""
    if not isinstance(explainer, XNNExplainer):
        return {}
    weight, bias = explainer.head()
    return {
        "xnn": {
            "k": int(explainer.k),
            "weight": weight.double().tolist(),
            "bias": bias.double().tolist(),
            "feature_map": explainer.feature_map,
        }
    }


def _store(run: str | os.PathLike | RunStore) -> tuple[RunStore, dict[str, Any]]:
    store = run if isinstance(run, RunStore) else RunStore(run)
    record = store.record()
    if "xnn" not in record:
        raise RunError(
            f"{store.root} is not an xnn run (method {record['settings']['method']!r}); "
            "x-features are stored by explain --method xnn"
        )
    return store, record


def chunk_arrays(chunk: Chunk, names, store: RunStore) -> list[np.ndarray]:
    """The chunk's stored x-feature arrays ``names`` (an empty list for an empty chunk);
    RunError naming the chunk when one is missing."""
    missing = [name for name in names if name not in chunk.extra]
    if len(chunk) and missing:
        raise RunError(
            f"chunk {chunk.number} of {store.root} holds no {missing[0]} (written before runs "
            "stored x-features); explain again with --overwrite"
        )
    return [chunk.extra[name] for name in names] if len(chunk) else []


def xnn_table(run: str | os.PathLike | RunStore) -> dict[str, Any]:
    """Every selected explained image of an xnn run, in manifest order: ``index (N,)``,
    ``path`` (N names), ``label (N,)`` or ``(N, K)``, ``target (N,)``, ``bias (N,)`` (the
    head's ``b_t``), ``contributions (N, k)``, ``x_features (N, k)``. Reads no maps."""
    store, record = _store(run)
    bias = np.asarray(record["xnn"]["bias"], dtype=np.float64)
    parts: dict[str, list] = {n: [] for n in ("index", "path", "label", "target", "c", "e")}
    for chunk in store.iter_chunks(maps=False):
        arrays = chunk_arrays(chunk, ARRAYS[1:], store)
        if not arrays:
            continue
        for name, values in zip(
            ("index", "path", "label", "target", "c", "e"),
            (chunk.index, chunk.path, chunk.label, chunk.target, *arrays),
        ):
            parts[name].append(np.asarray(values))
    if not parts["index"]:
        raise RunError(f"{store.root} holds no explained image yet; run explain first")
    joined = {name: np.concatenate(values) for name, values in parts.items()}
    order = np.argsort(joined["index"], kind="stable")
    target = joined["target"][order]
    return {
        "index": joined["index"][order],
        "path": [str(p) for p in joined["path"][order]],
        "label": joined["label"][order],
        "target": target,
        "bias": bias[target],
        "contributions": joined["c"][order],
        "x_features": joined["e"][order],
    }


def xnn_image(run: str | os.PathLike | RunStore, index: int) -> dict[str, Any]:
    """What an xnn run stored for manifest row ``index``: ``map (1, *S)``, ``feature_maps
    (k, 1, *S)``, ``contributions (k,)``, ``x_features (k,)``, ``target``, ``bias`` (``b_t``),
    ``path``. RunError when the run holds no map for that row."""
    store, record = _store(run)
    for chunk in store.iter_chunks(maps=True):
        rows = np.flatnonzero(np.asarray(chunk.index) == int(index))
        if rows.size:
            j = int(rows[0])
            fmaps, contributions, features = (a[j] for a in chunk_arrays(chunk, ARRAYS, store))
            target = int(chunk.target[j])
            return {
                "map": chunk.maps[j],
                "feature_maps": fmaps,
                "contributions": contributions,
                "x_features": features,
                "target": target,
                "bias": float(record["xnn"]["bias"][target]),
                "path": str(chunk.path[j]),
            }
    raise RunError(f"{store.root} holds no explained image with manifest row {index}")


def write_xnn_csv(store: RunStore, log=print) -> None:
    """``RUN/xnn.csv`` (module docstring) when the run is an xnn run, atomically."""
    if "xnn" not in store.record() or store.count() == 0:
        return
    try:
        table = xnn_table(store)
    except RunError as error:
        log(f"warning: xnn.csv not written: {error}")
        return
    k = table["contributions"].shape[1]
    header = ["index", "path", "label", "target", "bias"]
    header += [f"contribution_{j}" for j in range(k)] + [f"x_feature_{j}" for j in range(k)]
    rows = [
        [str(int(table["index"][i])), table["path"][i], cell(table["label"][i])]
        + [str(int(table["target"][i])), f"{table['bias'][i]:.8g}"]
        + [f"{v:.8g}" for v in table["contributions"][i].tolist()]
        + [f"{v:.8g}" for v in table["x_features"][i].tolist()]
        for i in range(len(table["path"]))
    ]
    atomic_write_text(store.root / "xnn.csv", csv_text([header, *rows]))
