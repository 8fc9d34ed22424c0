"""``demo`` and ``methods``: the built-in benchmark end to end, and the explainers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .app import DeviceOpt, ProgressOpt, app, console


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("runs/demo"),
    dims: Annotated[
        int | None,
        typer.Option(
            help="2 for 64x64 images, 3 for 32^3 volumes (default 2; the brain cohort: 3, "
            "its 4 mm volumes, or 2, the axial slice through the hippocampi)."
        ),
    ] = None,
    quick: Annotated[
        bool, typer.Option(help="Fewer images and iterations, for a first look.")
    ] = False,
    methods: Annotated[
        str, typer.Option(help="Comma-separated explainer names (default: the demo's set).")
    ] = "",
    seed: Annotated[int, typer.Option(help="Seed for data, training and explainers.")] = 0,
    device: DeviceOpt = "cpu",
    warp_seconds: Annotated[
        float | None,
        typer.Option(
            help="Fit a warping simulator for the atrophy class for at most this long "
            "(0: skip; default: 180 s with --dims 3, skipped in 2D)."
        ),
    ] = None,
    cohort: Annotated[
        str | None,
        typer.Option(
            help="Run on a realistic cohort instead of the geometric benchmark: brain "
            "(MNI152 MRI, 3D; --dims 2 for the axial slice), retina (colour fundus) or chest "
            "(radiographs on real lung masks), with a MONAI DenseNet."
        ),
    ] = None,
    progress: ProgressOpt = True,
) -> None:
    """Run the whole chain on the built-in aligned benchmark or a realistic cohort.

    Generates the benchmark (with a corner-marker shortcut in one class), trains a
    classifier, explains the test images with several methods, aggregates label-wise
    global maps, and proves them with PEPPR, deletion/insertion, localization and
    sanity checks. With --dims 3 (or --warp-seconds) it also fits a warping simulator for
    the atrophy class and shows its Jacobian maps. Writes OUT/results.json, OUT/maps/,
    OUT/figures/, OUT/report.html.

    With --cohort brain|retina|chest the same chain runs on images of real anatomy with
    known evidence (the brain cohort fits the warping simulator for atrophy, the retina
    cohort the similar/adversarial generator); each takes up to 15 minutes on two CPU cores.

    Example: medexplain demo --quick --out runs/quick
    """
    from ..demo import COHORTS, DemoSettings, run_demo

    if dims is None:
        dims = 3 if cohort == "brain" else 2
    if dims not in (2, 3):
        raise typer.BadParameter("--dims must be 2 or 3")
    if cohort is not None and cohort not in COHORTS:
        raise typer.BadParameter(f"--cohort must be one of {', '.join(COHORTS)}, got {cohort!r}")
    if cohort is not None and cohort != "brain" and dims != 2:
        raise typer.BadParameter(f"--dims 3 applies to the brain cohort only, not {cohort!r}")
    settings = DemoSettings.for_run(dims=dims, quick=quick, cohort=cohort, seed=seed, device=device)
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
    from ..explain import available

    table = Table("name", "description")
    for name, description in available().items():
        table.add_row(name, description)
    Console().print(table)
