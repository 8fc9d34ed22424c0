"""``global``: a run's stored maps streamed into global maps, figures and contrasts.

3D global maps are also written as NIfTI, but only when every image of the run lies on one
grid (:func:`medexplain.runs.nifti_maps.shared_grid`: the same affine within 1e-3 mm);
otherwise the ``.npy`` files and figures are written and one line names the first image
whose affine differs. A contrast can be restricted to a mask (``--mask``): only its voxels
are tested and counted by the Benjamini-Hochberg correction, at FDR level ``--alpha``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import one_line
from ..data.readers import DataError, load_image
from ..globalmaps import GlobalMaps, GlobalResult
from .atomic import atomic_write_bytes, atomic_write_text
from .chunk import Chunk
from .errors import RunError
from .nifti_maps import AFFINE_TOL, SharedGrid, shared_grid
from .settings import open_run
from .store import RunStore

__all__ = ["BY", "accumulate", "add_chunk", "global_run"]

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
        add_chunk(acc, chunk, record["multilabel"])
    if acc.count == 0:
        raise RunError(f"{store.root} holds no explained image yet; run explain first")
    return acc


def add_chunk(acc: GlobalMaps, chunk: Chunk, multilabel: bool) -> None:
    """Add a chunk's maps to ``acc`` (an unlabelled image joins the prediction groups only)."""
    if len(chunk) == 0:
        return
    maps = torch.from_numpy(chunk.maps)
    preds = torch.from_numpy(chunk.pred)
    labels = torch.from_numpy(chunk.label)
    labelled = labels >= 0
    if multilabel or bool(labelled.all()):
        acc.update(maps, labels, preds)
    else:
        acc.update(maps[labelled], labels[labelled], preds[labelled])
        acc.update(maps[~labelled], None, preds[~labelled])


def _display_mean(store: RunStore) -> np.ndarray | None:
    """The run's mean image as figures draw it: ``(3, *S)`` for colour images (drawn in
    RGB), else the channel mean ``(*S)`` (grey)."""
    mean = store.mean_image()
    if mean is None or mean.shape[0] == 3:
        return mean
    return mean.mean(axis=0)


def _group_key(by: str, name: str) -> tuple[str, ...]:
    return (by, *name.split("/"))


def run_grouping(by: str | None, store: RunStore, record: dict[str, Any], log) -> str:
    """``by`` for the run: None picks ``label`` when some explained image has a label, else
    ``prediction`` (``log`` gets a notice); ``label`` and ``outcome`` on a run without labels
    are a RunError."""
    labelled = bool(record.get("multilabel")) or any(
        len(chunk) and bool((np.asarray(chunk.label) >= 0).any())
        for chunk in store.iter_chunks(maps=False)
    )
    if labelled:
        return by or "label"
    if by is None:
        if store.count():  # an empty run is not unlabelled: the accumulator names it
            log(
                f"notice: the run {store.root} is unlabelled; global maps are grouped by prediction"
            )
        return "prediction"
    if by != "prediction":
        raise RunError(
            f"--by {by} needs labels but the run {store.root} is unlabelled; use --by prediction"
        )
    return by


def check_alpha(alpha: float) -> float:
    """The FDR level: a number strictly between 0 and 1 (RunError naming --alpha)."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise RunError(f"--alpha must be a number in (0, 1), got {alpha!r}") from None
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise RunError(f"--alpha must be a number in (0, 1) (the FDR level), got {alpha!r}")
    return value


def load_mask(
    path: str | os.PathLike, spatial_shape: Sequence[int], grid: SharedGrid
) -> torch.Tensor:
    """A brain mask ``(1, *S)`` bool on the maps' grid: a NIfTI (read like the images,
    RAS+ voxel order) or ``.npy`` whose voxels > 0 are inside. Its shape must be the maps'
    and, when both have one, its affine the maps' (within 1e-3 mm); RunError otherwise."""
    shape = tuple(int(n) for n in spatial_shape)
    if not os.path.exists(path):
        raise RunError(f"--mask {path} does not exist; expected a NIfTI or .npy mask")
    try:
        array, meta = load_image(path, spatial_dims=len(shape))
    except DataError as error:
        raise RunError(f"--mask: {one_line(error)}") from None
    if array.shape[0] != 1 or tuple(array.shape[1:]) != shape:
        found = tuple(array.shape[1:]) if array.shape[0] == 1 else tuple(array.shape)
        raise RunError(
            f"--mask {path} has shape {found}; expected one channel on the maps' grid "
            f"{shape} (the run's image shape)"
        )
    if meta.affine is not None and grid.affine is not None:
        gap = float(np.abs(np.asarray(meta.affine) - grid.affine).max())
        if gap > AFFINE_TOL:
            raise RunError(
                f"--mask {path} has an affine that differs from the maps' grid by up to "
                f"{gap:.4g} mm; resample the mask onto the images' grid"
            )
    inside = torch.from_numpy(np.ascontiguousarray(array > 0))
    if not bool(inside.any()):
        raise RunError(f"--mask {path} has no voxel > 0; expected a non-empty mask")
    return inside


def _write_nifti(path: Path, array: np.ndarray, grid: SharedGrid) -> None:
    from ..report.nifti import nifti_bytes

    atomic_write_bytes(path, nifti_bytes(array, grid.affine, grid.codes))


def save_global(result: GlobalResult, directory: Path, grid: SharedGrid) -> None:
    """``result``'s files in ``directory``, plus each map as NIfTI on ``grid`` for volumes
    that share one grid (``grid.problem`` None)."""
    result.save(directory)
    if len(result.spatial_shape) == 3 and grid.problem is None:
        for name, array in result.to_arrays().items():
            _write_nifti(directory / f"{name}.nii.gz", array, grid)


def global_run(
    run: str | Path,
    *,
    by: str | None = None,
    normalise: str = "max",
    transform: str = "abs",
    contrast: tuple[str, str] | None = None,
    mask: str | os.PathLike | None = None,
    alpha: float = 0.05,
    log=print,
    accumulator=accumulate,
) -> GlobalResult:
    """Global maps of a run into ``RUN/global/`` (``.npy``, ``index.json``, NIfTI for 3D
    when every image shares one affine, with it and the first source's header codes) and
    ``RUN/figures/global_<by>.png``; with ``contrast`` ``(A, B)`` also the Welch t / p / q
    maps of group A against B (``--by`` groups; an outcome group is named ``label/TP``),
    tested inside ``mask`` only (a NIfTI or ``.npy`` path on the maps' grid) with
    Benjamini-Hochberg FDR level ``alpha``. ``by`` None: ``label`` when the run has labels,
    else ``prediction``; ``label`` or ``outcome`` without labels is refused. Options are
    checked before anything is written (RunError). ``accumulator``: :func:`accumulate` or a
    function with its signature (e.g. one that merges chunks accumulated on Ray workers)."""
    from ..report.figures import plot_global_maps
    from .xnn_summary import write_xnn_global

    if by is not None and by not in BY:
        raise RunError(f"--by must be one of {BY}, got {by!r}")
    alpha = check_alpha(alpha)
    if mask is not None and contrast is None:
        raise RunError("--mask restricts a contrast; give --contrast A:B with it")
    store, record = open_run(run)
    by = run_grouping(by, store, record, log)
    grid = shared_grid(store)
    spatial = tuple(record["spatial_shape"])
    inside = None if mask is None else load_mask(mask, spatial, grid)
    acc = accumulator(store, record, (by,), normalise, transform)
    result = acc.result()
    for name in contrast or ():  # unknown groups are refused before anything is written
        try:
            result.group(_group_key(by, name))
        except KeyError as error:
            raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error.args[0]}") from None
    directory = store.root / "global"
    if directory.exists():
        shutil.rmtree(directory)
    result.settings["by"] = by
    result.settings["nifti"] = len(spatial) == 3 and grid.problem is None
    save_global(result, directory, grid)
    if len(spatial) == 3 and grid.problem is not None:
        log(
            f"warning: global maps written as .npy only (no NIfTI): {grid.problem}; "
            "NIfTI global maps need every image on one grid (register them first)"
        )
    write_xnn_global(store, record, by, normalise, transform, grid)  # for xnn runs
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
        where = None if mask is None else str(mask)
        _write_contrast(store, result, by, contrast, background, grid, (inside, where, alpha), log)
    return result


def _write_contrast(
    store: RunStore,
    result: GlobalResult,
    by: str,
    contrast: tuple[str, str],
    background: np.ndarray,
    grid: SharedGrid,
    test_options: tuple[torch.Tensor | None, str | None, float],
    log,
) -> None:
    """Welch t / p / q maps of group ``contrast[0]`` against ``contrast[1]`` as ``.npy``
    (and NIfTI in 3D on a shared grid), a JSON summary and a figure; ``test_options`` is
    ``(mask (1, *S) bool or None, its path, alpha)``."""
    from ..report.figures import plot_global_maps

    inside, mask_path, alpha = test_options
    a, b = _group_key(by, contrast[0]), _group_key(by, contrast[1])
    try:
        test = result.contrast(a, b, inside)
    except KeyError as error:
        raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error.args[0]}") from None
    except ValueError as error:
        raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error}") from None
    directory = store.root / "global"
    stem = f"contrast_{'_'.join(a[1:])}_vs_{'_'.join(b[1:])}"
    arrays = test.to_arrays()
    for name, array in arrays.items():
        np.save(directory / f"{stem}_{name}.npy", array)
        if len(result.spatial_shape) == 3 and grid.problem is None:
            _write_nifti(directory / f"{stem}_{name}.nii.gz", array, grid)
    significant = test.significant(alpha)
    n_tested = int(np.prod(result.spatial_shape)) if inside is None else int(inside.sum())
    summary = {
        "group_a": list(a),
        "group_b": list(b),
        "count_a": test.count_a,
        "count_b": test.count_b,
        "alpha": alpha,
        "mask": mask_path,
        "n_tested": n_tested,
        "n_significant": int(significant.sum()),
        "files": {k: f"{stem}_{k}.npy" for k in arrays},
    }
    atomic_write_text(directory / f"{stem}.json", json.dumps(summary, indent=2))
    finite_t = torch.nan_to_num(test.t, posinf=0.0, neginf=0.0)
    plot_global_maps(
        background,
        {
            f"t {contrast[0]} - {contrast[1]}": finite_t,
            f"t where q < {alpha:g}": finite_t * significant,
        },
        store.root / "figures" / f"{stem}.png",
        title=f"Welch t, {contrast[0]} vs {contrast[1]} (BH-FDR q)",
        signed=True,
    )
    log(
        f"{int(significant.sum())} of {n_tested} tested voxel(s) with q < {alpha:g} for "
        f"{contrast[0]} vs {contrast[1]}" + (f" inside {mask_path}" if mask_path else "")
    )
