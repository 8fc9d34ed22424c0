"""``fit``: learned explainers fitted on the user's data (or the benchmark)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..core.errors import one_line
from .app import (
    ConfigOpt,
    DeviceOpt,
    FactoryOpt,
    ModelOpt,
    NormaliseOpt,
    ProgressOpt,
    ShapeOpt,
    app,
    check_out_file,
    check_param_names,
    console,
    fail,
    guard,
    parse_params,
    parse_shape,
)

# --------------------------------------------------------------------------- fit

fit_app = typer.Typer(help="Fit a learned explainer and save its checkpoint.", no_args_is_help=True)
app.add_typer(fit_app, name="fit")


# The options every fit command shares.
CheckpointOutOpt = Annotated[Path, typer.Option(help="Checkpoint file to write.")]
FitDataOpt = Annotated[Path | None, typer.Option(help="CSV manifest or folder.")]
ParamOpt = Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")]
MaxSecondsOpt = Annotated[float, typer.Option(help="Training time cap.", min=0)]
SeedOpt = Annotated[int, typer.Option(help="Seed.")]


class _ImagesLabels:
    """(image, label) items of an ImageDataset, for the fitting loops' DataLoaders."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return item["image"], item["label"]


def _fit_inputs(model, model_factory, model_config, data, shape, normalise, device, seconds):
    """(model, train, val) from the user's files, or the built-in benchmark + a freshly
    trained classifier when neither --model nor --data is given."""
    import torch

    if model is None and model_factory is None and data is None:
        from ..data.synthetic import make_benchmark
        from ..models.cnn import CNNConfig, build_classifier
        from ..models.train import train_classifier

        bench = make_benchmark(600, seed=0)
        train, val, _ = bench.split(seed=0)
        net = build_classifier(CNNConfig(num_classes=len(bench.class_names), widths=(8, 16, 32)))
        train_classifier(
            net, train.dataset(), val.dataset(), epochs=8, max_seconds=seconds, device=device
        )
        return net.eval(), train.dataset(), val.dataset()
    if data is None or (model is None and model_factory is None):
        raise fail("give both --model (or --model-factory) and --data, or neither (benchmark)")
    from ..runs import ExplainSettings, open_data, open_model

    settings = ExplainSettings(
        data=str(data),
        method="",
        model=None if model is None else str(model),
        model_factory=model_factory,
        model_config=None if model_config is None else str(model_config),
        shape=parse_shape(shape),
        normalise=normalise,
        device=device,
    )
    loaded = open_model(settings)
    dataset = open_data(settings, loaded)
    n_val = max(1, len(dataset) // 10)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    from torch.utils.data import Subset

    items = _ImagesLabels(dataset)
    return loaded, Subset(items, order[n_val:]), Subset(items, order[:n_val])


#: Explainer keywords that ``fit`` sets from its own options.
_OPTIONS = {"max_seconds": "--max-seconds", "seed": "--seed", "target_class": "--target-class"}


def _check_param_names(params: dict, known: set[str], command: str) -> None:
    """Refuse a ``--param`` name the explainer does not take, before anything is loaded."""
    options = {k: v for k, v in _OPTIONS.items() if k in known}
    check_param_names(params, known - {"seed"}, f"fit {command}", options)


def _built(command: str, build):
    """``build()``, its TypeError/ValueError (a bad ``--param`` value) as one line."""
    try:
        return build()
    except (TypeError, ValueError) as error:
        raise fail(f"--param (fit {command}): {one_line(error)}") from None


@fit_app.command("similar-adversarial")
@guard
def fit_similar_adversarial_command(
    out: CheckpointOutOpt,
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    data: FitDataOpt = None,
    shape: ShapeOpt = None,
    normalise: NormaliseOpt = "none",
    param: ParamOpt = None,
    max_seconds: MaxSecondsOpt = 300.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Fit the similar/adversarial generator explainer for a classifier.

    Without --model and --data it fits on the built-in benchmark with a freshly trained
    classifier.

    Example: medexplain fit similar-adversarial --model cnn.pt --data train.csv --out sa.ckpt
    """
    import inspect

    from ..explain.generative.similar_adversarial import SimilarAdversarial

    check_out_file(out)
    params = parse_params(param)
    known = set(inspect.signature(SimilarAdversarial).parameters) - {"model", "generator"}
    _check_param_names(params, known - {"checkpoint", "force"}, "similar-adversarial")
    net, train, val = _fit_inputs(
        model, model_factory, model_config, data, shape, normalise, device, max_seconds
    )
    explainer = _built(
        "similar-adversarial",
        lambda: SimilarAdversarial(net, max_seconds=max_seconds, seed=seed, **params),
    )
    explainer.fit(train, val, progress=progress, out=out)
    console.print(f"[green]done[/green]: {out}")


@fit_app.command("warp-simulator")
@guard
def fit_warp_simulator_command(
    out: CheckpointOutOpt,
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    data: FitDataOpt = None,
    shape: ShapeOpt = None,
    normalise: NormaliseOpt = "none",
    target_class: Annotated[
        int | None, typer.Option(help="Class to inject/remove (default: every class).")
    ] = None,
    param: ParamOpt = None,
    max_seconds: MaxSecondsOpt = 300.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Fit the warping simulator explainer (anatomy shrinks/grows) for a classifier.

    Without --model and --data it fits on the built-in benchmark with a freshly trained
    classifier.

    Example: medexplain fit warp-simulator --model cnn3d.pt --model-factory lab.nets:cnn3d
    --data t1.csv --out sim.ckpt
    """
    from dataclasses import fields

    from ..explain.generative.warp_network import WarpSimulatorConfig
    from ..explain.generative.warp_simulator import WarpFitConfig, WarpSimulatorExplainer

    check_out_file(out)
    params = parse_params(param)
    known = {f.name for f in (*fields(WarpSimulatorConfig), *fields(WarpFitConfig))}
    _check_param_names(params, known | {"batch_size"}, "warp-simulator")
    net, train, val = _fit_inputs(
        model, model_factory, model_config, data, shape, normalise, device, max_seconds
    )
    explainer = _built(
        "warp-simulator",
        lambda: WarpSimulatorExplainer(
            net, target_class=target_class, max_seconds=max_seconds, seed=seed, **params
        ),
    )
    explainer.fit(train, val, progress=progress)
    explainer.save(out)
    console.print(f"[green]done[/green]: {out}")


@fit_app.command("xnn")
@guard
def fit_xnn_command(
    out: CheckpointOutOpt,
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    data: FitDataOpt = None,
    shape: ShapeOpt = None,
    normalise: NormaliseOpt = "none",
    layer: Annotated[
        str | None,
        typer.Option(help="Module to embed (default: the pooled features entering the head)."),
    ] = None,
    k: Annotated[int, typer.Option(help="Number of x-features.", min=1)] = 5,
    param: ParamOpt = None,
    max_seconds: MaxSecondsOpt = 180.0,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Fit XNN: a few x-features of one layer from which a linear head reproduces the logits.

    Without --model and --data it fits on the built-in benchmark with a freshly trained
    classifier.

    Example: medexplain fit xnn --model cnn.pt --data train.csv --k 5 --out xnn.ckpt
    """
    import inspect
    from dataclasses import fields

    from ..explain.generative.xnn import XNNExplainer, XNNFitConfig

    check_out_file(out)
    params = parse_params(param)
    known = set(inspect.signature(XNNExplainer).parameters) - {"model", "params", "checkpoint"}
    known = (known | {f.name for f in fields(XNNFitConfig)}) - {"force"}
    for name, option in (("layer", "--layer"), ("k", "--k")):
        if name in params:
            raise fail(f"--param {name}: use the option {option} of fit xnn")
    _check_param_names(params, known, "xnn")
    net, train, val = _fit_inputs(
        model, model_factory, model_config, data, shape, normalise, device, max_seconds
    )
    explainer = _built(
        "xnn",
        lambda: XNNExplainer(net, k=k, layer=layer, max_seconds=max_seconds, seed=seed, **params),
    )
    try:
        explainer.fit(train, val, progress=progress)
    except ValueError as error:  # a --layer that is not a module of the model
        raise fail(f"--layer: {one_line(error)}") from None
    explainer.save(out)
    console.print(f"[green]done[/green]: {out}")
