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
from .data.files import ImageDataset, open_dataset
from .data.readers import DataError
from .explain import create
from .explain.base import model_guard
from .globalmaps import GlobalMaps, GlobalResult
from .models.external import LoadedModel, ModelError, _sha256, load_model
from .progress import progress_bar
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
    ``chunk_size`` None picks ``min(64, 32 MB of maps)``. ``batch_size`` and ``device``
    do not change the maps (explainers are batch-invariant), so a run may resume with
    other values; every other field must match to resume.
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
    """The run's dataset; shape and channels default to the model's stated input shape."""
    shape, channels = settings.shape, settings.channels
    if model is not None and model.input_shape is not None:
        shape = shape if shape is not None else tuple(model.input_shape[1:])
        channels = channels if channels is not None else model.input_shape[0]
    return open_dataset(
        settings.data,
        shape=None if shape is None else tuple(shape),
        channels=channels,
        normalise=settings.normalise,
    )


def _explainer(settings: ExplainSettings, model: torch.nn.Module):
    params = dict(settings.params)
    params.setdefault("batch_size", settings.batch_size)
    if settings.explainer_checkpoint is not None:
        params["checkpoint"] = settings.explainer_checkpoint
    try:
        return create(settings.method, model, **params)
    except KeyError as error:
        raise RunError(str(error).strip("'\"")) from error
    except TypeError as error:
        raise RunError(f"--method {settings.method}: bad --param ({error})") from error


def _class_names(dataset: ImageDataset, model: LoadedModel, outputs: int) -> list[str]:
    """Names of the groups: the dataset's classes (checked against the model's outputs)."""
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
    checkpoint = settings.explainer_checkpoint
    return {
        "model": description,
        "data": dataset.describe(),
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
) -> tuple[list[dict[str, Any]], list[tuple[int, str, str]]]:
    """Explain loaded items in batches; returns per-image records and errors."""
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
            if not bool(finite[j]):
                errors.append((item["index"], item["path"], "the model returned non-finite logits"))
                continue
            if target_mode == "predicted":
                target = int(logits[j].argmax()) if logits.shape[1] > 1 else 0
            elif target_mode == "label":
                target = int(item["label"])
                if target < 0:
                    errors.append((item["index"], item["path"], "no label for --target label"))
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
                errors.append((item["index"], item["path"], "the explainer returned NaN or inf"))
                continue
            done.append(
                {
                    "index": item["index"],
                    "path": item["path"],
                    "map": maps[row].numpy(),
                    "label": item["label"].numpy(),
                    "pred": preds[j],
                    "target": targets[row],
                    "logits": logits[j].numpy(),
                    "affine": item["affine"]
                    if item["affine"] is not None
                    else np.full((4, 4), np.nan),
                    "image": item["image"],
                }
            )
    return done, errors


def _build_chunk(
    number: int, done: list[dict[str, Any]], errors: list, old: Chunk | None, spatial, k: int
) -> Chunk:
    records = sorted(done, key=lambda r: r["index"])
    image_sum = None
    if records:
        image_sum = torch.stack([r["image"] for r in records]).sum(0, dtype=torch.float64).numpy()
    chunk = Chunk(
        number=number,
        index=np.asarray([r["index"] for r in records], dtype=np.int64),
        maps=np.stack([r["map"] for r in records]).astype(np.float32)
        if records
        else np.zeros((0, 1, *spatial), np.float32),
        label=np.stack([r["label"] for r in records]) if records else np.zeros((0,), np.int64),
        pred=np.stack([r["pred"] for r in records]) if records else np.zeros((0,), np.int64),
        target=np.asarray([r["target"] for r in records], dtype=np.int64),
        logits=np.stack([r["logits"] for r in records]) if records else np.zeros((0, k)),
        affine=np.stack([r["affine"] for r in records]) if records else np.zeros((0, 4, 4)),
        path=np.asarray([r["path"] for r in records], dtype=np.str_),
        image_sum=image_sum,
        image_count=len(records),
        errors=sorted(errors),
    )
    if old is None or len(old.finished) == 0:
        return chunk
    return _merge_chunks(old, chunk)


def _merge_chunks(a: Chunk, b: Chunk) -> Chunk:
    if len(a) == 0:
        b.errors = sorted(a.errors + b.errors)
        return b
    if len(b) == 0:
        a.errors = sorted(a.errors + b.errors)
        return a
    order = np.argsort(np.concatenate([a.index, b.index]), kind="stable")

    def cat(name):
        return np.concatenate([getattr(a, name), getattr(b, name)])[order]

    sums = [s for s in (a.image_sum, b.image_sum) if s is not None]
    return Chunk(
        number=a.number,
        index=cat("index"),
        maps=cat("maps"),
        label=cat("label"),
        pred=cat("pred"),
        target=cat("target"),
        logits=cat("logits"),
        affine=cat("affine"),
        path=cat("path"),
        image_sum=sum(sums[1:], sums[0].copy()) if sums else None,
        image_count=a.image_count + b.image_count,
        errors=sorted(a.errors + b.errors),
    )


def explain_run(
    settings: ExplainSettings,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """Explain ``settings.data`` into the run folder ``out``, resuming what is there.

    Returns a summary ``{"n_images", "n_done", "n_errors", "n_computed", "seconds"}``.
    Raises RunError (different settings, busy run), DataError, ModelError.
    """
    settings.data = str(Path(settings.data).resolve())
    if settings.target not in TARGETS:
        try:
            int(settings.target)
        except ValueError:
            raise RunError(
                f"--target must be 'predicted', 'label' or a class index, got {settings.target!r}"
            ) from None
    if settings.batch_size < 1:
        raise RunError(f"--batch-size must be >= 1, got {settings.batch_size}")
    start = time.perf_counter()
    model = open_model(settings)
    dataset = open_data(settings, model)
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
    if chunk_size < 1:
        raise RunError(f"--chunk-size must be >= 1, got {chunk_size}")
    explainer = _explainer(settings, model)
    store = RunStore(out)
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
    n = len(dataset) if settings.limit is None else min(int(settings.limit), len(dataset))
    computed = 0
    with store.lock():
        store.initialise(record, identity, overwrite=overwrite)
        store.remove_partial()
        all_errors = store.errors()
        existing = set(store.chunk_numbers())
        n_chunks = math.ceil(n / chunk_size)
        with progress_bar(progress) as bar:
            task = bar.add_task(f"{settings.method:>16}", total=n)
            for number in range(n_chunks):
                wanted = range(number * chunk_size, min((number + 1) * chunk_size, n))
                old = store.read_chunk(number, maps=False) if number in existing else None
                finished = old.finished if old is not None else set()
                missing = [i for i in wanted if i not in finished]
                bar.advance(task, len(wanted) - len(missing))
                if not missing:
                    continue
                items, errors = [], []
                for i in missing:
                    item, error = dataset.try_get(i)
                    if item is None:
                        errors.append((i, str(dataset.records[i].path), error))
                    else:
                        items.append(item)
                done, bad = _explain_items(
                    model, explainer, items, settings.target, multilabel, settings.batch_size
                )
                errors += bad
                if old is not None:
                    old = store.read_chunk(number, maps=True)
                chunk = _build_chunk(number, done, errors, old, spatial, outputs)
                store.write_chunk(chunk)
                computed += len(done)
                if errors:
                    all_errors += errors
                    store.write_errors_csv(all_errors)
                    for i, path, reason in errors:
                        log(f"skipped image {i} ({path}): {reason}")
                bar.advance(task, len(missing))
        store.write_errors_csv(all_errors)
        store.write_items_csv()
        n_done = store.count()
        summary = {
            "n_images": n,
            "n_done": n_done,
            "n_errors": len(all_errors),
            "n_computed": computed,
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
    ``RUN/evaluation.json`` and ``RUN/figures/peppr.png``. Returns the evaluation dict."""
    from .metrics.deletion import deletion_insertion
    from .metrics.localization import localization_scores
    from .metrics.peppr import peppr_many, plot_peppr
    from .metrics.sanity import cascading_randomization

    store, record = open_run(run)
    settings = _settings_of(record, device)
    model = open_model(settings)
    dataset = open_data(settings, model)
    expected = record["identity"]["model"].get("sha256")
    if expected != model.source.get("sha256"):
        raise RunError(f"the model file {settings.model} changed since the run was explained")
    multilabel = record["multilabel"]
    evaluation: dict[str, Any] = {"run": str(store.root), "n_explained": store.count()}
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
        outcome = deletion_insertion(model, x, maps, targets, baseline="blur")
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
                model, lambda m: _explainer(settings, m), x, targets, seed=0
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
            ("peppr.erase_area", "PEPPR erase ↓"),
            ("peppr.random_erase_area", "random erase"),
            ("peppr.restore_area", "PEPPR restore ↑"),
            ("peppr.random_restore_area", "random restore"),
            ("deletion.deletion_auc", "deletion AUC ↓"),
            ("deletion.insertion_auc", "insertion AUC ↑"),
            ("localization.auroc", "loc. AUROC"),
            ("sanity.rank_correlation_fully_randomized", "sanity ρ ↓"),
        ]
        body = metrics_table({settings["method"]: evaluation}, columns)
        if (figures / "peppr.png").is_file():
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
