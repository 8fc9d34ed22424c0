"""Runs on the user's own data: explain a dataset into a resumable store, then global maps,
evaluation and a report from that store (what ``medexplain explain/global/evaluate/report``
call).

    settings = ExplainSettings(model="cnn.pt", data="t1.csv", method="saliency")
    explain_run(settings, "runs/ad")                 # killed? call again: it resumes
    result = global_run("runs/ad", by="label", contrast=("AD", "CN"))
    evaluate_run("runs/ad", peppr=True)
    report_run("runs/ad")

Memory never grows with the number of images: images are read, explained and written one
chunk at a time (:mod:`medexplain.runstore`), global maps and metrics stream the chunks back.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .core.model import model_guard
from .core.progress import progress_bar
from .data.files import ImageDataset, open_dataset
from .data.manifest import duplicate_rows
from .data.readers import DataError
from .explain import create
from .globalmaps import GlobalMaps, GlobalResult
from .models.external import LoadedModel, ModelError, _sha256, load_model
from .models.fingerprint import ClassifierMismatchError
from .runstore import Chunk, RunError, RunStore, atomic_write_text

__all__ = [
    "ExplainSettings",
    "RunError",
    "evaluate_run",
    "explain_run",
    "global_run",
    "open_run",
    "report_run",
]

TARGETS = ("predicted", "label")
BY = ("label", "prediction", "outcome")
#: Maps per chunk are capped at this many bytes (float32), and at 64 images.
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK = 64


@dataclass
class ExplainSettings:
    """What ``medexplain explain`` was asked; stored in ``run.json``.

    ``target``: ``"predicted"`` (argmax of the logits; the only output of a one-logit
    model), ``"label"`` (the true class; multi-class data only) or a class index.
    ``shape``/``channels`` default to the model config's input shape when it states one.
    ``chunk_size`` None picks ``min(64, 32 MB of maps)``. ``batch_size``, ``device``,
    ``limit`` and ``force`` do not change the maps (explainers are batch-invariant), so a
    run may resume with other values; every other field must match to resume. File paths
    are stored absolute. ``force`` accepts a learned explainer's checkpoint fitted for
    another classifier.
    """

    data: str
    method: str
    model: str | None = None
    model_factory: str | None = None
    model_config: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    explainer_checkpoint: str | None = None
    target: str = "predicted"
    shape: tuple[int, ...] | None = None
    channels: int | None = None
    normalise: str = "none"
    device: str = "cpu"
    batch_size: int = 16
    chunk_size: int | None = None
    limit: int | None = None
    force: bool = False

    def absolute(self) -> ExplainSettings:
        """The same settings with every file path absolute (so a run can be evaluated
        from any working directory)."""
        for name in ("data", "model", "model_config", "explainer_checkpoint"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(Path(value).expanduser().resolve()))
        return self

    def check(self) -> None:
        """Refuse options out of range (RunError naming the option)."""
        if self.target not in TARGETS:
            try:
                int(self.target)
            except ValueError:
                raise RunError(
                    f"--target must be 'predicted', 'label' or a class index, got {self.target!r}"
                ) from None
        for name in ("batch_size", "chunk_size", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or int(value) < 1):
                option = "--" + name.replace("_", "-")
                raise RunError(f"{option} must be a whole number >= 1, got {value}")

    def inputs(self) -> list[str]:
        """The files and folders a run reads (it may not write into any of them)."""
        values = (self.data, self.model, self.model_config, self.explainer_checkpoint)
        return [v for v in values if v is not None]


# --------------------------------------------------------------------------- opening


def open_model(settings: ExplainSettings) -> LoadedModel:
    """The classifier of a run (ModelError on bad files or configs)."""
    return load_model(
        settings.model,
        settings.model_factory,
        config=settings.model_config,
        device=settings.device,
    )


def open_data(settings: ExplainSettings, model: LoadedModel | None = None) -> ImageDataset:
    """The run's dataset; shape and channels default to the model's stated input shape,
    and the model's stated labels (two or more) fix the class order: the data's names are
    mapped onto them, and a name the model does not know is a DataError naming it."""
    shape, channels = settings.shape, settings.channels
    options: dict[str, Any] = {}
    if model is not None and model.input_shape is not None:
        shape = shape if shape is not None else tuple(model.input_shape[1:])
        channels = channels if channels is not None else model.input_shape[0]
    if model is not None and model.labels is not None and len(model.labels) > 1:
        options["class_names"] = list(model.labels)
    return open_dataset(
        settings.data,
        shape=None if shape is None else tuple(shape),
        channels=channels,
        normalise=settings.normalise,
        **options,
    )


def _explainer(settings: ExplainSettings, model: torch.nn.Module):
    params = dict(settings.params)
    params.setdefault("batch_size", settings.batch_size)
    if settings.explainer_checkpoint is not None:
        params["checkpoint"] = settings.explainer_checkpoint
        if settings.force:
            params["force"] = True
    try:
        return create(settings.method, model, **params)
    except KeyError as error:
        raise RunError(str(error).strip("'\"")) from error
    except ClassifierMismatchError as error:
        raise RunError(f"--explainer-checkpoint: {error}") from error
    except TypeError as error:
        raise RunError(f"--method {settings.method}: bad --param ({error})") from error


def _class_names(dataset: ImageDataset, model: LoadedModel, outputs: int) -> list[str]:
    """Names of the groups: the model's labels when it states them (the dataset was read
    in their order), else the dataset's classes (checked against the model's outputs)."""
    if dataset.labelled:
        names = dataset.class_names
        if dataset.multilabel or outputs > 1:
            if len(names) != outputs:
                raise ModelError(
                    f"the model returns {outputs} output(s) but the data {dataset.manifest.source}"
                    f" has {len(names)} classes {names}; they must correspond one to one"
                )
        elif len(names) != 2:
            raise ModelError(
                f"a one-logit model separates 2 classes but the data has {len(names)} {names}"
            )
        return names
    labels = model.labels or [str(i) for i in range(outputs)]
    return labels if outputs > 1 else [f"not {labels[0]}", labels[0]]


def _predictions(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    if multilabel:
        return (torch.sigmoid(logits) > 0.5).to(torch.float32).numpy()
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).to(torch.int64).numpy()
    return logits.argmax(1).numpy()


# --------------------------------------------------------------------------- explain


def _identity(settings: ExplainSettings, model: LoadedModel, dataset: ImageDataset, chunk: int):
    description = {k: v for k, v in model.describe().items() if k != "path"}
    data = {k: v for k, v in dataset.describe().items() if k != "n_images"}
    checkpoint = settings.explainer_checkpoint
    return {
        "model": description,
        "data": data,
        "method": settings.method,
        "params": settings.params,
        "explainer_checkpoint_sha256": None if checkpoint is None else _sha256(Path(checkpoint)),
        "target": settings.target,
        "chunk_size": chunk,
    }


def _first_item(dataset: ImageDataset) -> dict[str, Any]:
    for i in range(len(dataset)):
        item, _ = dataset.try_get(i)
        if item is not None:
            return item
    raise DataError(f"none of the {len(dataset)} images of {dataset.manifest.source} can be read")


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
        preds = _predictions(logits, multilabel)
        targets, keep = [], []
        for j, item in enumerate(part):
            where = (item["index"], item["path"])
            if not bool(finite[j]):
                errors.append((*where, "the model returned non-finite logits", item["key"]))
                continue
            if target_mode == "predicted":
                target = int(logits[j].argmax()) if logits.shape[1] > 1 else 0
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
        maps = explainer(x[keep], torch.tensor(targets, device=device)).cpu()
        for row, j in enumerate(keep):
            item = part[j]
            if not bool(torch.isfinite(maps[row]).all()):
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
    keys = dataset.item_keys()
    rows = [i for i in range(n) if i not in skipped]
    return [keys[i] for i in rows], rows


def _selection_mean(store: RunStore, dataset: ImageDataset) -> np.ndarray | None:
    """Mean image of the selected explained images: the chunks' sums where a chunk is
    wholly selected, the images re-read where it is not."""
    total, count = None, 0
    for chunk in store.iter_chunks(maps=False):
        if len(chunk) == 0:
            continue
        if chunk.image_sum is not None and chunk.image_count:
            parts = [(chunk.image_sum, chunk.image_count)]
        else:
            parts = []
            for index in chunk.index.tolist():
                item, _ = dataset.try_get(int(index))
                if item is not None:
                    parts.append((item["image"].double().numpy(), 1))
        for value, n in parts:
            total = value.copy() if total is None else total + value
            count += n
    return None if total is None else total / count


def explain_run(
    settings: ExplainSettings,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Explain ``settings.data`` into the run folder ``out``, resuming what is there.

    Images are matched to stored maps by key (path, file stamp, label), so a reordered,
    extended or shortened manifest resumes; damaged chunks are set aside and recomputed.
    Returns a summary ``{"n_images", "n_done", "n_errors", "n_computed", "seconds"}``.
    Raises RunError (different settings, busy run, an input inside ``out``), DataError,
    ModelError.
    """
    settings.absolute().check()
    start = time.perf_counter()
    store = RunStore(out)
    store.check_inputs(settings.inputs())
    model = open_model(settings)
    dataset = open_data(settings, model)
    store.check_files(dataset.paths + [str(r.mask) for r in dataset.records if r.mask])
    first = _first_item(dataset)
    if model.labels is None or model.input_shape is None:
        model.validate(first["image"][None])
    outputs = len(model.labels)
    multilabel = dataset.multilabel
    if multilabel and settings.target == "label":
        raise RunError("--target label needs single-label data; use 'predicted' or a class index")
    if settings.target not in TARGETS and not 0 <= int(settings.target) < outputs:
        raise RunError(f"--target {settings.target} is not a class index in [0, {outputs})")
    class_names = _class_names(dataset, model, outputs)
    spatial = tuple(first["image"].shape[1:])
    chunk_size = settings.chunk_size or max(
        1, min(MAX_CHUNK, CHUNK_BYTES // (4 * math.prod(spatial)))
    )
    explainer = _explainer(settings, model)
    n = len(dataset) if settings.limit is None else min(int(settings.limit), len(dataset))
    keys, rows = _selection(dataset, n, log)
    record = {
        "medexplain_version": __version__,
        "settings": asdict(settings),
        "model": model.describe(),
        "data": dataset.describe(),
        "class_names": class_names,
        "multilabel": multilabel,
        "spatial_shape": list(spatial),
        "channels": int(first["image"].shape[0]),
        "signed": bool(getattr(explainer, "signed", True)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    identity = _identity(settings, model, dataset, chunk_size)
    store.initialise_check()
    computed = 0
    with store.lock():
        store.initialise(record, identity, overwrite=overwrite, inputs=settings.inputs())
        store.update_record(settings=asdict(settings), data=dataset.describe())
        store.remove_partial()
        store.set_aside_damaged(log)
        store.write_selection(keys, rows)
        done_keys = store.stored_keys()
        missing = [(key, row) for key, row in zip(keys, rows) if key not in done_keys]
        number = store.next_chunk_number()
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{settings.method:>16}", total=len(keys))
            bar.advance(task, len(keys) - len(missing))
            for begin in range(0, len(missing), chunk_size):
                part = missing[begin : begin + chunk_size]
                items, errors = [], []
                for key, row in part:
                    item, error = dataset.try_get(row)
                    if item is None:
                        errors.append((row, str(dataset.records[row].path), error, key))
                    else:
                        items.append({**item, "key": key})
                done, bad = _explain_items(
                    model, explainer, items, settings.target, multilabel, settings.batch_size
                )
                errors += bad
                store.write_chunk(_build_chunk(number, done, errors, spatial, outputs))
                number += 1
                computed += len(done)
                for row, path, reason, _ in errors:
                    log(f"skipped image {row} ({path}): {reason}")
                bar.advance(task, len(part))
        all_errors = store.errors()
        store.write_errors_csv(all_errors)
        store.write_items_csv()
        if store.mean_image() is None and store.partial_chunks():
            mean = _selection_mean(store, dataset)
            if mean is not None:
                store.write_mean_image(mean)
        n_done = store.count()
        summary = {
            "n_images": len(keys),
            "n_done": n_done,
            "n_errors": len(all_errors),
            "n_computed": computed,
            "n_duplicates": n - len(keys),
            "seconds": time.perf_counter() - start,
        }
        store.update_record(last_explain=summary)
    return summary


# --------------------------------------------------------------------------- global


def open_run(run: str | Path) -> tuple[RunStore, dict[str, Any]]:
    store = RunStore(run)
    return store, store.record()


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
    mean = store.mean_image()
    return None if mean is None else mean.mean(axis=0)


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
    from .report.figures import plot_global_maps
    from .report.nifti import save_nifti

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
    dims = len(result.spatial_shape)
    if dims == 3:
        for name, array in result.to_arrays().items():
            save_nifti(array, directory / f"{name}.nii.gz", affine)
    mean = _display_mean(store)
    background = mean if mean is not None else np.zeros(result.spatial_shape)
    maps = {"/".join(key[1:]): group.mean for key, group in result.groups.items() if key[0] == by}
    maps = maps or {"overall": result.overall.mean}
    figures = store.root / "figures"
    plot_global_maps(
        background,
        maps,
        figures / f"global_{by}.png",
        title=f"{record['settings']['method']}: global maps by {by} ({normalise}, {transform})",
        signed=transform == "signed",
    )
    if contrast is not None:
        a, b = _group_key(by, contrast[0]), _group_key(by, contrast[1])
        try:
            test = result.contrast(a, b)
        except KeyError as error:
            raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error.args[0]}") from None
        except ValueError as error:
            raise RunError(f"--contrast {contrast[0]}:{contrast[1]}: {error}") from None
        stem = f"contrast_{'_'.join(a[1:])}_vs_{'_'.join(b[1:])}"
        arrays = test.to_arrays()
        for name, array in arrays.items():
            np.save(directory / f"{stem}_{name}.npy", array)
            if dims == 3:
                save_nifti(array, directory / f"{stem}_{name}.nii.gz", affine)
        significant = test.significant(0.05)
        atomic_write_text(
            directory / f"{stem}.json",
            json.dumps(
                {
                    "group_a": list(a),
                    "group_b": list(b),
                    "count_a": test.count_a,
                    "count_b": test.count_b,
                    "n_significant_q05": int(significant.sum()),
                    "files": {k: f"{stem}_{k}.npy" for k in arrays},
                },
                indent=2,
            ),
        )
        finite_t = torch.nan_to_num(test.t, posinf=0.0, neginf=0.0)
        plot_global_maps(
            background,
            {
                f"t {contrast[0]} - {contrast[1]}": finite_t,
                "t where q < 0.05": finite_t * significant,
            },
            figures / f"{stem}.png",
            title=f"Welch t, {contrast[0]} vs {contrast[1]} (BH-FDR q)",
            signed=True,
        )
        log(f"{int(significant.sum())} pixel(s) with q < 0.05 for {contrast[0]} vs {contrast[1]}")
    return result


# --------------------------------------------------------------------------- evaluate


def _settings_of(record: dict[str, Any], device: str | None = None) -> ExplainSettings:
    values = dict(record["settings"])
    if values.get("shape") is not None:
        values["shape"] = tuple(values["shape"])
    if device is not None:
        values["device"] = device
    return ExplainSettings(**values)


def _done_batches(
    store: RunStore,
    dataset: ImageDataset,
    batch_size: int,
    limit: int | None,
    multilabel: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of the run's labelled explained images, re-read from the data."""
    xs, ys, seen = [], [], 0
    for chunk in store.iter_chunks(maps=False):
        for j, index in enumerate(chunk.index.tolist()):
            if limit is not None and seen >= limit:
                break
            label = chunk.label[j]
            if not multilabel and int(label) < 0:
                continue
            item, _ = dataset.try_get(index)
            if item is None:
                continue
            xs.append(item["image"])
            ys.append(item["label"])
            seen += 1
            if len(xs) == batch_size:
                yield torch.stack(xs), torch.stack(ys)
                xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.stack(ys)


def _first_done(store: RunStore, dataset: ImageDataset, n: int):
    """Images, stored maps, targets and items of the first ``n`` explained images."""
    images, maps, targets, items = [], [], [], []
    for chunk in store.iter_chunks():
        for j, index in enumerate(chunk.index.tolist()):
            if len(images) >= n:
                break
            item, _ = dataset.try_get(index)
            if item is None:
                continue
            images.append(item["image"])
            maps.append(torch.from_numpy(chunk.maps[j]))
            targets.append(int(chunk.target[j]))
            items.append(item)
        if len(images) >= n:
            break
    if not images:
        raise RunError(f"{store.root} holds no explained image that can be read again")
    return torch.stack(images), torch.stack(maps), torch.tensor(targets), items


def evaluate_run(
    run: str | Path,
    *,
    peppr: bool = True,
    deletion: bool = True,
    localization: bool = True,
    sanity: bool = True,
    labelwise: bool = False,
    limit: int | None = None,
    n_deletion: int = 16,
    n_sanity: int = 4,
    peppr_steps: int = 20,
    peppr_seeds: int = 5,
    device: str | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Proof for a run: PEPPR with its global map(s), deletion/insertion, localization
    against the manifest's masks, cascading-randomisation sanity; writes
    ``RUN/evaluation.json`` and ``RUN/figures/peppr.png``.

    Evaluations accumulate: each call adds or replaces only the sections it computed, the
    others already in ``evaluation.json`` stay. Returns the whole evaluation dict."""
    _check_counts(
        limit=limit,
        n_deletion=n_deletion,
        n_sanity=n_sanity,
        steps=peppr_steps,
        seeds=peppr_seeds,
        batch_size=batch_size,
    )
    from .metrics.deletion import deletion_insertion
    from .metrics.localization import localization_scores
    from .metrics.peppr import peppr_many
    from .metrics.sanity import cascading_randomization
    from .report.peppr_plot import plot_peppr

    store, record = open_run(run)
    settings = _settings_of(record, device)
    model = open_model(settings)
    dataset = open_data(settings, model)
    expected = record["identity"]["model"].get("sha256")
    if expected != model.source.get("sha256"):
        raise RunError(f"the model file {settings.model} changed since the run was explained")
    multilabel = record["multilabel"]
    evaluation = _read_evaluation(store)
    evaluation.update(run=str(store.root), n_explained=store.count())
    figures = store.root / "figures"
    if peppr:
        directory = store.root / "global"
        if (directory / "index.json").is_file():
            result = GlobalResult.load(directory)
        else:
            result = global_run(run, log=lambda *_: None)
        if labelwise:
            kind = result.settings.get("by", "label")
            ranking: Any = {
                key[1]: g.mean.float()
                for key, g in result.groups.items()
                if key[0] == kind and len(key) == 2
            }
            if not ranking:
                raise RunError("--labelwise needs global maps by label or prediction")
        else:
            ranking = result.overall.mean.float()
        mean = store.mean_image()
        peppr_result = peppr_many(
            model,
            _done_batches(store, dataset, batch_size, limit, multilabel),
            None,
            {"global": ranking},
            fill="mean",
            mean_image=torch.from_numpy(mean).float(),
            n_steps=peppr_steps,
            random_seeds=peppr_seeds,
            batch_size=batch_size,
            activation="sigmoid" if multilabel else "auto",
            class_names=record["class_names"],
            progress=progress,
        )["global"]
        evaluation["peppr"] = peppr_result.summary()
        evaluation["peppr"]["n_images"] = peppr_result.n_images
        evaluation["peppr"]["labelwise"] = labelwise
        atomic_write_text(store.root / "peppr.json", json.dumps(peppr_result.to_dict(), indent=2))
        plot_peppr(peppr_result, figures / "peppr.png", title=f"PEPPR — {settings.method}")
    if deletion:
        x, maps, targets, _ = _first_done(store, dataset, n_deletion)
        outcome = deletion_insertion(model, x, targets, maps, baseline="blur")
        evaluation["deletion"] = {
            "n_images": int(x.shape[0]),
            "deletion_auc": float(outcome.deletion_auc.mean()),
            "insertion_auc": float(outcome.insertion_auc.mean()),
        }
    if localization:
        evaluation["localization"] = _localization(store, dataset, localization_scores)
    if sanity:
        x, _, targets, _ = _first_done(store, dataset, n_sanity)
        try:
            check = cascading_randomization(
                model, x, targets, make_explainer=lambda m: _explainer(settings, m), seed=0
            )
            evaluation["sanity"] = {
                "n_images": int(x.shape[0]),
                "rank_correlation_fully_randomized": check.rank_correlation_fully_randomized,
                "mean_per_step": check.mean.tolist(),
                "steps": check.step_names,
            }
        except Exception as error:  # e.g. TorchScript models cannot be deep-copied
            evaluation["sanity"] = {"skipped": f"{type(error).__name__}: {error}"}
    atomic_write_text(store.root / "evaluation.json", json.dumps(_json_safe(evaluation), indent=2))
    return evaluation


def _check_counts(**values: int | None) -> None:
    """Refuse counts below 1 (RunError naming the option)."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            option = "--" + name.replace("_", "-")
            raise RunError(f"{option} must be a whole number >= 1, got {value}")


def _read_evaluation(store: RunStore) -> dict[str, Any]:
    """The sections already in ``RUN/evaluation.json`` (empty when there is none)."""
    path = store.root / "evaluation.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"cannot read {path}: {error}") from error
    return data if isinstance(data, dict) else {}


def _localization(store: RunStore, dataset: ImageDataset, scores_fn) -> dict[str, Any]:
    with_mask = {i for i, r in enumerate(dataset.records) if r.mask is not None}
    if not with_mask:
        return {"skipped": "the dataset has no masks (add a 'mask' column to the CSV)"}
    values: dict[str, list[float]] = {}
    for chunk in store.iter_chunks():
        rows = [j for j, i in enumerate(chunk.index.tolist()) if i in with_mask]
        maps, masks = [], []
        for j in rows:
            item, _ = dataset.try_get(int(chunk.index[j]))
            if item is None or "mask" not in item or not bool(item["mask"].any()):
                continue
            maps.append(torch.from_numpy(chunk.maps[j]))
            masks.append(item["mask"])
        if not maps:
            continue
        scores = scores_fn(torch.stack(maps), torch.stack(masks))
        for name, tensor in scores.items():
            values.setdefault(name, []).extend(tensor.tolist())
    if not values:
        return {"skipped": "no explained image has a non-empty mask"}
    out: dict[str, Any] = {"n_images": len(next(iter(values.values())))}
    for name, v in values.items():
        array = np.asarray(v, dtype=np.float64)
        out[name] = float(np.nanmean(array)) if np.isfinite(array).any() else None
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- report


def report_run(run: str | Path) -> Path:
    """A self-contained ``RUN/report.html`` from ``run.json``, the global maps, the
    contrast and the evaluation (what exists)."""
    from .report.html import embed_png, metrics_table, write_report

    store, record = open_run(run)
    settings = record["settings"]
    summary = record.get("last_explain", {})
    errors = store.errors()
    intro = (
        f"<p>Method <b>{settings['method']}</b> {settings['params'] or ''} on "
        f"{summary.get('n_done', store.count())} image(s) of {settings['data']} "
        f"(shape {record['spatial_shape']}, classes {', '.join(record['class_names'])}); "
        f"model {settings['model'] or settings['model_factory']} "
        f"(sha256 {str(record['model'].get('sha256'))[:12]}), target {settings['target']}. "
        f"{len(errors)} image(s) could not be explained (errors.csv).</p>"
    )
    sections = [("Run", intro)]
    results: dict[str, Any] = {"run": record}
    figures = store.root / "figures"
    global_dir = store.root / "global"
    if (global_dir / "index.json").is_file():
        index = json.loads((global_dir / "index.json").read_text())
        results["global"] = index
        body = "".join(embed_png(p) for p in sorted(figures.glob("global_*.png")))
        rows = {"/".join(g["key"]): {"count": g["count"]} for g in index["groups"]}
        body += metrics_table(rows, [("count", "images")]).replace(">method<", ">group<")
        if len(record["spatial_shape"]) == 3:
            body += "<p class='note'>3D maps are in global/*.nii.gz with the scans' affine.</p>"
        sections.append(("Global maps", body))
        contrasts = sorted(figures.glob("contrast_*.png"))
        if contrasts:
            sections.append(
                ("Group contrast (Welch t, BH-FDR)", "".join(map(embed_png, contrasts)))
            )
    evaluation_path = store.root / "evaluation.json"
    if evaluation_path.is_file():
        evaluation = json.loads(evaluation_path.read_text())
        results["evaluation"] = evaluation
        columns = [
            ("peppr.erase_area", "PEPPR erase"),
            ("peppr.random_erase_area", "random erase"),
            ("peppr.restore_area", "PEPPR restore"),
            ("peppr.random_restore_area", "random restore"),
            ("deletion.deletion_auc", "deletion AUC"),
            ("deletion.insertion_auc", "insertion AUC"),
            ("localization.auroc", "loc. AUROC"),
            ("sanity.rank_correlation_fully_randomized", "sanity ρ"),
        ]
        body = metrics_table({settings["method"]: evaluation}, columns)
        if "peppr" in evaluation and (figures / "peppr.png").is_file():
            body += embed_png(figures / "peppr.png")
        sections.append(("Evaluation", body))
    if errors:
        rows = "".join(f"<li>{i}: {path} — {reason}</li>" for i, path, reason in errors[:50])
        sections.append(("Images not explained", f"<ul>{rows}</ul>"))
    return write_report(
        store.root / "report.html",
        title=f"medexplain run — {settings['method']}",
        sections=sections,
        results=_json_safe(results),
    )
