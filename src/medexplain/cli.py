"""The ``medexplain`` command line: one Typer app."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="medexplain",
    help="Explain image classifiers, medical images first.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from medexplain import __version__

        typer.echo(f"medexplain {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Explain image classifiers, medical images first."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    dims: Annotated[int, typer.Option(help="2 for 64x64 images, 3 for 32^3 volumes.")] = 2,
    quick: Annotated[bool, typer.Option(help="Fewer images and iterations (~1 min).")] = False,
    methods: Annotated[
        str, typer.Option(help="Comma-separated explainer names (default: the demo's set).")
    ] = "",
    seed: Annotated[int, typer.Option(help="Seed for data, training and explainers.")] = 0,
    device: Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda:0.")] = "cpu",
    warp_seconds: Annotated[
        float | None,
        typer.Option(
            help="Fit a warping simulator for the atrophy class for at most this long "
            "(0: skip; default: 180 s with --dims 3, skipped in 2D)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the whole chain on the built-in aligned benchmark.

    Generates the benchmark (with a corner-marker shortcut in one class), trains a
    classifier, explains the test images with several methods, aggregates label-wise
    global maps, and proves them with PEPPR, deletion/insertion, localization and
    sanity checks. With --dims 3 (or --warp-seconds) it also fits a warping simulator for
    the atrophy class and shows its Jacobian maps. Writes OUT/results.json, OUT/maps/,
    OUT/figures/, OUT/report.html.

    Example: medexplain demo --quick --out runs/quick
    """
    from .demo import DemoSettings, run_demo

    if dims not in (2, 3):
        raise typer.BadParameter("--dims must be 2 or 3")
    settings = DemoSettings.for_run(dims=dims, quick=quick, seed=seed, device=device)
    if warp_seconds is not None:
        if warp_seconds < 0:
            raise typer.BadParameter("--warp-seconds must be >= 0")
        settings.warp_seconds = warp_seconds
    if methods:
        settings.methods = tuple(name.strip() for name in methods.split(",") if name.strip())
    results = run_demo(out, settings, progress=progress)
    console.print(f"[green]done[/green] in {results['wall_seconds']:.0f} s: {out / 'report.html'}")


@app.command("methods")
def list_methods() -> None:
    """List the registered explainers with one-line descriptions."""
    from .explain import available

    table = Table("name", "description")
    for name, description in available().items():
        table.add_row(name, description)
    Console().print(table)


# --------------------------------------------------------------------------- runs on user data

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def _guard(fn):
    """Turn the errors a user causes (bad files, arguments, run folders) into one line on
    stderr and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .data.readers import DataError
        from .models.checkpoint import CheckpointError
        from .models.external import ModelError
        from .runs.errors import RunError

        try:
            return fn(*args, **kwargs)
        except (DataError, ModelError, CheckpointError, RunError) as error:
            raise _fail(_one_line(error)) from None
        except FileNotFoundError as error:
            raise _fail(_one_line(error)) from None

    return wrapper


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_params(values: list[str] | None) -> dict:
    """``key=value`` pairs; values are read as YAML scalars/lists (``n_steps=32``,
    ``baseline=blur``, ``widths=[8,16]``)."""
    import yaml

    params = {}
    for text in values or []:
        if "=" not in text:
            raise typer.BadParameter(f"--param expects key=value, got {text!r}")
        key, value = text.split("=", 1)
        try:
            params[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            params[key.strip()] = value
    return params


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(s) for s in text.lower().replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise typer.BadParameter(
            f"--shape must look like 64,64 or 32x32x32, got {text!r}"
        ) from None
    if len(shape) not in (2, 3):
        raise typer.BadParameter(f"--shape needs 2 or 3 sizes, got {text!r}")
    return shape


ModelOpt = Annotated[
    Path | None,
    typer.Option(help="Model file: TorchScript, state dict (+ --model-factory) or checkpoint."),
]
FactoryOpt = Annotated[
    str | None, typer.Option(help="'module:function' building the network of a state dict.")
]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="Model YAML: labels, activation, input shape/mean/std.")
]
DataOpt = Annotated[Path, typer.Option(help="CSV manifest or folder of images.")]
ShapeOpt = Annotated[
    str | None, typer.Option(help="Resample every image to this shape, e.g. 224,224.")
]
NormaliseOpt = Annotated[
    str, typer.Option(help="Intensity normalisation: none, minmax, zscore, percentile, range.")
]
DeviceOpt = Annotated[str, typer.Option(help="torch device, e.g. cpu or cuda:0.")]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars with ETA.")]


@app.command()
@_guard
def explain(
    data: DataOpt,
    method: Annotated[str, typer.Option(help="Explainer name (see `medexplain methods`).")],
    out: Annotated[Path, typer.Option(help="Run folder (created, or resumed).")],
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    param: Annotated[
        list[str] | None, typer.Option(help="Explainer parameter key=value (repeatable).")
    ] = None,
    explainer_checkpoint: Annotated[
        Path | None, typer.Option(help="Checkpoint of a learned explainer (medexplain fit).")
    ] = None,
    target: Annotated[
        str, typer.Option(help="Class explained: predicted, label, or a class index.")
    ] = "predicted",
    shape: ShapeOpt = None,
    channels: Annotated[int | None, typer.Option(help="1: grey, 3: RGB.")] = None,
    normalise: NormaliseOpt = "none",
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option(help="Images per explainer call.")] = 16,
    chunk_size: Annotated[
        int | None, typer.Option(help="Images per stored chunk (default: up to 64 / 32 MB).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Explain only the first N images.")] = None,
    global_maps: Annotated[
        bool, typer.Option("--global", help="Then compute global maps (label-wise, max, abs).")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace a run in OUT made with other settings (deletes only the files "
            "medexplain wrote there; a folder that is not a run is never touched)."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="Use --explainer-checkpoint even if it was fitted for another classifier."
        ),
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Explain every image of a dataset into a resumable run folder.

    Per-image maps go to OUT/chunks/ (atomic chunks), settings to OUT/run.json, unreadable
    images to OUT/errors.csv. Killed and started again with the same command, the run
    resumes where it stopped; different settings on an existing OUT are refused.

    Example: medexplain explain --model cnn.pt --model-factory lab.nets:cnn --data t1.csv
    --method integrated_gradients --param n_steps=32 --out runs/ad
    """
    from .runs import ExplainSettings, explain_run, global_run

    settings = ExplainSettings(
        data=str(data),
        method=method,
        model=None if model is None else str(model),
        model_factory=model_factory,
        model_config=None if model_config is None else str(model_config),
        params=parse_params(param),
        explainer_checkpoint=None if explainer_checkpoint is None else str(explainer_checkpoint),
        target=target,
        shape=_parse_shape(shape),
        channels=channels,
        normalise=normalise,
        device=device,
        batch_size=batch_size,
        chunk_size=chunk_size,
        limit=limit,
        force=force,
    )
    summary = explain_run(
        settings, out, overwrite=overwrite, progress=progress, log=lambda m: console.print(m)
    )
    if summary["n_done"] == 0:
        raise _fail(
            f"none of the {summary['n_images']} image(s) could be explained; the reasons are "
            f"in {out / 'errors.csv'}"
        )
    colour = "yellow" if summary["n_errors"] else "green"
    console.print(
        f"[{colour}]done[/{colour}]: {summary['n_done']} of {summary['n_images']} image(s) "
        f"explained ({summary['n_computed']} now, {summary['n_errors']} error(s)) in {out}"
    )
    if global_maps:
        _warn_alignment(settings)
        global_run(out, log=lambda m: console.print(m))
        console.print(f"global maps: {out / 'global'}")


def _warn_alignment(settings) -> None:
    from .data.alignment import check_alignment
    from .runs import open_data

    dataset = open_data(settings)
    report = check_alignment(dataset)
    if report.fraction_flagged > 0.1:
        console.print(
            f"[yellow]warning:[/yellow] {report.fraction_flagged:.0%} of the images look "
            "misaligned; global maps assume aligned images (run medexplain check-alignment)"
        )


@app.command("global")
@_guard
def global_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by explain.")],
    by: Annotated[str, typer.Option(help="Groups: label, prediction or outcome.")] = "label",
    normalise: Annotated[str, typer.Option(help="Per-map normalisation: max, mass, none.")] = "max",
    transform: Annotated[str, typer.Option(help="abs, positive or signed.")] = "abs",
    contrast: Annotated[
        str | None, typer.Option(help="Welch t / FDR q maps of group A vs B, as A:B.")
    ] = None,
) -> None:
    """Global maps of a run, streamed from its stored maps.

    Writes RUN/global/ (.npy + index.json, NIfTI for 3D with the scans' affine) and one
    figure per label over the mean image in RUN/figures/. With --contrast A:B also the
    voxel-wise Welch t, p and Benjamini-Hochberg q maps (outcome groups: label/TP).

    Example: medexplain global runs/ad --by label --contrast AD:CN
    """
    from .runs import global_run

    pair = None
    if contrast is not None:
        if contrast.count(":") != 1:
            raise _fail(f"--contrast must be A:B (two group names), got {contrast!r}")
        pair = tuple(contrast.split(":"))
    if normalise not in ("max", "mass", "none"):
        raise _fail(f"--normalise must be max, mass or none, got {normalise!r}")
    if transform not in ("abs", "positive", "signed"):
        raise _fail(f"--transform must be abs, positive or signed, got {transform!r}")
    result = global_run(
        run,
        by=by,
        normalise=normalise,
        transform=transform,
        contrast=pair,
        log=lambda m: console.print(m),
    )
    counts = ", ".join(f"{'/'.join(k)}: {n}" for k, n in result.counts.items())
    console.print(f"[green]done[/green]: {run / 'global'} ({counts})")


@app.command()
@_guard
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run folder written by explain.")],
    peppr: Annotated[bool, typer.Option(help="PEPPR with the global map vs random.")] = False,
    deletion: Annotated[bool, typer.Option(help="Deletion/insertion on a few images.")] = False,
    localization: Annotated[bool, typer.Option(help="Against the manifest's masks.")] = False,
    sanity: Annotated[bool, typer.Option(help="Cascading model randomisation.")] = False,
    labelwise: Annotated[bool, typer.Option(help="PEPPR with each label's own map.")] = False,
    limit: Annotated[int | None, typer.Option(help="PEPPR on the first N images.")] = None,
    n_deletion: Annotated[int, typer.Option(help="Images for deletion/insertion.")] = 16,
    n_sanity: Annotated[int, typer.Option(help="Images for the sanity check.")] = 4,
    steps: Annotated[int, typer.Option(help="PEPPR fractions: steps + 1 points.")] = 20,
    seeds: Annotated[int, typer.Option(help="Random orders for the PEPPR control.")] = 5,
    device: Annotated[str | None, typer.Option(help="torch device (default: the run's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    progress: ProgressOpt = True,
) -> None:
    """Prove a run's explanations: PEPPR, deletion/insertion, localization, sanity.

    Without any flag all four are run. Writes RUN/evaluation.json and RUN/figures/peppr.png.

    Example: medexplain evaluate runs/uwf --peppr --limit 2000
    """
    from .runs import evaluate_run

    everything = not (peppr or deletion or localization or sanity)
    evaluation = evaluate_run(
        run,
        peppr=peppr or everything,
        deletion=deletion or everything,
        localization=localization or everything,
        sanity=sanity or everything,
        labelwise=labelwise,
        limit=limit,
        n_deletion=n_deletion,
        n_sanity=n_sanity,
        peppr_steps=steps,
        peppr_seeds=seeds,
        device=device,
        batch_size=batch_size,
        progress=progress,
    )
    skipped = evaluation.get("localization", {}).get("skipped") if localization else None
    if skipped:
        raise _fail(f"--localization computed nothing: {skipped}")
    if peppr or everything:
        p = evaluation["peppr"]
        console.print(
            f"PEPPR erase area {p['erase_area']:.3f} (random {p['random_erase_area']:.3f}), "
            f"restore area {p['restore_area']:.3f} (random {p['random_restore_area']:.3f})"
        )
    console.print(f"[green]done[/green]: {run / 'evaluation.json'}")


@app.command()
@_guard
def report(run: Annotated[Path, typer.Argument(help="Run folder written by explain.")]) -> None:
    """Self-contained HTML report of a run (settings, global maps, contrast, evaluation).

    Example: medexplain report runs/uwf
    """
    from .runs import report_run

    console.print(f"[green]done[/green]: {report_run(run)}")


@app.command("check-alignment")
@_guard
def check_alignment_command(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Folder for alignment.csv/.png/.json.")] = Path(
        "alignment"
    ),
    template: Annotated[
        Path | None, typer.Option(help="Reference image (default: the dataset mean).")
    ] = None,
    shape: ShapeOpt = None,
    channels: Annotated[int | None, typer.Option(help="1: grey, 3: RGB.")] = None,
    normalise: NormaliseOpt = "none",
    threshold: Annotated[
        float | None, typer.Option(help="Also flag correlations below this.")
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Check that a dataset is aligned: correlate each image with the mean (or a template),
    flag outliers and mirrored images.

    Example: medexplain check-alignment --data uwf.csv --out runs/uwf-alignment
    """
    from .data.alignment import check_alignment
    from .data.files import open_dataset
    from .data.readers import load_image
    from .report.alignment_plot import plot_alignment

    dataset = open_dataset(data, shape=_parse_shape(shape), channels=channels, normalise=normalise)
    reference = None
    if template is not None:
        reference, _ = load_image(template, spatial_dims=dataset.spatial_dims)
    result = check_alignment(dataset, reference, threshold=threshold, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(out / "alignment.csv")
    plot_alignment(result, out / "alignment.png")
    summary = result.summary()
    (out / "alignment.json").write_text(
        json.dumps(summary, indent=2, default=lambda v: None if v != v else str(v))
    )
    console.print(
        f"{len(result.flagged)} of {result.checked} image(s) flagged "
        f"({result.fraction_flagged:.1%}); {len(result.errors)} unreadable; see {out}"
    )


# --------------------------------------------------------------------------- fit

fit_app = typer.Typer(help="Fit a learned explainer and save its checkpoint.", no_args_is_help=True)
app.add_typer(fit_app, name="fit")


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
        from .data.synthetic import make_benchmark
        from .models.cnn import CNNConfig, build_classifier
        from .models.train import train_classifier

        bench = make_benchmark(600, seed=0)
        train, val, _ = bench.split(seed=0)
        net = build_classifier(CNNConfig(num_classes=len(bench.class_names), widths=(8, 16, 32)))
        train_classifier(
            net, train.dataset(), val.dataset(), epochs=8, max_seconds=seconds, device=device
        )
        return net.eval(), train.dataset(), val.dataset()
    if data is None or (model is None and model_factory is None):
        raise _fail("give both --model (or --model-factory) and --data, or neither (benchmark)")
    from .runs import ExplainSettings, open_data, open_model

    settings = ExplainSettings(
        data=str(data),
        method="",
        model=None if model is None else str(model),
        model_factory=model_factory,
        model_config=None if model_config is None else str(model_config),
        shape=_parse_shape(shape),
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


@fit_app.command("similar-adversarial")
@_guard
def fit_similar_adversarial_command(
    out: Annotated[Path, typer.Option(help="Checkpoint file to write.")],
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    data: Annotated[Path | None, typer.Option(help="CSV manifest or folder.")] = None,
    shape: ShapeOpt = None,
    normalise: NormaliseOpt = "none",
    param: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    max_seconds: Annotated[float, typer.Option(help="Training time cap.")] = 300.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: DeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Fit the similar/adversarial generator explainer for a classifier.

    Without --model and --data it fits on the built-in benchmark with a freshly trained
    classifier.

    Example: medexplain fit similar-adversarial --model cnn.pt --data train.csv --out sa.ckpt
    """
    from .explain.generative.similar_adversarial import fit_similar_adversarial

    net, train, val = _fit_inputs(
        model, model_factory, model_config, data, shape, normalise, device, max_seconds
    )
    fit_similar_adversarial(
        net,
        train,
        val,
        out=out,
        max_seconds=max_seconds,
        seed=seed,
        progress=progress,
        **parse_params(param),
    )
    console.print(f"[green]done[/green]: {out}")


@fit_app.command("warp-simulator")
@_guard
def fit_warp_simulator_command(
    out: Annotated[Path, typer.Option(help="Checkpoint file to write.")],
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    data: Annotated[Path | None, typer.Option(help="CSV manifest or folder.")] = None,
    shape: ShapeOpt = None,
    normalise: NormaliseOpt = "none",
    target_class: Annotated[
        int | None, typer.Option(help="Class to inject/remove (default: every class).")
    ] = None,
    param: Annotated[list[str] | None, typer.Option(help="key=value (repeatable).")] = None,
    max_seconds: Annotated[float, typer.Option(help="Training time cap.")] = 300.0,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    device: DeviceOpt = "cpu",
    progress: ProgressOpt = True,
) -> None:
    """Fit the warping simulator explainer (anatomy shrinks/grows) for a classifier.

    Without --model and --data it fits on the built-in benchmark with a freshly trained
    classifier.

    Example: medexplain fit warp-simulator --model cnn3d.pt --model-factory lab.nets:cnn3d
    --data t1.csv --out sim.ckpt
    """
    from .explain.generative.warp_simulator import fit_warp_simulator

    net, train, val = _fit_inputs(
        model, model_factory, model_config, data, shape, normalise, device, max_seconds
    )
    fit_warp_simulator(
        net,
        train,
        val,
        target_class=target_class,
        out=out,
        max_seconds=max_seconds,
        seed=seed,
        progress=progress,
        **parse_params(param),
    )
    console.print(f"[green]done[/green]: {out}")


@app.command()
@_guard
def sag(
    image: Annotated[Path, typer.Option(help="One image file (PNG, NIfTI, DICOM, npy).")],
    out: Annotated[Path, typer.Option(help="Output folder for sag.json and sag.png.")],
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    target: Annotated[
        int | None, typer.Option(help="Class index explained (default: the predicted class).")
    ] = None,
    grid: Annotated[int, typer.Option(help="Patches per side (7 in the SAG paper).")] = 7,
    param: Annotated[
        list[str] | None, typer.Option(help="Further SAG parameter key=value (repeatable).")
    ] = None,
    shape: ShapeOpt = None,
    normalise: NormaliseOpt = "none",
    device: DeviceOpt = "cpu",
) -> None:
    """Structured Attention Graph of one image: several minimal sufficient patch sets.

    Writes OUT/sag.json (roots, diverse subset, graph) and OUT/sag.png.

    Example: medexplain sag --model cxr.ts --image dicoms/p123.dcm --out sag/p123
    """
    from .data.files import ImageDataset
    from .explain.sag import run_sag
    from .models.external import load_model
    from .report.sag_plot import plot_sag

    loaded = load_model(
        None if model is None else str(model),
        model_factory,
        config=None if model_config is None else str(model_config),
        device=device,
    )
    if shape is None and loaded.input_shape is not None:
        shape = ",".join(str(s) for s in loaded.input_shape[1:])
    dataset = ImageDataset.from_paths([str(image)], shape=_parse_shape(shape), normalise=normalise)
    item, error = dataset.try_get(0)
    if item is None:
        raise _fail(error or f"cannot read {image}")
    result = run_sag(loaded, item["image"], out, target=target, grid=grid, **parse_params(param))
    plot_sag(result, out / "sag.png")
    console.print(
        f"[green]done[/green]: {len(result.roots)} root(s), {len(result.diverse)} diverse, "
        f"{result.forward_passes} forward passes -> {out / 'sag.json'}, {out / 'sag.png'}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
