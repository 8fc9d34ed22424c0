"""What a run was asked, and opening its model, data and explainer from that.

``ExplainSettings`` is stored in ``run.json``; :func:`open_model`, :func:`open_data` and
:func:`make_explainer` rebuild what ``explain`` used, for ``global``, ``evaluate`` and
``report`` as much as for ``explain`` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import one_line
from ..data.files import ImageDataset, open_dataset
from ..data.manifest import manifest_columns
from ..explain import create
from ..explain.base import NeedsGradientsError
from ..models.external import LoadedModel, ModelError, load_model
from ..models.fingerprint import ClassifierMismatchError
from .errors import RunError
from .store import RunStore

__all__ = [
    "CHUNK_BYTES",
    "MAX_CHUNK",
    "TARGETS",
    "ExplainSettings",
    "check_counts",
    "group_names",
    "make_explainer",
    "open_data",
    "open_model",
    "open_run",
    "settings_of",
]

TARGETS = ("predicted", "label")


#: Maps per chunk are capped at this many bytes (float32), and at 64 images.
CHUNK_BYTES = 32 * 2**20


MAX_CHUNK = 64


def check_counts(**values: int | None) -> None:
    """Refuse counts below 1 (None means unset); the RunError names the option."""
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            option = "--" + name.replace("_", "-")
            raise RunError(f"{option} must be a whole number >= 1, got {value}")


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
    another classifier. ``label_column`` names a CSV manifest's class column (None:
    unlabelled data; the default ``"label"`` reads the data as unlabelled when the manifest
    has no such column).
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
    label_column: str | None = "label"
    #: Per-image maps as NIfTI in RUN/maps/: None = for 3D images only (does not change maps).
    nifti_maps: bool | None = None

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
        check_counts(batch_size=self.batch_size, chunk_size=self.chunk_size, limit=self.limit)

    def inputs(self) -> list[str]:
        """The files and folders a run reads (it may not write into any of them)."""
        values = (self.data, self.model, self.model_config, self.explainer_checkpoint)
        return [v for v in values if v is not None]


def open_model(settings: ExplainSettings) -> LoadedModel:
    """The classifier of a run (ModelError on bad files or configs)."""
    return load_model(
        settings.model,
        settings.model_factory,
        config=settings.model_config,
        device=settings.device,
    )


def open_data(
    settings: ExplainSettings,
    model: LoadedModel | None = None,
    log: Callable[[str], Any] | None = None,
) -> ImageDataset:
    """The run's dataset, read as the model's class space.

    Shape and channels default to the model's stated input shape. The model's stated labels
    (two or more) fix the class order: the data may hold any subset of them, by name or by
    index, and a name the model does not know is a DataError naming it. A CSV manifest
    is read as multi-label when the model is a sigmoid model whose every label is a column
    (0/1 each); as unlabelled when ``settings.label_column`` is None, or when it is the
    default ``"label"`` and the manifest has no such column (``log`` gets a notice)."""
    shape, channels = settings.shape, settings.channels
    options: dict[str, Any] = {}
    if model is not None and model.input_shape is not None:
        shape = shape if shape is not None else tuple(model.input_shape[1:])
        channels = channels if channels is not None else model.input_shape[0]
    labels = None if model is None else model.labels
    if labels is not None and len(labels) > 1:
        options["class_names"] = list(labels)
    source = Path(settings.data)
    if source.is_file() and source.suffix.lower() in (".csv", ".tsv", ".txt"):
        options.update(_label_options(settings, model, log))
    return open_dataset(
        settings.data,
        shape=None if shape is None else tuple(shape),
        channels=channels,
        normalise=settings.normalise,
        **options,
    )


def _label_options(
    settings: ExplainSettings, model: LoadedModel | None, log: Callable[[str], Any] | None
) -> dict[str, Any]:
    """How to read the labels of the run's CSV manifest (see :func:`open_data`)."""
    columns = manifest_columns(settings.data)
    labels = None if model is None else model.labels
    if (
        labels is not None
        and len(labels) > 1
        and model is not None
        and model.activation == "sigmoid"
        and all(name in columns for name in labels)
    ):
        return {"labels": list(labels), "class_names": None}
    column = settings.label_column
    if column == "label" and column not in columns:
        if log is not None:
            log(
                f"notice: {settings.data} has no 'label' column (columns: {columns}); the data "
                "is explained as unlabelled (name the class column with --label-column)"
            )
        column = None
    return {"label_column": column}


def make_explainer(settings: ExplainSettings, model: torch.nn.Module):
    params = dict(settings.params)
    params.setdefault("batch_size", settings.batch_size)
    if settings.explainer_checkpoint is not None:
        params["checkpoint"] = settings.explainer_checkpoint
        if settings.force:
            params["force"] = True
    try:
        explainer = create(settings.method, model, **params)
    except KeyError as error:
        raise RunError(str(error).strip("'\"")) from error
    except ClassifierMismatchError as error:
        raise RunError(f"--explainer-checkpoint: {error}") from error
    except NeedsGradientsError as error:  # a gradient method for an ONNX model
        raise RunError(f"--method {settings.method}: {one_line(error)}") from error
    except TypeError as error:
        raise RunError(f"--method {settings.method}: bad --param ({error})") from error
    except ValueError as error:
        raise RunError(f"--method {settings.method}: bad --param: {one_line(error)}") from error
    if getattr(explainer, "fitted", True) is False:
        raise RunError(
            f"--method {settings.method} is a learned explainer: give its checkpoint with "
            f"--explainer-checkpoint (fit one with `medexplain fit`)"
        )
    return explainer


def group_names(dataset: ImageDataset, model: LoadedModel, outputs: int) -> list[str]:
    """Names of the groups, one per model output: the model's labels when it states them
    (the dataset was read in their order, and may hold any subset of them); else the
    dataset's classes, when they are integer indices into the outputs or name each output.
    A one-logit model names its two groups ``not <label>`` and ``<label>``."""
    labels = model.labels or [str(i) for i in range(outputs)]
    if not dataset.labelled:
        return labels if outputs > 1 else [f"not {labels[0]}", labels[0]]
    names = dataset.class_names
    if outputs == 1 and not dataset.multilabel:
        if len(names) != 2:
            raise ModelError(
                f"a one-logit model separates 2 classes but the data has {len(names)} {names}"
            )
        return names
    if len(names) == outputs:
        return names
    indices = [str(i) for i in range(len(names))]
    if not dataset.multilabel and names == indices and len(names) < outputs:
        return labels  # integer labels: a subset of the outputs, by index
    raise ModelError(
        f"the model returns {outputs} output(s) but the data {dataset.manifest.source} has "
        f"{len(names)} classes {names}; state the model's labels (one per output, in output "
        "order) in a model config (--model-config) so the data's classes can be matched to "
        "them, or label the data by output index"
    )


def settings_of(record: dict[str, Any], device: str | None = None) -> ExplainSettings:
    values = dict(record["settings"])
    if values.get("shape") is not None:
        values["shape"] = tuple(values["shape"])
    if device is not None:
        values["device"] = device
    return ExplainSettings(**values)


def open_run(run: str | Path) -> tuple[RunStore, dict[str, Any]]:
    store = RunStore(run)
    return store, store.record()
