"""``explain``: every image of a dataset explained into a resumable run folder."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..core.errors import one_line
from ..core.model import model_guard
from ..core.progress import progress_bar
from ..core.scores import default_targets, predict_classes
from ..data.files import ImageDataset
from ..data.manifest import duplicate_rows, record_key
from ..data.readers import DataError
from ..models.external import LoadedModel, ModelError
from ..models.model_file import file_sha256
from .chunk import Chunk
from .errors import RunError
from .nifti_maps import sync_maps, wants_maps, write_chunk_maps
from .settings import (
    CHUNK_BYTES,
    MAX_CHUNK,
    TARGETS,
    ExplainSettings,
    group_names,
    make_explainer,
    open_data,
    open_model,
)
from .store import RunStore
from .xnn_run import batch_outputs, write_xnn_csv, xnn_record

__all__ = ["ChunkWork", "explain_run", "missing_parts"]


def _identity(settings: ExplainSettings, model: LoadedModel, dataset: ImageDataset, chunk: int):
    description = {k: v for k, v in model.describe().items() if k != "path"}
    if description.get("outputs") == "logits":  # the default, which runs made before it
        description.pop("outputs")  # was stated do not record: they resume unchanged
        description.pop("score", None)
    data = {k: v for k, v in dataset.describe().items() if k != "n_images"}
    if any(str(path).lower().endswith((".nii", ".nii.gz")) for path in dataset.paths):
        # NIfTI volumes are read in RAS+ voxel order: maps of a run made when they were read
        # in the file's own order must not be resumed into the same run
        data["nifti_voxel_order"] = "RAS+"
    checkpoint = settings.explainer_checkpoint
    return {
        "model": description,
        "data": data,
        "method": settings.method,
        "params": settings.params,
        "explainer_checkpoint_sha256": (
            None if checkpoint is None else file_sha256(Path(checkpoint))
        ),
        "target": settings.target,
        "chunk_size": chunk,
    }


def _image_or_none(dataset: ImageDataset, row: int) -> np.ndarray | None:
    """Row ``row``'s image ``(C, *S)`` as float64, or None when it cannot be read."""
    item, _ = dataset.try_get(row)
    return None if item is None else item["image"].double().numpy()


def _first_item(dataset: ImageDataset) -> dict[str, Any]:
    first_error = None
    for i in range(len(dataset)):
        item, error = dataset.try_get(i)
        if item is not None:
            return item
        first_error = first_error or error
    raise DataError(
        f"none of the {len(dataset)} images of {dataset.manifest.source} can be read; the "
        f"first: {first_error}"
    )


def _explain_items(
    model: LoadedModel,
    explainer,
    items: list[dict[str, Any]],
    target_mode: str,
    multilabel: bool,
    batch_size: int,
) -> tuple[list[dict[str, Any]], list[tuple[int, str, str, str]]]:
    """Explain loaded items (each with its ``key``) in batches; returns per-image records
    and ``(index, path, reason, key)`` errors."""
    device = explainer.device
    done, errors = [], []
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        x = torch.stack([item["image"] for item in part]).to(device)
        with model_guard(model), torch.no_grad():
            logits = model(x).cpu().float()
        finite = torch.isfinite(logits).all(1)
        defaults = default_targets(torch.nan_to_num(logits))
        preds = predict_classes(logits, multilabel).numpy()
        if multilabel:
            preds = preds.astype(np.float32)
        targets, keep = [], []
        for j, item in enumerate(part):
            where = (item["index"], item["path"])
            if not bool(finite[j]):
                errors.append((*where, "the model returned non-finite logits", item["key"]))
                continue
            if target_mode == "predicted":
                target = int(defaults[j])
            elif target_mode == "label":
                target = int(item["label"])
                if target < 0:
                    errors.append((*where, "no label for --target label", item["key"]))
                    continue
            else:
                target = int(target_mode)
            targets.append(target)
            keep.append(j)
        if not keep:
            continue
        maps, extra = batch_outputs(explainer, x[keep], torch.tensor(targets, device=device))
        for row, j in enumerate(keep):
            item = part[j]
            if not all(bool(torch.isfinite(a[row]).all()) for a in (maps, *extra.values())):
                reason = "the explainer returned NaN or inf"
                errors.append((item["index"], item["path"], reason, item["key"]))
                continue
            affine = item["affine"]
            done.append(
                {
                    "index": item["index"],
                    "key": item["key"],
                    "path": item["path"],
                    "map": maps[row].numpy(),
                    "label": item["label"].numpy(),
                    "pred": preds[j],
                    "target": targets[row],
                    "logits": logits[j].numpy(),
                    "affine": affine if affine is not None else np.full((4, 4), np.nan),
                    "image": item["image"],
                    "extra": {name: array[row].numpy() for name, array in extra.items()},
                }
            )
    return done, errors


def _build_chunk(
    number: int, records: list[dict[str, Any]], errors: list, spatial, k: int
) -> Chunk:
    def stack(name: str, empty: np.ndarray) -> np.ndarray:
        return np.stack([r[name] for r in records]) if records else empty

    image_sum = None
    if records:
        image_sum = torch.stack([r["image"] for r in records]).sum(0, dtype=torch.float64).numpy()
    return Chunk(
        number=number,
        index=np.asarray([r["index"] for r in records], dtype=np.int64),
        key=np.asarray([r["key"] for r in records], dtype=np.str_),
        maps=stack("map", np.zeros((0, 1, *spatial), np.float32)).astype(np.float32),
        label=stack("label", np.zeros((0,), np.int64)),
        pred=stack("pred", np.zeros((0,), np.int64)),
        target=np.asarray([r["target"] for r in records], dtype=np.int64),
        logits=stack("logits", np.zeros((0, k))),
        affine=stack("affine", np.zeros((0, 4, 4))),
        path=np.asarray([r["path"] for r in records], dtype=np.str_),
        image_sum=image_sum,
        image_count=len(records),
        errors=sorted(errors),
        extra={n: np.stack([r["extra"][n] for r in records]) for n in records[0]["extra"]}
        if records
        else {},
    )


def _selection(dataset: ImageDataset, n: int, log) -> tuple[list[str], list[int]]:
    """Keys and manifest rows of the first ``n`` rows, each image once (exact repeats are
    reported and skipped; the same image with two labels is a DataError)."""
    repeats, conflicts = duplicate_rows(dataset.manifest)
    source = dataset.manifest.source or "the data"
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise DataError(f"{source}: {conflicts[0]}{more}")
    skipped = {i for i, _ in repeats if i < n}
    if skipped:
        examples = ", ".join(f"row {i} repeats row {j}" for i, j in repeats if i < n)
        log(
            f"warning: {len(skipped)} duplicate row(s) in {source} ({examples[:200]}); "
            "each image is explained and counted once"
        )
    rows = [i for i in range(n) if i not in skipped]
    return [record_key(dataset.records[i]) for i in rows], rows


@dataclass
class _Prepared:
    """Everything ``explain`` opens and checks before it touches the run folder."""

    model: LoadedModel
    dataset: ImageDataset
    explainer: Any
    record: dict[str, Any]
    identity: dict[str, Any]
    spatial: tuple[int, ...]
    outputs: int
    chunk_size: int
    keys: list[str]
    rows: list[int]
    n_rows: int


def _prepare(settings: ExplainSettings, store: RunStore, log) -> _Prepared:
    """Open and check the model, data and explainer; nothing is written yet."""
    settings.absolute().check()
    store.check_inputs(settings.inputs())
    model = open_model(settings)
    dataset = open_data(settings, model, log)
    store.check_files(dataset.paths + [str(r.mask) for r in dataset.records if r.mask])
    first = _first_item(dataset)
    if model.labels is None or model.input_shape is None:
        try:
            model.validate(first["image"][None])
        except ModelError as error:  # e.g. a 4D NIfTI read as channels, a 3D scan, 2D model
            shape = tuple(first["image"].shape)
            raise ModelError(f"{first['path']} (read as {shape}): {one_line(error)}") from error
    outputs = len(model.labels)
    if settings.target == "label" and (dataset.multilabel or not dataset.labelled):
        kind = "multi-label" if dataset.labelled else "unlabelled"
        raise RunError(
            f"--target label needs single-label data but {settings.data} is {kind}; use "
            "'predicted' or a class index"
        )
    if settings.target not in TARGETS and not 0 <= int(settings.target) < outputs:
        raise RunError(f"--target {settings.target} is not a class index in [0, {outputs})")
    spatial = tuple(first["image"].shape[1:])
    explainer = make_explainer(settings, model)
    stored = 1 + xnn_record(explainer).get("xnn", {}).get("k", 0)  # maps stored per image
    chunk_size = settings.chunk_size or max(
        1, min(MAX_CHUNK, CHUNK_BYTES // (4 * stored * math.prod(spatial)))
    )
    n = len(dataset) if settings.limit is None else min(int(settings.limit), len(dataset))
    keys, rows = _selection(dataset, n, log)
    record = {
        "medexplain_version": __version__,
        "settings": asdict(settings),
        "model": model.describe(),
        "data": dataset.describe(),
        "class_names": group_names(dataset, model, outputs),
        "multilabel": dataset.multilabel,
        "spatial_shape": list(spatial),
        "channels": int(first["image"].shape[0]),
        "signed": bool(explainer.signed),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    identity = _identity(settings, model, dataset, chunk_size)
    return _Prepared(
        model, dataset, explainer, record, identity, spatial, outputs, chunk_size, keys, rows, n
    )


@dataclass
class ChunkWork:
    """What explaining one chunk needs, opened once (by the local engine, or by each Ray
    actor): the model, dataset and explainer of the run, its settings, the images' spatial
    shape and the model's number of outputs."""

    model: LoadedModel
    dataset: ImageDataset
    explainer: Any
    settings: ExplainSettings
    spatial: tuple[int, ...]
    outputs: int

    def explain_chunk(
        self, store: RunStore, number: int, part: list[tuple[str, int]]
    ) -> tuple[int, list[tuple[int, str, str, str]]]:
        """Explain ``part`` (``(key, manifest row)`` pairs) into chunk ``number``, written
        atomically (with its NIfTI maps when asked); returns how many images were explained
        and the ``(row, path, reason, key)`` of those that failed."""
        items, errors = [], []
        for key, row in part:
            item, error = self.dataset.try_get(row)
            if item is None:
                errors.append((row, str(self.dataset.records[row].path), error, key))
            else:
                items.append({**item, "key": key})
        done, bad = _explain_items(
            self.model,
            self.explainer,
            items,
            self.settings.target,
            self.dataset.multilabel,
            self.settings.batch_size,
        )
        errors += bad
        chunk = _build_chunk(number, done, errors, self.spatial, self.outputs)
        store.write_chunk(chunk)
        nifti = wants_maps(self.settings.nifti_maps, len(self.spatial))
        write_chunk_maps(store, chunk, self.dataset, nifti)
        return len(done), errors


def missing_parts(run: _Prepared, done_keys: set[str]) -> tuple[int, list[list[tuple[str, int]]]]:
    """How many selected images are settled already, and the others as chunk-sized lists
    of ``(key, manifest row)`` in manifest order."""
    missing = [(key, row) for key, row in zip(run.keys, run.rows) if key not in done_keys]
    parts = [missing[b : b + run.chunk_size] for b in range(0, len(missing), run.chunk_size)]
    return len(run.keys) - len(missing), parts


def _explain_missing(
    store: RunStore,
    run: _Prepared,
    settings: ExplainSettings,
    done_keys: set[str],
    progress: bool,
    log,
) -> int:
    """Explain the selected keys not in ``done_keys``, one new chunk at a time; returns how
    many images were explained."""
    settled, parts = missing_parts(run, done_keys)
    work = ChunkWork(run.model, run.dataset, run.explainer, settings, run.spatial, run.outputs)
    number = store.next_chunk_number()
    computed = 0
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{settings.method:>16}", total=len(run.keys))
        bar.advance(task, settled)
        for part in parts:
            n_done, errors = work.explain_chunk(store, number, part)
            number += 1
            computed += n_done
            for row, path, reason, _ in errors:
                log(f"skipped image {row} ({path}): {reason}")
            bar.advance(task, len(part))
    return computed


def explain_run(
    settings: ExplainSettings,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
    engine=None,
) -> dict[str, Any]:
    """Explain ``settings.data`` into the run folder ``out``, resuming what is there.

    ``engine``: None explains in this process; an object with ``explain_missing(store, run,
    settings, done_keys, progress, log) -> int`` (e.g. :class:`medexplain.runs.ray_engine.
    RayEngine`) fills the missing chunks instead.

    Images are matched to stored maps by key (path, file stamp, label), so a reordered,
    extended or shortened manifest resumes; damaged chunks are set aside and recomputed.
    Returns a summary ``{"n_images", "n_done", "n_errors", "n_computed", "n_duplicates",
    "seconds"}``. Raises RunError (different settings, busy run, an input inside ``out``),
    DataError, ModelError.
    """
    start = time.perf_counter()
    store = RunStore(out)
    run = _prepare(settings, store, log)
    store.initialise_check()
    with store.lock():
        store.initialise(run.record, run.identity, overwrite=overwrite, inputs=settings.inputs())
        store.update_record(
            settings=asdict(settings), data=run.dataset.describe(), **xnn_record(run.explainer)
        )
        store.remove_partial()
        done_keys = store.scan(log)
        store.write_selection(run.keys, run.rows)
        fill = _explain_missing if engine is None else engine.explain_missing
        computed = fill(store, run, settings, done_keys, progress, log)
        all_errors = store.errors()
        store.write_errors_csv(all_errors)
        store.write_items_csv()
        write_xnn_csv(store, log)
        sync_maps(store, run.dataset, wants_maps(settings.nifti_maps, len(run.spatial)))
        store.update_mean_image(lambda row: _image_or_none(run.dataset, row))
        summary = {
            "n_images": len(run.keys),
            "n_done": store.count(),
            "n_errors": len(all_errors),
            "n_computed": computed,
            "n_duplicates": run.n_rows - len(run.keys),
            "seconds": time.perf_counter() - start,
        }
        store.update_record(last_explain=summary)
    return summary
