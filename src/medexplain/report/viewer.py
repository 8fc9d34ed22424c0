"""The interactive map viewer of a report page: 8-bit arrays and a small script, inline.

The page stays one self-contained file: the viewer's data (the background image and each
method's group maps, downsampled by block means and quantised to 8 bits) is a JSON block of
base64 strings inside the page, drawn by ``viewer.js`` (plain JavaScript shipped with this
package, inlined into the page) on canvases. Nothing is fetched when the page is viewed.

Volumes ``(X, Y, Z)`` are taken in RAS+ voxel order unless an affine says otherwise
(:func:`axis_letters`); each of the three views fixes one voxel axis and is drawn with the
other two as columns (left to right) and rows (bottom to top), so a RAS volume shows the
axial slice with anterior up and the patient's right on the right (the neurological
convention nilearn uses).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch

__all__ = ["axis_letters", "downsample", "quantise", "view_names", "viewer_html"]

_OPPOSITE = {"R": "L", "L": "R", "A": "P", "P": "A", "S": "I", "I": "S"}
_VIEW_OF = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal"}

#: Bytes of 8-bit data the viewer embeds at most (background + every map of every method).
BUDGET = 6 * 2**20


def axis_letters(affine: np.ndarray | None, ndim: int = 3) -> list[tuple[str, str]]:
    """``(negative end, positive end)`` letter of each voxel axis: from the affine's closest
    axis codes (nibabel), or RAS (``("L", "R"), ("P", "A"), ("I", "S")``) without one."""
    codes: Sequence[str] = ("R", "A", "S")
    if affine is not None and np.isfinite(np.asarray(affine, dtype=float)).all():
        from nibabel.orientations import aff2axcodes

        found = aff2axcodes(np.asarray(affine, dtype=float))
        if all(code in _OPPOSITE for code in found):
            codes = found
    return [(_OPPOSITE[code], code) for code in codes[:ndim]]


def view_names(letters: Sequence[tuple[str, str]]) -> list[str]:
    """The name of the view that fixes each voxel axis: sagittal (the left-right axis),
    coronal (posterior-anterior), axial (inferior-superior)."""
    return [_VIEW_OF.get(positive, "axial") for _, positive in letters]


def downsample(array: np.ndarray, factor: int, rgb: bool = False) -> np.ndarray:
    """Block means over ``factor`` voxels per axis of ``(*S)`` data, or ``(*S, 3)`` with
    ``rgb``; edge blocks are averaged over the voxels they hold (``ceil(n / factor)`` per
    axis)."""
    if factor <= 1:
        return np.asarray(array, dtype=np.float64)
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float64))
    batch = tensor.movedim(-1, 0) if rgb else tensor[None]
    pool = torch.nn.functional.avg_pool3d if batch.ndim == 4 else torch.nn.functional.avg_pool2d
    pooled = pool(batch[None], factor, ceil_mode=True, count_include_pad=False)[0]
    return (pooled.movedim(0, -1) if rgb else pooled[0]).numpy()


def quantise(array: np.ndarray, scale: float, signed: bool) -> np.ndarray:
    """8-bit codes: signed maps ``[-scale, scale] -> [0, 255]`` (0 at 127.5), magnitudes
    ``[0, scale] -> [0, 255]``; values beyond the scale are clipped."""
    scale = scale if scale > 0 else 1.0
    values = np.asarray(array, dtype=np.float64) / scale
    codes = 127.5 + 127.5 * values if signed else 255.0 * values
    return np.clip(np.rint(codes), 0, 255).astype(np.uint8)


def _grey(image: np.ndarray) -> np.ndarray:
    """Background ``(*S)`` or ``(*S, 3)`` to 8 bits between its 1st and 99th percentiles."""
    low, high = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    if high <= low:
        low, high = float(image.min()), float(image.max())
    span = high - low if high > low else 1.0
    return np.clip(np.rint(255 * (image - low) / span), 0, 255).astype(np.uint8)


def _lut(name: str) -> str:
    from matplotlib import colormaps

    table = colormaps[name](np.linspace(0, 1, 256))[:, :3]
    return _b64(np.rint(255 * table).astype(np.uint8))


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _factor(shape: Sequence[int], n_arrays: int, display: int, budget: int) -> int:
    """The smallest block size that keeps ``n_arrays`` arrays within ``budget`` bytes and
    each axis at most ``display`` samples."""
    factor = max(1, math.ceil(max(shape) / display))
    voxels = math.prod(shape)
    while n_arrays * math.prod(math.ceil(n / factor) for n in shape) > budget and factor < max(
        shape
    ):
        factor += 1
    return factor if voxels else 1


def viewer_html(
    background: np.ndarray,
    methods: Mapping[str, tuple[bool, Mapping[str, np.ndarray]]],
    *,
    images: Mapping[str, tuple[np.ndarray, Mapping[str, np.ndarray]]] | None = None,
    affine: np.ndarray | None = None,
    initial_group: str | None = None,
    cut: Sequence[int] | None = None,
    budget: int = BUDGET,
    max_size: int | None = None,
) -> str:
    """The viewer's HTML (controls, canvases, data and script) for maps over one image.

    background: ``(C, *S)`` (RGB when ``C == 3``, else the channel mean in grey);
    methods: name -> (signed, {group name: map ``(*S)``}); every group map of a method
    shares one colour scale (its largest |value|), diverging (``RdBu_r``) when signed,
    sequential (``inferno``) otherwise. images: name -> (image ``(C, *S)``, {method: map
    ``(*S)``}): single images, each a further entry of the group list drawn over its own
    image on its own scale. ``cut``: the voxel the 3D views start at (default the centre).
    Arrays are block-averaged to at most ``max_size`` samples per axis (default 256 for
    images, 128 for volumes) and ``budget`` bytes in all.
    """
    background = np.asarray(background, dtype=np.float64)
    spatial = background.shape[1:]
    ndim = len(spatial)
    rgb = background.shape[0] == 3
    images = images or {}
    n_arrays = sum(len(groups) for _, groups in methods.values()) + (3 if rgb else 1)
    n_arrays += sum(len(maps) + (3 if rgb else 1) for _, maps in images.values())
    max_size = max_size or (128 if ndim == 3 else 256)
    factor = _factor(spatial, n_arrays, max_size, budget)
    encoded = {
        name: _encode(groups, signed, spatial, factor) for name, (signed, groups) in methods.items()
    }
    backgrounds = {}
    for name, (image, maps) in images.items():
        backgrounds[name] = _b64(_background(image, factor, rgb))
        for method, heat in maps.items():
            if method in encoded:
                entry = _encode({name: heat}, encoded[method]["signed"], spatial, factor)
                encoded[method]["groups"][name] = {**entry["groups"][name], "background": name}
    first = next(iter(encoded))
    letters = axis_letters(affine) if ndim == 3 else []
    names = view_names(letters) if ndim == 3 else []
    views = (
        [{"name": names[a], "axis": a} for a in sorted(range(3), key=lambda a: names[a])]
        if ndim == 3
        else [{"name": "image", "axis": None}]
    )
    mean = _background(background, factor, rgb)
    data = {
        "shape": list(mean.shape[:ndim]),
        "rgb": rgb,
        "background": _b64(mean),
        "backgrounds": backgrounds,
        "luts": {"seq": _lut("inferno"), "div": _lut("RdBu_r")},
        "methods": encoded,
        "initial": {
            "method": first,
            "group": initial_group or next(iter(encoded[first]["groups"])),
        },
        "letters": letters,
        "views": views,
        "display": 256 if ndim == 3 else 384,
        "factor": factor,
    }
    if cut is not None and ndim == 3:
        data["cut"] = [min(int(c) // factor, n - 1) for c, n in zip(cut, data["shape"])]
    return _page(data)


def _background(image: np.ndarray, factor: int, rgb: bool) -> np.ndarray:
    """An image ``(C, *S)`` as the viewer draws it: 8-bit ``(*S', 3)`` or ``(*S')``."""
    image = np.asarray(image, dtype=np.float64)
    if rgb and image.shape[0] != 3:
        image = np.repeat(image.mean(axis=0, keepdims=True), 3, axis=0)
    flat = np.moveaxis(image, 0, -1) if rgb else image.mean(axis=0)
    return _grey(downsample(flat, factor, rgb=rgb))


def _encode(
    groups: Mapping[str, np.ndarray], signed: bool, spatial: Sequence[int], factor: int
) -> dict[str, Any]:
    """One method's maps, downsampled and quantised on one scale (their largest |value|):
    ``{"signed", "scale", "groups": {name: {"data": base64, "scale"}}}``."""
    small = {
        g: downsample(np.asarray(m, dtype=np.float64).reshape(spatial), factor)
        for g, m in groups.items()
    }
    scale = max((float(np.abs(m).max()) for m in small.values()), default=1.0) or 1.0
    return {
        "signed": bool(signed),
        "scale": scale,
        "groups": {
            g: {"data": _b64(quantise(m, scale, signed)), "scale": scale} for g, m in small.items()
        },
    }


def _page(data: dict[str, Any]) -> str:
    """The controls, the view area, the data block and the script."""
    factor = data["factor"]
    script = resources.files(__package__).joinpath("viewer.js").read_text(encoding="utf-8")
    payload = json.dumps(data).replace("</", "<\\/")
    note = f"downsampled {factor}x per axis, 8-bit" if factor > 1 else "full resolution, 8-bit"
    return (
        "<div class='mx-viewer' data-mx-viewer>"
        "<div class='mx-controls'>"
        "<label>method <select data-role='method'></select></label> "
        "<label>group <select data-role='group'></select></label> "
        "<label>opacity <input data-role='opacity' type='range' min='0' max='1' step='0.05' "
        "value='0.9'> <span data-role='opacity-value'></span></label> "
        "<label>threshold <input data-role='threshold' type='range' min='0' max='1' "
        "step='0.01' value='0.1'> <span data-role='threshold-value'></span></label>"
        f"<span class='mx-note'> ({html.escape(note)}; click a view to move the crosshair)</span>"
        "</div><div class='mx-views' data-role='views'></div>"
        f"<script type='application/json'>{payload}</script>"
        f"<script>{script}</script></div>"
    )
