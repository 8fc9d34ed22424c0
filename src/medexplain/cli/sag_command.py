"""``sag``: the Structured Attention Graph of one image."""

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
    ShapeOpt,
    app,
    check_out_folder,
    check_param_names,
    console,
    explainer_params,
    fail,
    guard,
    parse_params,
    parse_shape,
)


@app.command()
@guard
def sag(
    image: Annotated[Path, typer.Option(help="One image file (PNG, NIfTI, DICOM, npy).")],
    out: Annotated[Path, typer.Option(help="Output folder for sag.json and sag.png.")],
    model: ModelOpt = None,
    model_factory: FactoryOpt = None,
    model_config: ConfigOpt = None,
    target: Annotated[
        int | None, typer.Option(help="Class index explained (default: the predicted class).")
    ] = None,
    grid: Annotated[int, typer.Option(help="Patches per side (7 in the SAG paper).", min=1)] = 7,
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
    from ..data.files import ImageDataset
    from ..explain.sag import StructuredAttentionGraph, run_sag
    from ..models.external import ModelError, load_model
    from ..report.sag_plot import plot_sag

    check_out_folder(out)
    params = parse_params(param)
    known = explainer_params(StructuredAttentionGraph)
    if known is not None:
        check_param_names(params, known, "sag", {"grid": "--grid", "target": "--target"})
    loaded = load_model(
        None if model is None else str(model),
        model_factory,
        config=None if model_config is None else str(model_config),
        device=device,
    )
    size = parse_shape(shape)
    if size is None and loaded.input_shape is not None:
        size = tuple(loaded.input_shape[1:])
    dataset = ImageDataset.from_paths([str(image)], shape=size, normalise=normalise)
    item, error = dataset.try_get(0)
    if item is None:
        raise fail(error or f"cannot read {image}")
    try:  # a 3D volume for a 2D model, a colour image for a grey one...
        loaded.validate(item["image"][None])
    except ModelError as error:
        read = _described(item["image"])
        raise fail(f"--image {image} (read as {read}): {one_line(error)}") from None
    try:
        result = run_sag(loaded, item["image"], out, target=target, grid=grid, **params)
    except TypeError as error:
        raise fail(f"--param: {one_line(error)}") from None
    except ValueError as error:
        message = one_line(error)
        option = "--grid" if "grid" in message else "--target" if "target" in message else ""
        raise fail(f"{option} {message}".strip()) from None
    plot_sag(result, out / "sag.png")
    console.print(
        f"[green]done[/green]: {len(result.roots)} root(s), {len(result.diverse)} diverse, "
        f"{result.forward_passes} forward passes -> {out / 'sag.json'}, {out / 'sag.png'}"
    )


def _described(image) -> str:
    """``"a 3D image of 1 channel(s), 16 x 16 x 8"`` for an image ``(C, *S)``."""
    spatial = tuple(image.shape[1:])
    sizes = " x ".join(str(n) for n in spatial)
    return f"a {len(spatial)}D image of {image.shape[0]} channel(s), {sizes}"
