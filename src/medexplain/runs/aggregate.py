"""``global``: a run's stored maps streamed into global maps, figures and contrasts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..globalmaps import GlobalMaps, GlobalResult
from .atomic import atomic_write_text
from .errors import RunError
from .settings import open_run
from .store import RunStore

__all__ = ["BY", "accumulate", "global_run"]

BY = ("label", "prediction", "outcome")


def accumulate(
    store: RunStore,
    record: dict[str, Any],
    kinds: Sequence[str] = BY,
    normalise: str = "max",
    transform: str = "abs",
) -> GlobalMaps:
    """Stream every stored map into a :class:`GlobalMaps`, chunk by chunk in index order."""
    acc = GlobalMaps(
        record["spatial_shape"],
        record["class_names"],
        normalise=normalise,
        transform=transform,
        multilabel=record["multilabel"],
        kinds=kinds,
    )
    for chunk in store.iter_chunks():
        if len(chunk) == 0:
            continue
        maps = torch.from_numpy(chunk.maps)
        preds = torch.from_numpy(chunk.pred)
        labels = torch.from_numpy(chunk.label)
        if record["multilabel"]:
            acc.update(maps, labels, preds)
            continue
        labelled = labels >= 0
        if bool(labelled.all()):
            acc.update(maps, labels, preds)
        else:
            acc.update(maps[labelled], labels[labelled], preds[labelled])
            acc.update(maps[~labelled], None, preds[~labelled])
    if acc.count == 0:
        raise RunError(f"{store.root} holds no explained image yet; run explain first")
    return acc


def _display_mean(store: RunStore) -> np.ndarray | None:
    """The run's mean image as figures draw it: ``(3, *S)`` for colour images (drawn in
    RGB), else the channel mean ``(*S)`` (grey)."""
    mean = store.mean_image()
    if mean is None or mean.shape[0] == 3:
        return mean
    return mean.mean(axis=0)


def _group_key(by: str, name: str) -> tuple[str, ...]:
    return (by, *name.split("/"))


def global_run(
    run: str | Path,
    *,
    by: str = "label",
    normalise: str = "max",
    transform: str = "abs",
    contrast: tuple[str, str] | None = None,
    log=print,
) -> GlobalResult:
    """Global maps of a run into ``RUN/global/`` (``.npy``, ``index.json``, NIfTI for 3D
    with the first image's affine) and ``RUN/figures/global_<by>.png``; with ``contrast``
    ``(A, B)`` also the Welch t / p / q maps of group A against B (``--by`` groups; an
    outcome group is named ``label/TP``)."""
    from ..report.figures import plot_global_maps
    from ..report.nifti import save_nifti

    if by not in BY:
        raise RunError(f"--by must be one of {BY}, got {by!r}")
    store, record = open_run(run)
    acc = accumulate(store, record, (by,), normalise, transform)
    result = acc.result()
    directory = store.root / "global"
    if directory.exists():
        shutil.rmtree(directory)
    result.settings["by"] = by
    result.save(directory)
    affine = store.first_affine()
    if len(result.spatial_shape) == 3:
        for name, array in result.to_arrays().items():
            save_nifti(array, directory / f"{name}.nii.gz", affine)
    mean = _display_mean(store)
    background = mean if mean is not None else np.zeros(result.spatial_shape)
    maps = {"/".join(key[1:]): group.mean for key, group in result.groups.items() if key[0] == by}
    maps = maps or {"overall": result.overall.mean}
    plot_global_maps(
        background,
        maps,
        store.root / "figures" / f"global_{by}.png",
        title=f"{record['settings']['method']}: global maps by {by} ({normalise}, {transform})",
        signed=transform == "signed",
    )
    if contrast is not None:
        _write_contrast(store, result, by, contrast, background, affine, log)
    return result


def _write_contrast(
    store: RunStore,
    result: GlobalResult,
    by: str,
    contrast: tuple[str, str],
    background: np.ndarray,
    affine: np.ndarray | None,
    log,
) -> None:
    """Welch t / p / q maps of group ``contrast[0]`` against ``contrast[1]`` as ``.npy``
    (and NIfTI in 3D), a JSON summary and a figure."""
    from ..report.figures import plot_global_maps
    from ..report.nifti import save_nifti

    a, b = _group_key(by, contrast[0]), _group_key(by, contrast[1])
    try:
        test = result.contrast(a, b)
    except KeyError as error:
        raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error.args[0]}") from None
    except ValueError as error:
        raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error}") from None
    directory = store.root / "global"
    stem = f"contrast_{'_'.join(a[1:])}_vs_{'_'.join(b[1:])}"
    arrays = test.to_arrays()
    for name, array in arrays.items():
        np.save(directory / f"{stem}_{name}.npy", array)
        if len(result.spatial_shape) == 3:
            save_nifti(array, directory / f"{stem}_{name}.nii.gz", affine)
    significant = test.significant(0.05)
    summary = {
        "group_a": list(a),
        "group_b": list(b),
        "count_a": test.count_a,
        "count_b": test.count_b,
        "n_significant_q05": int(significant.sum()),
        "files": {k: f"{stem}_{k}.npy" for k in arrays},
    }
    atomic_write_text(directory / f"{stem}.json", json.dumps(summary, indent=2))
    finite_t = torch.nan_to_num(test.t, posinf=0.0, neginf=0.0)
    plot_global_maps(
        background,
        {
            f"t {contrast[0]} - {contrast[1]}": finite_t,
            "t where q < 0.05": finite_t * significant,
        },
        store.root / "figures" / f"{stem}.png",
        title=f"Welch t, {contrast[0]} vs {contrast[1]} (BH-FDR q)",
        signed=True,
    )
    log(f"{int(significant.sum())} pixel(s) with q < 0.05 for {contrast[0]} vs {contrast[1]}")
