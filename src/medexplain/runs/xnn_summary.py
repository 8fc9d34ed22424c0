"""XNN's global view of a run, streamed from its chunks (Qi, Khorram & Li, arXiv 1709.05360).

For an ``xnn`` run (:mod:`medexplain.runs.xnn_run`), ``global`` also writes ``RUN/global/xnn/``:

- ``feature_<j>/``: x-feature ``j``'s global maps by label (by prediction when the run is
  unlabelled or ``--by prediction``): the stored maps ``xnn_feature_maps[:, j]`` fed chunk by
  chunk to the global-map accumulator with the ``global`` command's normalisation and
  transform (:class:`~medexplain.globalmaps.GlobalResult` files, and NIfTI for volumes
  that share one grid, as ``global`` writes its own);
- ``xnn.json``: ``k``, ``by``, ``contributions`` (per class ``c``: ``mean_contribution`` the
  mean over the group's images of ``W[c, j] e_j``, the contribution of each x-feature to
  that class's logit, the head's ``bias`` ``b_c`` and the number of images ``n``) and
  ``top_activating`` (per x-feature the manifest rows, paths and values of the images with
  the largest ``e_j``, largest first, ties by row).

``report`` shows the same numbers, computed again from the chunks (with ``global``'s options
when it ran), with the figure of :func:`medexplain.report.xnn_plot.plot_xnn`.
"""

from __future__ import annotations

import html
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import one_line
from ..data.readers import DataError
from ..globalmaps import GlobalMaps, GlobalResult
from .aggregate import add_chunk, run_grouping, save_global
from .atomic import atomic_write_text
from .errors import RunError
from .nifti_maps import SharedGrid
from .settings import open_data, settings_of
from .store import RunStore
from .xnn_run import ARRAYS, chunk_arrays

__all__ = ["N_TOP", "write_xnn_global", "xnn_global", "xnn_section"]

#: Top-activating images kept per x-feature.
N_TOP = 8


def _members(values: np.ndarray, n_classes: int, multilabel: bool) -> np.ndarray:
    """``(n, K)`` bool: the classes each image belongs to (no class when unlabelled)."""
    values = np.asarray(values)
    if multilabel:
        return values.reshape(len(values), n_classes) > 0
    onehot = np.zeros((len(values), n_classes), dtype=bool)
    known = values >= 0
    onehot[np.flatnonzero(known), values[known].astype(np.int64)] = True
    return onehot


def xnn_global(
    store: RunStore,
    record: dict[str, Any],
    by: str = "label",
    normalise: str = "max",
    transform: str = "abs",
    n_top: int = N_TOP,
) -> tuple[dict[str, Any], list[GlobalResult]]:
    """``(view, results)``: the document of ``xnn.json`` (module docstring) and one
    :class:`GlobalResult` per x-feature grouped ``by`` (``label`` or ``prediction``), from
    the chunks one at a time (maps of one chunk in memory at once)."""
    head = record["xnn"]
    k, names = int(head["k"]), list(record["class_names"])
    weight, bias = np.asarray(head["weight"]), np.asarray(head["bias"])
    multilabel = bool(record["multilabel"])
    accumulators = [
        GlobalMaps(record["spatial_shape"], names, normalise, transform, multilabel, (by,))
        for _ in range(k)
    ]
    sums, counts = np.zeros((len(names), k)), np.zeros(len(names), dtype=np.int64)
    rows, paths, features = [], [], []
    for chunk in store.iter_chunks():
        if len(chunk) == 0:
            continue
        fmaps, _, e = chunk_arrays(chunk, ARRAYS, store)
        for j, accumulator in enumerate(accumulators):
            add_chunk(
                accumulator, replace(chunk, maps=np.ascontiguousarray(fmaps[:, j])), multilabel
            )
        member = _members(chunk.label if by == "label" else chunk.pred, len(names), multilabel)
        sums += member.T.astype(np.float64) @ e.astype(np.float64)
        counts += member.sum(0)
        rows += [int(i) for i in chunk.index]
        paths += [str(p) for p in chunk.path]
        features.append(np.asarray(e, dtype=np.float64))
    if not rows:
        raise RunError(f"{store.root} holds no explained image yet; run explain first")
    e_all = np.concatenate(features)
    contributions = {
        names[c]: {
            "mean_contribution": (weight[c] * sums[c] / counts[c]).tolist(),
            "bias": float(bias[c]),
            "n": int(counts[c]),
        }
        for c in range(len(names))
        if counts[c]
    }
    top = []
    for j in range(k):
        order = sorted(range(len(rows)), key=lambda i: (-e_all[i, j], rows[i]))[:n_top]
        top.append(
            {
                "index": [rows[i] for i in order],
                "path": [paths[i] for i in order],
                "value": [float(e_all[i, j]) for i in order],
            }
        )
    view = {"k": k, "by": by, "contributions": contributions, "top_activating": top}
    return view, [accumulator.result() for accumulator in accumulators]


def write_xnn_global(
    store: RunStore,
    record: dict[str, Any],
    by: str,
    normalise: str,
    transform: str,
    grid: SharedGrid,
) -> Path | None:
    """For an xnn run, :func:`xnn_global` written into ``RUN/global/xnn/`` (its
    ``xnn.json``'s path; NIfTI too on ``grid``, the run's :func:`shared_grid`); None for
    other methods. ``by`` ``outcome`` groups by label."""
    if "xnn" not in record:
        return None
    by = "prediction" if by == "prediction" else "label"
    view, results = xnn_global(store, record, by, normalise, transform)
    directory = store.root / "global" / "xnn"
    if directory.exists():
        shutil.rmtree(directory)
    for j, result in enumerate(results):
        save_global(result, directory / f"feature_{j}", grid)
    view["global_maps"] = [f"feature_{j}" for j in range(len(results))]
    view["settings"] = {"normalise": normalise, "transform": transform}
    return atomic_write_text(directory / "xnn.json", json.dumps(view, indent=2))


def _options(store: RunStore, record: dict[str, Any]) -> tuple[str, str, str]:
    """``(by, normalise, transform)`` of ``global``'s x-feature maps when it ran, else
    label (prediction for an unlabelled run), max, abs."""
    path = store.root / "global" / "xnn" / "xnn.json"
    if path.is_file():
        view = json.loads(path.read_text())
        return view["by"], view["settings"]["normalise"], view["settings"]["transform"]
    return run_grouping(None, store, record, log=lambda _message: None), "max", "abs"


def _top_images(store: RunStore, record: dict[str, Any], view: dict[str, Any], log):
    """The top-activating images ``(M, C, *S)`` read again from the data (zeros when the
    data cannot be read), the view with their indices renumbered into that array, and each
    image's manifest row as its title."""
    import torch

    rows = sorted({i for top in view["top_activating"] for i in top["index"]})
    try:
        dataset = open_data(settings_of(record))
    except (DataError, RunError, OSError, ValueError) as error:
        log(f"notice: the XNN section draws no images ({one_line(error)})")
        dataset = None
    shape = (int(record.get("channels", 1)), *record["spatial_shape"])
    images = torch.zeros((len(rows), *shape), dtype=torch.float64)
    for position, row in enumerate(rows):
        item = None if dataset is None else dataset.try_get(row)[0]
        if item is not None and tuple(item["image"].shape) == shape:
            images[position] = item["image"].double()
    where = {row: position for position, row in enumerate(rows)}
    tops = [{**top, "index": [where[i] for i in top["index"]]} for top in view["top_activating"]]
    return images, {**view, "top_activating": tops}, [f"#{row}" for row in rows]


def xnn_section(store: RunStore, record: dict[str, Any], figures: Path, log=print) -> str | None:
    """The report's XNN section (HTML) for an xnn run, None for other methods: the per-class
    mean-contribution table, and the figure of top-activating images and x-feature global
    maps, computed here from the chunks (with ``global``'s grouping, normalisation and
    transform when it ran, else by label, max, abs), so they follow a run explained further."""
    from ..report.html import embed_png, plain_table
    from ..report.xnn_plot import plot_xnn

    if "xnn" not in record:
        return None
    by, normalise, transform = _options(store, record)
    view, results = xnn_global(store, record, by, normalise, transform)
    k = int(view["k"])
    header = ["class (" + view["by"] + ")", "images", "bias"] + [f"x{j}" for j in range(k)]
    rows = [
        [name, entry["n"], f"{entry['bias']:.4g}"]
        + [f"{v:.4g}" for v in entry["mean_contribution"]]
        for name, entry in view["contributions"].items()
    ]
    body = (
        "<p>Mean contribution <i>W[c, j] e<sub>j</sub></i> of each x-feature to the logit of "
        f"class <i>c</i> over the images of that {html.escape(view['by'])} (xnn.csv has every "
        "image's contributions to its target).</p>" + plain_table(header, rows)
    )
    images, shown, names = _top_images(store, record, view, log)
    path = figures / "report_xnn.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_xnn(shown, images, results, n_top=min(4, N_TOP), path=path, names=names)
    tops = "".join(
        f"<li>x{j}: "
        + ", ".join(f"#{i} ({v:.3g})" for i, v in zip(t["index"], t["value"]))
        + "</li>"
        for j, t in enumerate(view["top_activating"])
    )
    body += f"<p>Top-activating images (manifest row, e<sub>j</sub>):</p><ul>{tops}</ul>"
    body += (
        f"<p>Figure: the table's contributions, then per x-feature its top 4 images and its "
        f"global map by {html.escape(by)} ({html.escape(normalise)}, {html.escape(transform)})."
        "</p>"
    )
    return body + embed_png(path)
