"""What a run was asked, and opening its model, data and explainer from that.

``ExplainSettings`` is stored in ``run.json``; :func:`open_model`, :func:`open_data` and
:func:`make_explainer` rebuild what ``explain`` used, for ``global``, ``evaluate`` and
``report`` as much as for ``explain`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..core.errors import one_line
from ..data.files import ImageDataset, open_dataset
from ..explain import create
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
