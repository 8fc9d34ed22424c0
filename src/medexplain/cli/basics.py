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
    dims: Annotated[int, typer.Option(help="2 for 64x64 images, 3 for 32^3 volumes.")] = 2,
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
    progress: ProgressOpt = True,
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
    from ..demo import DemoSettings, run_demo

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
    from ..explain import available

    table = Table("name", "description")
    for name, description in available().items():
        table.add_row(name, description)
    Console().print(table)
