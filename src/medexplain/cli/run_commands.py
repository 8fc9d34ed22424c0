"""``explain``, ``global``, ``evaluate``, ``report`` and ``check-alignment``: runs on the
user's own data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .app import (
    ChannelsOpt,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    FactoryOpt,
    ModelOpt,
    NormaliseOpt,
    ProgressOpt,
    ShapeOpt,
    app,
    check_device,
    check_out_folder,
    check_param_names,
    console,
    explainer_params,
    fail,
    guard,
    holding,
    parse_params,
    parse_shape,
)

EngineOpt = Annotated[
    str,
    typer.Option(help="local (this process) or ray (Ray actors; pip install 'medexplain[ray]')."),
]
AddressOpt = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster: 'auto' (this node joined it with `ray start`) or ray://HOST:10001 "
        "(default: start a Ray on this machine)."
    ),
]
WorkersOpt = Annotated[
    int | None, typer.Option(help="Ray actors (default: as many as the cluster's CPUs hold).")
]
GpusOpt = Annotated[float, typer.Option(help="GPUs each Ray actor reserves (with --device).")]


def _ray_options(
    engine: str, address: str | None, workers: int | None, gpus: float, device: str | None
):
    """RayOptions for ``--engine ray``, None for the local engine (a usage error names a Ray
    option given without ``--engine ray``, or a GPU device without ``--gpus-per-worker``)."""
    if engine not in ("local", "ray"):
        raise fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "local":
        if address is not None or workers is not None or gpus:
            raise fail("--address, --workers and --gpus-per-worker need --engine ray")
        return None
    from ..runs.ray_engine import RayOptions, import_ray

    import_ray()
    options = RayOptions(address=address, workers=workers, gpus_per_worker=gpus)
    options.check()
    if (device or "").startswith("cuda") and gpus <= 0:
        raise fail(f"--device {device} with --engine ray needs --gpus-per-worker (e.g. 1)")
    return options


def _explain_engines(engine: str, address, workers, gpus: float, device: str):
    """``(engine, accumulator)`` for ``explain_run`` and ``global_run``: the local ones
    (None, ``accumulate``) or Ray's."""
    from ..runs import accumulate

    options = _ray_options(engine, address, workers, gpus, device)
    if options is None:
        return None, accumulate
    from ..runs.ray_engine import RayEngine, ray_accumulator

    return RayEngine(options), ray_accumulator(options)


# Over 80 lines only because Typer declares each of its 20 options in the signature.
@app.command()
@guard
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
    label_column: Annotated[
        str,
        typer.Option(
            help="Class column of a CSV manifest; 'none': unlabelled data (also assumed, with "
            "a notice, when the default 'label' column is absent)."
        ),
    ] = "label",
    shape: ShapeOpt = None,
    channels: ChannelsOpt = None,
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
    nifti_maps: Annotated[
        bool | None,
        typer.Option(
            "--nifti-maps/--no-nifti-maps",
            help="Also write each map as NIfTI in OUT/maps/ (default: for 3D images only).",
        ),
    ] = None,
    progress: ProgressOpt = True,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = 0.0,
) -> None:
    """Explain every image of a dataset into a resumable run folder.

    Per-image maps go to OUT/chunks/ (atomic chunks), settings to OUT/run.json, unreadable
    images to OUT/errors.csv. Killed and started again with the same command, the run
    resumes where it stopped; different settings on an existing OUT are refused.

    Example: medexplain explain --model cnn.pt --model-factory lab.nets:cnn --data t1.csv
    --method integrated_gradients --param n_steps=32 --out runs/ad
    (add --engine ray --address auto to explain on a Ray cluster)
    """
    from ..runs import ExplainSettings, explain_run, global_run

    check_out_folder(out)
    engine_object, accumulator = _explain_engines(engine, address, workers, gpus_per_worker, device)
    params = parse_params(param)
    _check_method_params(method, params)
    settings = ExplainSettings(
        data=str(data),
        method=method,
        model=None if model is None else str(model),
        model_factory=model_factory,
        model_config=None if model_config is None else str(model_config),
        params=params,
        explainer_checkpoint=None if explainer_checkpoint is None else str(explainer_checkpoint),
        target=target,
        shape=parse_shape(shape),
        channels=channels,
        normalise=normalise,
        device=device,
        batch_size=batch_size,
        chunk_size=chunk_size,
        limit=limit,
        force=force,
        label_column=None if label_column.strip().lower() == "none" else label_column,
        nifti_maps=nifti_maps,
    )
    summary = explain_run(
        settings,
        out,
        overwrite=overwrite,
        progress=progress,
        log=lambda m: console.print(m),
        engine=engine_object,
    )
    if summary["n_done"] == 0:
        raise fail(
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
        with holding(out, "global"):
            global_run(out, log=lambda m: console.print(m), accumulator=accumulator)
        console.print(f"global maps: {out / 'global'}")


def _check_method_params(method: str, params: dict) -> None:
    """An unknown ``--param`` name of a registered method, named with its choices."""
    from ..explain import available
    from ..explain.base import explainer_class

    if method not in available():
        return  # a wrapper (augmented:...) or an unknown name: explain reports it
    known = explainer_params(explainer_class(method))
    if known is not None:
        check_param_names(params, known, f"--method {method}")


def _warn_alignment(settings) -> None:
    from ..data.alignment import check_alignment
    from ..runs import open_data

    dataset = open_data(settings)
    report = check_alignment(dataset)
    if report.fraction_flagged > 0.1:
        console.print(
            f"[yellow]warning:[/yellow] {report.fraction_flagged:.0%} of the images look "
            "misaligned; global maps assume aligned images (run medexplain check-alignment)"
        )


@app.command("global")
@guard
def global_command(
    run: Annotated[Path, typer.Argument(help="Run folder written by explain.")],
    by: Annotated[
        str | None,
        typer.Option(
            help="Groups: label, prediction or outcome (default: label; prediction for "
            "unlabelled data)."
        ),
    ] = None,
    normalise: Annotated[str, typer.Option(help="Per-map normalisation: max, mass, none.")] = "max",
    transform: Annotated[str, typer.Option(help="abs, positive or signed.")] = "abs",
    contrast: Annotated[
        str | None, typer.Option(help="Welch t / FDR q maps of group A vs B, as A:B.")
    ] = None,
    mask: Annotated[
        Path | None,
        typer.Option(help="Brain mask (NIfTI or .npy on the maps' grid): the voxels tested."),
    ] = None,
    alpha: Annotated[float, typer.Option(help="FDR level of the contrast, in (0, 1).")] = 0.05,
) -> None:
    """Global maps of a run, streamed from its stored maps.

    Writes RUN/global/ (.npy + index.json, NIfTI for 3D with the scans' affine) and one
    figure per label over the mean image in RUN/figures/. With --contrast A:B also the
    voxel-wise Welch t, p and Benjamini-Hochberg q maps (outcome groups: label/TP).

    Example: medexplain global runs/ad --by label --contrast AD:CN
    """
    from ..runs import global_run

    pair = None
    if contrast is not None:
        if contrast.count(":") != 1:
            raise fail(f"--contrast must be A:B (two group names), got {contrast!r}")
        pair = tuple(contrast.split(":"))
    if normalise not in ("max", "mass", "none"):
        raise fail(f"--normalise must be max, mass or none, got {normalise!r}")
    if transform not in ("abs", "positive", "signed"):
        raise fail(f"--transform must be abs, positive or signed, got {transform!r}")
    with holding(run, "global"):
        result = global_run(
            run,
            by=by,
            normalise=normalise,
            transform=transform,
            contrast=pair,
            mask=mask,
            alpha=alpha,
            log=lambda m: console.print(m),
        )
    counts = ", ".join(f"{'/'.join(k)}: {n}" for k, n in result.counts.items())
    console.print(f"[green]done[/green]: {run / 'global'} ({counts})")
    if (run / "global" / "xnn").is_dir():
        console.print(f"x-feature global maps and mean contributions: {run / 'global' / 'xnn'}")


#: The PEPPR areas ``evaluate`` prints.
AREAS = ("erase_area", "random_erase_area", "restore_area", "random_restore_area")


@app.command()
@guard
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
    device: Annotated[
        str | None, typer.Option(help="torch device (default: the run's).", callback=check_device)
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    progress: ProgressOpt = True,
    engine: EngineOpt = "local",
    address: AddressOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusOpt = 0.0,
) -> None:
    """Prove a run's explanations: PEPPR, deletion/insertion, localization, sanity.

    Without any flag all four are run. Writes RUN/evaluation.json and RUN/figures/peppr.png.

    Example: medexplain evaluate runs/uwf --peppr --limit 2000
    (--engine ray: PEPPR's and deletion's forward passes on Ray workers)
    """
    from ..runs import evaluate_run

    ray_options = _ray_options(engine, address, workers, gpus_per_worker, device)
    forward = None
    if ray_options is not None:
        from ..runs.ray_engine import ray_forward

        forward = ray_forward(ray_options)
    everything = not (peppr or deletion or localization or sanity)
    with holding(run, "evaluate"):
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
            forward=forward,
        )
    skipped = evaluation.get("localization", {}).get("skipped") if localization else None
    if skipped:
        raise fail(f"--localization computed nothing: {skipped}")
    if peppr or everything:
        section, metric = evaluation["peppr"], "AUC"
        if section["erase_area"] is None:  # one class only: the AUC is undefined
            section, metric = section["accuracy"], "accuracy"
        p = {k: "n/a" if v is None else f"{v:.3f}" for k, v in section.items() if k in AREAS}
        console.print(
            f"PEPPR ({metric}) erase area {p['erase_area']} (random {p['random_erase_area']}), "
            f"restore area {p['restore_area']} (random {p['random_restore_area']})"
        )
    console.print(f"[green]done[/green]: {run / 'evaluation.json'}")


@app.command()
@guard
def report(run: Annotated[Path, typer.Argument(help="Run folder written by explain.")]) -> None:
    """Self-contained HTML report of a run: predictions, examples, global maps by label,
    prediction and outcome, evaluation checks, an interactive viewer (3D: three views).

    Example: medexplain report runs/uwf
    """
    from ..runs import report_run

    console.print(f"[green]done[/green]: {report_run(run)}")


@app.command("check-alignment")
@guard
def check_alignment_command(
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Folder for alignment.csv/.png/.json.")] = Path(
        "alignment"
    ),
    template: Annotated[
        Path | None, typer.Option(help="Reference image (default: the dataset mean).")
    ] = None,
    shape: ShapeOpt = None,
    channels: ChannelsOpt = None,
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
    from ..core.serialise import json_safe
    from ..data.alignment import check_alignment
    from ..data.files import open_dataset
    from ..data.readers import load_image
    from ..report.alignment_plot import plot_alignment

    check_out_folder(out)
    dataset = open_dataset(data, shape=parse_shape(shape), channels=channels, normalise=normalise)
    reference = None
    if template is not None:
        reference, _ = load_image(template, spatial_dims=dataset.spatial_dims)
    result = check_alignment(dataset, reference, threshold=threshold, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(out / "alignment.csv")
    plot_alignment(result, out / "alignment.png")
    summary = result.summary()
    (out / "alignment.json").write_text(json.dumps(json_safe(summary), indent=2))
    console.print(
        f"{len(result.flagged)} of {result.checked} image(s) flagged "
        f"({result.fraction_flagged:.1%}); {len(result.errors)} unreadable; see {out}"
    )
